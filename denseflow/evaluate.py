"""Test-set bits/dim: the single-sample ELBO (spec §10) or the importance-weighted bound IWBO-k
(§11)."""

from __future__ import annotations

import math

import torch
from tqdm import tqdm

from . import distributed
from .model import DenseFlow
from .seeding import stream


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
    batch per pass. The noises of batch ``i`` come from a generator seeded with ``(seed, i)``, so
    the figure is reproducible and independent of how batches are shared out. Sums are
    accumulated in float64. In a process group every rank calls this with the same arguments:
    rank ``r`` evaluates batches ``r, r + W, …``, the totals are summed (exactly the
    single-process value, no image counted twice).
    """
    device = model.base.loc.device
    total = torch.zeros((), dtype=torch.float64, device=device)
    starts = list(range(0, len(images), batch_size))[distributed.rank() :: distributed.world_size()]
    show = progress and distributed.is_main()
    bar = tqdm(total=len(images), desc=desc, unit="img", disable=not show, leave=False)
    for start in starts:
        x = images[start : start + batch_size].to(device).long()
        generator = stream(seed, "eval", start // batch_size, device=device)
        if k is None:
            log_p = model.elbo(x, generator=generator)
        else:
            log_p = model.iwbo(x, k, chunk=kbs, generator=generator)
        total += log_p.double().sum()
        bar.update(len(x) * distributed.world_size())
    bar.close()
    nats = (distributed.all_sum(total) / len(images)).item()
    return {
        "bpd": -nats / (model.config.num_dims * math.log(2)),
        "nats": nats,
        "images": len(images),
        "k": k or 1,
    }
