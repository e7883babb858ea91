"""The training loop (spec §13), readable top to bottom: :func:`train`.

Run directory::

    config.yaml          the resolved configuration
    data.json            which files were read (paths, release, sha256)
    metrics.jsonl        one JSON object per logged step ("train") and per evaluation ("eval")
    checkpoints/         step_XXXXXXX.pt, the last ``train.keep_checkpoints`` kept
    samples/             step_XXXXXXX.png, a grid at every evaluation
    best.pt, final.pt    inference exports (weights + config): best test bpd, end of training
    bpd_curve.png        train and test bits/dim (needs matplotlib)

Every random choice of step ``t`` (batch order of its epoch, augmentation, model noise) comes
from generators seeded by ``(train.seed, epoch)`` or ``(train.seed, t)``, so a resumed run
continues exactly as if it had never stopped.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import math
import signal
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm import tqdm

from . import checkpoint as ckpt
from . import distributed
from .config import ConfigError, RunConfig, TrainConfig
from .data import augment, load_images
from .distributed import seeded_generator
from .evaluate import evaluate_images
from .model import DenseFlow
from .sample import sample_seeds, save_grid


class TrainingDiverged(ValueError):
    """Too many non-finite steps in a row after the allowed rollbacks."""


def learning_rate(cfg: TrainConfig, step: int, epoch: int, first_in_epoch: bool, main_steps: int) -> float:
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
    the returned loss is then non-finite too. This is the step :func:`train` runs and
    ``denseflow bench`` times.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    forward = ddp or model
    world = distributed.world_size() if ddp is not None else 1
    total = batch_size or sum(len(x) for x, _ in chunks)
    optimizer.zero_grad(set_to_none=True)
    loss = torch.zeros((), device=chunks[0][0].device)
    for i, (x, generator) in enumerate(chunks):
        with distributed.no_sync(forward, last=i == len(chunks) - 1):
            share = (-forward(x, generator=generator) / (model.config.num_dims * math.log(2))).sum() / total
            (share * world).backward()  # DDP averages over the ranks: undo its 1/world
        loss += share.detach()
    if ddp is not None:
        distributed.all_sum(loss)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads)
    if not torch.isfinite(loss + norm):
        optimizer.zero_grad(set_to_none=True)
        return loss + norm.detach()
    if grad_clip:
        torch.nn.utils.clip_grads_with_norm_(grads, grad_clip, norm)
    optimizer.step()
    return loss


def prepare(model: DenseFlow, cfg: TrainConfig, device: torch.device) -> DenseFlow:
    """Move ``model`` to ``device`` with the speed/memory settings of ``cfg`` (no change to the maths).

    ``low_memory`` also caps glibc's heap growth on the CPU (allocations from 1 MiB on are
    returned to the system when freed): activation checkpointing frees and reallocates large
    blocks every step, which otherwise stay resident.
    """
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.set_net_precision(_net_dtype(cfg))
    if cfg.compile:
        mode = {} if cfg.compile_mode == "default" else {"mode": cfg.compile_mode}
        model.compile_nets(backend=cfg.compile_backend, dynamic=False, **mode)  # dynamic shapes trip inductor
    if cfg.low_memory:
        model.set_low_memory(True)
        if device.type == "cpu":
            _cap_heap_growth(1 << 20)
    return model


def _net_dtype(cfg: TrainConfig) -> torch.dtype | None:
    """The conditioner networks' autocast dtype while training (None: float32)."""
    return torch.bfloat16 if cfg.precision == "bfloat16" else None


def _cap_heap_growth(threshold: int) -> None:
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return
    libc.mallopt(-3, threshold)  # M_MMAP_THRESHOLD; a fixed value also stops its dynamic growth


def _wrap(model: DenseFlow, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel around ``model`` (after the ActNorm init: DDP broadcasts rank 0's state)."""
    # channels_last (1, C, 1, 1) weights have two valid stride patterns; DDP warns about the
    # harmless one-off mismatch between them
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when available, else the CPU; under torchrun CUDA means this rank's GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device {name!r}: not a torch device (auto, cpu, cuda, cuda:N, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r}: this torch ({torch.__version__}) sees no CUDA GPU; use cpu or auto")
    return distributed.local_device(device)


@contextmanager
def _stop_requests():
    """SIGINT/SIGTERM ask the loop to stop at the next step boundary (a second SIGINT aborts)."""
    requested = {"stop": False}

    def handler(signum, frame):
        if requested["stop"] and signum == signal.SIGINT:
            raise KeyboardInterrupt
        requested["stop"] = True

    try:
        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread: no signal handling
        previous = {}
    try:
        yield requested
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


class _Log:
    """metrics.jsonl (truncated to the resumed step), optional TensorBoard; ``run_dir=None`` (ranks
    other than 0) logs nothing."""

    def __init__(self, run_dir: Path | None, resume_step: int, tensorboard: bool) -> None:
        self.path, self.writer = (run_dir / "metrics.jsonl" if run_dir else None), None
        if self.path is None:
            return
        kept = []
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= resume_step]
        self.path.write_text("".join(line + "\n" for line in kept))
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                tqdm.write("tensorboard is not installed (pip install tensorboard): logging to metrics.jsonl only")
            else:
                self.writer = SummaryWriter(str(run_dir / "tb"))

    def write(self, record: dict[str, Any]) -> None:
        if self.path is None:
            return
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.writer:
            for key, value in record.items():
                if key not in ("kind", "step", "epoch") and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{record['kind']}/{key}", value, record["step"])

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.path.read_text().splitlines()]


class _Monitor:
    """Per dense block: the largest |log-scale| of any coupling and the largest |log-det| per
    dimension of any glow-like step, gathered by hooks during the monitored training forward."""

    def __init__(self, model: DenseFlow) -> None:
        self.values: dict[str, float] = {}
        self.hooks = []
        for s, block in enumerate(model.blocks, start=1):
            for unit in block.units:
                for step in unit.children():
                    self.hooks.append(step.coupling.net.register_forward_hook(self._scale(f"block{s}")))
                    self.hooks.append(step.register_forward_hook(self._logdet(f"block{s}")))
        self.active = False

    def _keep(self, key: str, value: float) -> None:
        if self.active:
            self.values[key] = max(self.values.get(key, 0.0), value)

    def _scale(self, block: str):
        def hook(module, args, out):
            s = out.detach().unflatten(1, (-1, 2))[:, :, 0]
            self._keep(f"{block}.max_abs_log_scale", (2 * torch.tanh(s / 2)).abs().max().item())

        return hook

    def _logdet(self, block: str):
        def hook(module, args, out):
            z, delta = out
            self._keep(f"{block}.max_abs_logdet_per_dim", (delta.detach().abs().max() / z[0].numel()).item())

        return hook

    def record(self) -> dict[str, float]:
        values, self.values = self.values, {}
        return values


_MATPLOTLIB_WARNED = []


def plot_bpd_curve(records: list[dict[str, Any]], path: Path) -> None:
    """Train and test bits/dim against steps; says once if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        if not _MATPLOTLIB_WARNED:
            tqdm.write("matplotlib is not installed (pip install 'denseflow[plot]'): no bpd_curve.png")
            _MATPLOTLIB_WARNED.append(True)
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for kind, key, label in (("train", "bpd", "train (batch ELBO)"), ("eval", "test_bpd", "test (ELBO)")):
        points = [(r["step"], r[key]) for r in records if r["kind"] == kind]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o" if kind == "eval" else None, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("bits/dim")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def train(
    config: RunConfig,
    run_dir: str | Path,
    data_dir: str | Path | None = None,
    resume: str | Path | dict[str, Any] | None = None,
    progress: bool = True,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Train ``config`` into ``run_dir``; return a summary (steps, last test bpd, paths).

    ``resume``: a run directory or checkpoint to continue from (model, optimizer, position), or
    the checkpoint already loaded with :func:`denseflow.checkpoint.load`.
    ``stop_after``: stop (with a checkpoint) once that many steps are done — an interruption.

    Inside an initialised process group (``torchrun``) every rank calls this: DistributedDataParallel
    over the ranks as described in :mod:`denseflow.distributed`; only rank 0 writes to ``run_dir``,
    logs and shows progress (the run directory must be visible to every rank for resume/rollback).
    """
    run_dir = Path(run_dir)
    world, main = distributed.world_size(), distributed.is_main()
    say = tqdm.write if main else lambda message: None  # messages from rank 0 only
    chunks = distributed.effective_chunks(config.train.batch_chunks, world)
    if chunks != config.train.batch_chunks:
        config = dataclasses.replace(config, train=dataclasses.replace(config.train, batch_chunks=chunks))
        say(f"train.batch_chunks raised to {chunks}, a multiple of the {world} ranks")
    cfg = config.train
    progress = progress and main
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)

    # data ------------------------------------------------------------------------------
    data_kwargs = dict(image_size=config.model.image_shape[1:], celeba_crop=config.data.celeba_crop)
    trainset = load_images(config.data.dataset, "train", data_dir, limit=config.data.train_limit, **data_kwargs)
    testset = load_images(config.data.dataset, "test", data_dir, limit=config.data.test_limit, **data_kwargs)
    if tuple(trainset.images.shape[1:]) != config.model.image_shape:
        raise ValueError(
            f"{config.data.dataset} images are {tuple(trainset.images.shape[1:])}, "
            f"the model expects model.image_shape={config.model.image_shape}"
        )

    # model, optimizer, position ----------------------------------------------------------
    model = prepare(DenseFlow(config.model), cfg, device)
    ddp = None  # the DistributedDataParallel wrapper, made once the ActNorms are initialised
    optimizer = torch.optim.Adamax(model.parameters(), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    step, epoch, batch_index, best, skipped, bad_in_a_row, lr_scale, rollbacks = 0, 0, 0, math.inf, 0, 0, 1.0, 0

    def restore(state: dict[str, Any]) -> None:
        nonlocal step, epoch, batch_index, best, skipped, lr_scale, rollbacks
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, epoch, batch_index = state["step"], state["epoch"], state["batch"]
        best, skipped = state.get("best_test_bpd", math.inf), state.get("skipped_steps", 0)
        lr_scale, rollbacks = state.get("lr_scale", 1.0), state.get("rollbacks", 0)

    if resume is not None:
        restore(resume if isinstance(resume, dict) else ckpt.load(resume))
    elif any((run_dir / "checkpoints").glob("step_*.pt")):
        raise ValueError(f"{run_dir} already holds a run's checkpoints: --resume {run_dir}, or choose another --out")
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False, default_flow_style=None))
        (run_dir / "data.json").write_text(json.dumps({"train": trainset.source, "test": testset.source}, indent=1))
    log = _Log(run_dir, step, cfg.tensorboard) if main else _Log(None, step, False)

    n = len(trainset.images)
    steps_per_epoch = math.ceil(n / cfg.batch_size)  # the last partial batch is kept, as official
    smallest = min(n, cfg.batch_size) if n % cfg.batch_size == 0 else n % cfg.batch_size
    if smallest < chunks:
        raise ValueError(
            f"train.batch_chunks={chunks}: a batch of {smallest} images cannot be split into {chunks} chunks"
        )
    total_epochs = cfg.epochs + cfg.finetune_epochs
    total_steps = min(total_epochs * steps_per_epoch, cfg.max_steps or math.inf)
    main_steps = min(cfg.epochs * steps_per_epoch, total_steps)

    def save_checkpoint() -> None:
        if not main:
            return
        payload = {
            "kind": "training",
            "config": config.to_dict(),
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "step": step,
            "epoch": epoch,
            "batch": batch_index,
            "best_test_bpd": best,
            "skipped_steps": skipped,
            "lr_scale": lr_scale,
            "rollbacks": rollbacks,
        }
        ckpt.save(run_dir / "checkpoints" / f"step_{step:07d}.pt", payload)
        for old in sorted((run_dir / "checkpoints").glob("step_*.pt"))[: -cfg.keep_checkpoints]:
            old.unlink()

    def evaluate_and_sample() -> float:
        nonlocal eval_seconds
        began = time.perf_counter()
        model.eval().set_net_precision(None)  # bf16 trains only: evaluation and sampling in float32
        result = evaluate_images(model, testset.images, config.eval.batch_size, seed=cfg.seed, progress=False)
        if cfg.num_samples:
            images = sample_seeds(model, list(range(cfg.num_samples)), cfg.sample_temperature)
            if main:
                save_grid(images, run_dir / "samples" / f"step_{step:07d}.png", num_bits=config.model.num_bits)
        model.train().set_net_precision(_net_dtype(cfg))
        log.write({"kind": "eval", "step": step, "epoch": epoch, "test_bpd": result["bpd"]})
        if main:
            plot_bpd_curve(log.records(), run_dir / "bpd_curve.png")
        eval_seconds += time.perf_counter() - began
        return result["bpd"]

    def timing() -> dict[str, float]:
        """Images and seconds of training (evaluations excluded) in this call, i.e. since the resume."""
        return {"images_seen": images_seen, "train_seconds": time.perf_counter() - started - eval_seconds}

    # the loop ----------------------------------------------------------------------------
    model.train()
    monitor = _Monitor(model)
    bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", disable=not progress, dynamic_ncols=True)
    test_bpd = None
    tic, seen = time.perf_counter(), 0
    started, images_seen, eval_seconds = time.perf_counter(), 0, 0.0
    with _stop_requests() as stop:
        while step < total_steps:
            order = torch.randperm(n, generator=seeded_generator(cfg.seed, epoch))
            while batch_index < steps_per_epoch and step < total_steps:
                indices = order[batch_index * cfg.batch_size : (batch_index + 1) * cfg.batch_size]
                x = augment(trainset.images[indices], config.data.augmentation, seeded_generator(cfg.seed, step))
                if step == 0:  # on the global batch, the same on every rank
                    model.data_init(x.to(device).long(), generator=seeded_generator(cfg.seed + 1, 0, device))
                if world > 1 and ddp is None:
                    ddp = _wrap(model, device)
                parts = [
                    (part.to(device, non_blocking=True).long(), seeded_generator(cfg.seed, step + (j << 40), device))
                    for j, part in distributed.my_chunks(x, chunks)
                ]
                lr = learning_rate(cfg, step, epoch, batch_index == 0, main_steps) * lr_scale
                monitor.active = bool(cfg.monitor_every) and (step + 1) % cfg.monitor_every == 0
                loss = train_step(model, optimizer, parts, lr, cfg.grad_clip, len(x), ddp)
                if monitor.active:
                    log.write({"kind": "monitor", "step": step + 1, "epoch": epoch, **monitor.record()})
                step, batch_index, seen, images_seen = step + 1, batch_index + 1, seen + len(x), images_seen + len(x)
                bad_in_a_row = 0 if torch.isfinite(loss) else bad_in_a_row + 1
                if bad_in_a_row:
                    skipped += 1
                    log.write({"kind": "skip", "step": step, "epoch": epoch, "skipped_steps": skipped})
                    say(f"step {step}: non-finite loss or gradient, update skipped ({skipped} so far)")
                if bad_in_a_row >= cfg.max_bad_steps:
                    if rollbacks >= cfg.max_rollbacks:
                        bar.close()
                        raise TrainingDiverged(
                            f"training diverged: {bad_in_a_row} non-finite steps in a row at step {step} after "
                            f"{rollbacks} rollback(s) (lr scale {lr_scale:g}); checkpoints kept in {run_dir}"
                        )
                    scale, count = lr_scale * cfg.rollback_lr_factor, rollbacks + 1
                    try:
                        restore(ckpt.load(run_dir))
                    except ckpt.CheckpointError:
                        bar.close()
                        raise TrainingDiverged(
                            f"training diverged at step {step}, before any good checkpoint: lower train.lr"
                        ) from None
                    lr_scale, rollbacks, bad_in_a_row = scale, count, 0
                    log.write({"kind": "rollback", "step": step, "epoch": epoch, "lr_scale": lr_scale})
                    say(f"rolled back to step {step} with the learning rate scaled by {lr_scale:g}")
                    bar.n = step
                    break

                if step % cfg.log_every == 0 or step == total_steps:
                    rate = seen / (time.perf_counter() - tic)
                    bpd = loss.item()
                    log.write({"kind": "train", "step": step, "epoch": epoch, "bpd": bpd, "lr": lr, "img_per_s": rate})
                    bar.set_postfix(bpd=f"{bpd:.3f}", lr=f"{lr:.2e}", img_s=f"{rate:.1f}")
                    tic, seen = time.perf_counter(), 0
                bar.update(1)
                if step % cfg.checkpoint_every == 0:
                    save_checkpoint()
                stop_now = stop["stop"] or (stop_after is not None and step >= stop_after)
                if world > 1:  # every rank stops at the same step
                    stop_now = bool(distributed.all_sum(torch.tensor(float(stop_now), device=device)))
                if stop_now:
                    if step % cfg.checkpoint_every:
                        save_checkpoint()
                    bar.close()
                    say(f"stopped at step {step}; resume with --resume {run_dir}")
                    return {"run_dir": str(run_dir), "step": step, "stopped": True, "test_bpd": test_bpd, **timing()}
            if batch_index == steps_per_epoch:
                epoch, batch_index = epoch + 1, 0
            if epoch % cfg.eval_every == 0 and batch_index == 0 or step == total_steps:
                test_bpd = evaluate_and_sample()
                if test_bpd < best:
                    best = test_bpd
                    if main:
                        ckpt.export(run_dir / "best.pt", model, config)
                save_checkpoint()
    bar.close()
    if main:
        ckpt.export(run_dir / "final.pt", model, config)
    return {
        "run_dir": str(run_dir),
        "step": step,
        "stopped": False,
        "test_bpd": test_bpd,
        "best_test_bpd": best,
        **timing(),
    }
