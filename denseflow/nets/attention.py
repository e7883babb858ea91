"""Nyström attention, the global branch of the coupling network (spec §7.3).

Two kinds:

``official``
    What the published weights were trained with, quirks included: the ``(3E, H, W)`` output of
    the q/k/v projection is *reinterpreted in memory* as an ``(N, 3E)`` matrix (a "token" is a
    run of 3E consecutive elements, not a pixel), one head, landmarks divided by √N, all three
    softmaxes over the second-to-last axis, and a residual on V.
``multihead``
    The corrected attention for new models: one token per pixel, ``heads`` heads, queries
    scaled by ``1/√d``, softmaxes over the last axis (standard Nyströmformer), residual on V.

Both use ``E = M // 2`` embedding channels, ``m = min(landmarks, N)`` landmarks as means of
contiguous token groups (``torch.tensor_split`` sizes, equal groups when ``m`` divides ``N``,
which is the only case the official code runs), and 6 iterations of the Nyströmformer
pseudo-inverse.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .runner import at_least_float32


def segment_means(x: Tensor, groups: int) -> Tensor:
    """Means of ``groups`` contiguous row groups: (..., N, d) -> (..., groups, d); one reduction
    when ``groups`` divides N (the official code's only case)."""
    n = x.shape[-2]
    if n % groups == 0:
        return x.unflatten(-2, (groups, n // groups)).mean(dim=-2)
    return torch.stack([part.mean(dim=-2) for part in x.tensor_split(groups, dim=-2)], dim=-2)


def _iterate(a: Tensor, z: Tensor, iters: int, saved: list[Tensor]) -> Tensor:
    """``iters`` steps ``Z ← ¼·Z·(13I + N(15I + N(7I + N)))`` with ``N = −AZ``; appends each
    step's ``Z, N, Q = 7I + N, P = 15I + NQ, R = 13I + NP`` to ``saved``. The sign of ``N``, the
    multiples of ``I`` and the ¼ are GEMM and addition scalars (exact: a sign, small integers
    times 1 and 0, a power of two), so each value is bitwise that of the plain products."""
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    for _ in range(iters):
        n = torch.baddbmm(z, a, z, beta=0, alpha=-1)  # −AZ (beta=0: the first z is not read)
        q = torch.add(n, eye, alpha=7)
        p = torch.baddbmm(eye, n, q, beta=15)
        r = torch.baddbmm(eye, n, p, beta=13)
        saved += [z, n, q, p, r]
        z = torch.baddbmm(z, z, r, beta=0, alpha=0.25)  # ¼·ZR in the GEMM
    return z


class _PinvIterations(torch.autograd.Function):
    """The iterations of :func:`iterative_pinv` from ``(A, Z₀)``, with a backward pass written
    out: the gradient ``Ḡ`` of ``Z' = ¼ZR`` gives, with ``H = ZᵀḠ``, ``Hₚ = NᵀH``,
    ``Hₙ = NᵀHₚ + HₚQᵀ + HPᵀ`` (4x the gradient of N), ``Z̄ = ¼(ḠRᵀ − AᵀHₙ)`` and
    ``Ā −= ¼HₙZᵀ``: eight batched GEMMs an iteration, every sum inside one (``baddbmm``), the
    ¼ and the signs in their scalars (exact: a power of two), where autograd runs twelve
    products and additions, scalings and negations besides. The forward pass computes the
    values of the plain products bit for bit. Differentiated with ``create_graph=True``, the
    backward pass differentiates the iteration again with autograd (the saved intermediates
    carry no graph)."""

    @staticmethod
    def forward(ctx, a: Tensor, z: Tensor, iters: int) -> Tensor:
        saved: list[Tensor] = []
        out = _iterate(a, z, iters, saved)
        ctx.iters = iters
        ctx.save_for_backward(a, *saved)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        a, *saved = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: a graph of the gradient is wanted
            inputs = (a, saved[0])
            out = _iterate(*inputs, ctx.iters, [])
            wanted = [t for t in inputs if t.requires_grad]
            grads = iter(torch.autograd.grad(out, wanted, grad, create_graph=True))
            return *(next(grads) if t.requires_grad else None for t in inputs), None
        grad_a = None  # the gradient of A, summed over the iterations
        for i in reversed(range(0, len(saved), 5)):
            z, n, q, p, r = saved[i : i + 5]
            h = torch.bmm(z.mT, grad)
            h_p = torch.bmm(n.mT, h)
            h_n = torch.baddbmm(torch.baddbmm(torch.bmm(n.mT, h_p), h_p, q.mT), h, p.mT)
            first = grad_a is None
            grad_a = torch.baddbmm(
                h_n if first else grad_a, h_n, z.mT, beta=0 if first else 1, alpha=-0.25
            )
            grad = torch.baddbmm(torch.bmm(grad, r.mT), a.mT, h_n, beta=0.25, alpha=-0.25)
        return grad_a, grad, None


def iterative_pinv(a: Tensor, iters: int = 6) -> Tensor:
    """Moore-Penrose pseudo-inverse of each (m, m) matrix by the Nyströmformer iteration.

    ``Z₀ = Aᵀ / (max_j Σ_i |A_ij| · max_i Σ_j |A_ij|)`` with the maxima taken per matrix, then
    ``Z ← ¼·Z·(13I − AZ(15I − AZ(7I − AZ)))``, written with ``N = −AZ`` so that each product
    and the multiple of I it is added to are one batched GEMM (``baddbmm``), and differentiated
    by hand (:class:`_PinvIterations`): 109 operators for the 6 iterations forward and backward
    instead of 192 for the plain formula under autograd (``denseflow bench --what ops`` counts
    them; each is a kernel or a few on a GPU). The 74 attentions of DenseFlow-74-10 run this
    every step, a large share of what it launches.
    """
    abs_a = a.abs()
    col = abs_a.sum(dim=-2).amax(dim=-1, keepdim=True).unsqueeze(-1)
    row = abs_a.sum(dim=-1).amax(dim=-1, keepdim=True).unsqueeze(-1)
    z = a.transpose(-1, -2) / (col * row)
    shape, m = a.shape, a.shape[-1]
    return _PinvIterations.apply(a.reshape(-1, m, m), z.reshape(-1, m, m), iters).reshape(shape)


class NystromAttention(nn.Module):
    """``(B, M, H, W) -> (B, M, H, W)``; see the module docstring for the two kinds."""

    def __init__(
        self,
        channels: int,
        kind: str = "official",
        heads: int = 1,
        landmarks: int = 4,
        pinv_iters: int = 6,
    ) -> None:
        super().__init__()
        if kind not in ("official", "multihead"):
            raise ValueError(f"attention kind must be 'official' or 'multihead', got {kind!r}")
        self.kind, self.heads, self.landmarks, self.pinv_iters = kind, heads, landmarks, pinv_iters
        self.embed = channels // 2
        self.qkv = nn.Conv2d(channels, 3 * self.embed, 1)
        self.out = nn.Conv2d(self.embed, channels, 1)

    def forward(self, h: Tensor) -> Tensor:
        b, _, height, width = h.shape
        n, e = height * width, self.embed
        m = min(self.landmarks, n)
        qkv = self.qkv(h)
        if self.kind == "official":
            q, k, v = qkv.reshape(b, 1, n, 3 * e).split(e, dim=-1)  # memory reinterpretation quirk
            q_l, k_l = segment_means(q, m) / math.sqrt(n), segment_means(k, m) / math.sqrt(n)
            axis = -2
        else:
            tokens = qkv.flatten(2).transpose(1, 2).unflatten(-1, (3, self.heads, e // self.heads))
            q, k, v = tokens.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, d)
            q = q / math.sqrt(e // self.heads)
            q_l, k_l = segment_means(q, m), segment_means(k, m)
            axis = -1
        f = torch.softmax(q @ k_l.transpose(-1, -2), dim=axis)
        a = torch.softmax(q_l @ k_l.transpose(-1, -2), dim=axis)
        g = torch.softmax(q_l @ k.transpose(-1, -2), dim=axis)
        with torch.autocast(h.device.type, enabled=False):  # the m x m pseudo-inverse in float32
            pinv = iterative_pinv(at_least_float32(a), self.pinv_iters)
        o = (f @ pinv.to(f.dtype)) @ (g @ v) + v
        if self.kind == "official":
            o = o.reshape(b, e, height, width)  # inverse memory reinterpretation
        else:
            o = o.permute(0, 1, 3, 2).reshape(b, e, height, width)
        return self.out(o)
