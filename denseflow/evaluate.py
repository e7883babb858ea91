"""Bits/dim of images: the single-sample ELBO (spec §10) or the importance-weighted bound IWBO-k
(§11), per image (:func:`score_images`, e.g. for out-of-distribution scores) or as the mean over
a test set (:func:`evaluate_images`)."""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Callable, Mapping, Sequence

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
    k: int | Sequence[int] | None = None,
    kbs: int | None = None,
    seed: int = 0,
    progress: bool = True,
    desc: str = "evaluate",
    cuda_graph: bool = True,
) -> torch.Tensor:
    """Per-image ``log p̂(x)`` in nats, float64 ``(N,)``, of ``images`` (uint8 ``(N, C, H, W)``)
    under ``model`` in its current mode.

    ``k=None``: one noise draw per image (ELBO). Otherwise IWBO-k with ``kbs`` copies of each
    batch per pass; ``k`` a sequence: ``(len(k), N)``, row ``i`` IWBO-``k[i]`` of the first
    ``k[i]`` of ``max(k)`` draws (:meth:`~denseflow.model.DenseFlow.iwbo`). The noises of batch
    ``i`` come from the stream ``(seed, "eval", i)``, so the values are reproducible and
    independent of how batches are shared out. In a process group every rank calls this with
    the same arguments: rank ``r`` scores batches ``r, r + W, …`` and every rank gets every
    image's value, in dataset order (exactly the single-process values). On a GPU the batches
    replay CUDA graphs (:class:`denseflow.graph.GraphedInference`, the same values) unless
    ``cuda_graph`` is False.
    """
    scorer = inference(model, cuda_graph, say=distributed.say)

    ks = [None] if k is None else [k] if isinstance(k, int) else list(k)

    def score(x: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        if k is None:
            return {"None": scorer.elbo(x, generator=generator)}
        bounds = scorer.iwbo(x, ks, chunk=kbs, generator=generator)
        return {str(j): bound for j, bound in zip(ks, bounds, strict=True)}

    names = [str(j) for j in ks]
    values = _batches(model, images, batch_size, seed, progress, desc, names, score)
    rows = [values[name] for name in names]
    return rows[0] if k is None or isinstance(k, int) else torch.stack(rows)


@torch.no_grad()
def score_terms(
    model: DenseFlow,
    images: torch.Tensor,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Per image, the summands of the ELBO (:meth:`~denseflow.model.DenseFlow.elbo_terms`) in
    nats, float64 ``(N,)`` each: the draws of :func:`score_images`'s ELBO (the same streams),
    so they sum to its values to float rounding. Eager (no CUDA graphs)."""

    def score(x: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return model.elbo_terms(x, generator=generator)

    names = model.term_names
    return _batches(model, images, batch_size, seed, progress, "terms", names, score)


def _batches(
    model: DenseFlow,
    images: torch.Tensor,
    batch_size: int,
    seed: int,
    progress: bool,
    desc: str,
    names: Sequence[str],
    score: Callable[[torch.Tensor, torch.Generator], dict[str, torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """``score(x, generator)`` of every batch (``(B,)`` values of ``names``), batch ``i`` with
    the stream ``(seed, "eval", i)``, shared out over the ranks: float64 ``(N,)`` by name, every
    image's value on every rank."""
    device = model.base.loc.device
    values = {name: torch.zeros(len(images), dtype=torch.float64, device=device) for name in names}
    starts = list(range(0, len(images), batch_size))[distributed.rank() :: distributed.world_size()]
    show = progress and distributed.is_main()
    bar = tqdm(total=len(images), desc=desc, unit="img", disable=not show, leave=False)
    for start in starts:
        x = images[start : start + batch_size].to(device).long()
        generator = stream(seed, "eval", start // batch_size, device=device)
        for name, value in score(x, generator).items():
            values[name][start : start + len(x)] = value.double()
        bar.update(len(x) * distributed.world_size())
    bar.close()
    return {name: distributed.all_sum(v) for name, v in values.items()}  # one rank per image


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


def with_error(value: float, error: float | None) -> str:
    """``3.7325 ± 0.0123`` (the value alone without an error)."""
    return f"{value:.4f}" + (f" ± {error:.4f}" if error is not None else "")


def in_words(figures: Mapping[str, float | None], iwbo: bool) -> str:
    """:func:`summarize`'s figures in words: ``3.7325 ± 0.0123 (ELBO …; ELBO − IWBO …, paired;
    ± one standard error over the 2,000 images``, the parenthesis left open."""
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


def curve_in_words(curve: Mapping[int, Mapping[str, float | None]]) -> str:
    """IWBO-j bits/dim for each j of a ``--k`` list (the first j of the largest j's draws)."""
    words = [f"k={j} {with_error(c['bpd'], c['bpd_sem'])}" for j, c in curve.items()]
    return f"IWBO-k bits/dim of the first k of {max(curve)} draws: {', '.join(words)}"


def terms_in_words(terms_bpd: Mapping[str, float], elbo_bpd: float) -> str:
    """A table of each ELBO summand's bits/dim (:func:`score_terms`' means), their sum and the
    ELBO it adds up to."""
    width = max(map(len, terms_bpd))
    lines = ["ELBO bits/dim by term (the same draws; a negative share lowers the bits/dim):"]
    lines += [f"  {name:<{width}}  {value:+9.4f}" for name, value in terms_bpd.items()]
    lines.append(f"  {'sum':<{width}}  {sum(terms_bpd.values()):+9.4f}  (ELBO {elbo_bpd:.4f})")
    return "\n".join(lines)


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
