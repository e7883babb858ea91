"""Conditioner networks: the coupling network (spec §7), the cross-unit noise net g_i (spec §5)
and the dequantizer's context and coupling networks (spec §4)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..transforms.base import bounded_log_scale
from .attention import NystromAttention
from .dense import DenseBlock
from .recompute import Recomputable, is_recomputing
from .runner import at_least_float32


def zero_conv1x1(in_channels: int, out_channels: int) -> nn.Conv2d:
    """1x1 conv with zero weight and bias: the output layer that makes a coupling start as
    identity."""
    conv = nn.Conv2d(in_channels, out_channels, 1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class FusionBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d that leaves its running statistics alone while a low-memory forward is
    recomputed in the backward pass (the batch statistics, hence the output, are the same)."""

    def forward(self, x: Tensor) -> Tensor:
        if self.training and is_recomputing():  # update throw-away copies of the statistics
            mean, var = self.running_mean.clone(), self.running_var.clone()
            return F.batch_norm(x, mean, var, self.weight, self.bias, True, self.momentum, self.eps)
        return super().forward(x)


class CouplingNet(nn.Module):
    """DenseBlock ⊕ Nyström attention, fused (spec §7).

    ``h = in_proj(x)``; ``f = fusion(concat(attention(h), dense(h)))`` with fusion =
    BatchNorm -> ReLU -> 1x1 conv (no bias); ``out = out_proj(f)``, zero-initialised.
    ``(B, C_in, H, W) -> (B, C_out, H, W)``. ``attention=None`` drops the attention branch
    (an ablation, not the paper's net): ``f = fusion(dense(h))``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        width: int,
        depth: int = 7,
        growth: int = 64,
        attention: str | None = "official",
        heads: int = 1,
        landmarks: int = 4,
    ) -> None:
        super().__init__()
        self.in_proj = nn.Conv2d(in_channels, width, 1)
        self.dense = DenseBlock(width, width, depth, growth)
        self.attention = NystromAttention(width, attention, heads, landmarks) if attention else None
        fused = 2 * width if attention else width
        self.fusion = nn.Sequential(
            FusionBatchNorm(fused), nn.ReLU(), nn.Conv2d(fused, width, 1, bias=False)
        )
        self.out_proj = zero_conv1x1(width, out_channels)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, c_in, H, W) -> (B, c_out, H, W)``."""
        h = self.in_proj(x)
        f = (
            self.dense(h)
            if self.attention is None
            else torch.cat([self.attention(h), self.dense(h)], dim=1)
        )
        return self.out_proj(self.fusion(f))


class GlowCouplingNet(nn.Module):
    """Glow's coupling network (Kingma & Dhariwal 2018): 3x3 conv -> ReLU -> 1x1 conv -> ReLU ->
    zero-initialised 3x3 conv, ``width`` hidden channels (Glow's ActNorm inside the net omitted).
    The baseline of the ablation experiment; ``(B, C_in, H, W) -> (B, C_out, H, W)``."""

    def __init__(self, in_channels: int, out_channels: int, width: int) -> None:
        super().__init__()
        out = nn.Conv2d(width, out_channels, 3, padding=1)
        nn.init.zeros_(out.weight)
        nn.init.zeros_(out.bias)
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, width, 1),
            nn.ReLU(),
            out,
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class NoiseNet(Recomputable):
    """g_i of a cross-unit coupling: 3x3 conv (c -> 4c) -> ReLU -> 1x1 conv (4c -> 2g), zero-init.

    Returns ``(μ, log σ)``, each ``(B, g, H, W)``: μ = first g output channels,
    ``log σ = 2·tanh(s/2)`` of the last g (block layout, unlike the couplings' interleaving).
    """

    def __init__(self, in_channels: int, growth: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 4 * in_channels, 3, padding=1)
        self.out = zero_conv1x1(4 * in_channels, 2 * growth)

    def _compute(self, c: Tensor) -> tuple[Tensor, Tensor]:
        mu, s = at_least_float32(self.out(torch.relu(self.conv(c)))).chunk(
            2, dim=1
        )  # the bound in >= fp32
        return mu, bounded_log_scale(s)


class LearnedGaussianNoise(nn.Module):
    """The unconditional alternative to :class:`NoiseNet` (an ablation, VFlow-style augmentation):
    ``(μ, log σ)`` are learned per channel, zero-initialised, ``log σ = 2·tanh(s/2)`` as there, and
    do not depend on the context; only its batch size and spatial size are read."""

    def __init__(self, growth: int) -> None:
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(1, growth, 1, 1))
        self.scale = nn.Parameter(torch.zeros(1, growth, 1, 1))

    def forward(self, c: Tensor) -> tuple[Tensor, Tensor]:
        shape = (c.shape[0], self.loc.shape[1], *c.shape[2:])
        return self.loc.expand(shape), bounded_log_scale(self.scale).expand(shape)


class ContextNet(Recomputable):
    """The dequantizer's context ``h = c(x)`` (spec §4): ``(B, C, H, W)`` integers ->
    ``(B, width, H/2, W/2)``.

    ``x' = 2x/(2^bits − 1) − 1``; DenseBlock at full resolution; 2x2 stride-2 conv; DenseBlock.
    """

    def __init__(
        self, in_channels: int, width: int, depth: int, growth: int, num_bits: int
    ) -> None:
        super().__init__()
        self.max_value = 2**num_bits - 1
        self.dense_in = DenseBlock(in_channels, width, depth, growth)
        self.down = nn.Conv2d(width, width, 2, stride=2)
        self.dense_out = DenseBlock(width, width, depth, growth)

    def _compute(self, x: Tensor) -> Tensor:
        # float64 with widened weights; float32 under autocast, even where the weights were cast
        x = 2 * x.to(torch.promote_types(x.dtype, self.down.weight.dtype)) / self.max_value - 1
        return self.dense_out(self.down(self.dense_in(x)))


class DequantCouplingNet(nn.Module):
    """The dequantizer's coupling net: 1x1 conv -> residual DenseBlock -> zero-init 1x1 conv
    (spec §4)."""

    def __init__(
        self, in_channels: int, out_channels: int, width: int, depth: int, growth: int
    ) -> None:
        super().__init__()
        self.in_proj = nn.Conv2d(in_channels, width, 1)
        self.dense = DenseBlock(width, width, depth, growth, residual=True)
        self.out_proj = zero_conv1x1(width, out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_proj(self.dense(self.in_proj(x)))
