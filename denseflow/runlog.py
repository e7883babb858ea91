"""What a training run reports while it runs: the metrics log, per-layer monitors, the bits/dim
plot, and stop requests (Ctrl-C, SIGTERM).

``metrics.jsonl`` holds one JSON object per line: ``{"kind": "train" | "eval" | "skip" |
"rollback" | "monitor", "step": ..., ...}``. Each line is appended with a single ``write`` call on
a file opened for appending, so a crash can tear at most the last line; resuming drops a torn
last line (saying so) and refuses a malformed line anywhere else. Non-finite numbers are
written as ``null`` (:func:`to_json`: strict JSON, which every parser reads).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml
from tqdm import tqdm

from . import checkpoint as ckpt
from . import distributed
from .average import WeightAverage
from .config import RunConfig, TrainConfig
from .errors import DenseFlowError
from .model import DenseFlow
from .recalibrate import describe
from .transforms.glow import bounded_log_scale

if TYPE_CHECKING:
    from .train import LoopState


class LogError(DenseFlowError):
    """A metrics log that cannot be continued; the message names the file and line."""


def to_json(value: Any, indent: int | None = None) -> str:
    """``json.dumps`` that writes strict JSON: a NaN or infinite float becomes ``null`` (Python's
    ``NaN``/``Infinity`` tokens are refused by JavaScript, Go and most other parsers)."""

    def strict(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {key: strict(item) for key, item in v.items()}
        if isinstance(v, (list, tuple)):
            return [strict(item) for item in v]
        return v

    return json.dumps(strict(value), indent=indent, allow_nan=False)


def nan_for_null(figures: dict[str, Any]) -> dict[str, Any]:
    """``figures`` read back from :func:`to_json`'s text, with every top-level ``null`` (a
    non-finite number it wrote: a diverged run's bits/dim; the experiments' records hold no other
    top-level null) NaN again, so that means and tables treat them as the numbers they were;
    nested values are left as read."""
    return figures | {key: math.nan for key, value in figures.items() if value is None}


def read_records(path: Path, drop_torn_tail: bool = False) -> list[dict[str, Any]]:
    """The records of a metrics log. A last line that is not valid JSON (torn by a crash during
    its write) is dropped with a message when ``drop_torn_tail``; any other malformed line is a
    :class:`LogError` naming the file and line."""
    lines = path.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError("not a record with an integer 'step'")
        except ValueError as err:
            if drop_torn_tail and number == len(lines):
                tqdm.write(f"{path}: dropped a torn last line ({line[:40]!r}...), left by a crash")
                break
            raise LogError(f"{path}, line {number}: malformed record ({err})") from None
        records.append(record)
    return records


def run_files(folder: Path) -> list[str]:
    """Which of a training run's own files ``folder`` holds (none: it is not a run's folder)."""
    names = ("final.pt", "checkpoints", "metrics.jsonl")
    return [name for name in names if (folder / name).exists()]


class RunLog:
    """``metrics.jsonl`` of a run directory (truncated to the resumed step) and optionally
    TensorBoard; ``run_dir=None`` (ranks other than 0) logs nothing."""

    def __init__(self, run_dir: Path | None, resume_step: int, tensorboard: bool = False) -> None:
        self.path, self.writer = (run_dir / "metrics.jsonl" if run_dir else None), None
        if self.path is None:
            return
        kept = []
        if self.path.exists() and resume_step:
            kept = [r for r in read_records(self.path, True) if r["step"] <= resume_step]
        elif self.path.exists():  # a new run: an earlier log here has no checkpoint to continue
            tqdm.write(f"{self.path}: a log without a checkpoint to resume, replaced")
        tmp = self.path.with_name(f".{self.path.name}.tmp")  # replaced whole, never half-written
        tmp.write_text("".join(to_json(r) + "\n" for r in kept))
        os.replace(tmp, self.path)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                tqdm.write(
                    "tensorboard is not installed (pip install tensorboard): "
                    "logging to metrics.jsonl only"
                )
            else:
                self.writer = SummaryWriter(str(run_dir / "tb"))

    def write(self, record: dict[str, Any]) -> None:
        """Append one record (one ``write`` call: a crash tears at most this line)."""
        if self.path is None:
            return
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (to_json(record) + "\n").encode())
        finally:
            os.close(fd)
        if self.writer:
            for key, value in record.items():
                if key not in ("kind", "step", "epoch") and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{record['kind']}/{key}", value, record["step"])

    def records(self) -> list[dict[str, Any]]:
        """Every record logged so far (none on ranks other than 0)."""
        return read_records(self.path) if self.path else []


class RunOutputs:
    """Everything a run writes into its directory and shows; ranks other than 0 write nothing.

    ``config.yaml``, ``data.json``, ``metrics.jsonl`` (:attr:`log`), ``checkpoints/`` (at most
    one per step, the newest ``train.keep_checkpoints`` kept), ``samples/``, ``best.pt``,
    ``final.pt``, ``bpd_curve.png``, the progress bar and rank 0's messages.
    """

    def __init__(
        self,
        run_dir: Path,
        config: RunConfig,
        sources: dict,
        train_images: int,
        state: LoopState,
        total: int,
        progress: bool,
    ) -> None:
        self.run_dir, self.config, self.main = run_dir, config, distributed.is_main()
        self.train_images = train_images  # how many the BatchNorm recalibration can use
        self.saved_step = state.step  # the step of the newest checkpoint
        self.plot_warned, self.tic, self.seen = False, time.perf_counter(), 0
        if self.main:
            run_dir.mkdir(parents=True, exist_ok=True)
            text = yaml.safe_dump(config.to_dict(), sort_keys=False, default_flow_style=None)
            (run_dir / "config.yaml").write_text(text)
            (run_dir / "data.json").write_text(json.dumps(sources, indent=1))
        self.log = RunLog(run_dir if self.main else None, state.step, config.train.tensorboard)
        show = progress and self.main
        self.bar = tqdm(
            total=total,
            initial=state.step,
            desc="train",
            unit="step",
            disable=not show,
            dynamic_ncols=True,
        )

    def stepped(
        self, state: LoopState, loss: torch.Tensor, lr: float, images: int, log: bool
    ) -> None:
        """A finished step: a ``train`` record when ``log``, the progress bar."""
        self.seen += images
        if log:
            rate, bpd = self.seen / (time.perf_counter() - self.tic), loss.item()
            record = {"kind": "train", "step": state.step, "epoch": state.epoch, "bpd": bpd}
            self.log.write(record | {"lr": lr, "img_per_s": rate})
            self.bar.set_postfix(bpd=f"{bpd:.3f}", lr=f"{lr:.2e}", img_s=f"{rate:.1f}")
            self.tic, self.seen = time.perf_counter(), 0
        self.bar.update(1)

    def skipped(self, state: LoopState) -> None:
        """A step whose update a non-finite loss or gradient skipped."""
        self.log.write(
            {
                "kind": "skip",
                "step": state.step,
                "epoch": state.epoch,
                "skipped_steps": state.skipped_steps,
            }
        )
        distributed.say(
            f"step {state.step}: non-finite loss or gradient, update skipped "
            f"({state.skipped_steps} so far)"
        )

    def rolled_back(self, state: LoopState) -> None:
        """The run continues from the checkpoint of ``state.step`` (which is not saved again)."""
        self.log.write(
            {
                "kind": "rollback",
                "step": state.step,
                "epoch": state.epoch,
                "lr_scale": state.lr_scale,
            }
        )
        distributed.say(
            f"rolled back to step {state.step} with the learning rate scaled by {state.lr_scale:g}"
        )
        self.bar.n = self.saved_step = state.step

    def evaluated(
        self, state: LoopState, model: DenseFlow, bpd: float, test_bpd: float | None = None
    ) -> None:
        """An evaluation of ELBO ``bpd`` (on the test set, or on the held-out training images
        where ``data.validation`` holds some out, with the test set's ``test_bpd`` at the end):
        its record, the bits/dim curve, and ``best.pt`` when ``bpd`` is the best so far."""
        record = {"kind": "eval", "step": state.step, "epoch": state.epoch}
        if self.config.data.validation:
            record["val_bpd"] = bpd
            if test_bpd is not None:
                record["test_bpd"] = test_bpd
        else:
            record["test_bpd"] = bpd
        self.log.write(record)
        if self.main and not plot_bpd_curve(self.log.records(), self.run_dir / "bpd_curve.png"):
            if not self.plot_warned:
                distributed.say(
                    "matplotlib is not installed (pip install 'denseflow[plot]'): no bpd_curve.png"
                )
            self.plot_warned = True
        if bpd < state.best_bpd:
            state.best_bpd = bpd
            self.export("best.pt", model)

    def grid(self, step: int) -> Path | None:
        """Where the sample grid of an evaluation at ``step`` goes (None on other ranks)."""
        return self.run_dir / "samples" / f"step_{step:07d}.png" if self.main else None

    def save(
        self,
        model: DenseFlow,
        opt: torch.optim.Optimizer,
        state: LoopState,
        average: WeightAverage | None = None,
    ) -> None:
        """A training checkpoint of the raw module at ``state.step`` (once per step), with the
        weights' ``average`` where the run keeps one."""
        if self.main and self.saved_step != state.step:
            payload = {"kind": "training", "config": self.config.to_dict()}
            payload |= {"model": model.state_dict(), "optimizer": opt.state_dict()}
            if average is not None:
                payload["average"] = average.state_dict()
            folder = self.run_dir / "checkpoints"
            ckpt.save(folder / f"step_{state.step:07d}.pt", payload | dataclasses.asdict(state))
            for old in sorted(folder.glob("step_*.pt"))[: -self.config.train.keep_checkpoints]:
                old.unlink()
        self.saved_step = state.step

    @property
    def batchnorm(self) -> str:
        """Which BatchNorm statistics the run evaluates and exports with (and, with
        ``train.ema_decay``, that they are the weights' average's)."""
        cfg = self.config.train
        if not cfg.bn_recalibrate:
            return ckpt.RUNNING_STATISTICS
        words = describe(cfg.bn_recalibrate, cfg.batch_size, cfg.seed, self.train_images)
        if cfg.ema_decay:
            words += f", for the weights' average (train.ema_decay={cfg.ema_decay:g})"
        return words

    def export(self, name: str, model: DenseFlow) -> None:
        """Inference weights and config as ``name`` (``best.pt``, ``final.pt``), with the
        BatchNorm statistics the run evaluates with."""
        if self.main:
            ckpt.export(self.run_dir / name, model, self.config, batchnorm=self.batchnorm)


class LayerMonitor:
    """Per dense block: the largest |log-scale| of any coupling and the largest |log-det| per
    dimension of any glow-like step, gathered by hooks while :attr:`active`."""

    def __init__(self, model: DenseFlow) -> None:
        self.values: dict[str, float] = {}
        self.active = False
        for s, block in enumerate(model.blocks, start=1):
            for unit in block.units:
                for step in unit.children():
                    step.coupling.net.register_forward_hook(self._scale(f"block{s}"))
                    step.register_forward_hook(self._logdet(f"block{s}"))

    def _keep(self, key: str, value: float) -> None:
        if self.active:
            self.values[key] = max(self.values.get(key, 0.0), value)

    def _scale(self, block: str):
        def hook(module, args, out):
            if self.active:
                s = out.detach().unflatten(1, (-1, 2))[:, :, 0]
                self._keep(f"{block}.max_abs_log_scale", bounded_log_scale(s).abs().max().item())

        return hook

    def _logdet(self, block: str):
        def hook(module, args, out):
            if self.active:
                z, delta = out
                per_dim = delta.detach().abs().max() / z[0].numel()
                self._keep(f"{block}.max_abs_logdet_per_dim", per_dim.item())

        return hook

    def record(self) -> dict[str, float]:
        """The values gathered since the last call."""
        values, self.values = self.values, {}
        return values


def logged_train_seconds(run: Path, cfg: TrainConfig) -> float:
    """A run's training time across interruptions, from its metrics log: the sum over its logged
    intervals of the images trained in the interval divided by the interval's images/s."""
    per_interval = cfg.log_every * cfg.batch_size
    records = [r for r in read_records(run / "metrics.jsonl") if r.get("kind") == "train"]
    return sum(per_interval / r["img_per_s"] for r in records)


def plot_bpd_curve(records: list[dict[str, Any]], path: Path) -> bool:
    """Train, test and validation bits/dim against steps into ``path``; False if matplotlib is
    missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for kind, key, label in (
        ("train", "bpd", "train (batch ELBO)"),
        ("eval", "val_bpd", "validation (ELBO)"),
        ("eval", "test_bpd", "test (ELBO)"),
    ):
        points = [(r["step"], r[key]) for r in records if r["kind"] == kind and key in r]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o" if kind == "eval" else None, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("bits/dim")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


@contextmanager
def stop_requests():
    """SIGINT/SIGTERM ask the loop to stop at the next step boundary (a second SIGINT aborts).
    Yields a dict whose ``"stop"`` turns True; the previous handlers come back on exit."""
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


def all_stop(requested: bool, device: torch.device) -> bool:
    """Whether any rank asked to stop (every rank stops at the same step)."""
    if distributed.world_size() == 1:
        return requested
    return bool(distributed.all_sum(torch.tensor(float(requested), device=device)))
