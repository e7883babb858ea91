"""DenseBlock (spec §7.2): the local branch of every coupling network and of the dequantizer.

Memory: a dense layer's 1x1 convolution reads the concatenation of every earlier feature map.
Autograd would keep one such concatenation per layer alive for the backward pass (Σ_l c_l
channels, 1680 in DenseFlow-74-10's coupling nets against 496 distinct ones). :class:`_ConcatConv`
keeps only the pieces and concatenates again in the backward pass — the memory-efficient DenseNet
of Pleiss et al. (2017). The arithmetic is the same convolution on the same tensor.

Kernels: each piece's gradient is the sum of what every later layer sends it, which autograd
adds up per piece (``d(d+1)/2`` additions in a block of depth ``d``: 2,132 in a DenseFlow-74-10
training pass). Within a block the concat-convs share instead one gradient buffer of the widest
concatenation (:class:`GradSum`): the gate's backward pass starts it, each layer adds the
gradient of the feature maps it reads into it in one kernel and hands on the slice of its own
newest piece, complete by then (a layer's backward pass runs after every later layer's). These
are the additions of the official code's growing concatenations, in its order. The block's input
is left to autograd, whose sum also takes in its other uses (the attention branch, the residual)
in its own order, and in float32 where autocast casts it: ``2d - 1`` additions, every gradient
bit for bit as before.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class GradSum:
    """The gradient of a DenseBlock's widest concatenation, shared by the backward passes of its
    concat-convs (module docstring); one per forward call of the block."""

    __slots__ = ("grad",)

    def __init__(self) -> None:
        self.grad: Tensor | None = None


class _ConcatConv(torch.autograd.Function):
    """``conv2d(cat(pieces, 1), weight, bias)`` saving the pieces instead of their concatenation.

    With a :class:`GradSum`, the gradient of the pieces after the first goes into the shared
    buffer (``widest``: the block's last concat-conv, the first in the backward pass, starts it)
    and only the first and the newest piece's gradients are returned; without, every piece's."""

    @staticmethod
    def forward(
        ctx,
        weight: Tensor,
        bias: Tensor | None,
        padding: int,
        grad_sum: GradSum | None,
        widest: bool,
        *pieces: Tensor,
    ) -> Tensor:
        ctx.save_for_backward(weight, *pieces)
        ctx.padding, ctx.has_bias = padding, bias is not None
        ctx.grad_sum, ctx.widest = grad_sum, widest
        return F.conv2d(torch.cat(pieces, dim=1), weight, bias, padding=padding)

    @staticmethod
    def backward(ctx, grad: Tensor):
        weight, *pieces = ctx.saved_tensors
        x = torch.cat(pieces, dim=1)
        p = ctx.padding
        needs_pieces = ctx.needs_input_grad[5:]
        mask = [
            any(needs_pieces),
            ctx.needs_input_grad[0],
            ctx.has_bias and ctx.needs_input_grad[1],
        ]
        bias_sizes = [weight.shape[0]] if ctx.has_bias else None
        grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward(
            grad, x, weight, bias_sizes, [1, 1], [p, p], [1, 1], False, [0, 0], 1, mask
        )
        grad_pieces: list[Tensor | None] = [None] * len(pieces)
        if grad_x is not None and ctx.grad_sum is None:
            grad_pieces = list(grad_x.split([t.shape[1] for t in pieces], dim=1))
        elif grad_x is not None:  # block input: autograd's sums; later pieces: the shared buffer
            start, end, total = pieces[0].shape[1], x.shape[1], ctx.grad_sum
            grad_pieces[0] = grad_x[:, :start]
            if ctx.widest:
                total.grad = grad_x
            elif len(pieces) > 1:
                total.grad[:, start:end].add_(grad_x[:, start:])
            else:  # the block's first layer, the last to run backward
                total.grad = None
            if len(pieces) > 1:
                grad_pieces[-1] = total.grad[:, end - pieces[-1].shape[1] : end]
        grad_pieces = [
            g if need else None for g, need in zip(grad_pieces, needs_pieces, strict=True)
        ]
        return grad_w, grad_b, None, None, None, *grad_pieces


def concat_conv(
    pieces: list[Tensor], conv: nn.Conv2d, grad_sum: GradSum | None = None, widest: bool = False
) -> Tensor:
    """``conv(torch.cat(pieces, 1))``; without autograd the plain expression. Under autocast the
    casts autocast would make happen outside the custom function (its backward sees one dtype).
    ``conv`` must have stride 1, dilation 1, one group and equal zero padding on both axes: the
    custom backward assumes them. ``grad_sum``/``widest``: the shared input gradient of a
    :class:`DenseBlock` (module docstring); the pieces' gradients are then right only for a
    block's sequence of calls, each adding one newest piece to the previous call's pieces."""
    plain = (conv.stride, conv.dilation, conv.groups, conv.padding_mode) == (
        (1, 1),
        (1, 1),
        1,
        "zeros",
    )
    if not plain or not isinstance(conv.padding, tuple) or conv.padding[0] != conv.padding[1]:
        raise ValueError(
            f"concat_conv: needs stride 1, dilation 1, groups 1, equal padding: {conv}"
        )
    if torch.is_grad_enabled() and any(t.requires_grad for t in (conv.weight, *pieces)):
        device = pieces[0].device.type
        if torch.is_autocast_enabled(device):
            dtype = torch.get_autocast_dtype(device)
            weight, bias = conv.weight.to(dtype), None if conv.bias is None else conv.bias.to(dtype)
            with torch.autocast(device, enabled=False):
                return _ConcatConv.apply(
                    weight,
                    bias,
                    conv.padding[0],
                    grad_sum,
                    widest,
                    *(t.to(dtype) for t in pieces),
                )
        return _ConcatConv.apply(conv.weight, conv.bias, conv.padding[0], grad_sum, widest, *pieces)
    return conv(torch.cat(pieces, dim=1))


class DenseLayer(nn.Module):
    """``v = ReLU(Conv3x3(c -> k)(ReLU(Conv1x1(c -> c)(h))))``; the 1x1 keeps the width.

    ``h`` is given as the list of feature maps whose concatenation it is.
    """

    def __init__(self, channels: int, growth: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 1)
        self.conv3 = nn.Conv2d(channels, growth, 3, padding=1)

    def forward(self, pieces: list[Tensor], grad_sum: GradSum | None = None) -> Tensor:
        # in-place ReLUs: the convolutions' outputs are needed by nothing else
        return torch.relu_(self.conv3(torch.relu_(concat_conv(pieces, self.conv1, grad_sum))))


class GatedConv1x1(nn.Module):
    """``Conv1x1(c_in -> 3·c_out)`` split into ``(α, β, γ)``, returning ``α + β·sigmoid(γ)``."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 3 * out_channels, 1)

    def forward(self, pieces: list[Tensor], grad_sum: GradSum | None = None) -> Tensor:
        alpha, beta, gamma = concat_conv(pieces, self.conv, grad_sum, widest=True).chunk(3, dim=1)
        return alpha + beta * torch.sigmoid(gamma)


class DenseBlock(nn.Module):
    """``depth`` dense layers, each appending ``growth`` channels, then a gated 1x1 conv.

    Widths ``c_0, c_0 + k, …, c_0 + n·k`` -> ``out_channels``. With ``residual`` the input is
    added to the output (the dequantizer's coupling nets). ``(B, c_0, H, W) -> (B, c_out, H, W)``.
    """

    def __init__(
        self, in_channels: int, out_channels: int, depth: int, growth: int, residual: bool = False
    ) -> None:
        super().__init__()
        if residual and in_channels != out_channels:
            raise ValueError(
                f"a residual DenseBlock needs in == out channels, "
                f"got {in_channels} -> {out_channels}"
            )
        self.layers = nn.ModuleList(
            DenseLayer(in_channels + i * growth, growth) for i in range(depth)
        )
        self.gate = GatedConv1x1(in_channels + depth * growth, out_channels)
        self.residual = residual

    def forward(self, x: Tensor) -> Tensor:
        """``(B, c_0, H, W) -> (B, c_out, H, W)``."""
        # compiled nets: dynamo cannot trace the shared buffer's mutation (AOT autograd derives
        # the backward pass, and its compiler fuses additions)
        pieces, grad_sum = [x], None if torch.compiler.is_compiling() else GradSum()
        for layer in self.layers:
            pieces.append(layer(pieces, grad_sum))
        out = self.gate(pieces, grad_sum)
        return x + out if self.residual else out
