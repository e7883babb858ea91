"""Dequantization (spec §4): integer images ``x`` -> continuous ``z = (x + u) / 2^bits`` in (0, 1).

``delta_logp = −D·bits·log 2 − log q(u|x)``, so that the model's total is the ELBO of the discrete
likelihood. The inverse quantises: ``clamp(floor(2^bits · z), 0, 2^bits − 1)``, a NaN ``z`` (a
latent that overflowed, e.g. sampled at an enormous temperature) to 0, so every value it returns
is a pixel value.

The input is integers, so unlike the other steps a dequantizer cannot read its working dtype
from its input: ``forward`` takes it as ``dtype`` (default: the parameters'), float64 for the
model's exact encode.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..nets.coupling import ContextNet, DequantCouplingNet
from ..nets.runner import NetRunner
from .base import DiagonalGaussian, FlowSequence, Noise, Transform
from .glow import AffineCoupling, Conv1x1, Conv1x1LU, Sigmoid, Unsqueeze


class Dequantization(Transform):
    """Shared part: the bin width and the quantising inverse."""

    def __init__(self, num_bits: int) -> None:
        super().__init__()
        self.num_bits = num_bits

    def _bound_terms(self, x: Tensor, u: Tensor, log_q: Tensor) -> tuple[Tensor, Tensor]:
        levels = 2**self.num_bits
        z = (x.to(u.dtype) + u) / levels
        return z, -(x[0].numel() * math.log(levels)) - log_q

    def inverse(
        self, z: Tensor, context: Tensor | None = None, noise: Noise | None = None
    ) -> Tensor:
        levels = 2**self.num_bits
        return torch.floor(levels * z).nan_to_num(0.0).clamp(0, levels - 1).long()


class UniformDequantization(Dequantization):
    """``u ~ U(0, 1)^D`` (``u = Φ(η)`` of the standard-normal draw ``dequant.eta``),
    ``log q = 0``."""

    def __init__(self, num_bits: int) -> None:
        super().__init__(num_bits)
        self.register_buffer("dtype_anchor", torch.zeros(()), persistent=False)

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        noise: Noise | None = None,
        dtype: torch.dtype | None = None,
    ) -> tuple[Tensor, Tensor]:
        like = self.dtype_anchor.to(dtype or self.dtype_anchor.dtype)
        eta = (noise or Noise()).draw("dequant.eta", tuple(x.shape), like=like)
        u = torch.special.ndtr(eta)
        return self._bound_terms(x, u, u.new_zeros(x.shape[0]))


class VariationalDequantization(NetRunner, Dequantization):
    """Flow++-style ``q(u|x)``: a conditional flow from Gaussian noise to ``u ∈ (0, 1)^D``
    (spec §4).

    ``ε = μ_d + σ_d·η`` on ``(4C, H/2, W/2)``; ``steps`` × [1x1 conv, affine coupling conditioned
    on the context ``h = c(x)``], one more 1x1 conv, un-squeeze, sigmoid -> ``u``.
    ``log q(u|x) = log N(ε; μ_d, σ_d) − Σ log-dets``.
    """

    def __init__(
        self,
        channels: int,
        num_bits: int = 8,
        width: int = 64,
        steps: int = 4,
        depth: int = 4,
        growth: int = 64,
        context_growth: int = 16,
        conv1x1: str = "full",
    ) -> None:
        super().__init__(num_bits)
        c = 4 * channels
        conv = Conv1x1LU if conv1x1 == "lu" else Conv1x1
        self.context_net = ContextNet(channels, width, depth, context_growth, num_bits)
        self.base = DiagonalGaussian(c)
        flow: list[Transform] = []
        for _ in range(steps):
            net = DequantCouplingNet((c + 1) // 2 + width, 2 * (c // 2), width, depth, growth)
            flow += [conv(c), AffineCoupling(net)]
        self.flow = FlowSequence([*flow, conv(c), Unsqueeze(), Sigmoid()])

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        noise: Noise | None = None,
        dtype: torch.dtype | None = None,
    ) -> tuple[Tensor, Tensor]:
        # integers 0 .. 2^bits − 1 are exact in any float dtype; the context net runs in dtype
        h = self.run_net(self.context_net, x.to(dtype or self.base.loc.dtype))
        eta = (noise or Noise()).draw(
            "dequant.eta", (h.shape[0], self.base.loc.shape[1], *h.shape[2:]), like=h
        )
        eps = self.base.sample(eta)
        u, ldj = self.flow(eps, context=h)
        return self._bound_terms(x, u, self.base.log_prob(eps) - ldj)
