"""Dense blocks of invertible units joined by cross-unit coupling (spec §5)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..nets.coupling import CouplingNet, GlowCouplingNet, LearnedGaussianNoise, NoiseNet
from ..nets.runner import NetRunner
from .base import FlowSequence, Noise, Transform, std_normal_log_prob
from .glow import glow_step


class CrossUnitCoupling(NetRunner, Transform):
    """Appends ``g`` noise channels whose distribution depends on earlier representations.

    ``(μ, log σ) = g_i(context)``, ``ẽ = μ + σ·η`` with ``η`` the draw ``{name}.eta``, output
    ``concat(y, ẽ)`` (noise at the end of the channel axis).
    ``delta_logp = Σ log σ − log N(η; 0, I)`` (= −log q(ẽ | context)). The left inverse drops the
    last ``g`` channels.
    ``conditional=False`` replaces ``g_i`` by a learned per-channel Gaussian that ignores the
    context (:class:`~denseflow.nets.coupling.LearnedGaussianNoise`, an ablation).
    """

    def __init__(
        self, context_channels: int, growth: int, name: str, conditional: bool = True
    ) -> None:
        super().__init__()
        self.net = (
            NoiseNet(context_channels, growth) if conditional else LearnedGaussianNoise(growth)
        )
        self.growth = growth
        self.name = name

    def forward(
        self, x: Tensor, context: Tensor | None = None, noise: Noise | None = None
    ) -> tuple[Tensor, Tensor]:
        mu, log_sigma = self.run_net(self.net, context)
        eta = (noise or Noise()).draw(f"{self.name}.eta", tuple(mu.shape), like=mu)
        e = mu + torch.exp(log_sigma) * eta
        delta = log_sigma.flatten(1).sum(1) - std_normal_log_prob(eta)
        return torch.cat([x, e], dim=1), delta

    def inverse(
        self, z: Tensor, context: Tensor | None = None, noise: Noise | None = None
    ) -> Tensor:
        return z[:, : z.shape[1] - self.growth]


class InvertibleDenseBlock(Transform):
    """``K`` invertible units of ``L`` glow-like steps; before unit ``i ≥ 1`` a cross-unit coupling
    appends ``g`` channels conditioned on ``concat(x_0, y_0, …, y_{i−2})`` — the block input and
    every earlier unit output except the one the noise is appended to (spec §5).

    ``(B, C0, H, W) -> (B, C0 + (K−1)·g, H, W)``. Noise names: ``{name}.unit{i}.eta``.
    """

    def __init__(
        self,
        in_channels: int,
        units: int,
        steps: int,
        growth: int,
        net_factory,
        name: str,
        conv1x1: str = "full",
        conditional: bool = True,
    ) -> None:
        super().__init__()
        self.name = name
        widths = [in_channels + i * growth for i in range(units)]
        self.units = nn.ModuleList(
            FlowSequence(glow_step(c, net_factory(c), conv1x1) for _ in range(steps))
            for c in widths
        )
        context_widths = (
            [in_channels + sum(widths[: i - 1]) for i in range(1, units)] if growth else []
        )
        self.couplings = nn.ModuleList(
            CrossUnitCoupling(c, growth, f"{name}.unit{i}", conditional)
            for i, c in enumerate(context_widths, start=1)
        )
        self.out_channels = widths[-1]

    def forward(
        self, x: Tensor, context: Tensor | None = None, noise: Noise | None = None
    ) -> tuple[Tensor, Tensor]:
        representations = [x]
        y, total = self.units[0](x)
        for i in range(1, len(self.units)):
            if self.couplings:  # growth_rate 0: units follow each other at constant width
                y_aug, delta = self.couplings[i - 1](y, torch.cat(representations, dim=1), noise)
                representations.append(y)
                y, total = y_aug, total + delta
            y, delta = self.units[i](y)
            total = total + delta
        return y, total

    def inverse(
        self, z: Tensor, context: Tensor | None = None, noise: Noise | None = None
    ) -> Tensor:
        for i in reversed(range(len(self.units))):
            z = self.units[i].inverse(z)
            if i > 0 and self.couplings:
                z = self.couplings[i - 1].inverse(z)
        return z


def coupling_net_factory(
    width: int,
    depth: int,
    growth: int,
    attention: str,
    heads: int,
    landmarks: int,
    kind: str = "fused",
):
    """``C -> net(⌈C/2⌉ -> 2⌊C/2⌋)`` for the glow-like steps of one scale. ``kind``: ``fused``
    (DenseBlock ⊕ attention, the paper's), ``dense`` (no attention branch) or ``glow``."""

    def make(channels: int) -> nn.Module:
        c_in, c_out = (channels + 1) // 2, 2 * (channels // 2)
        if kind == "glow":
            return GlowCouplingNet(c_in, c_out, width)
        return CouplingNet(
            c_in,
            c_out,
            width,
            depth,
            growth,
            attention if kind == "fused" else None,
            heads,
            landmarks,
        )

    return make
