"""Bits/dim of images: the single-sample ELBO (spec §10) or the importance-weighted bound IWBO-k
(§11), per image (:func:`score_images`, e.g. for out-of-distribution scores) or as the mean over
a test set (:func:`evaluate_images`)."""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping, Sequence

import torch
from tqdm import tqdm

from . import distributed
from .graph import inference
from .model import DenseFlow
from .seeding import stream


@torch.no_grad()
def score_images(
    model: DenseFlow,
    images: torch.Tensor,
    batch_size: int = 64,
    k: int | None = None,
    kbs: int | None = None,
    seed: int = 0,
    progress: bool = True,
    desc: str = "evaluate",
    cuda_graph: bool = True,
) -> torch.Tensor:
    """Per-image ``log p̂(x)`` in nats, float64 ``(N,)``, of ``images`` (uint8 ``(N, C, H, W)``)
    under ``model`` in its current mode.

    ``k=None``: one noise draw per image (ELBO). Otherwise IWBO-k with ``kbs`` copies of each
    batch per pass. The noises of batch ``i`` come from the stream ``(seed, "eval", i)``, so the
    values are reproducible and independent of how batches are shared out. In a process group
    every rank calls this with the same arguments: rank ``r`` scores batches ``r, r + W, …`` and
    every rank gets every image's value, in dataset order (exactly the single-process values).
    On a GPU the batches replay CUDA graphs (:class:`denseflow.graph.GraphedInference`, the same
    values) unless ``cuda_graph`` is False.
    """
    device = model.base.loc.device
    scorer = inference(model, cuda_graph, say=distributed.say)
    values = torch.zeros(len(images), dtype=torch.float64, device=device)
    starts = list(range(0, len(images), batch_size))[distributed.rank() :: distributed.world_size()]
    show = progress and distributed.is_main()
    bar = tqdm(total=len(images), desc=desc, unit="img", disable=not show, leave=False)
    for start in starts:
        x = images[start : start + batch_size].to(device).long()
        generator = stream(seed, "eval", start // batch_size, device=device)
        if k is None:
            log_p = scorer.elbo(x, generator=generator)
        else:
            log_p = scorer.iwbo(x, k, chunk=kbs, generator=generator)
        values[start : start + len(x)] = log_p.double()
        bar.update(len(x) * distributed.world_size())
    bar.close()
    return distributed.all_sum(values)  # each image is non-zero on exactly one rank


def to_bits_per_dim(model: DenseFlow, nats: torch.Tensor) -> torch.Tensor:
    """``−log p̂ / (D·ln 2)``: nats per image to bits per data dimension."""
    return -nats / (model.config.num_dims * math.log(2))


def standard_error(values: torch.Tensor) -> float | None:
    """Standard error of the mean of ``values`` over its entries (images): the sample standard
    deviation (N − 1) over √N, in float64; None for fewer than two values."""
    if len(values) < 2:
        return None
    return (values.double().std() / math.sqrt(len(values))).item()


def summarize(model: DenseFlow, nats: Mapping[str, torch.Tensor], bound: str) -> dict:
    """The figures of an evaluation from per-image ``nats`` (``{"elbo": …}`` and, for IWBO, the
    ``bound``'s): mean bits/dim of the bound and of the ELBO, their standard errors over the
    images, and the paired standard error of ELBO − bound (per image)."""
    bpd = {key: to_bits_per_dim(model, value) for key, value in nats.items()}
    return {
        "bpd": to_bits_per_dim(model, nats[bound].mean()).item(),
        "bpd_sem": standard_error(bpd[bound]),
        "elbo_bpd": to_bits_per_dim(model, nats["elbo"].mean()).item(),
        "elbo_bpd_sem": standard_error(bpd["elbo"]),
        "elbo_minus_bpd_sem": standard_error(bpd["elbo"] - bpd[bound]),
        "nats": nats[bound].mean().item(),
        "images": len(nats[bound]),
    }


def in_words(figures: Mapping[str, float | None], iwbo: bool) -> str:
    """:func:`summarize`'s figures in words: ``3.7325 ± 0.0123 (ELBO …; ELBO − IWBO …, paired;
    ± one standard error over the 2,000 images``, the parenthesis left open."""

    def with_error(value: float, error: float | None) -> str:
        return f"{value:.4f}" + (f" ± {error:.4f}" if error is not None else "")

    notes, n = [], figures["images"]
    if iwbo:
        gap = figures["elbo_bpd"] - figures["bpd"]
        notes.append(f"ELBO {with_error(figures['elbo_bpd'], figures['elbo_bpd_sem'])}")
        notes.append(f"ELBO − IWBO {with_error(gap, figures['elbo_minus_bpd_sem'])}, paired")
    if figures["bpd_sem"] is not None:
        notes.append(f"± one standard error over the {n:,} images")
    else:
        notes.append(f"{n} image{'s' * (n != 1)}")
    return f"{with_error(figures['bpd'], figures['bpd_sem'])} ({'; '.join(notes)}"


def evaluate_images(
    model: DenseFlow,
    images: torch.Tensor,
    batch_size: int = 64,
    k: int | None = None,
    kbs: int | None = None,
    seed: int = 0,
    progress: bool = True,
    desc: str = "evaluate",
    cuda_graph: bool = True,
) -> dict[str, float]:
    """Mean bits/dim of ``images`` (:func:`score_images`, summed in float64): ``{"bpd", "nats",
    "images", "k"}``."""
    nats = score_images(model, images, batch_size, k, kbs, seed, progress, desc, cuda_graph)
    nats = nats.sum().item()
    nats /= len(images)
    bpd = to_bits_per_dim(model, torch.tensor(nats, dtype=torch.float64)).item()
    return {"bpd": bpd, "nats": nats, "images": len(images), "k": k or 1}


def write_scores(
    path: str | os.PathLike, bpd: Mapping[str, torch.Tensor], names: Sequence[str] | None = None
) -> None:
    """A CSV with one row per image in dataset order: ``index``, ``file`` (where the images have
    file names), then one bits/dim column per bound (``elbo_bpd``, ``iwbo16_bpd``, ...)."""
    columns = {f"{bound}_bpd": values.tolist() for bound, values in bpd.items()}
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["index", *(["file"] if names else []), *columns])
        for i, row in enumerate(zip(*columns.values(), strict=True)):
            writer.writerow([i, *([names[i]] if names else []), *(f"{v:.6f}" for v in row)])
