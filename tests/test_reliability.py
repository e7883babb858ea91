"""Runs killed with SIGKILL at random moments resume to bitwise the same parameters."""

from __future__ import annotations

import json
import os
import random
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from denseflow import checkpoint as ckpt

ARGS = [
    "--preset",
    "tiny",
    "--set",
    "train.epochs=8",
    "--set",
    "train.checkpoint_every=2",
    "--quiet",
]
#: one thread per process; a process that aborts prints its Python stacks first
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}


def _train(run, resume: bool) -> subprocess.Popen:
    argv = [sys.executable, "-m", "denseflow", "train", *ARGS, "--out", str(run)]
    if resume:
        argv += ["--resume", str(run)]
    return subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=ENV,
    )


def _logged_step(run) -> int:
    """The newest step in the run's metrics.jsonl (0 before the first)."""
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    return max((json.loads(line)["step"] for line in lines if line.endswith("}")), default=0)


def test_sigkill_at_random_points_then_resume_is_bitwise_exact(tmp_path):
    """Six lives of the run are killed, each at a random moment shortly after a randomly chosen
    later step was logged, or while it starts up (kills aimed by progress, not by wall-clock, so
    they land whatever the machine's speed); after half of the kills the log ends in a torn
    line, as when the kill lands in a log write; the seventh life finishes. The final parameters
    equal an uninterrupted run's bitwise, and the log is whole."""
    reference = _train(tmp_path / "reference", resume=False)
    assert reference.wait(timeout=300) == 0, reference.stderr.read().decode()
    run, rng, kills = tmp_path / "killed", random.Random(0), 0
    while kills < 6:
        started = any((run / "checkpoints").glob("step_*.pt"))
        done = ckpt.load(run)["step"] if started else 0
        process = _train(run, resume=started)
        target = rng.randint(done, min(done + 8, 31))  # the run has 32 steps
        deadline = time.time() + 120
        if target == done:  # during start-up, or before its first step is logged
            time.sleep(rng.uniform(0.0, 1.5))
        while (
            target > done
            and _logged_step(run) < target
            and process.poll() is None
            and time.time() < deadline
        ):
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.05))
        assert process.poll() is None, "the run finished before its kill"
        process.send_signal(signal.SIGKILL)
        process.wait()
        kills += 1
        log = run / "metrics.jsonl"
        if log.exists() and rng.random() < 0.5:  # the kill tore the log line being written
            data = log.read_bytes()
            log.write_bytes(data + data[data.rfind(b"\n", 0, len(data) - 1) + 1 :][:-7])
    last = _train(run, resume=True)
    assert last.wait(timeout=300) == 0, last.stderr.read().decode()
    a = ckpt.load(tmp_path / "reference" / "final.pt")["model"]
    b = ckpt.load(run / "final.pt")["model"]
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs after {kills} kills"
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 32


def test_sigterm_stops_cleanly_with_a_checkpoint(tmp_path):
    run = tmp_path / "run"
    process = _train(run, resume=False)
    deadline = time.time() + 120
    while not any((run / "checkpoints").glob("step_*.pt")) and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 0
    assert "stopped at step" in process.stdout.read().decode()
    state = ckpt.load(run)
    assert state["step"] >= 2 and not (run / "final.pt").exists()


class _Died(BaseException):
    """Stands for the process dying: nothing after it runs, no handler catches it."""


def test_death_during_a_checkpoint_write_leaves_the_previous_one(tmp_path, monkeypatch):
    """The process dies half-way through writing the step-5 checkpoint: only the temporary file is
    affected, resume continues from step 4, and the result equals an uninterrupted run bitwise."""
    from denseflow.config import load_config
    from denseflow.train import train

    config = load_config("tiny").override(["train.checkpoint_every=1"])
    full = train(config, tmp_path / "full", progress=False)
    real_save = torch.save

    def dying_save(obj, handle, *args, **kwargs):
        if obj.get("step") == 5:
            handle.write(b"PK\x03\x04 half a checkpoint")
            raise _Died
        return real_save(obj, handle, *args, **kwargs)

    run = tmp_path / "run"
    monkeypatch.setattr(ckpt.torch, "save", dying_save)
    try:
        train(config, run, progress=False)
    except _Died:
        pass
    monkeypatch.setattr(ckpt.torch, "save", real_save)
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert "step_0000005.pt" not in names and ".step_0000005.pt.tmp" in names
    assert ckpt.load(run)["step"] == 4
    train(config, run, resume=run, progress=False)
    a, b = ckpt.load(tmp_path / "full" / "final.pt")["model"], ckpt.load(run / "final.pt")["model"]
    assert full["step"] == 8 and all(torch.equal(a[k], b[k]) for k in a)


def _torchrun(run) -> subprocess.Popen:
    """2 gloo ranks under torchrun with one restart allowed, resuming ``run`` by itself."""
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    argv += ["--max-restarts=1", "-m", "denseflow", "train", *ARGS, "--out", str(run)]
    argv += ["--resume", "auto", "--set", "train.batch_chunks=2", "--set", "train.epochs=4"]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)


def _workers(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children")
    return sorted(int(p) for p in children.read_text().split()) if children.exists() else []


def test_a_killed_rank_is_restarted_by_torchrun_and_the_run_ends_bitwise_the_same(tmp_path):
    """SIGKILL one of two ranks in the middle of a run: torchrun restarts the group, which
    resumes from the newest good checkpoint by itself (--resume auto), and the final weights
    and statistics equal an uninterrupted 2-rank run's bitwise."""
    reference = _torchrun(tmp_path / "reference")
    assert reference.wait(timeout=300) == 0, reference.stderr.read().decode()[-6000:]
    run = tmp_path / "killed"
    process = _torchrun(run)
    deadline = time.time() + 120
    while _logged_step(run) < 7 and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    ranks = _workers(process.pid)
    assert process.poll() is None and len(ranks) == 2 and _logged_step(run) < 16
    os.kill(ranks[-1], signal.SIGKILL)
    assert process.wait(timeout=300) == 0, process.stderr.read().decode()[-6000:]
    assert not Path(f"/proc/{ranks[-1]}").exists()
    a = ckpt.load(tmp_path / "reference" / "final.pt")["model"]
    b = ckpt.load(run / "final.pt")["model"]
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs after a rank was killed"


@pytest.mark.skipif(os.name == "nt", reason="Windows cannot fsync a folder")
def test_checkpoint_save_fsyncs_the_folder_after_the_rename(tmp_path, monkeypatch):
    """File fsync, rename, then fsync of the folder: without the last, a crash can lose the
    rename (the new checkpoint's name) although its contents reached the disk."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        info = os.fstat(fd)
        events.append(("fsync", "folder" if stat.S_ISDIR(info.st_mode) else "file", info.st_ino))
        real_fsync(fd)

    def replace(src, dst) -> None:
        events.append(("rename", os.path.basename(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    folder = tmp_path / "checkpoints"
    path = ckpt.save(folder / "step_0000001.pt", {"step": 1})
    assert events == [
        ("fsync", "file", path.stat().st_ino),
        ("rename", "step_0000001.pt"),
        ("fsync", "folder", folder.stat().st_ino),
    ]
