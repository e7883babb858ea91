"""One training step: the batch a position of the run sees (:class:`Batches`) and the update it
makes (:func:`train_step`, spec §10).

:func:`denseflow.train.train` runs :func:`train_step`, or :class:`denseflow.graph.GraphedStep`
(the same numbers on static buffers, one CUDA graph on a GPU); ``denseflow bench`` times the one
``train`` would run. Every random draw comes from a stream named by the run's seed, the purpose
and the position (:mod:`denseflow.seeding`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch

from . import distributed
from .config import TrainConfig
from .data import augment
from .model import DenseFlow
from .seeding import stream

if TYPE_CHECKING:
    from .train import LoopState


#: where a chunk's noise comes from: a generator to draw from, or the named noises themselves
NoiseSource = torch.Generator | Mapping[str, torch.Tensor] | None


def backpropagate(
    model: DenseFlow,
    chunks: Sequence[tuple[torch.Tensor, NoiseSource]],
    total: int,
    ddp: torch.nn.Module | None = None,
) -> torch.Tensor:
    """Forward and backward pass of each chunk, gradients accumulated into ``.grad``; returns
    this process's share of the loss, ``Σ bits/dim / total`` over its chunks (spec §10).

    ``chunks``: ``(images, noise)`` with ``noise`` a generator the model draws from or the named
    noises themselves (:attr:`DenseFlow.noise_names`); ``ddp``: the DistributedDataParallel
    wrapper of ``model`` (see :mod:`denseflow.distributed`).
    """
    forward = ddp or model
    world = distributed.world_size() if ddp is not None else 1
    nats_to_bits = model.config.num_dims * math.log(2)
    loss = torch.zeros((), device=chunks[0][0].device)
    for i, (x, noise) in enumerate(chunks):
        source = {"noise": noise} if isinstance(noise, Mapping) else {"generator": noise}
        with distributed.no_sync(forward, last=i == len(chunks) - 1):
            share = (-forward(x, **source) / nats_to_bits).sum() / total
            (share * world).backward()  # DDP averages over the ranks: undo its 1/world
        loss += share.detach()
    return loss


def gradient_norm(model: DenseFlow) -> tuple[list[torch.nn.Parameter], torch.Tensor]:
    """The parameters that hold a gradient, and the 2-norm of all their gradients together."""
    params = [p for p in model.parameters() if p.grad is not None]
    return params, torch.nn.utils.get_total_norm([p.grad for p in params])


def train_step(
    model: DenseFlow,
    optimizer: torch.optim.Optimizer,
    chunks: list[tuple[torch.Tensor, torch.Generator | None]],
    lr: float,
    grad_clip: float = 0.0,
    batch_size: int | None = None,
    ddp: torch.nn.Module | None = None,
) -> torch.Tensor:
    """One optimizer step; loss = mean bits/dim over the global batch (spec §10). Returns the loss.

    ``chunks``: this process's ``(images, noise generator)`` parts of the global batch of
    ``batch_size`` images (default: all of it here), each one forward pass, gradients accumulated
    (see :mod:`denseflow.distributed`); ``ddp``: the DistributedDataParallel wrapper of ``model``.
    A non-finite loss or gradient skips the update (parameters and optimizer state untouched);
    the returned loss is then non-finite too. :func:`train` runs this step, or
    :class:`denseflow.graph.GraphedStep` (the same numbers on static buffers, one CUDA graph on a
    GPU); ``denseflow bench`` times the one :func:`train` would run.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    total = batch_size or sum(len(x) for x, _ in chunks)
    optimizer.zero_grad(set_to_none=True)
    loss = backpropagate(model, chunks, total, ddp)
    if ddp is not None:
        distributed.all_sum(loss)
    params, norm = gradient_norm(model)
    if not torch.isfinite(loss + norm):
        optimizer.zero_grad(set_to_none=True)
        return loss + norm.detach()
    if grad_clip:
        torch.nn.utils.clip_grads_with_norm_(params, grad_clip, norm)
    optimizer.step()
    return loss


class Batches:
    """The training batch of a position: epoch ``e``'s order from the stream ``(seed, "order",
    e)``, step ``t``'s augmentation from ``(seed, "augment", t)``; uint8 images on the CPU."""

    def __init__(self, images: torch.Tensor, cfg: TrainConfig, augmentation: str) -> None:
        self.images, self.cfg, self.augmentation = images, cfg, augmentation
        self._order: tuple[int, torch.Tensor] | None = None

    def __call__(self, state: LoopState) -> torch.Tensor:
        cfg = self.cfg
        if self._order is None or self._order[0] != state.epoch:
            generator = stream(cfg.seed, "order", state.epoch)
            self._order = state.epoch, torch.randperm(len(self.images), generator=generator)
        indices = self._order[1][state.batch * cfg.batch_size : (state.batch + 1) * cfg.batch_size]
        return augment(
            self.images[indices], self.augmentation, stream(cfg.seed, "augment", state.step)
        )

    def chunks(
        self, x: torch.Tensor, step: int, device: torch.device
    ) -> list[tuple[torch.Tensor, torch.Generator]]:
        """This rank's chunks of the global batch ``x`` on ``device``, each with the noise
        stream ``(seed, "noise", step, chunk)``."""
        seed, parts = self.cfg.seed, distributed.my_chunks(x, self.cfg.batch_chunks)
        return [
            (
                part.to(device, non_blocking=True).long(),
                stream(seed, "noise", step, j, device=device),
            )
            for j, part in parts
        ]
