"""Glow-like step parts (spec §6) and the other deterministic bijections.

A glow-like step is ActNorm -> invertible 1x1 conv -> affine coupling -> channel swap
(:func:`glow_step`). Shapes are ``(B, C, H, W)`` throughout.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nets.recompute import Recomputable
from ..nets.runner import NetRunner
from .base import (
    FlowSequence,
    Noise,
    Transform,
    bounded_log_scale,
    capturing,
    sum_except_batch,
)


class ActNorm(Transform):
    """Per-channel affine normalisation ``z = (x - b_c) · exp(-l_c)``; log-det ``-H·W·Σ_c l_c``.

    Starts as the identity; :meth:`initialize` sets ``b`` to the batch mean and ``l`` to
    ``log(std + 1e-6)`` (unbiased std over B, H, W), as the official first training forward does.
    Initialisation is never hidden in ``forward``: the model's ``data_init`` calls it.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.shift = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.log_scale = nn.Parameter(torch.zeros(1, channels, 1, 1))

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        """Set the shift and log-scale from the batch ``x`` so that its output is standardised."""
        self.shift.copy_(x.mean(dim=(0, 2, 3), keepdim=True))
        self.log_scale.copy_(torch.log(x.std(dim=(0, 2, 3), keepdim=True) + 1e-6))

    def forward(
        self, x: Tensor, context: Tensor | None = None, noise: Noise | None = None
    ) -> tuple[Tensor, Tensor]:
        shift, log_scale = self.shift.to(x.dtype), self.log_scale.to(x.dtype)
        z = (x - shift) * torch.exp(-log_scale)
        ldj = -(x.shape[2] * x.shape[3]) * log_scale.sum()
        return z, ldj.expand(x.shape[0])

    def inverse(
        self, z: Tensor, context: Tensor | None = None, noise: Noise | None = None
    ) -> Tensor:
        return z * torch.exp(self.log_scale.to(z.dtype)) + self.shift.to(z.dtype)


def _random_orthogonal(channels: int) -> Tensor:
    q, _ = torch.linalg.qr(torch.randn(channels, channels))
    return q


class _LogAbsDet(torch.autograd.Function):
    """``log|det W|`` from an LU factorisation without an error check; gradient ``W⁻ᵀ`` solved
    from the same factors. What ``torch.linalg.slogdet`` computes for a real matrix, op for op:
    it factors ``Wᵀ`` when ``W`` is row-major (then the factored matrix is column-major, as
    LAPACK wants it) and ``W`` otherwise, and solves with those factors in the backward pass —
    bitwise equal values and gradients on the CPU in float32 and float64 (tests/test_graph.py).
    Unlike slogdet it never reads an error flag on the host, so a CUDA graph can capture it."""

    @staticmethod
    def forward(ctx, w: Tensor) -> Tensor:
        transposed = w.is_contiguous()
        lu, pivots, _ = torch.linalg.lu_factor_ex(w.mT if transposed else w)
        ctx.save_for_backward(lu, pivots)
        ctx.transposed = transposed
        return lu.diagonal(dim1=-2, dim2=-1).abs().log().sum(-1)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        lu, pivots = ctx.saved_tensors
        eye_scaled = torch.diag_embed(grad.unsqueeze(-1).expand_as(pivots).to(lu.dtype)).mT
        return torch.linalg.lu_solve(lu, pivots, eye_scaled, adjoint=not ctx.transposed)


def log_abs_det(w: Tensor) -> Tensor:
    """``log|det w|`` of a real square matrix (or a batch), equal to
    ``torch.linalg.slogdet(w)[1]``; no host synchronisation, forward or backward."""
    return _LogAbsDet.apply(w)


def inverse(w: Tensor) -> Tensor:
    """``w⁻¹``: ``torch.linalg.inv`` without its error check (bitwise the same values; no host
    synchronisation). A singular matrix gives non-finite values instead of an exception."""
    return torch.linalg.inv_ex(w)[0]


class Conv1x1(Transform):
    """Invertible 1x1 convolution ``z = W x`` per pixel with a full ``C x C`` matrix (official).

    Log-det ``H·W·log|det W|``; ``W`` starts as a random orthogonal matrix.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(_random_orthogonal(channels))

    def matrix(self, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        """(W, log|det W|), computed in ``dtype`` (default: the parameters'); the log-determinant
        of the pass under way where :func:`batched_log_dets` computed it in that dtype."""
        w = self.weight.to(dtype or self.weight.dtype)
        batched = self.__dict__.get("_pass_log_det")
        if batched is not None and batched.dtype == w.dtype:
            return w, batched
        return w, log_abs_det(w)

    def forward(
        self, x: Tensor, context: Tensor | None = None, noise: Noise | None = None
    ) -> tuple[Tensor, Tensor]:
        w, logdet = self.matrix(x.dtype)
        z = F.conv2d(x, w[:, :, None, None])
        return z, (x.shape[2] * x.shape[3] * logdet).expand(x.shape[0])

    def inverse(
        self, z: Tensor, context: Tensor | None = None, noise: Noise | None = None
    ) -> Tensor:
        return F.conv2d(z, self._inverse_matrix(z.dtype)[:, :, None, None])

    def _inverse_matrix(self, dtype: torch.dtype) -> Tensor:
        """``W⁻¹``, inverted in ``dtype``. Without autograd (sampling, decoding) it is cached per
        ``dtype`` until the parameters (address, version) change, and then recomputed *in place*:
        a captured sampling graph reads the cached tensor, and
        :class:`denseflow.graph.GraphedInference` brings it up to date
        (:meth:`refresh_inverses`) before each replay, so no replay inverts anything. A training
        graph's replay changes W behind autograd's version counters: :class:`denseflow.graph.
        GraphedStep` calls :meth:`forget_inverse` after each. While a graph is captured an
        up-to-date cached inverse is read; a stale one is computed inside the graph, uncached."""
        if torch.is_grad_enabled():
            return inverse(self.matrix(dtype)[0])
        key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in self.parameters())
        cache = self.__dict__.setdefault("_inverses", {})  # dtype -> [key, W⁻¹]
        entry = cache.get(dtype)
        if entry is not None and entry[0] == key:
            return entry[1]
        if capturing(next(self.parameters())):
            return inverse(self.matrix(dtype)[0])
        with torch.inference_mode(False), torch.no_grad():  # a tensor updatable in place anywhere
            fresh = inverse(self.matrix(dtype)[0])
            if entry is None or (entry[1].shape, entry[1].device) != (fresh.shape, fresh.device):
                cache[dtype] = [key, fresh]
            else:
                entry[1].copy_(fresh)
                entry[0] = key
        return cache[dtype][1]

    def refresh_inverses(self) -> None:
        """Recompute, in place, every cached ``W⁻¹`` whose parameters changed."""
        with torch.no_grad():
            for dtype in list(self.__dict__.get("_inverses", {})):
                self._inverse_matrix(dtype)

    def forget_inverse(self) -> None:
        """Mark every cached ``W⁻¹`` stale (the next use recomputes it, in place)."""
        for entry in self.__dict__.get("_inverses", {}).values():
            entry[0] = None


@contextmanager
def batched_log_dets(convs: Sequence[Conv1x1]) -> Iterator[None]:
    """Inside the block, each of ``convs`` (full-matrix 1x1 convolutions) uses a ``log|det W|``
    computed before it, in its parameters' dtype, by one :func:`log_abs_det` of the stacked
    matrices of each size, instead of factorising its own: the same values to float rounding
    (a batched factorisation may round differently), with gradients. A lead for GPUs, where
    DenseFlow-74-10's 79 single factorisations cost 17 ms a step (docs/benchmarks.md); off
    unless ``train.batched_logdets``."""
    groups: dict[tuple, list[Conv1x1]] = {}
    for conv in convs:
        w = conv.weight
        groups.setdefault((w.shape, w.dtype, w.device), []).append(conv)
    try:
        for group in groups.values():
            values = log_abs_det(torch.stack([conv.weight for conv in group]))
            for conv, value in zip(group, values.unbind(), strict=True):
                conv._pass_log_det = value
        yield
    finally:
        for conv in convs:
            conv.__dict__.pop("_pass_log_det", None)


class Conv1x1LU(Conv1x1):
    """Invertible 1x1 convolution with ``W = P·L·(U + diag(sign·exp(log_s)))`` (Glow's LU option).

    ``P`` is fixed, ``L`` unit lower-triangular, ``U`` strictly upper-triangular; the log-det is
    ``H·W·Σ log_s`` without a determinant. Same random orthogonal start as :class:`Conv1x1`.
    """

    def __init__(self, channels: int) -> None:
        Transform.__init__(self)
        p, lower, upper = torch.linalg.lu(_random_orthogonal(channels))
        diag = torch.diagonal(upper)
        self.register_buffer("perm", p)
        self.register_buffer("sign", torch.sign(diag))
        self.register_buffer("lower_mask", torch.tril(torch.ones(channels, channels), -1))
        self.lower = nn.Parameter(lower)
        self.upper = nn.Parameter(torch.triu(upper, 1))
        self.log_s = nn.Parameter(diag.abs().log())

    def matrix(self, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        """(W = P·L·U, log|det W| = Σ log s), computed in ``dtype`` (default: the
        parameters')."""
        dtype = dtype or self.lower.dtype
        mask, log_s = self.lower_mask.to(dtype), self.log_s.to(dtype)
        eye = torch.eye(mask.shape[0], dtype=dtype, device=mask.device)
        lower = self.lower.to(dtype) * mask + eye
        upper = self.upper.to(dtype) * mask.T + torch.diag(self.sign.to(dtype) * torch.exp(log_s))
        return self.perm.to(dtype) @ lower @ upper, log_s.sum()


class AffineCoupling(NetRunner, Recomputable, Transform):
    """Affine coupling with a bounded scale (spec §6.3, §7.4).

    ``x_a`` = first ⌈C/2⌉ channels (kept), ``x_b`` = the rest. ``net(x_a)`` (or
    ``net(concat(x_a, context))`` when conditioned) gives ``2·⌊C/2⌋`` channels, interleaved:
    channel ``2k`` is the raw scale ``s_k``, ``2k+1`` the shift ``t_k``. With
    ``log a = 2·tanh(s/2)`` ∈ (-2, 2): ``y_b = t + exp(log a)·x_b``, log-det ``Σ log a``.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def _log_a_and_shift(self, x_a: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        h = x_a if context is None else torch.cat([x_a, context], dim=1)
        s, t = self.run_net(self.net, h).unflatten(1, (-1, 2)).unbind(2)
        return bounded_log_scale(s), t

    def _compute(
        self, x: Tensor, context: Tensor | None = None, noise: Noise | None = None
    ) -> tuple[Tensor, Tensor]:
        """The coupling's forward pass: ``(x_a, x_b) -> (x_a, y_b)`` and its log-det."""
        x_a, x_b = x.split((x.shape[1] + 1) // 2, dim=1)
        log_a, t = self._log_a_and_shift(x_a, context)
        y_b = t + torch.exp(log_a) * x_b
        return torch.cat([x_a, y_b], dim=1), sum_except_batch(log_a)

    def inverse(
        self, z: Tensor, context: Tensor | None = None, noise: Noise | None = None
    ) -> Tensor:
        x_a, y_b = z.split((z.shape[1] + 1) // 2, dim=1)
        log_a, t = self._log_a_and_shift(x_a, context)
        return torch.cat([x_a, (y_b - t) * torch.exp(-log_a)], dim=1)


class ChannelSwap(Transform):
    """``[p, q] -> [q, p]`` with ``p`` the first ⌈C/2⌉ channels; log-det 0.

    The inverse splits at ⌊C/2⌋, which is correct for odd C too (the official inverse splits at
    ⌈C/2⌉ again; every width of the paper's models is even, where the two agree).
    """

    def forward(
        self, x: Tensor, context: Tensor | None = None, noise: Noise | None = None
    ) -> tuple[Tensor, Tensor]:
        p, q = x.split((x.shape[1] + 1) // 2, dim=1)
        return torch.cat([q, p], dim=1), x.new_zeros(x.shape[0])

    def inverse(
        self, z: Tensor, context: Tensor | None = None, noise: Noise | None = None
    ) -> Tensor:
        q, p = z.split([z.shape[1] // 2, (z.shape[1] + 1) // 2], dim=1)
        return torch.cat([p, q], dim=1)


def squeeze(x: Tensor) -> Tensor:
    """2x2 space-to-depth: channel ``4c + 2a + b`` holds pixel ``(2i+a, 2j+b)`` of channel c."""
    return F.pixel_unshuffle(x, 2)


def unsqueeze(z: Tensor) -> Tensor:
    """Inverse of :func:`squeeze`."""
    return F.pixel_shuffle(z, 2)


class Unsqueeze(Transform):
    """Depth-to-space 2x2 (the inverse of :func:`squeeze`) as a step; a permutation, log-det 0."""

    def forward(
        self, x: Tensor, context: Tensor | None = None, noise: Noise | None = None
    ) -> tuple[Tensor, Tensor]:
        return unsqueeze(x), x.new_zeros(x.shape[0])

    def inverse(
        self, z: Tensor, context: Tensor | None = None, noise: Noise | None = None
    ) -> Tensor:
        return squeeze(z)


class Sigmoid(Transform):
    """Element-wise ``σ(y)``; log-det ``Σ -softplus(-y) - softplus(y)`` (no epsilon, as
    official)."""

    def forward(
        self, x: Tensor, context: Tensor | None = None, noise: Noise | None = None
    ) -> tuple[Tensor, Tensor]:
        ldj = sum_except_batch(-F.softplus(-x) - F.softplus(x))
        return torch.sigmoid(x), ldj

    def inverse(
        self, z: Tensor, context: Tensor | None = None, noise: Noise | None = None
    ) -> Tensor:
        return torch.logit(z)


def glow_step(channels: int, coupling_net: nn.Module, conv1x1: str = "full") -> FlowSequence:
    """One glow-like step on ``channels`` channels: ActNorm, 1x1 conv, affine coupling, swap."""
    conv = Conv1x1LU(channels) if conv1x1 == "lu" else Conv1x1(channels)
    return FlowSequence(
        {
            "actnorm": ActNorm(channels),
            "conv1x1": conv,
            "coupling": AffineCoupling(coupling_net),
            "swap": ChannelSwap(),
        }
    )
