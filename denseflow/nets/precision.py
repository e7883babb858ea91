"""Mixed precision for the conditioner networks only (``train.precision="bfloat16"``).

The coupling, cross-unit noise and dequantizer networks run under autocast; their outputs come
back in float32, so the bounds (``2·tanh(s/2)``), exponentials, log-determinants, the 1x1
convolutions and their inverses, the base densities and the bits/dim stay float32.
"""

from __future__ import annotations

import torch
from torch import nn


def at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32 if it is a 16-bit float (float32 and float64 pass unchanged)."""
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


class NetPrecision:
    """Mixin of the steps that call a network: ``net_dtype`` (None = float32) is set by
    :meth:`denseflow.model.DenseFlow.set_net_precision`."""

    net_dtype: torch.dtype | None = None

    def run_net(self, net: nn.Module, *args: torch.Tensor):
        if self.net_dtype is None:
            return net(*args)
        with torch.autocast(args[0].device.type, dtype=self.net_dtype):
            out = net(*args)
        return tuple(map(at_least_float32, out)) if isinstance(out, tuple) else at_least_float32(out)
