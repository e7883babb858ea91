"""The one contract every step of the flow follows, and the named noise source.

Every step is a :class:`Transform`::

    forward(x, context=None, noise=None) -> (z, delta_logp)     # data -> latent
    inverse(z, context=None, noise=None) -> x                   # latent -> data

``delta_logp`` has shape ``(B,)`` and is the step's contribution to the per-sample
log-likelihood estimate ``log p̂(x) = log p_base(z_L) + Σ delta_logp``: ``log|det J|`` for a
bijection, ``log|det J| - log q(noise)`` for a stochastic step, the log-density of the
factored-out half for a transition. ``context`` conditions a step (the dequantizer's couplings,
the cross-unit noise nets); ``noise`` is a :class:`Noise` that stochastic steps draw their
standard-normal variables from, by name. Deterministic steps ignore both.

A step computes in its input's dtype: given float64 inputs, a float32 step casts its parameters
(and its network's, :meth:`~denseflow.nets.runner.NetRunner.run_net`) up for that call, which is
how a float32 model encodes and decodes exactly (:meth:`~denseflow.model.DenseFlow.encode`).
With inputs of the parameters' own dtype every cast is a no-op and nothing changes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import Tensor, nn

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def capturing(t: Tensor) -> bool:
    """Whether a CUDA graph is being captured on the current stream (``t`` on a GPU): values
    cannot be read on the host, and what is computed is replayed later on other values."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def standard_normal(
    shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device
) -> Tensor:
    """A fresh float32 standard normal, from ``generator`` on its device (or from ``device``'s
    default generator): how every named noise is drawn, whatever the working dtype, so that a
    float64 pass or a graph's pre-drawn buffers see the same values."""
    where = device if generator is None else generator.device
    return torch.randn(shape, generator=generator, device=where, dtype=torch.float32)


def sum_except_batch(x: Tensor) -> Tensor:
    """Sum over every axis but the first: (B, ...) -> (B,)."""
    return x.reshape(x.shape[0], -1).sum(1)


def bounded_log_scale(s: Tensor) -> Tensor:
    """``2·tanh(s/2)``: a raw network output ``s`` as a log-scale in (-2, 2) (spec §6.3, §5).

    The affine couplings and the cross-unit noise bound every log-scale this way, so a scale
    lies in (e⁻², e²) whatever the network outputs; near 0 it is the identity (slope 1).
    """
    return 2 * torch.tanh(s / 2)


def std_normal_log_prob(x: Tensor) -> Tensor:
    """log N(x; 0, I) per sample, (B, ...) -> (B,)."""
    return sum_except_batch(-0.5 * x.square() - HALF_LOG_2PI)


#: the draws :func:`recorded_draws` is collecting, or None (a plain global, as in
#: :mod:`denseflow.nets.recompute`: read once per draw, never inside a compiled net)
_recording: list[tuple[torch.Generator | None, str, tuple[int, ...]]] | None = None


@contextmanager
def recorded_draws() -> Iterator[list[tuple[torch.Generator | None, str, tuple[int, ...]]]]:
    """Inside the block, every standard normal a :class:`Noise` draws fresh (not given) is
    appended to the yielded list as ``(generator, name, shape)``, in the order drawn.

    :class:`denseflow.graph.GraphedStep` records one eager step this way and afterwards draws the
    same tensors from the same generators itself, before the step, into static buffers.
    """
    global _recording
    previous, _recording = _recording, []
    try:
        yield _recording
    finally:
        _recording = previous


class Noise:
    """Named standard-normal variables for the stochastic steps.

    A step asks for ``draw(name, shape, like)``; a tensor given under that name is used (cast to
    ``like``'s dtype and device, shape checked), otherwise a fresh one is drawn in float32 from
    ``generator`` (or the global generator) and cast. Names are those of
    ``../shared/parity/A/FORMAT.md``: ``dequant.eta``, ``block{s}.unit{i}.eta``,
    ``transition{t}.eta``, ``base.eta``.
    ``temperature`` scales the draws of sampling (base and transitions) only.
    """

    def __init__(
        self,
        named: Mapping[str, Tensor] | None = None,
        generator: torch.Generator | None = None,
        temperature: float = 1.0,
    ) -> None:
        self.named = dict(named or {})
        self.generator = generator
        self.temperature = float(temperature)

    def draw(self, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """Standard-normal ``name`` of ``shape``, given or drawn, on ``like``'s device and dtype."""
        given = self.named.get(name)
        if given is not None:
            if tuple(given.shape) != tuple(shape):
                raise ValueError(
                    f"noise {name!r} has shape {tuple(given.shape)}, expected {tuple(shape)}"
                )
            return given.to(device=like.device, dtype=like.dtype)
        if _recording is not None:
            _recording.append((self.generator, name, tuple(shape)))
        out = standard_normal(shape, self.generator, like.device)
        return out.to(device=like.device, dtype=like.dtype)


class Transform(nn.Module):
    """Base class of every step; see the module docstring for the contract."""

    def forward(
        self, x: Tensor, context: Tensor | None = None, noise: Noise | None = None
    ) -> tuple[Tensor, Tensor]:
        """Data -> latent: ``(z, delta_logp)``, ``delta_logp`` of shape ``(B,)``."""
        raise NotImplementedError

    def inverse(
        self, z: Tensor, context: Tensor | None = None, noise: Noise | None = None
    ) -> Tensor:
        """Latent -> data (the left inverse for a stochastic step)."""
        raise NotImplementedError


class FlowSequence(Transform):
    """Steps applied in order; ``delta_logp`` is the sum of theirs, the inverse runs backwards.

    Steps given as a mapping keep their names (``actnorm``, ``conv1x1`` …) in the state dict.
    """

    def __init__(self, steps: Iterable[Transform] | Mapping[str, Transform]) -> None:
        super().__init__()
        items = steps.items() if isinstance(steps, Mapping) else enumerate(steps)
        for name, step in items:
            self.add_module(str(name), step)

    def __getitem__(self, index: int) -> Transform:
        return list(self.children())[index]

    def __len__(self) -> int:
        return len(self._modules)

    def forward(
        self, x: Tensor, context: Tensor | None = None, noise: Noise | None = None
    ) -> tuple[Tensor, Tensor]:
        total = None  # the first step's own: no zeros made and added (two kernels a sequence)
        for step in self.children():
            x, delta = step(x, context, noise)
            total = delta if total is None else total + delta
        return x, x.new_zeros(x.shape[0]) if total is None else total

    def inverse(
        self, z: Tensor, context: Tensor | None = None, noise: Noise | None = None
    ) -> Tensor:
        for step in reversed(list(self.children())):
            z = step.inverse(z, context, noise)
        return z


class DiagonalGaussian(nn.Module):
    """Gaussian with a learned mean and log-scale per channel, shape ``(1, C, 1, 1)``, init N(0, 1).

    The model's base distribution (spec §9) and the dequantizer's base (spec §4).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.log_scale = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def log_prob(self, z: Tensor) -> Tensor:
        """Σ log N(z; μ_c, σ_c) per sample, (B, C, H, W) -> (B,)."""
        loc, log_scale = self.loc.to(z.dtype), self.log_scale.to(z.dtype)
        eta = (z - loc) * torch.exp(-log_scale)
        return sum_except_batch(-0.5 * eta.square() - log_scale - HALF_LOG_2PI)

    def sample(self, eta: Tensor) -> Tensor:
        """μ_c + σ_c · eta for standard-normal ``eta``, in ``eta``'s dtype."""
        return self.loc.to(eta.dtype) + torch.exp(self.log_scale.to(eta.dtype)) * eta
