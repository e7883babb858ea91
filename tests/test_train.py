"""The training loop: schedule, exact resume, checkpoints and the run directory."""

from __future__ import annotations

import hashlib
import json
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from denseflow import checkpoint as ckpt
from denseflow.config import TrainConfig, load_config
from denseflow.sample import sample_seeds, save_grid
from denseflow.train import TrainingDiverged, learning_rate, train

from .conftest import strict_json


def test_official_schedule_closed_form():
    cfg = TrainConfig(lr=1e-3, warmup=100, gamma=0.9, epochs=3, finetune_epochs=1, finetune_lr=2e-5)
    assert learning_rate(cfg, 0, 0, True, 0) == 0.0  # torch >= 2: the first step runs at lr 0
    assert learning_rate(cfg, 50, 0, False, 0) == pytest.approx(5e-4)
    assert learning_rate(cfg, 150, 1, False, 0) == pytest.approx(
        1e-3
    )  # constant: decay never accumulates
    assert learning_rate(cfg, 150, 1, True, 0) == pytest.approx(
        0.9e-3
    )  # first step of an epoch: lr·gamma
    assert learning_rate(cfg, 60, 1, True, 0) == pytest.approx(0.9 * 0.6e-3)
    assert learning_rate(cfg, 900, 3, True, 0) == 2e-5  # fine-tune stage (train_more.py)


def test_real_decays():
    exp = TrainConfig(lr=1e-3, warmup=0, gamma=0.5, schedule="exponential")
    assert learning_rate(exp, 10, 2, False, 100) == pytest.approx(0.25e-3)
    cos = TrainConfig(lr=1e-3, warmup=0, schedule="cosine")
    assert learning_rate(cos, 50, 0, False, 100) == pytest.approx(0.5e-3)
    assert learning_rate(cos, 100, 0, False, 100) == pytest.approx(0.0, abs=1e-12)


def test_grad_clip_clips():
    """``train.grad_clip``: the update sees gradients of norm ``grad_clip`` (torch's
    clip_grads_with_norm_ takes the parameters; given the gradients it clipped nothing)."""
    from denseflow.model import DenseFlow
    from denseflow.step import train_step

    torch.manual_seed(0)
    model = DenseFlow(load_config("tiny").model).train()
    optimizer = torch.optim.Adamax(model.parameters())
    images = torch.randint(0, 256, (4, 1, 28, 28))
    train_step(model, optimizer, [(images, torch.Generator().manual_seed(0))], 1e-3, 0.01)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert torch.nn.utils.get_total_norm(grads).item() == pytest.approx(0.01, rel=1e-4)


def _weights(path):
    return ckpt.load(path)["model"]


def test_interrupt_and_resume_equals_uninterrupted(tmp_path):
    config = load_config(
        "tiny"
    )  # 64 images, batch 16: 4 steps/epoch, 2 epochs, checkpoints every 3 steps
    full = train(config, tmp_path / "full", progress=False)
    assert full["step"] == 8 and not full["stopped"]
    for stop in (3, 5):  # on a checkpoint boundary and between two
        run = tmp_path / f"stopped{stop}"
        first = train(config, run, progress=False, stop_after=stop)
        assert first["stopped"] and first["step"] == stop
        second = train(config, run, resume=run, progress=False)
        assert second["step"] == 8
        a, b = _weights(full["run_dir"] + "/final.pt"), _weights(run / "final.pt")
        for key in a:
            assert torch.equal(a[key], b[key]), f"{key} differs after resuming at step {stop}"
        assert second["test_bpd"] == full["test_bpd"]


def test_run_directory_contents(tmp_path):
    config = load_config("tiny").override(["train.epochs=1"])
    summary = train(config, tmp_path, progress=False)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]
    evals = [r for r in records if r["kind"] == "eval"]
    assert (
        len(evals) == 1
        and math.isfinite(evals[0]["test_bpd"])
        and evals[0]["test_bpd"] == summary["test_bpd"]
    )
    assert (tmp_path / "samples" / "step_0000004.png").exists()
    assert (tmp_path / "final.pt").exists() and (tmp_path / "best.pt").exists()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "step_0000003.pt",
        "step_0000004.pt",
    ]
    data = json.loads((tmp_path / "data.json").read_text())
    assert data["train"]["files"] and data["test"]["files"]
    payload = torch.load(tmp_path / "final.pt", weights_only=True)
    assert payload["format"] == "denseflow" and payload["config"]["model"]["image_shape"] == [
        1,
        28,
        28,
    ]
    model, loaded = ckpt.load_model(tmp_path / "final.pt")
    assert loaded == config and not model.training


def test_checkpoints_carry_a_verified_checksum(tmp_path):
    path = ckpt.save(tmp_path / "c.pt", {"model": {"w": torch.arange(6.0)}, "step": 3})
    assert ckpt.load(path)["step"] == 3
    payload = torch.load(path, weights_only=True)
    payload["model"]["w"][2] += 1  # altered contents, still a valid torch file
    torch.save(payload, tmp_path / "altered.pt")
    with pytest.raises(ckpt.CheckpointError, match="damaged"):
        ckpt.load(tmp_path / "altered.pt")
    data = path.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ckpt.CheckpointError, match="not a readable"):
        ckpt.load(tmp_path / "cut.pt")


def _contents() -> dict:
    return {
        "model": {
            "w": torch.arange(6.0).reshape(2, 3),
            "h": torch.tensor([1.5, -2.0], dtype=torch.bfloat16),
        },
        "state": {0: {"step": 7}},
        "params": [1, 23],
        "betas": (0.9, 0.999),
        "name": "1",
        "flag": True,
    }


def _set(key: str, value):
    return lambda c: c.update({key: value})


ALTERATIONS = {
    "tensor bytes": lambda c: c["model"]["w"].view(-1)[4].add_(1),
    "bfloat16 bytes": lambda c: c["model"]["h"].view(torch.int16)[0].add_(1),
    "dtype, same bytes": lambda c: c["model"].update(w=c["model"]["w"].view(torch.int32)),
    "shape, same bytes": lambda c: c["model"].update(w=c["model"]["w"].reshape(3, 2)),
    "renamed key": lambda c: c["model"].update(v=c["model"].pop("w")),
    "int key as a string": lambda c: c.update(state={"0": c["state"][0]}),
    "plain value": lambda c: c["state"][0].update(step=8),
    "list regrouped": _set("params", [12, 3]),
    "tuple as a list": _set("betas", [0.9, 0.999]),
    "string as a number": _set("name", 1),
    "bool as a number": _set("flag", 1),
}


@pytest.mark.parametrize("alteration", ALTERATIONS)
def test_checksum_detects_every_change_of_contents(tmp_path, alteration):
    """Each alteration leaves a valid torch file that carries the original checksum: load refuses
    it. Format 1's checksum missed three of them (it fed [1, 23] and [12, 3], {0: x} and
    {"0": x}, a tuple and a list alike)."""
    path = ckpt.save(tmp_path / "c.pt", _contents())
    payload = torch.load(path, weights_only=True)
    ALTERATIONS[alteration](payload)
    torch.save(payload, tmp_path / "altered.pt")
    with pytest.raises(ckpt.CheckpointError, match="damaged"):
        ckpt.load(tmp_path / "altered.pt")


# What the format-1 code (denseflow before format 2) computed over _v1_contents(), pinned.
V1_CHECKSUM = "a4c5a2267418ffa1e840dd2053aec9f5987740d590929c024c8729bdcbc0c059"


def _v1_contents() -> dict:
    return {
        "format": "denseflow",
        "version": 1,
        "denseflow_version": "0.1.0",
        "kind": "weights",
        "model": {
            "w": torch.arange(6.0).reshape(2, 3),
            "h": torch.tensor([1.5, -2.0], dtype=torch.bfloat16),
        },
        "step": 3,
        "betas": (0.9, 0.999),
        "name": "é",
        "state": {0: {"n": None, "ok": True}},
    }


def test_version_1_checkpoints_still_load_and_verify(tmp_path):
    """A file written by the format-1 code loads and verifies; altered, it is refused."""
    torch.save(_v1_contents() | {"checksum": V1_CHECKSUM}, tmp_path / "v1.pt")
    payload, expected = ckpt.load(tmp_path / "v1.pt"), _v1_contents()
    assert payload["version"] == 1 and torch.equal(payload["model"]["h"], expected["model"]["h"])
    altered = _v1_contents() | {"checksum": V1_CHECKSUM}
    altered["model"]["w"][1, 1] += 1
    torch.save(altered, tmp_path / "altered.pt")
    with pytest.raises(ckpt.CheckpointError, match="damaged"):
        ckpt.load(tmp_path / "altered.pt")
    newer = _v1_contents() | {"version": 3, "checksum": V1_CHECKSUM}
    torch.save(newer, tmp_path / "newer.pt")
    with pytest.raises(ckpt.CheckpointError, match=r"newer denseflow \(format 3 > 2\)"):
        ckpt.load(tmp_path / "newer.pt")


def test_resume_falls_back_past_a_damaged_newest_checkpoint(tmp_path, capsys):
    config = load_config("tiny")
    full = train(config, tmp_path / "full", progress=False)
    run = tmp_path / "run"
    train(
        config, run, progress=False, stop_after=5
    )  # keeps the checkpoints of steps 4 (epoch end) and 5
    newest = run / "checkpoints" / "step_0000005.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated, as by a crash mid-write
    capsys.readouterr()
    second = train(config, run, resume=run, progress=False)
    out = capsys.readouterr().out
    assert "step_0000005.pt" in out and "resuming from step_0000004.pt" in out
    a, b = _weights(tmp_path / "full" / "final.pt"), _weights(run / "final.pt")
    assert second["step"] == full["step"] and all(torch.equal(a[k], b[k]) for k in a)


def test_non_finite_steps_are_skipped_and_counted(tmp_path, monkeypatch):
    """Test hook: the third training loss is NaN. That update is skipped (Adamax state and the
    weight average untouched), logged, and training carries on to finite weights."""
    calls = []
    original = ckpt.DenseFlow.forward  # the training forward (evaluation calls elbo)

    def poisoned(self, x, noise=None, generator=None):
        calls.append(1)
        value = original(self, x, noise, generator)
        return value * float("nan") if len(calls) == 3 else value

    monkeypatch.setattr(ckpt.DenseFlow, "forward", poisoned)
    summary = train(load_config("tiny").override(["train.ema_decay=0.5"]), tmp_path, progress=False)
    assert summary["step"] == 8 and math.isfinite(summary["test_bpd"])
    skips = [
        json.loads(line)
        for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
        if '"skip"' in line
    ]
    assert [(r["step"], r["skipped_steps"]) for r in skips] == [(3, 1)]
    state = ckpt.load(tmp_path)
    assert state["skipped_steps"] == 1
    assert all(s["step"] == 7 for s in state["optimizer"]["state"].values())  # 8 steps, 1 skipped
    assert state["average"]["count"] == 7
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_persistent_divergence_rolls_back_then_stops_cleanly(tmp_path, monkeypatch):
    """From the fifth training loss on, every loss is NaN: two rollbacks to the newest good
    checkpoint (learning rate x0.5, x0.25), then a clean stop; the checkpoints survive."""
    calls = []
    original = ckpt.DenseFlow.forward  # the training forward (evaluation calls elbo)

    def diverging(self, x, noise=None, generator=None):
        calls.append(1)
        value = original(self, x, noise, generator)
        return value * float("nan") if len(calls) >= 5 else value

    monkeypatch.setattr(ckpt.DenseFlow, "forward", diverging)
    config = load_config("tiny").override(
        ["train.max_bad_steps=2", "train.max_rollbacks=2", "train.epochs=4"]
    )
    with pytest.raises(TrainingDiverged, match="after 2 rollback"):
        train(config, tmp_path, progress=False)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["lr_scale"]) for r in records if r["kind"] == "rollback"] == [
        (4, 0.5),
        (4, 0.25),
    ]
    state = ckpt.load(tmp_path)
    assert state["step"] == 4 and all(
        torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point()
    )


def test_per_layer_monitors_in_the_log(tmp_path):
    config = load_config("tiny").override(["train.monitor_every=2", "train.epochs=1"])
    train(config, tmp_path, progress=False)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    monitors = [r for r in records if r["kind"] == "monitor"]
    assert [r["step"] for r in monitors] == [2, 4]
    for r in monitors:
        for block in ("block1", "block2"):
            assert 0 <= r[f"{block}.max_abs_log_scale"] < 2  # bounded by 2·tanh(s/2)
            assert math.isfinite(r[f"{block}.max_abs_logdet_per_dim"])
    # zero-initialised couplings: exactly 0 until the first update at lr > 0 (step 1 runs at lr 0)
    assert monitors[0]["block1.max_abs_log_scale"] == 0 < monitors[1]["block1.max_abs_log_scale"]


def test_a_torn_last_log_line_is_dropped_on_resume(tmp_path, capsys):
    """A kill during a log write leaves a partial last line: resuming says so, names the file,
    drops the line and continues; the log is whole again."""
    from denseflow.cli import main

    run = tmp_path / "R"
    tiny = ["train", "--preset", "tiny", "--quiet", "--out", str(run)]
    assert main([*tiny, "--set", "train.epochs=1"]) == 0
    with open(run / "metrics.jsonl", "a") as log:
        log.write('{"kind": "train", "step": 9')
    capsys.readouterr()
    assert main([*tiny, "--resume", str(run), "--set", "train.epochs=2"]) == 0
    out = capsys.readouterr().out
    assert f"{run / 'metrics.jsonl'}: dropped a torn last line" in out
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 8 and steps.count(9) == 0


def test_what_a_resume_may_read_and_where_it_may_write(tmp_path, capsys):
    """A run continues in a new folder (its own left as it was) and on its data copied elsewhere
    (the same files, so data.json's digests match) or with another train_limit; a new run in a
    folder holding a log but no checkpoint replaces the log and says so (malformed rows 68-73:
    the refusals)."""
    from denseflow.cli import main

    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    for split, count in (("train", 48), ("test", 8)):
        (data / split).mkdir(parents=True)
        for i in range(count):
            pixels = rng.integers(0, 256, (28, 28), np.uint8)
            Image.fromarray(pixels).save(data / split / f"{i}.png")
    run, tiny = tmp_path / "run", ["train", "--preset", "tiny", "--quiet"]
    run.mkdir()
    (run / "metrics.jsonl").write_text("not a log\nof denseflow\n")  # no checkpoint beside it
    folder = ["--set", "data.dataset=folder", "--set", "train.epochs=1"]
    assert main([*tiny, "--out", str(run), "--data-dir", str(data), *folder]) == 0
    assert f"{run / 'metrics.jsonl'}: a log without a checkpoint to resume, replaced" in (
        capsys.readouterr().out
    )
    assert [json.loads(r)["step"] for r in (run / "metrics.jsonl").read_text().splitlines()][0] == 1
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    step = run / "checkpoints" / "step_0000003.pt"
    branch = ["train", "--resume", str(step), "--out", str(tmp_path / "branch")]
    assert main([*branch, "--set", "train.epochs=2"]) == 0
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    assert json.loads((tmp_path / "branch" / "data.json").read_text())["train"]["num_images"] == 48
    copy = tmp_path / "moved"
    shutil.copytree(data, copy)
    more = ["--set", "train.epochs=2", "--data-dir", str(copy)]
    assert main(["train", "--resume", str(run), "--quiet", *more]) == 0
    recorded = json.loads((run / "data.json").read_text())["train"]
    assert recorded["path"] == str(copy) and recorded["num_images"] == 48
    fewer = ["--set", "train.epochs=3", "--set", "data.train_limit=32"]
    assert main(["train", "--resume", str(run), "--quiet", *fewer]) == 0
    assert json.loads((run / "data.json").read_text())["train"]["num_images"] == 32


def test_logs_and_reports_are_strict_json_with_null_for_non_finite(tmp_path):
    """NaN and infinities are written as null (Python's NaN/Infinity tokens are not JSON);
    a log written before, with NaN tokens, still resumes and is rewritten strict."""
    from denseflow.runlog import RunLog, nan_for_null, plot_bpd_curve, read_records, to_json

    value = {"a": math.nan, "b": [1.5, -math.inf, {"c": math.inf}], "d": (2, "x"), "e": None}
    assert strict_json(to_json(value)) == {
        "a": None,
        "b": [1.5, None, {"c": None}],
        "d": [2, "x"],
        "e": None,
    }
    assert to_json({"n": 3, "f": 0.1}) == '{"n": 3, "f": 0.1}'
    # read back: the top-level nulls are NaN again, nested values as read, nothing added
    back = nan_for_null(strict_json(to_json(value)))
    assert math.isnan(back["a"]) and math.isnan(back["e"]) and sorted(back) == list("abde")
    assert back["b"] == [1.5, None, {"c": None}] and back["d"] == [2, "x"]
    log = RunLog(tmp_path, resume_step=0)
    log.write({"kind": "eval", "step": 1, "epoch": 0, "test_bpd": math.nan})
    log.write({"kind": "train", "step": 2, "epoch": 0, "bpd": 3.25})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [strict_json(line).get("test_bpd", "-") for line in lines] == [None, "-"]
    old = tmp_path / "old"
    old.mkdir()
    (old / "metrics.jsonl").write_text('{"kind": "eval", "step": 1, "test_bpd": NaN}\n')
    RunLog(old, resume_step=1)  # resuming rewrites the kept records
    assert strict_json((old / "metrics.jsonl").read_text()) == {
        "kind": "eval",
        "step": 1,
        "test_bpd": None,
    }
    records = read_records(tmp_path / "metrics.jsonl")
    pytest.importorskip("matplotlib")
    assert (
        plot_bpd_curve(records, tmp_path / "curve.png") and (tmp_path / "curve.png").stat().st_size
    )


def test_weight_average_is_the_bias_corrected_moving_average():
    """WeightAverage after t steps: Σ β^(t-s) θ_s / Σ β^(t-s) over the weights θ_1..θ_t after
    each step (float64, closed form); inside ``applied`` the model holds it and afterwards its
    own weights bit for bit; decay 0 keeps the last weights; the state round-trips."""
    from denseflow.average import WeightAverage

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2).double()
    beta, thetas = 0.9, []
    average = WeightAverage(model, beta)
    last = WeightAverage(model, 0.0)
    for _ in range(6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        thetas.append([p.detach().clone() for p in model.parameters()])
        average.update()
        last.update()
    t = len(thetas)
    weights = [beta ** (t - s) for s in range(1, t + 1)]
    own = [p.detach().clone() for p in model.parameters()]
    with average.applied():
        for i, p in enumerate(model.parameters()):
            expected = sum(w * th[i] for w, th in zip(weights, thetas, strict=True)) / sum(weights)
            torch.testing.assert_close(p.detach(), expected, rtol=1e-14, atol=1e-14)
    for p, q in zip(model.parameters(), own, strict=True):
        assert torch.equal(p, q)
    with last.applied():
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), own, strict=True))
    copy = WeightAverage(model, beta)
    copy.load_state_dict(average.state_dict())
    assert copy.count == 6 and all(
        torch.equal(a, b) for a, b in zip(copy.average, average.average, strict=True)
    )
    fresh = WeightAverage(model, beta)
    fresh.update()  # the first step copies the weights: no trace of where the average started
    assert all(torch.equal(a, p) for a, p in zip(fresh.average, model.parameters(), strict=True))


def test_weight_average_changes_what_is_evaluated_not_what_is_trained(tmp_path):
    """train.ema_decay: the training checkpoints' weights and Adamax state are bitwise those of a
    run without it; the exports hold the average the checkpoint stores (not the weights), the
    test bpd is the average's; an interrupted run resumes to bitwise the same average."""
    plain = load_config("tiny")
    averaged = plain.override(["train.ema_decay=0.8"])
    runs = {
        "plain": train(plain, tmp_path / "plain", progress=False),
        "averaged": train(averaged, tmp_path / "averaged", progress=False),
    }
    train(averaged, tmp_path / "resumed", progress=False, stop_after=5)
    runs["resumed"] = train(
        averaged, tmp_path / "resumed", resume=tmp_path / "resumed", progress=False
    )
    last = {n: ckpt.load(tmp_path / n / "checkpoints" / "step_0000008.pt") for n in runs}
    assert "average" not in last["plain"]
    for key, value in last["plain"]["model"].items():
        assert torch.equal(last["averaged"]["model"][key], value), key
    for i, state in last["plain"]["optimizer"]["state"].items():
        assert all(
            torch.equal(last["averaged"]["optimizer"]["state"][i][k], v) for k, v in state.items()
        )
    average = last["averaged"]["average"]
    assert average["count"] == 8 and average["decay"] == 0.8
    export = ckpt.load(tmp_path / "averaged" / "final.pt")
    final = export["model"]
    assert export["batchnorm"].endswith(", for the weights' average (train.ema_decay=0.8)")
    assert "average" not in ckpt.load(tmp_path / "plain" / "final.pt")["batchnorm"]
    moved = 0
    for key, value in average["weights"].items():
        assert torch.equal(final[key], value), key
        moved += not torch.equal(value, last["averaged"]["model"][key])
    assert moved > 0.9 * len(average["weights"])  # trained parameters all differ from the average
    assert runs["averaged"]["test_bpd"] != runs["plain"]["test_bpd"]
    assert runs["resumed"]["test_bpd"] == runs["averaged"]["test_bpd"]
    # the run's last sample grid is the exported average's samples (its 1x1 inverses included)
    model, config = ckpt.load_model(tmp_path / "averaged" / "final.pt")
    seeds = list(range(config.train.num_samples))
    samples = sample_seeds(model, seeds, config.train.sample_temperature, cuda_graph=False)
    save_grid(samples, tmp_path / "again.png", num_bits=config.model.num_bits)
    grid = np.asarray(Image.open(tmp_path / "averaged" / "samples" / "step_0000008.png"))
    assert np.array_equal(np.asarray(Image.open(tmp_path / "again.png")), grid)
    assert last["resumed"]["average"]["count"] == 8
    for key, value in average["weights"].items():
        assert torch.equal(last["resumed"]["average"]["weights"][key], value), key


def test_average_check_script_scores_what_the_run_scores(tmp_path):
    """scripts/average_check.py (the README's weight-averaging table): its evaluation of the
    run's own average is the run's test bpd, the weights' and the other averages' rows are
    there, and each paired difference is the difference of the means."""
    import os
    import subprocess
    import sys

    from .conftest import REPO

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, str(REPO / "scripts" / "average_check.py"), "--preset", "tiny"]
    command += ["--out", str(tmp_path / "run"), "--decays", "0.5,0.9", "--k", "4"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "average_check.json").read_text())
    rows = {row["weights"]: row for row in report["rows"]}
    assert list(rows) == ["trained", "average 0.5", "average 0.9"] and report["steps"] == 8
    assert rows["average 0.5"]["elbo_bpd"] == report["run_test_bpd"]
    for name in ("average 0.5", "average 0.9"):
        for bound in ("elbo", "iwbo4"):
            difference = rows[name][f"{bound}_bpd"] - rows["trained"][f"{bound}_bpd"]
            assert rows[name][f"{bound}_minus_trained"] == pytest.approx(difference, abs=1e-12)
            assert 0 < rows[name][f"{bound}_minus_trained_sem"] < abs(difference)


def test_a_held_out_validation_set_chooses_best_and_is_never_trained_on(tmp_path, monkeypatch):
    """data.validation=16 of tiny's 64 training images: training batches and BatchNorm
    recalibration read the other 48 (3 steps an epoch), every evaluation scores the 16, the
    test set is scored once at the end, best.pt is the best validation evaluation (scored again
    from the file by `denseflow evaluate --split validation`); a resume keeps the split."""
    from denseflow import train as train_module
    from denseflow.cli import main
    from denseflow.config import ConfigError
    from denseflow.data import hold_out, load_images

    settings = ["data.validation=16", "train.epochs=3", "train.lr=0.2"]  # worse after epoch 1
    config = load_config("tiny").override(settings)
    read = {}
    batches = train_module.Batches

    def recording(images, *args):
        read["batches"] = images
        return batches(images, *args)

    monkeypatch.setattr(train_module, "Batches", recording)
    run = tmp_path / "run"
    summary = train(config, run, progress=False)
    every = load_images("fashion_mnist", "train", limit=64)
    rest, held = hold_out(every, 16)
    assert torch.equal(read["batches"], rest.images) and summary["step"] == 3 * 3
    assert not any((held.images[i] == rest.images).flatten(1).all(1).any() for i in range(16))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [3, 6, 9]
    assert [sorted(r) for r in evals[:2]] == [["epoch", "kind", "step", "val_bpd"]] * 2
    assert evals[2]["test_bpd"] == summary["test_bpd"] and evals[2]["val_bpd"] == summary["val_bpd"]
    best = min(r["val_bpd"] for r in evals)
    assert best == evals[0]["val_bpd"] < summary["val_bpd"]  # best.pt is not final.pt
    assert summary["best_val_bpd"] == best and "best_test_bpd" not in summary
    data = json.loads((run / "data.json").read_text())
    assert data["train"]["num_images"] == 48 and data["validation"]["num_images"] == 16
    assert data["validation"]["validation"] == {
        "held_out": 16,
        "of": 64,
        "indices_sha256": data["train"]["validation"]["indices_sha256"],
    }
    for name in ("best", "final"):
        out = tmp_path / f"{name}.json"
        argv = ["evaluate", "--checkpoint", str(run / f"{name}.pt"), "--split", "validation"]
        assert main([*argv, "--json", str(out), "--quiet"]) == 0
        scored = json.loads(out.read_text())
        assert scored["split"] == "validation"
        assert scored["bpd"] == (best if name == "best" else summary["val_bpd"])
    assert train_module.run_images(config, "train").images.equal(rest.images)
    assert train_module.run_images(config, "validation", limit=5).images.equal(held.images[:5])
    # the same run resumed continues on the same split; another split is refused
    train(config, tmp_path / "stopped", progress=False, stop_after=4)
    again = train(config, tmp_path / "stopped", resume=tmp_path / "stopped", progress=False)
    assert again["best_val_bpd"] == best and again["test_bpd"] == summary["test_bpd"]
    for change in ("data.validation=8", "data.train_limit=48"):
        with pytest.raises(ConfigError, match=change.split("=")[0]):
            train(config.override([change]), run, resume=run, progress=False)


def test_checkpoints_before_validation_sets_keep_their_best():
    """``LoopState.best_bpd`` was ``best_test_bpd`` (always the test set's) in older checkpoints:
    a resumed run still knows its best, and does not overwrite best.pt with a worse one."""
    from denseflow.train import LoopState

    assert LoopState.from_checkpoint({"step": 2, "best_test_bpd": 3.5}).best_bpd == 3.5
    assert LoopState.from_checkpoint({"step": 2}).best_bpd == math.inf


def test_hold_out_is_fixed_disjoint_and_keeps_order():
    from denseflow.data import DataError, ImageSet, hold_out

    images = torch.arange(20, dtype=torch.uint8).view(20, 1, 1, 1).expand(20, 1, 2, 2)
    names = tuple(f"{i:02d}.png" for i in range(20))
    every = ImageSet(images.contiguous(), "folder", "train", {"num_images": 20}, names)
    torch.manual_seed(1)
    rest, held = hold_out(every, 5)
    torch.manual_seed(2)  # the global generator plays no part
    assert hold_out(every, 5)[1].images.equal(held.images)
    index = {part.split: part.images[:, 0, 0, 0].long().tolist() for part in (rest, held)}
    rest_i, held_i = index["train"], index["validation"]
    assert len(held_i) == 5 and sorted(rest_i + held_i) == list(range(20))
    assert rest_i == sorted(rest_i) and held_i == sorted(held_i)
    assert held.names == tuple(f"{i:02d}.png" for i in held_i)
    assert (rest.split, held.split, rest.source["num_images"]) == ("train", "validation", 15)
    digest = hashlib.sha256(np.array(held_i, dtype="<i8").tobytes()).hexdigest()
    assert held.source["validation"] == {"held_out": 5, "of": 20, "indices_sha256": digest}
    assert set(held_i) < set(hold_out(every, 6)[1].images[:, 0, 0, 0].tolist())  # a prefix
    for n in (0, 20):
        with pytest.raises(DataError, match=f"data.validation={n} must leave training images"):
            hold_out(every, n)


def test_a_plain_folder_trains_with_its_held_out_images_as_its_evaluation(tmp_path, capsys):
    """A folder of images without train/ and test/ subfolders: refused as before without a
    validation set; with data.validation=8 the run trains on 32 of its 40 images, evaluates on
    the 8 others and has no test set (evaluate --split test says so, in one line)."""
    from denseflow.cli import main

    folder = tmp_path / "mine"
    folder.mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, (40, 28, 28), dtype=np.uint8)
    for i, image in enumerate(pixels):
        Image.fromarray(image, mode="L").save(folder / f"{i:03d}.png")
    run = tmp_path / "run"
    argv = ["train", "--preset", "tiny", "--data-dir", str(folder), "--out", str(run), "--quiet"]
    argv += ["--set", "data.dataset=folder", "--set", "train.epochs=1"]
    assert main(argv) == 2
    assert "train on them with some held out (--set data.validation=N)" in capsys.readouterr().err
    assert main([*argv, "--set", "data.validation=8"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["step"] == 2 and summary["test_bpd"] is None  # 32 images, batches of 16
    assert math.isfinite(summary["val_bpd"])
    data = json.loads((run / "data.json").read_text())
    assert sorted(data) == ["train", "validation"] and data["train"]["num_images"] == 32
    out = tmp_path / "scored.json"
    scored = ["evaluate", "--checkpoint", str(run), "--quiet", "--json", str(out)]
    assert main([*scored, "--split", "validation"]) == 0
    assert json.loads(out.read_text())["bpd"] == summary["val_bpd"]
    assert main(scored) == 2
    err = capsys.readouterr().err
    assert "split 'test': the run trained on a folder without train/ and test/" in err
    assert err.count("\n") == 1
    # interpolate between held-out images by their index, in evaluate's order
    from denseflow.pretrained import open_model
    from denseflow.train import run_images

    held = run_images(open_model(str(run))[1], "validation").images
    assert len(held) == 8 and not any(torch.equal(held[0], held[i]) for i in range(1, 8))
    strip = tmp_path / "strip.png"
    ends = ["interpolate", "--checkpoint", str(run), "--split", "validation", "--a", "2"]
    assert main([*ends, "--b", "7", "--steps", "3", "--scale", "1", "--out", str(strip)]) == 0
    grid = np.asarray(Image.open(strip))  # 3 frames of 28 px, 2 px of padding around each
    assert np.array_equal(grid[2:30, 2:30], held[2, 0].numpy())
    assert np.array_equal(grid[2:30, 2 + 2 * 30 : 30 + 2 * 30], held[7, 0].numpy())
