"""The training loop (spec §13): :func:`train`, read once top to bottom.

Run directory::

    config.yaml          the resolved configuration
    data.json            which files were read (paths, release, sha256)
    metrics.jsonl        one JSON object per logged step ("train") and per evaluation ("eval")
    checkpoints/         step_XXXXXXX.pt, the last ``train.keep_checkpoints`` kept
    samples/             step_XXXXXXX.png, a grid at every evaluation
    best.pt, final.pt    inference exports (weights + config): best test bpd, end of training
    bpd_curve.png        train and test bits/dim (needs matplotlib)

Every random choice of step ``t`` (batch order of its epoch, augmentation, model noise per
chunk) comes from a stream of its own, named by ``train.seed``, the purpose and the position
(:mod:`denseflow.seeding`), so a resumed run continues exactly as if it had never stopped: a
checkpoint holds the weights, the Adamax state and the :class:`LoopState`, nothing else.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from . import checkpoint as ckpt
from . import distributed, runtime
from .config import ConfigError, RunConfig, TrainConfig
from .data import ImageSet, augment, load_images
from .errors import DenseFlowError
from .evaluate import evaluate_images
from .model import DenseFlow
from .recalibrate import recalibrated
from .runlog import LayerMonitor, RunOutputs, all_stop, stop_requests
from .sample import sample_seeds, save_grid
from .schedule import Plan, learning_rate
from .seeding import stream


class TrainingDiverged(DenseFlowError):
    """Too many non-finite steps in a row after the allowed rollbacks."""


@dataclasses.dataclass
class LoopState:
    """Where a run stands; a training checkpoint stores these fields beside the weights and the
    optimizer state, and resuming restores them."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch: int = 0  # batches done in this epoch
    best_test_bpd: float = math.inf
    skipped_steps: int = 0  # steps whose update a non-finite loss or gradient skipped
    lr_scale: float = 1.0  # learning-rate factor after rollbacks
    rollbacks: int = 0
    images_seen: int = 0  # by the whole run, across interruptions

    @classmethod
    def from_checkpoint(cls, payload: dict[str, Any]) -> LoopState:
        """The loop state a training checkpoint stores (fields it lacks keep their defaults)."""
        names = [f.name for f in dataclasses.fields(cls)]
        return cls(**{name: payload[name] for name in names if name in payload})


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


def restore(model: DenseFlow, opt: torch.optim.Optimizer, payload: dict[str, Any]) -> LoopState:
    """Load a training checkpoint's weights and optimizer state; return its loop state."""
    model.load_state_dict(payload["model"])
    opt.load_state_dict(payload["optimizer"])
    return LoopState.from_checkpoint(payload)


def check_start(run_dir: Path, config: RunConfig, resumed: RunConfig | None) -> None:
    """Refuse a new run in a folder that holds a run's checkpoints, and a resume that changes
    the architecture or the data (``resumed``: the configuration the checkpoint was saved with)."""
    if resumed is None:
        if any((run_dir / "checkpoints").glob("step_*.pt")):
            raise ConfigError(
                f"{run_dir} already holds a run's checkpoints: "
                f"--resume {run_dir}, or choose another --out"
            )
        return
    fixed = [("model", f.name) for f in dataclasses.fields(config.model)]
    fixed += [("data", "dataset"), ("data", "celeba_crop")]
    for section, name in fixed:
        saved, now = (
            getattr(getattr(resumed, section), name),
            getattr(getattr(config, section), name),
        )
        if saved != now:
            raise ConfigError(
                f"--resume: {section}.{name} was {saved!r} in the checkpoint, now {now!r}; a run "
                "keeps its architecture and dataset: start a new run (another --out)"
            )


def start(
    model: DenseFlow,
    opt: torch.optim.Optimizer,
    resume: Any,
    run_dir: Path,
    plan: Plan,
    config: RunConfig,
) -> LoopState:
    """The loop state to start from: a new run's, or the resumed checkpoint's (a run directory,
    a checkpoint file, or a loaded checkpoint), after :func:`check_start`."""
    payload = None
    if resume is not None:
        payload = resume if isinstance(resume, dict) else ckpt.load_on_every_rank(resume)
    check_start(run_dir, config, None if payload is None else ckpt.run_config(payload))
    if payload is None:
        return LoopState()
    state = restore(model, opt, payload)
    if state.batch == plan.steps_per_epoch:  # saved by denseflow 0.1 when stopped at an epoch's end
        state.epoch, state.batch = state.epoch + 1, 0
    return state


def rollback(
    run_dir: Path, model: DenseFlow, opt: torch.optim.Optimizer, state: LoopState, cfg: TrainConfig
) -> LoopState:
    """After ``train.max_bad_steps`` non-finite steps in a row: the newest good checkpoint's
    state with the learning rate scaled by ``train.rollback_lr_factor``, or
    :class:`TrainingDiverged` once ``train.max_rollbacks`` are spent or nothing good was saved."""
    if state.rollbacks >= cfg.max_rollbacks:
        raise TrainingDiverged(
            f"training diverged: {cfg.max_bad_steps} non-finite steps in a row at step "
            f"{state.step} after {state.rollbacks} rollback(s) (lr scale {state.lr_scale:g}); "
            f"checkpoints kept in {run_dir}"
        )
    try:  # rank 0 chooses the checkpoint, every rank restores that one
        restored = restore(model, opt, ckpt.load_on_every_rank(run_dir))
    except ckpt.CheckpointError:
        raise TrainingDiverged(
            f"training diverged at step {state.step}, before any good checkpoint: lower train.lr"
        ) from None
    scale = state.lr_scale * cfg.rollback_lr_factor
    return dataclasses.replace(restored, lr_scale=scale, rollbacks=state.rollbacks + 1)


@contextmanager
def evaluation(model: DenseFlow, config: RunConfig, train_images: torch.Tensor):
    """The model as a run evaluates and exports it, inside the block: eval mode, float32
    networks (bf16 trains only), BatchNorm statistics recalibrated over ``train.bn_recalibrate``
    training batches; on exit the training state is exactly as before."""
    cfg = config.train
    model.set_net_precision(None)
    try:
        with recalibrated(model, train_images, cfg.bn_recalibrate, cfg.batch_size, cfg.seed):
            model.eval()
            yield
    finally:
        model.train().set_net_precision(runtime.net_dtype(cfg))


def evaluate_and_sample(
    model: DenseFlow, images: torch.Tensor, config: RunConfig, grid: Path | None
) -> float:
    """Test ELBO bits/dim of the model as it is, and a sample grid into ``grid``."""
    cfg = config.train
    result = evaluate_images(model, images, config.eval.batch_size, seed=cfg.seed, progress=False)
    if cfg.num_samples:
        samples = sample_seeds(model, list(range(cfg.num_samples)), cfg.sample_temperature)
        if grid is not None:
            info = {"temperature": cfg.sample_temperature, "seeds": f"0-{cfg.num_samples - 1}"}
            save_grid(samples, grid, num_bits=config.model.num_bits, metadata=info)
    return result["bpd"]


def load_datasets(config: RunConfig, first_only: bool = False) -> tuple[ImageSet, ImageSet]:
    """The run's training and test images from ``data.data_dir``, checked against the model's
    image shape (``first_only``: one image of each, to check that they can be read)."""
    data, shape = config.data, config.model.image_shape
    size = dict(image_size=shape[1:], celeba_crop=data.celeba_crop)
    limits = (1, 1) if first_only else (data.train_limit, data.test_limit)
    trainset = load_images(data.dataset, "train", data.data_dir, limit=limits[0], **size)
    testset = load_images(data.dataset, "test", data.data_dir, limit=limits[1], **size)
    if tuple(trainset.images.shape[1:]) != shape:
        raise ConfigError(
            f"{data.dataset} images are {tuple(trainset.images.shape[1:])}, "
            f"the model expects model.image_shape={shape}"
        )
    return trainset, testset


def train(
    config: RunConfig,
    run_dir: str | Path,
    data_dir: str | Path | None = None,
    resume: str | Path | dict[str, Any] | None = None,
    progress: bool = True,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Train ``config`` into ``run_dir``; return a summary (steps, last test bpd, paths).

    ``data_dir``: where the data is (recorded in the run's configuration as ``data.data_dir``;
    default: the configuration's). ``resume``: a run directory or checkpoint to continue from
    (model, optimizer, position), or the checkpoint already loaded with
    :func:`denseflow.checkpoint.load`; its architecture and dataset cannot change.
    ``stop_after``: stop (with a checkpoint) once that many steps are done — an interruption.

    Inside an initialised process group (``torchrun``) every rank calls this: DDP over the ranks
    as described in :mod:`denseflow.distributed`; only rank 0 writes to ``run_dir``, logs and
    shows progress (the run directory must be visible to every rank for resume and rollback).
    """
    from .graph import graphed_step  # the graphed step builds on this module's pieces

    run_dir, world = Path(run_dir), distributed.world_size()
    config = config.with_data_dir(data_dir)
    chunks = distributed.effective_chunks(config.train.batch_chunks, world)
    if chunks != config.train.batch_chunks:
        config = config.override([f"train.batch_chunks={chunks}"])
        distributed.say(f"train.batch_chunks raised to {chunks}, a multiple of the {world} ranks")
    cfg = config.train
    device = runtime.resolve_device(cfg.device)
    trainset, testset = load_datasets(config)
    plan = Plan.of(cfg, len(trainset.images))

    with torch.random.fork_rng(devices=[]):  # the initial weights depend on train.seed alone
        torch.manual_seed(cfg.seed)
        model = runtime.prepare(DenseFlow(config.model), cfg, device)
    optimizer = torch.optim.Adamax(model.parameters(), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    graphed = graphed_step(model, optimizer, cfg, device, world, say=distributed.say)
    state = start(model, optimizer, resume, run_dir, plan, config)
    sources = {"train": trainset.source, "test": testset.source}
    out = RunOutputs(run_dir, config, sources, state, plan.total_steps, progress)
    monitor = LayerMonitor(model) if cfg.monitor_every else None
    batches = Batches(trainset.images, cfg, config.data.augmentation)

    ddp, test_bpd, bad_in_a_row, eval_seconds, started = None, None, 0, 0.0, time.perf_counter()
    model.train()
    with stop_requests() as stop, runtime.ddp_warnings_scope():
        while state.step < plan.total_steps:
            x = batches(state)
            if state.step == 0:  # on the global batch, the same on every rank
                init_noise = stream(cfg.seed, "init", device=device)
                model.data_init(x.to(device).long(), generator=init_noise)
            if world > 1 and ddp is None:
                ddp = runtime.wrap_ddp(model, device)
            first = state.batch == 0
            lr = (
                learning_rate(cfg, state.step, state.epoch, first, plan.main_steps) * state.lr_scale
            )
            if monitor:
                monitor.active = (state.step + 1) % cfg.monitor_every == 0
            parts = batches.chunks(x, state.step, device)
            if graphed is not None:  # train.cuda_graph: the same step on static buffers
                loss = graphed(parts, lr, len(x))
            else:
                loss = train_step(model, optimizer, parts, lr, cfg.grad_clip, len(x), ddp)
            state.step, state.batch = state.step + 1, state.batch + 1
            state.images_seen += len(x)
            if monitor and monitor.active:
                record = {"kind": "monitor", "step": state.step, "epoch": state.epoch}
                out.log.write(record | monitor.record())
            bad_in_a_row = 0 if torch.isfinite(loss) else bad_in_a_row + 1
            if bad_in_a_row:
                state.skipped_steps += 1
                out.skipped(state)
            if bad_in_a_row >= cfg.max_bad_steps:
                state, bad_in_a_row = rollback(run_dir, model, optimizer, state, cfg), 0
                out.rolled_back(state)
                continue

            last = state.step == plan.total_steps
            out.stepped(state, loss, lr, len(x), log=state.step % cfg.log_every == 0 or last)
            if state.batch == plan.steps_per_epoch:
                state.epoch, state.batch = state.epoch + 1, 0
            if state.batch == 0 and state.epoch % cfg.eval_every == 0 or last:
                began = time.perf_counter()
                with evaluation(model, config, trainset.images):
                    grid = out.grid(state.step)
                    test_bpd = evaluate_and_sample(model, testset.images, config, grid)
                    out.evaluated(state, test_bpd, model)
                    if last:
                        out.export("final.pt", model)
                out.save(model, optimizer, state)
                eval_seconds += time.perf_counter() - began
            if state.step % cfg.checkpoint_every == 0:
                out.save(model, optimizer, state)
            if all_stop(
                stop["stop"] or stop_after is not None and state.step >= stop_after, device
            ):
                out.save(model, optimizer, state)
                break
    out.bar.close()
    stopped = state.step < plan.total_steps
    if stopped:
        distributed.say(f"stopped at step {state.step}; resume with --resume {run_dir}")
    summary = {
        "run_dir": str(run_dir),
        "step": state.step,
        "stopped": stopped,
        "test_bpd": test_bpd,
    }
    if not stopped:
        summary["best_test_bpd"] = state.best_test_bpd
    train_seconds = time.perf_counter() - started - eval_seconds
    return summary | {"images_seen": state.images_seen, "train_seconds": train_seconds}
