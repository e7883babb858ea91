"""Bits/dim of images: the single-sample ELBO (spec §10) or the importance-weighted bound IWBO-k
(§11), per image (:func:`score_images`, e.g. for out-of-distribution scores; IWBO for several k
from one run) or as the mean over a test set (:func:`evaluate_images`); the ELBO's summands per
image (:func:`score_terms`); an evaluation's figures with their standard errors over the images
(:func:`summarize`). A long evaluation given ``partial=`` survives an interruption."""

from __future__ import annotations

import csv
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from . import checkpoint as ckpt
from . import distributed
from .graph import inference
from .model import DenseFlow, draw_counts, positive_int
from .seeding import stream

#: a partial evaluation (``partial=``) is kept at most this often, and when it stops early
SAVE_SECONDS = 60.0


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
    partial: str | os.PathLike | None = None,
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
    ``cuda_graph`` is False. ``partial``: a file that keeps the scores done so far (every
    :data:`SAVE_SECONDS` and when the call stops early): the same call continues from it and
    gives bitwise the values of an uninterrupted one; it is removed when the call completes.
    """
    batch_size = _check_arguments(model, images, batch_size)
    ks = None if k is None else draw_counts(k)
    kbs = None if kbs is None else positive_int(kbs, "kbs")
    scorer = inference(model, cuda_graph, say=distributed.say)
    names = ["elbo"] if ks is None else [f"iwbo{j}" for j in ks]

    def score(x: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        if ks is None:
            return {"elbo": scorer.elbo(x, generator=generator)}
        bounds = scorer.iwbo(x, ks, chunk=kbs, generator=generator)
        return dict(zip(names, bounds, strict=True))

    keep = None
    if partial is not None:  # hashing DenseFlow-74-10 and 10,000 CIFAR images: 0.6 s (2 cores)
        keep = _Partial(partial, _identity(model, images, batch_size, seed, ks, kbs, cuda_graph))
    values = _batches(model, images, batch_size, seed, progress, desc, names, score, keep)
    rows = [values[name] for name in names]
    return torch.stack(rows) if isinstance(k, Sequence) else rows[0]


@torch.no_grad()
def score_terms(
    model: DenseFlow,
    images: torch.Tensor,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
    partial: str | os.PathLike | None = None,
) -> dict[str, torch.Tensor]:
    """Per image, the summands of the ELBO (:meth:`~denseflow.model.DenseFlow.elbo_terms`) in
    nats, float64 ``(N,)`` each: the draws of :func:`score_images`'s ELBO (the same streams),
    so they sum to its values to float rounding. Eager (no CUDA graphs). ``partial``: as for
    :func:`score_images`."""

    batch_size = _check_arguments(model, images, batch_size)

    def score(x: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return model.elbo_terms(x, generator=generator)

    names = model.term_names
    keep = None
    if partial is not None:
        keep = _Partial(partial, _identity(model, images, batch_size, seed, "terms"))
    return _batches(model, images, batch_size, seed, progress, "terms", names, score, keep)


def _check_arguments(model: DenseFlow, images: torch.Tensor, batch_size: int) -> int:
    """Refuse what would score wrongly or fail deep: a ``model`` that is not a DenseFlow, images
    that are not integer pixel values of its shape (the model's own check, naming ``images``), a
    ``batch_size`` that is not a positive integer; returns the batch size as an int."""
    if not isinstance(model, DenseFlow):
        raise TypeError(
            f"model: expected a DenseFlow, got {type(model).__name__} "
            "(load one with DenseFlow.from_pretrained(...))"
        )
    model._check_images(images, "images")
    return positive_int(batch_size, "batch_size")


def _identity(
    model: DenseFlow, images: torch.Tensor, batch_size: int, seed: int, *settings
) -> dict:
    """What a partial evaluation's scores depend on: the model's parameters and buffers, their
    memory layout and the mode; the images; the batches, noise streams and other settings."""
    return {
        "model": model.state_dict(),
        "layout": [tuple(p.stride()) for p in model.parameters()],
        "training": model.training,
        "device": model.base.loc.device.type,
        "images": images,
        "batches": [batch_size, seed],
        "settings": repr(settings),
    }


class _Partial:
    """The scores of an evaluation done so far, kept in a checkpoint-format file (atomic,
    checksummed) so that an interrupted evaluation continues where it stopped: valid only for
    the same model (parameters, buffers, layout, mode), images, settings and process group; one
    file per rank, removed once the evaluation is complete."""

    def __init__(self, path: str | os.PathLike, identity: dict) -> None:
        rank, world = distributed.rank(), distributed.world_size()
        self.path = Path(path) if world == 1 else Path(f"{path}.rank{rank}")
        self.identity = ckpt.checksum(identity | {"world": world, "rank": rank})
        self.saved = time.perf_counter()

    def restore(self, values: dict[str, torch.Tensor]) -> set[int]:
        """The batch starts already scored, their values copied into ``values``."""
        if not self.path.exists():
            return set()
        try:
            payload = ckpt.load(self.path)
        except ckpt.CheckpointError as err:
            distributed.say(f"{err}: scoring from the start")
            return set()
        if payload.get("identity") != self.identity:
            distributed.say(
                f"{self.path}: a partial evaluation of another model, images or settings: "
                "scoring from the start"
            )
            return set()
        for name, value in values.items():
            value.copy_(payload["values"][name])
        distributed.note(f"{self.path}: continuing a partial evaluation")
        return set(payload["done"])

    def save(self, values: dict[str, torch.Tensor], done: set[int], now: bool = False) -> None:
        """Keep the scores so far, at most every :data:`SAVE_SECONDS` unless ``now``."""
        if now or time.perf_counter() - self.saved > SAVE_SECONDS:
            kept = {name: value.cpu() for name, value in values.items()}
            payload = {"identity": self.identity, "done": sorted(done), "values": kept}
            ckpt.save(self.path, payload)
            self.saved = time.perf_counter()


def _batches(
    model: DenseFlow,
    images: torch.Tensor,
    batch_size: int,
    seed: int,
    progress: bool,
    desc: str,
    names: Sequence[str],
    score: Callable[[torch.Tensor, torch.Generator], dict[str, torch.Tensor]],
    partial: _Partial | None = None,
) -> dict[str, torch.Tensor]:
    """``score(x, generator)`` of every batch (``(B,)`` values of ``names``), batch ``i`` with
    the stream ``(seed, "eval", i)``, shared out over the ranks: float64 ``(N,)`` by name, every
    image's value on every rank. With ``partial``, batches scored before are not scored again,
    and the scores so far are kept every :data:`SAVE_SECONDS` and when the loop stops early."""
    device = model.base.loc.device
    values = {name: torch.zeros(len(images), dtype=torch.float64, device=device) for name in names}
    starts = list(range(0, len(images), batch_size))[distributed.rank() :: distributed.world_size()]
    done = partial.restore(values) if partial is not None else set()
    show = progress and distributed.is_main()
    bar = tqdm(total=len(images), desc=desc, unit="img", disable=not show, leave=False)
    try:
        for start in starts:
            x = images[start : start + batch_size]
            if start not in done:
                x = x.to(device).long()
                generator = stream(seed, "eval", start // batch_size, device=device)
                for name, value in score(x, generator).items():
                    values[name][start : start + len(x)] = value.double()
                done.add(start)
                if partial is not None:
                    partial.save(values, done)
            bar.update(len(x) * distributed.world_size())
    except BaseException:  # an interruption or a failure: keep what was scored
        if partial is not None and done:
            partial.save(values, done, now=True)
            distributed.say(f"{partial.path}: the scores so far are kept; the same call continues")
        raise
    finally:
        bar.close()
    scores = {name: distributed.all_sum(v) for name, v in values.items()}  # one rank per image
    if partial is not None:
        partial.path.unlink(missing_ok=True)
    return scores


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
