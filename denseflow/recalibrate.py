"""BatchNorm recalibration: running statistics recomputed for the weights as they are.

The coupling networks normalise with BatchNorm. In training mode it uses each batch's own
statistics; in eval mode — where the density is defined and every evaluation and sample runs — it
uses running averages (momentum 0.1) that trail weights which change every step. After a short
run that lag costs up to 0.3 bits/dim (``docs/results.md``); the official recipe hides it behind
its 2e-5 fine-tune stage.

:func:`recalibrate_batchnorm` runs ``N`` training-mode forward passes over fixed batches of
training images (no parameter changes, noises from the ``(seed, "recalibrate", batch)``
streams) and sets every BatchNorm's running mean and variance to the exact population
statistics of its inputs over those batches: the mean and the unbiased variance over all
``N·B·H·W`` values per channel, accumulated per batch in float64 and combined in batch order
(Chan et al.'s pairwise update). The images are un-augmented training images, taken in the order
of the ``(seed, "recalibrate")`` permutation, in batches of the training batch size (the batch
statistics seen by later layers are those of training). In a process group batch ``i`` runs on
rank ``i mod W`` and the per-batch statistics are shared exactly, so every rank computes the
single-process statistics.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor, nn
from tqdm import tqdm

from . import distributed
from .model import DenseFlow, eager
from .seeding import stream


def describe(batches: int, batch_size: int, seed: int = 0, images: int | None = None) -> str:
    """The statistics of a recalibration, in words (stored with exported weights). ``images``:
    how many training images there are; with fewer than ``batches·batch_size`` every one is used
    and the words say the batches that ran, not those asked for."""
    if images is None or images >= batches * batch_size:
        runs = _count(batches, "training batch", "es") + f" of {batch_size}"
    else:
        full, rest = divmod(images, batch_size)
        parts = [_count(full, "training batch", "es") + f" of {batch_size}"] if full else []
        parts += [f"1 {'' if full else 'training batch '}of {rest}"] if rest else []
        runs = f"{' and '.join(parts)} (all {images} training images)"
    return f"recalibrated: population statistics of {runs} (seed {seed})"


def _count(n: int, noun: str, plural: str = "s") -> str:
    return f"{n} {noun}{plural if n != 1 else ''}"


def batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """Every BatchNorm layer of ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def recalibration_batches(images: Tensor, batches: int, batch_size: int, seed: int) -> list[Tensor]:
    """The fixed batches of recalibration: the first ``batches·batch_size`` images of the
    ``(seed, "recalibrate")`` permutation (all images, if there are fewer)."""
    order = torch.randperm(len(images), generator=stream(seed, "recalibrate"))
    chosen = images[order[: batches * batch_size]]
    return list(chosen.split(batch_size))


@torch.no_grad()
def recalibrate_batchnorm(
    model: DenseFlow,
    images: Tensor,
    batches: int,
    batch_size: int,
    seed: int = 0,
    progress: bool = False,
) -> int:
    """Set every BatchNorm's running statistics to the population statistics of its inputs over
    ``batches`` fixed batches of ``images`` (uint8 training images, ``(N, C, H, W)``); returns
    the number of batches used. The model's mode and parameters are left as they were.
    ``progress``: a progress bar over the batches (rank 0's)."""
    layers = batchnorms(model)
    parts = recalibration_batches(images, batches, batch_size, seed)
    if not layers or not parts:
        return len(parts)
    device = model.base.loc.device
    # per layer and batch: (count, mean, M2) per channel, float64; zeros where another rank ran
    stats = [
        torch.zeros(len(parts), 3, m.num_features, dtype=torch.float64, device=device)
        for m in layers
    ]
    current = {"batch": 0}

    def record(index: int):
        def hook(module, args):
            x = args[0].detach().double().transpose(0, 1).flatten(1)  # (C, B·H·W)
            mean = x.mean(1)
            stats[index][current["batch"]] = torch.stack(
                [torch.full_like(mean, x.shape[1]), mean, (x - mean[:, None]).square().sum(1)]
            )

        return hook

    hooks = [m.register_forward_pre_hook(record(i)) for i, m in enumerate(layers)]
    saved = [
        (m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
        for m in layers
    ]
    was_training = model.training
    try:
        model.train()
        mine = range(distributed.rank(), len(parts), distributed.world_size())
        show = progress and distributed.is_main()
        with eager():  # a few passes: not worth compiling
            for i in tqdm(mine, desc="recalibrate", unit="batch", disable=not show, leave=False):
                current["batch"] = i
                x = parts[i].to(device).long()
                model.elbo(x, generator=stream(seed, "recalibrate", i, device=device))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
        for m, (mean, var, count) in zip(layers, saved, strict=True):  # undo the passes' updates
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.num_batches_tracked.copy_(count)
    for m, table in zip(layers, stats, strict=True):
        count, mean, m2 = _combine(distributed.all_sum(table))
        m.running_mean.copy_(mean)
        m.running_var.copy_(m2 / (count - 1))
    return len(parts)


def _combine(table: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Pool per-batch ``(count, mean, M2)`` rows, in row order (Chan, Golub, LeVeque 1979)."""
    count, mean, m2 = table[0]
    for n, batch_mean, batch_m2 in table[1:]:
        total = count + n
        delta = batch_mean - mean
        mean = mean + delta * n / total
        m2 = m2 + batch_m2 + delta.square() * count * n / total
        count = total
    return count, mean, m2


@contextmanager
def recalibrated(model: DenseFlow, images: Tensor, batches: int, batch_size: int, seed: int = 0):
    """Inside the block the model has recalibrated BatchNorm statistics (``batches`` > 0); on
    exit the statistics it had come back, so training continues (and resumes) exactly as without."""
    if batches <= 0:
        yield
        return
    layers = batchnorms(model)
    saved = [(m.running_mean.clone(), m.running_var.clone()) for m in layers]
    recalibrate_batchnorm(model, images, batches, batch_size, seed)
    try:
        yield
    finally:
        for m, (mean, var) in zip(layers, saved, strict=True):
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
