"""The training schedule (spec §13.1-13.2): how many steps a run takes, and at which rate."""

from __future__ import annotations

import dataclasses
import math

from .config import ConfigError, TrainConfig


@dataclasses.dataclass(frozen=True)
class Plan:
    """How many steps: per epoch (the last partial batch is kept, as official), in all, and in
    the main stage (before fine-tuning, for the cosine schedule)."""

    steps_per_epoch: int
    total_steps: int
    main_steps: int

    @classmethod
    def of(cls, cfg: TrainConfig, num_images: int) -> Plan:
        """The plan for ``num_images`` training images; every batch must hold a chunk per rank."""
        smallest = num_images % cfg.batch_size or min(num_images, cfg.batch_size)
        if smallest < cfg.batch_chunks:
            raise ConfigError(
                f"train.batch_chunks={cfg.batch_chunks}: a batch of {smallest} images "
                f"cannot be split into {cfg.batch_chunks} chunks"
            )
        per_epoch = math.ceil(num_images / cfg.batch_size)
        total = min((cfg.epochs + cfg.finetune_epochs) * per_epoch, cfg.max_steps or math.inf)
        return cls(per_epoch, total, min(cfg.epochs * per_epoch, total))


def learning_rate(
    cfg: TrainConfig, step: int, epoch: int, first_in_epoch: bool, main_steps: int
) -> float:
    """Learning rate of optimizer step ``step`` (0-based), in ``epoch``.

    ``official``: ``lr·min(1, step/warmup)``, times ``gamma`` on the first step of each epoch
    after the first (the official warm-up and per-epoch schedulers interfere so that the decay
    never accumulates, spec §13.2; with torch >= 2 the very first step runs at lr 0).
    ``exponential``: ``lr·min(1, step/warmup)·gamma^epoch``. ``cosine``: decay to 0 over the
    ``main_steps`` steps of the main stage. After ``epochs`` epochs: ``finetune_lr``.
    """
    if epoch >= cfg.epochs:
        return cfg.finetune_lr
    warm = min(1.0, step / cfg.warmup) if cfg.warmup else 1.0
    if cfg.schedule == "official":
        return cfg.lr * warm * (cfg.gamma if first_in_epoch and epoch > 0 else 1.0)
    if cfg.schedule == "exponential":
        return cfg.lr * warm * cfg.gamma**epoch
    return cfg.lr * warm * 0.5 * (1 + math.cos(math.pi * min(1.0, step / main_steps)))
