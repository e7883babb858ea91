"""The training loop (spec §13): :func:`train`, read once top to bottom.

Run directory::

    config.yaml          the resolved configuration
    data.json            which files were read (paths, release, sha256)
    metrics.jsonl        one JSON object per logged step ("train") and per evaluation ("eval")
    checkpoints/         step_XXXXXXX.pt, the last ``train.keep_checkpoints`` kept
    samples/             step_XXXXXXX.png, a grid at every evaluation
    best.pt, final.pt    inference exports (weights + config): best evaluation, end of training
    bpd_curve.png        train and test (or validation) bits/dim (needs matplotlib)

An evaluation (every ``train.eval_every`` epochs and at the end) scores the test set, or, where
``data.validation`` holds training images out, those, and the test set once at the end; ``best.pt``
is the weights of the best one.

Every random choice of step ``t`` (batch order of its epoch, augmentation, model noise per
chunk) comes from a stream of its own, named by ``train.seed``, the purpose and the position
(:mod:`denseflow.seeding`), so a resumed run continues exactly as if it had never stopped: a
checkpoint holds the weights, the Adamax state, the :class:`LoopState` and, with
``train.ema_decay``, the weights' average (:mod:`denseflow.average`), nothing else.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, NamedTuple

import torch
import yaml

from . import checkpoint as ckpt
from . import distributed, runtime
from .average import WeightAverage
from .config import ConfigError, DataConfig, RunConfig, TrainConfig
from .data import ImageSet, hold_out, load_images
from .errors import DenseFlowError
from .evaluate import evaluate_images
from .model import DenseFlow
from .recalibrate import batchnorms, recalibrated
from .runlog import LayerMonitor, RunOutputs, all_stop, run_files, stop_requests
from .sample import sample_seeds, save_grid
from .schedule import Plan, learning_rate
from .seeding import stream
from .step import Batches, train_step


class TrainingDiverged(DenseFlowError):
    """Too many non-finite steps in a row after the allowed rollbacks."""


@dataclasses.dataclass
class LoopState:
    """Where a run stands; a training checkpoint stores these fields beside the weights and the
    optimizer state, and resuming restores them."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch: int = 0  # batches done in this epoch
    best_bpd: float = math.inf  # of the evaluations (test, or validation where held out)
    skipped_steps: int = 0  # steps whose update a non-finite loss or gradient skipped
    lr_scale: float = 1.0  # learning-rate factor after rollbacks
    rollbacks: int = 0
    images_seen: int = 0  # by the whole run, across interruptions

    @classmethod
    def from_checkpoint(cls, payload: dict[str, Any]) -> LoopState:
        """The loop state a training checkpoint stores (fields it lacks keep their defaults)."""
        names = [f.name for f in dataclasses.fields(cls)]
        if "best_test_bpd" in payload:  # its name in checkpoints written before data.validation
            payload = {"best_bpd": payload["best_test_bpd"]} | payload
        return cls(**{name: payload[name] for name in names if name in payload})


def restore(
    model: DenseFlow,
    opt: torch.optim.Optimizer,
    payload: dict[str, Any],
    average: WeightAverage | None = None,
) -> LoopState:
    """Load a training checkpoint's weights, optimizer state and (into ``average``) weight
    average; return its loop state."""
    model.load_state_dict(payload["model"])
    opt.load_state_dict(payload["optimizer"])
    if average is not None:
        average.load_state_dict(payload.get("average"))
    return LoopState.from_checkpoint(payload)


def run_folder(source: str | Path) -> Path:
    """The run directory a resume source belongs to: the folder itself, or the run above a
    ``checkpoints/step_*.pt`` file (another file: its folder)."""
    path = Path(source)
    if path.is_dir():
        return path
    return path.parent.parent if path.parent.name == "checkpoints" else path.parent


def check_start(
    run_dir: Path,
    config: RunConfig,
    resumed: dict[str, Any] | None,
    source: str | Path | None = None,
) -> None:
    """Refuse a new run in a folder that holds a run's checkpoints; a resume from weights alone
    (``final.pt``, ``best.pt``), into a folder holding another run (``source``: where the
    checkpoint ``resumed`` was read, where known), or that changes the architecture or the data."""
    if resumed is None:
        if any((run_dir / "checkpoints").glob("step_*.pt")):
            raise ConfigError(
                f"{run_dir} already holds a run's checkpoints: "
                f"--resume {run_dir}, or choose another --out"
            )
        return
    where = source or "the checkpoint"
    if "optimizer" not in resumed:
        raise ConfigError(
            f"--resume {where}: weights without the optimizer's state (final.pt, best.pt, an "
            "export), not a training checkpoint: --resume the run folder or a "
            "checkpoints/step_*.pt"
        )
    if source is not None and run_folder(source).resolve() != run_dir.resolve():
        held = run_files(run_dir)
        if held:
            raise ConfigError(
                f"--resume {source} into {run_dir}, which holds another run ({', '.join(held)}): "
                f"continue it in its own folder (--out {run_folder(source)}) or in a new one"
            )
    saved = ckpt.run_config(resumed, str(where))
    fixed = [("model", f.name) for f in dataclasses.fields(config.model)]
    fixed += [("data", "dataset"), ("data", "celeba_crop"), ("data", "validation")]
    if config.data.validation:  # which images are held out depends on how many are read
        fixed.append(("data", "train_limit"))
    for section, name in fixed:
        was, now = getattr(getattr(saved, section), name), getattr(getattr(config, section), name)
        if was != now:
            raise ConfigError(
                f"--resume: {section}.{name} was {was!r} in the checkpoint, now {now!r}; a run "
                "keeps its architecture and dataset: start a new run (another --out)"
            )


def check_same_data(run_dir: Path, trained: dict[str, Any], train_limit: int | None) -> None:
    """Refuse a resume whose training images (``trained``: their source record) are not those the
    run's ``data.json`` records: another release, or other files. Files are compared where the
    count read is the same or ``train_limit`` is what the run read with (its ``config.yaml``): a
    changed ``data.train_limit`` reads another count, and may."""
    try:
        recorded = json.loads((run_dir / "data.json").read_text())["train"]
        limit = yaml.safe_load((run_dir / "config.yaml").read_text())["data"]["train_limit"]
    except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError):  # none, or unreadable
        return
    same = recorded.get("num_images") == trained["num_images"] or limit == train_limit
    if recorded.get("release") != trained["release"] or (
        same and recorded.get("files") != trained["files"]
    ):
        raise ConfigError(
            f"--resume: the training images in {trained['path']} are not those "
            f"{run_dir / 'data.json'} records ({recorded.get('path')}): give the run's data "
            f"(--data-dir), or start a new run (another --out)"
        )


def start(
    model: DenseFlow,
    opt: torch.optim.Optimizer,
    resume: Any,
    run_dir: Path,
    plan: Plan,
    config: RunConfig,
    average: WeightAverage | None = None,
) -> LoopState:
    """The loop state to start from: a new run's, or the resumed checkpoint's (a run directory,
    a checkpoint file, or a loaded checkpoint), after :func:`check_start`."""
    payload, source = None, None
    if isinstance(resume, dict):
        payload = resume
    elif resume is not None:
        payload, source = ckpt.load_on_every_rank(resume), resume
    check_start(run_dir, config, payload, source)
    if payload is None:
        return LoopState()
    state = restore(model, opt, payload, average)
    if state.batch == plan.steps_per_epoch:  # saved by denseflow 0.1 when stopped at an epoch's end
        state.epoch, state.batch = state.epoch + 1, 0
    return state


def rollback(
    run_dir: Path,
    model: DenseFlow,
    opt: torch.optim.Optimizer,
    state: LoopState,
    cfg: TrainConfig,
    average: WeightAverage | None = None,
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
        restored = restore(model, opt, ckpt.load_on_every_rank(run_dir), average)
    except ckpt.CheckpointError:
        raise TrainingDiverged(
            f"training diverged at step {state.step}, before any good checkpoint: lower train.lr"
        ) from None
    scale = state.lr_scale * cfg.rollback_lr_factor
    return dataclasses.replace(restored, lr_scale=scale, rollbacks=state.rollbacks + 1)


@contextmanager
def evaluation(
    model: DenseFlow,
    config: RunConfig,
    train_images: torch.Tensor,
    average: WeightAverage | None = None,
):
    """The model as a run evaluates and exports it, inside the block: eval mode, float32
    networks (bf16 trains only), the weights' ``average`` in place of the weights
    (``train.ema_decay``), BatchNorm statistics recalibrated over ``train.bn_recalibrate``
    training batches; on exit the training state is as before, except that under data
    parallelism every rank has first taken rank 0's BatchNorm running statistics (those its
    checkpoints hold: each rank's own chunks move them apart, and only evaluation reads them)."""
    cfg = config.train
    distributed.from_rank_0([b for m in batchnorms(model) for b in m.buffers()])
    model.set_net_precision(None)
    try:
        with (
            average.applied() if average is not None else nullcontext(),
            recalibrated(model, train_images, cfg.bn_recalibrate, cfg.batch_size, cfg.seed),
        ):
            model.eval()
            yield
    finally:
        model.train().set_net_precision(runtime.net_dtype(cfg))


def elbo_bpd(model: DenseFlow, images: torch.Tensor, config: RunConfig) -> float:
    """ELBO bits/dim of the model as it is on ``images`` (the noises of ``train.seed``)."""
    cfg = config.train
    result = evaluate_images(
        model,
        images,
        config.eval.batch_size,
        seed=cfg.seed,
        progress=False,
        cuda_graph=cfg.cuda_graph,
    )
    return result["bpd"]


def sample_grid(model: DenseFlow, config: RunConfig, grid: Path | None) -> None:
    """``train.num_samples`` samples of the model as it is, as a grid into ``grid`` (None: drawn
    but not written, on ranks other than 0)."""
    cfg = config.train
    if cfg.num_samples:
        seeds = list(range(cfg.num_samples))
        samples = sample_seeds(model, seeds, cfg.sample_temperature, cuda_graph=cfg.cuda_graph)
        if grid is not None:
            info = {"temperature": cfg.sample_temperature, "seeds": f"0-{cfg.num_samples - 1}"}
            save_grid(samples, grid, num_bits=config.model.num_bits, metadata=info)


class Datasets(NamedTuple):
    """A run's images: ``train`` (without those held out), ``test`` (None for a plain folder,
    :func:`training_split`), and ``validation`` (the ``data.validation`` training images held
    out; None where the run holds none out)."""

    train: ImageSet
    test: ImageSet | None
    validation: ImageSet | None = None


def training_split(data: DataConfig, data_dir: str | Path | None = None) -> str:
    """The split a run trains on: ``"train"``, or ``"all"`` for a ``folder`` dataset without
    ``train/`` and ``test/`` subfolders (its images themselves) where ``data.validation`` holds
    some of them out: such a run has no test set, its held-out images are its evaluation."""
    folder = data_dir or data.data_dir
    if data.dataset != "folder" or not data.validation or folder is None:
        return "train"
    root = Path(folder).expanduser()
    plain = root.is_dir() and not any((root / s).is_dir() for s in ("train", "test"))
    return "all" if plain else "train"


def load_datasets(config: RunConfig, first_only: bool = False) -> Datasets:
    """The run's images from ``data.data_dir``, every split read with the model's image size
    and channels (:func:`denseflow.data.load_images` refuses what does not fit) before any step
    is trained (``first_only``: one training and one test image, to check that they can be
    read; nothing held out)."""
    data, shape = config.data, config.model.image_shape
    size = dict(image_size=shape[1:], celeba_crop=data.celeba_crop, channels=shape[0])
    limits = (1, 1) if first_only else (data.train_limit, data.test_limit)
    split = training_split(data)
    trainset = load_images(data.dataset, split, data.data_dir, limit=limits[0], **size)
    testset = None
    if split == "train":
        testset = load_images(data.dataset, "test", data.data_dir, limit=limits[1], **size)
    if data.validation and not first_only:
        trainset, validation = hold_out(trainset, data.validation)
        return Datasets(trainset, testset, validation)
    return Datasets(trainset, testset)


def run_images(
    config: RunConfig,
    split: str,
    data_dir: str | Path | None = None,
    limit: int | None = None,
) -> ImageSet:
    """A run's images of ``split``, read from ``data_dir`` (default ``data.data_dir``) with the
    run's limits: ``"test"``, ``"train"`` (without the images ``data.validation`` holds out) or
    ``"validation"`` (those). ``limit``: the first ``limit`` of them instead (read in place of the
    run's limit where no images are held out, so that it can also read more)."""
    data = config.data
    if split == "validation" and not data.validation:
        raise ConfigError(
            "split 'validation': the run held no training images out (data.validation=0)"
        )
    trained = training_split(data, data_dir)
    if split == "test" and trained == "all":
        raise ConfigError(
            f"split 'test': the run trained on a folder without train/ and test/ subfolders "
            f"({data_dir or data.data_dir}), so it has no test set; its held-out images: "
            "--split validation"
        )
    held = data.validation if split != "test" else 0
    read = "test" if split == "test" else trained
    run_limit = data.test_limit if read == "test" else data.train_limit
    images = load_images(
        data.dataset,
        read,
        data_dir or data.data_dir,
        image_size=config.model.image_shape[1:],
        celeba_crop=data.celeba_crop,
        limit=run_limit if held or not limit else limit,
        channels=config.model.image_shape[0],
    )
    if not held:
        return images
    images = hold_out(images, held)[split == "validation"]
    if limit is None or limit >= len(images.images):
        return images
    names = None if images.names is None else images.names[:limit]
    source = images.source | {"num_images": limit}
    return dataclasses.replace(images, images=images.images[:limit], source=source, names=names)


def train(
    config: RunConfig,
    run_dir: str | Path,
    data_dir: str | Path | None = None,
    resume: str | Path | dict[str, Any] | None = None,
    progress: bool = True,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Train ``config`` into ``run_dir``; return a summary (steps, last test bpd, paths; with
    ``data.validation``, the last validation bpd and the best one, which ``best.pt`` holds).

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
    trainset, testset, validation = load_datasets(config)
    evalset = testset if validation is None else validation  # what the evaluations score
    plan = Plan.of(cfg, len(trainset.images))

    with torch.random.fork_rng(devices=[]):  # the initial weights depend on train.seed alone
        torch.manual_seed(cfg.seed)
        model = runtime.prepare(DenseFlow(config.model), cfg, device)
    optimizer = torch.optim.Adamax(model.parameters(), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    graphed = graphed_step(model, optimizer, cfg, device, world, say=distributed.say)
    average = WeightAverage(model, cfg.ema_decay) if cfg.ema_decay else None
    state = start(model, optimizer, resume, run_dir, plan, config, average)
    if resume is not None:
        check_same_data(run_dir, trainset.source, config.data.train_limit)
    if state.step >= plan.total_steps:
        distributed.say(
            f"{run_dir}: the run had finished ({state.step} of {plan.total_steps} steps); "
            "nothing to train (more epochs: --set train.epochs=N)"
        )
    sources = {"train": trainset.source}
    for name, images in (("test", testset), ("validation", validation)):
        if images is not None:
            sources[name] = images.source
    out = RunOutputs(
        run_dir, config, sources, len(trainset.images), state, plan.total_steps, progress
    )
    monitor = LayerMonitor(model) if cfg.monitor_every else None
    batches = Batches(trainset.images, cfg, config.data.augmentation)

    ddp, synced, bad_in_a_row = None, False, 0
    test_bpd = val_bpd = None
    eval_seconds, started = 0.0, time.perf_counter()
    model.train()
    with stop_requests() as stop, runtime.ddp_warnings_scope():
        while state.step < plan.total_steps:
            x = batches(state)
            if state.step == 0:  # on the global batch, the same on every rank
                init_noise = stream(cfg.seed, "init", device=device)
                model.data_init(x.to(device).long(), generator=init_noise)
            if world > 1 and not synced:  # every rank from rank 0's state (DDP does it itself)
                if graphed is None:
                    ddp = runtime.wrap_ddp(model, device)
                else:
                    distributed.from_rank_0([*model.parameters(), *model.buffers()])
                synced = True
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
            if average is not None and not bad_in_a_row:
                average.update()
            if bad_in_a_row:
                state.skipped_steps += 1
                out.skipped(state)
            if bad_in_a_row >= cfg.max_bad_steps:
                state = rollback(run_dir, model, optimizer, state, cfg, average)
                bad_in_a_row = 0
                out.rolled_back(state)
                continue

            last = state.step == plan.total_steps
            out.stepped(state, loss, lr, len(x), log=state.step % cfg.log_every == 0 or last)
            if state.batch == plan.steps_per_epoch:
                state.epoch, state.batch = state.epoch + 1, 0
            if state.batch == 0 and state.epoch % cfg.eval_every == 0 or last:
                began = time.perf_counter()
                with evaluation(model, config, trainset.images, average):
                    bpd = elbo_bpd(model, evalset.images, config)
                    sample_grid(model, config, out.grid(state.step))
                    if validation is None:
                        test_bpd = bpd
                    else:
                        val_bpd = bpd
                        scored = last and testset is not None  # a plain folder has none
                        test_bpd = elbo_bpd(model, testset.images, config) if scored else None
                    out.evaluated(state, model, bpd, test_bpd)
                    if last:
                        out.export("final.pt", model)
                out.save(model, optimizer, state, average)
                eval_seconds += time.perf_counter() - began
            if state.step % cfg.checkpoint_every == 0:
                out.save(model, optimizer, state, average)
            if all_stop(
                stop["stop"] or stop_after is not None and state.step >= stop_after, device
            ):
                out.save(model, optimizer, state, average)
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
        "batchnorm": out.batchnorm,  # the statistics test_bpd was evaluated with
    }
    if validation is not None:
        summary["val_bpd"] = val_bpd
    if not stopped:
        summary["best_val_bpd" if validation is not None else "best_test_bpd"] = state.best_bpd
    train_seconds = time.perf_counter() - started - eval_seconds
    return summary | {"images_seen": state.images_seen, "train_seconds": train_seconds}
