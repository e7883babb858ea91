"""DenseBlock (spec §7.2): the local branch of every coupling network and of the dequantizer."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class DenseLayer(nn.Module):
    """``v = ReLU(Conv3x3(c -> k)(ReLU(Conv1x1(c -> c)(h))))``; the 1x1 keeps the width."""

    def __init__(self, channels: int, growth: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 1)
        self.conv3 = nn.Conv2d(channels, growth, 3, padding=1)

    def forward(self, h: Tensor) -> Tensor:
        return torch.relu(self.conv3(torch.relu(self.conv1(h))))


class GatedConv1x1(nn.Module):
    """``Conv1x1(c_in -> 3·c_out)`` split into ``(α, β, γ)``, returning ``α + β·sigmoid(γ)``."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 3 * out_channels, 1)

    def forward(self, h: Tensor) -> Tensor:
        alpha, beta, gamma = self.conv(h).chunk(3, dim=1)
        return alpha + beta * torch.sigmoid(gamma)


class DenseBlock(nn.Module):
    """``depth`` dense layers, each appending ``growth`` channels, then a gated 1x1 conv.

    Widths ``c_0, c_0 + k, …, c_0 + n·k`` -> ``out_channels``. With ``residual`` the input is
    added to the output (the dequantizer's coupling nets). ``(B, c_0, H, W) -> (B, c_out, H, W)``.
    """

    def __init__(self, in_channels: int, out_channels: int, depth: int, growth: int, residual: bool = False) -> None:
        super().__init__()
        if residual and in_channels != out_channels:
            raise ValueError(f"a residual DenseBlock needs in == out channels, got {in_channels} -> {out_channels}")
        self.layers = nn.ModuleList(DenseLayer(in_channels + i * growth, growth) for i in range(depth))
        self.gate = GatedConv1x1(in_channels + depth * growth, out_channels)
        self.residual = residual

    def forward(self, x: Tensor) -> Tensor:
        h = x
        for layer in self.layers:
            h = torch.cat([h, layer(h)], dim=1)
        out = self.gate(h)
        return x + out if self.residual else out
