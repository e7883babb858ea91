"""Training augmentations (spec §13.4): the names :data:`AUGMENTATIONS` and :func:`augment`.

This module is the one definition of the augmentation names; :mod:`denseflow.config` checks
``data.augmentation`` against it.
"""

from __future__ import annotations

import math

import torch

AUGMENTATIONS = ("none", "eta", "neta", "hflip")


def augment(x: torch.Tensor, kind: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """Training augmentation of a batch, each image with its own random draw (spec §13.4).

    Args:
        x: images ``(B, C, H, W)``, uint8 (any dtype and device works).
        kind: ``"none"`` (returns ``x`` itself), ``"hflip"`` (each image mirrored left-right with
            probability 0.5), ``"eta"`` (the official CIFAR/ImageNet augmentation) or ``"neta"``
            (``"eta"`` without the flip).
        generator: CPU generator for the draws (the default generator if ``None``); the result is
            a deterministic function of ``x`` and its state. Draws: ``B`` uniforms for the flips
            (``hflip``, ``eta``), then ``B x 2`` for the translations (``eta``, ``neta``).

    ``eta``: flip (p 0.5) -> edge-pad by ``p_h = ceil(0.04 H)`` rows and ``p_w = ceil(0.04 W)``
    columns -> translate by integers ``t = round(u)``,
    ``u ~ U[-0.04 (H + 2 p_h), +0.04 (H + 2 p_h)]`` for rows (``W``, ``p_w`` for columns; round
    half to even, like Python's ``round``) with zero fill -> center crop ``H x W``.
    Equivalently, output row ``i`` is row ``p_h - t_y + i`` of the padded image: a window at
    offset ``p + d`` with ``d = -t``. For 32x32, ``p = 2`` and ``|t| <= 1``; for 64x64, ``p = 3``
    and ``|t| <= 3``, so the zero fill is never visible at the paper's sizes.

    Returns:
        Tensor like ``x``, ``(B, C, H, W)``.
    """
    if kind not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {kind!r}; choose one of {', '.join(AUGMENTATIONS)}")
    if x.dim() != 4:
        raise ValueError(f"augment expects images (B, C, H, W), got shape {tuple(x.shape)}")
    if kind == "none":
        return x
    b, _, h, w = x.shape
    if kind in ("hflip", "eta"):
        flip = (torch.rand(b, generator=generator) < 0.5).to(x.device)
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    if kind == "hflip":
        return x
    pad_h, pad_w = math.ceil(0.04 * h), math.ceil(0.04 * w)
    max_t = torch.tensor([0.04 * (h + 2 * pad_h), 0.04 * (w + 2 * pad_w)], dtype=torch.float64)
    u = (torch.rand(b, 2, generator=generator, dtype=torch.float64) * 2 - 1) * max_t
    t = torch.round(u).to(torch.int64).to(x.device)  # (B, 2): (t_y, t_x)
    rows = torch.arange(h, device=x.device)[None, :] - t[:, :1]  # (B, H) in original coordinates
    cols = torch.arange(w, device=x.device)[None, :] - t[:, 1:]  # (B, W)
    inside = ((rows >= -pad_h) & (rows < h + pad_h))[:, :, None] & (
        (cols >= -pad_w) & (cols < w + pad_w)
    )[:, None, :]
    batch = torch.arange(b, device=x.device)[:, None, None]
    out = x.permute(0, 2, 3, 1)[
        batch, rows.clamp(0, h - 1)[:, :, None], cols.clamp(0, w - 1)[:, None, :]
    ]
    out = out * inside[..., None].to(out.dtype)  # zero fill beyond the edge padding
    return out.permute(0, 3, 1, 2).contiguous()
