"""How the steps run their conditioner networks: precision and compilation.

Mixed precision (``train.precision="bfloat16"``): the coupling, cross-unit noise and dequantizer
networks run under autocast; their outputs come back in float32, so the bounds
(``2·tanh(s/2)``), exponentials, log-determinants, the 1x1 convolutions and their inverses, the
base densities and the bits/dim stay float32.

In :class:`denseflow.graph.GraphedStep` the networks' convolution weights are cast once a step
for all networks together (:attr:`NetRunner.net_weights`) instead of once per weight by
autocast: the same values, a few kernels instead of two per weight (forward and backward).

Compiled networks (``train.compile``): nets of one class share their compiled code, each
distinct input shape being one recompilation of it, so while a compiled net runs (in the forward
pass, or recomputed in the backward pass in low-memory mode) dynamo's recompile limit is raised
to four per net (training, recomputation, evaluation and sampling graphs); the process-wide
setting is restored after each call.

Wider inputs (the exact encode/decode of :class:`~denseflow.model.DenseFlow`): a float64 input
to a net whose parameters are float32 runs the net in float64 on float64 copies of its
parameters and buffers, made for that call (``torch.func.functional_call``; nothing is stored,
so there is nothing to invalidate when the parameters change).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from contextlib import nullcontext

import torch
from torch import Tensor, nn


def at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32 if it is a 16-bit float (float32 and float64 pass unchanged)."""
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


def widened_state(net: nn.Module, dtype: torch.dtype) -> dict[str, Tensor] | None:
    """``net``'s parameters and buffers with every floating one in ``dtype``, or None when they
    all are already (integer buffers, e.g. BatchNorm's batch count, stay as they are)."""
    state = dict(itertools.chain(net.named_parameters(), net.named_buffers()))
    if all(not t.is_floating_point() or t.dtype == dtype for t in state.values()):
        return None
    return {k: t.to(dtype) if t.is_floating_point() else t for k, t in state.items()}


class NetRunner:
    """Mixin of the steps that run a network. ``net_dtype`` (None = float32) is set by
    :meth:`denseflow.model.DenseFlow.set_net_precision`, ``recompile_limit`` (0 = not compiled)
    by :meth:`denseflow.model.DenseFlow.compile_nets`."""

    net_dtype: torch.dtype | None = None
    recompile_limit: int = 0
    #: The convolution weights already in ``net_dtype`` for the pass under way, by ``id`` of the
    #: parameter (set by :class:`denseflow.graph.GraphedStep` around its passes); None: autocast
    #: casts each weight where it is used. The same values either way.
    net_weights: Mapping[int, Tensor] | None = None

    def run_net(self, net: nn.Module, *args: torch.Tensor):
        """``net(*args)`` in the step's precision, outputs in float32 or wider; in float64 with
        float64 copies of the net's parameters when ``args[0]`` is float64 (module docstring)."""
        with self._compile_limit():
            if args[0].dtype == torch.float64:
                state = widened_state(net, torch.float64)
                if state is not None:
                    return torch.func.functional_call(net, state, args)
            if self.net_dtype is None:
                return net(*args)
            with torch.autocast(args[0].device.type, dtype=self.net_dtype):
                cast = self.net_weights
                if cast is None:
                    out = net(*args)
                else:
                    weights = {k: cast[id(p)] for k, p in net.named_parameters() if id(p) in cast}
                    out = torch.func.functional_call(net, weights, args, tie_weights=False)
        return (
            tuple(map(at_least_float32, out)) if isinstance(out, tuple) else at_least_float32(out)
        )

    def _compile_limit(self):
        if not self.recompile_limit:
            return nullcontext()
        limit = max(torch._dynamo.config.recompile_limit, self.recompile_limit)
        return torch._dynamo.config.patch(recompile_limit=limit)
