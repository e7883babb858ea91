"""Checkpoint cost at full size: plain torch.save/torch.load against denseflow.checkpoint.

Builds DenseFlow-74-10 (``load_config("cifar10")``, 130,647,294 parameters) with an Adamax state
(one step on random gradients), the training-checkpoint payload that ``RunOutputs.save`` writes,
and times, each as the median of ``--repeats`` rounds (one of each per round, after
``--warmup`` untimed rounds: the first writes and loads of a process are slower):

  (a) ``plain_save``   torch.save(payload, f), flush, fsync
  (b) ``plain_load``   torch.load(path, weights_only=True)
  (c) ``ours_save``    denseflow.checkpoint.save (checksum, torch.save, fsync, rename, ...)
  (d) ``ours_load``    denseflow.checkpoint.load (torch.load, checksum verified)
  (e) ``checksum``     denseflow.checkpoint.checksum over the payload alone

Each write goes to a fresh file (the previous one removed and the file system synced, untimed).
Loads are timed twice: ``warm`` straight after the write (the file is in the OS page cache) and
``cold`` after evicting the file's pages with posix_fadvise(POSIX_FADV_DONTNEED) (the file was
fsynced, so its pages are clean; only this file is dropped, not the whole cache). The ratios
(c)/(a) and (d)/(b) are the item's measure. Prints one JSON object.

Run from the repository root (about 7 GB of RAM, 2 x 1.6 GB of files under --dir, about three
minutes on 2 cores)::

    PYTHONPATH=. python scripts/checkpoint_cost.py --dir /tmp --repeats 5
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from denseflow import DenseFlow
from denseflow import checkpoint as ckpt
from denseflow.config import load_config
from denseflow.train import LoopState


def training_payload() -> dict[str, Any]:
    """What ``RunOutputs.save`` hands to ``checkpoint.save`` for DenseFlow-74-10 with Adamax."""
    torch.manual_seed(0)
    config = load_config("cifar10")
    model = DenseFlow(config.model)
    opt = torch.optim.Adamax(model.parameters(), lr=config.train.lr, betas=config.train.betas)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    payload = {"kind": "training", "config": config.to_dict()}
    payload |= {"model": model.state_dict(), "optimizer": opt.state_dict()}
    return payload | dataclasses.asdict(LoopState(step=1000, epoch=3, images_seen=64000))


def fresh(path: Path) -> None:
    """Before a timed write: remove ``path`` and let the file system settle (as a run's new
    checkpoint names do, so neither write pays for freeing or discarding an old file)."""
    gc.collect()
    path.unlink(missing_ok=True)
    if hasattr(os, "sync"):
        os.sync()


def evict(path: Path) -> None:
    """Collect garbage, then drop ``path``'s pages from the OS page cache (where the platform
    can)."""
    gc.collect()
    if hasattr(os, "posix_fadvise"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed(run: Callable[[], Any], before: Callable[[], Any]) -> float:
    """Wall-clock seconds of ``run()``, ``before()`` untimed."""
    before()
    tic = time.perf_counter()
    result = run()
    seconds = time.perf_counter() - tic
    del result  # a loaded checkpoint is freed untimed
    return seconds


def plain_save(payload: dict[str, Any], path: Path) -> None:
    """torch.save with the flush and fsync that checkpoint.save does too."""
    with open(path, "wb") as handle:
        torch.save(payload, handle)
        handle.flush()
        os.fsync(handle.fileno())


def cpu_name() -> str:
    """The CPU's model name as ``lscpu`` gives it."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor()
    names = [line.split(":", 1)[1].strip() for line in out.splitlines() if "Model name" in line]
    return names[0] if names else platform.processor()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where the files go")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    payload = training_payload()
    tensors = [v for v in _leaves(payload) if isinstance(v, torch.Tensor)]
    work = Path(tempfile.mkdtemp(prefix="checkpoint_cost_", dir=args.dir))
    plain, ours = work / "plain.pt", work / "ours.pt"
    measurements = {  # name: (run, untimed preparation)
        "plain_save": (lambda: plain_save(payload, plain), lambda: fresh(plain)),
        "ours_save": (lambda: ckpt.save(ours, payload), lambda: fresh(ours)),
        "checksum": (lambda: ckpt.checksum(payload), gc.collect),
        "plain_load_warm": (lambda: torch.load(plain, weights_only=True), gc.collect),
        "ours_load_warm": (lambda: ckpt.load(ours), gc.collect),
        "plain_load_cold": (lambda: torch.load(plain, weights_only=True), lambda: evict(plain)),
        "ours_load_cold": (lambda: ckpt.load(ours), lambda: evict(ours)),
    }
    times: dict[str, list[float]] = {name: [] for name in measurements}
    try:
        for round_ in range(args.warmup + args.repeats):  # interleaved: drifts hit all alike
            for name, (run, before) in measurements.items():
                seconds = timed(run, before)
                if round_ >= args.warmup:
                    times[name].append(round(seconds, 3))
        sizes = {"plain_file_bytes": plain.stat().st_size, "ours_file_bytes": ours.stat().st_size}
    finally:
        for f in (plain, ours):
            f.unlink(missing_ok=True)
        work.rmdir()
    median = {name: round(statistics.median(t), 3) for name, t in times.items()}
    report = {
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "checkpoint_version": ckpt.VERSION,
        "tensors": len(tensors),
        "tensor_bytes": sum(t.numel() * t.element_size() for t in tensors),
        **sizes,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "seconds": median,
        "all_seconds": times,
        "ratio_save": round(median["ours_save"] / median["plain_save"], 2),
        "ratio_load_warm": round(median["ours_load_warm"] / median["plain_load_warm"], 2),
        "ratio_load_cold": round(median["ours_load_cold"] / median["plain_load_cold"], 2),
    }
    print(json.dumps(report))


def _leaves(value: Any) -> Iterator[Any]:
    if isinstance(value, dict):
        for v in value.values():
            yield from _leaves(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _leaves(v)
    else:
        yield value


if __name__ == "__main__":
    main()
