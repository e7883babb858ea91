"""Test-set bits/dim: the single-sample ELBO (spec §10) or the importance-weighted bound IWBO-k (§11)."""

from __future__ import annotations

import math

import torch
from tqdm import tqdm

from .model import DenseFlow


@torch.no_grad()
def evaluate_images(
    model: DenseFlow,
    images: torch.Tensor,
    batch_size: int = 64,
    k: int | None = None,
    kbs: int | None = None,
    seed: int = 0,
    progress: bool = True,
    desc: str = "evaluate",
) -> dict[str, float]:
    """Mean bits/dim of ``images`` (uint8 ``(N, C, H, W)``) under ``model`` in its current mode.

    ``k=None``: one noise draw per image (ELBO). Otherwise IWBO-k with ``kbs`` copies of each
    batch per pass. Noises come from a generator seeded with ``seed``, so the figure is
    reproducible. Sums are accumulated in float64.
    """
    device = model.base.loc.device
    generator = torch.Generator(device=device).manual_seed(seed)
    total = torch.zeros((), dtype=torch.float64)
    bar = tqdm(total=len(images), desc=desc, unit="img", disable=not progress, leave=False)
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size].to(device).long()
        if k is None:
            log_p = model.elbo(x, generator=generator)
        else:
            log_p = model.iwbo(x, k, chunk=kbs, generator=generator)
        total += log_p.double().sum().cpu()
        bar.update(len(x))
    bar.close()
    nats = (total / len(images)).item()
    return {"bpd": -nats / (model.config.num_dims * math.log(2)), "nats": nats, "images": len(images), "k": k or 1}
