"""The denseflow command: train → evaluate → sample on the tiny preset, import-official, errors."""

from __future__ import annotations

import errno
import json
import math
import os
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from denseflow import checkpoint as ckpt
from denseflow.cli import main
from denseflow.config import ConfigError, load_config
from denseflow.model import DenseFlow

from .conftest import PARITY_DIRS, needs_fixtures


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    assert (
        main(["train", "--preset", "tiny", "--out", str(run), "--quiet", "--set", "train.epochs=1"])
        == 0
    )
    return run


def test_dry_run_prints_the_resolved_config(capsys):
    assert (
        main(
            [
                "train",
                "--preset",
                "tiny",
                "--set",
                "train.lr=0.002",
                "--set",
                "model.growth_rate=4",
                "--dry-run",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "lr: 0.002" in out and "growth_rate: 4" in out and "dataset: fashion_mnist" in out


def test_evaluate_elbo_and_chunked_iwbo(tiny_run, capsys):
    final = tiny_run / "final.pt"
    assert main(["evaluate", "--checkpoint", str(final), "--quiet"]) == 0
    elbo = json.loads((tiny_run / "final.test.elbo.json").read_text())
    assert (
        main(
            [
                "evaluate",
                "--checkpoint",
                str(final),
                "--k",
                "6",
                "--kbs",
                "4",
                "--quiet",
                "--json",
                str(tiny_run / "iw.json"),
            ]
        )
        == 0
    )
    iwbo = json.loads((tiny_run / "iw.json").read_text())
    assert elbo["images"] == iwbo["images"] == 32 and iwbo["k"] == 6
    assert iwbo["bpd"] < elbo["bpd"] < 9  # the importance-weighted bound is tighter
    assert "bits/dim" in capsys.readouterr().out
    assert (
        main(
            [
                "evaluate",
                "--checkpoint",
                str(final),
                "--double",
                "--quiet",
                "--json",
                str(tiny_run / "d.json"),
            ]
        )
        == 0
    )
    assert json.loads((tiny_run / "d.json").read_text())["bpd"] == pytest.approx(
        elbo["bpd"], abs=1e-4
    )


def test_sample_seeds_are_reproducible_and_independent(tiny_run, tmp_path):
    for name, seeds in (("a", "0-3"), ("b", "2,3")):
        argv = ["sample", "--checkpoint", str(tiny_run / "final.pt"), "--seeds", seeds]
        assert (
            main(
                [*argv, "--out", str(tmp_path / f"{name}.png"), "--each-dir", str(tmp_path / name)]
            )
            == 0
        )
    for seed in (2, 3):
        a = np.asarray(Image.open(tmp_path / "a" / f"seed{seed:06d}.png"))
        b = np.asarray(Image.open(tmp_path / "b" / f"seed{seed:06d}.png"))
        assert a.shape == (28, 28) and np.array_equal(a, b)
    assert not np.array_equal(
        np.asarray(Image.open(tmp_path / "a" / "seed000000.png")),
        np.asarray(Image.open(tmp_path / "a" / "seed000001.png")),
    )
    grid = Image.open(tmp_path / "a.png")  # each 28x28 image shown at 84x84 by default
    assert grid.size == (4 * 86 + 2, 86 + 2) and grid.text["temperature"] == "1.0"
    cells = np.asarray(grid)[2:86, 2:86]  # the first image, each pixel a 3x3 block
    assert np.array_equal(
        cells[::3, ::3], np.asarray(Image.open(tmp_path / "a" / "seed000000.png"))
    )
    argv += ["--out", str(tmp_path / "c.png"), "--scale", "1", "--temperature", "0.5", "--quiet"]
    assert main(argv) == 0
    small = Image.open(tmp_path / "c.png")
    assert small.size == (2 * 30 + 2, 30 + 2) and small.text["temperature"] == "0.5"
    # a list of temperatures: the same seeds at each, a grid row per temperature in the given
    # order, a PNG per seed and temperature
    sweep = argv[:-7] + ["--out", str(tmp_path / "sweep.png"), "--scale", "1", "--quiet"]
    assert main([*sweep, "--temperature", "0.5,1", "--each-dir", str(tmp_path / "sw")]) == 0
    both = Image.open(tmp_path / "sweep.png")
    assert both.size == (2 * 30 + 2, 2 * 30 + 2) and both.text["temperature"] == "0.5,1.0"
    assert np.array_equal(np.asarray(both)[:32], np.asarray(small))  # row 1: T = 0.5
    for column, seed in enumerate((2, 3)):
        cell = np.asarray(both)[32:60, 2 + 30 * column : 30 + 30 * column]  # row 2: T = 1
        assert np.array_equal(cell, np.asarray(Image.open(tmp_path / "a" / f"seed{seed:06d}.png")))
        hot = np.asarray(Image.open(tmp_path / "sw" / f"seed{seed:06d}_t1.png"))
        assert np.array_equal(cell, hot)
        cool = np.asarray(Image.open(tmp_path / "sw" / f"seed{seed:06d}_t0.5.png"))
        assert np.array_equal(np.asarray(small)[2:30, 2 + 30 * column : 30 + 30 * column], cool)
    assert len(list((tmp_path / "sw").iterdir())) == 4
    # --no-grid: only the per-seed PNGs, the same images; nothing else written
    checkpoint = str(tiny_run / "final.pt")
    only = tmp_path / "only"
    argv = ["sample", "--checkpoint", checkpoint, "--seeds", "2,3", "--each-dir", str(only)]
    assert main([*argv, "--no-grid", "--quiet"]) == 0
    assert sorted(p.name for p in only.iterdir()) == ["seed000002.png", "seed000003.png"]
    for seed in (2, 3):
        name = f"seed{seed:06d}.png"
        a = np.asarray(Image.open(tmp_path / "a" / name))
        assert np.array_equal(np.asarray(Image.open(only / name)), a)
    assert not (tiny_run / "final.samples.png").exists()


def test_default_outputs_of_a_run_folder_go_into_it(tiny_run, tmp_path, monkeypatch):
    """`--checkpoint RUN_DIR` reads its final.pt: the default outputs go beside that file, as for
    `--checkpoint RUN_DIR/final.pt`, not into the current folder."""
    monkeypatch.chdir(tmp_path)
    argv = ["--checkpoint", str(tiny_run), "--quiet"]
    assert main(["sample", *argv, "--num", "2"]) == 0
    assert main(["evaluate", *argv, "--limit", "2"]) == 0
    written = [tiny_run / "final.samples.png", tiny_run / "final.test.elbo.first2.json"]
    assert all(path.is_file() for path in written) and not list(tmp_path.iterdir())
    for path in written:  # the other tests see the run as it was
        path.unlink()


@pytest.mark.skipif(not Path("/dev/full").is_char_device(), reason="no /dev/full")
def test_a_full_disk_is_one_line_naming_the_output(tiny_run, tmp_path, capsys, monkeypatch):
    """An output the system refuses only when written (ENOSPC: /dev/full, written to, never
    replaced), after the work: one line naming it, exit code 2, not an internal error."""
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("L", (28, 28), 7).save(folder / "a.png")
    argv = ["evaluate", "--checkpoint", str(tiny_run), "--images", str(folder), "--quiet"]
    assert main([*argv, "--json", str(tmp_path / "r.json"), "--per-image", "/dev/full"]) == 2
    err = capsys.readouterr().err
    line = (
        "denseflow evaluate: error: --per-image /dev/full: cannot write (No space left on device)"
    )
    assert err == line + "\n"
    assert Path("/dev/full").is_char_device()
    # a result that goes to a device keeps no partial evaluation beside it (in /dev)
    kept = []
    monkeypatch.setattr("denseflow.evaluate.SAVE_SECONDS", -1.0)  # after every batch
    monkeypatch.setattr("denseflow.evaluate.ckpt.save", lambda path, payload: kept.append(path))
    assert main([*argv, "--json", "/dev/full"]) == 2
    assert "--json /dev/full: cannot write" in capsys.readouterr().err and kept == []
    assert main([*argv, "--json", str(tmp_path / "r.json")]) == 0
    assert kept == [tmp_path / ".r.json.elbo.partial"]  # a file's are kept, as before


def test_a_checkpoint_is_written_over_a_regular_file_only(tmp_path, monkeypatch):
    """checkpoint.save renames its file over the target: a symbolic link or a named pipe there is
    refused (and left as it is), and a failed write leaves no temporary file."""
    target = tmp_path / "target.pt"
    target.write_text("kept")
    (tmp_path / "link.pt").symlink_to(target)
    os.mkfifo(tmp_path / "pipe.pt")
    for name, kind in (("link.pt", "a symbolic link"), ("pipe.pt", "a named pipe")):
        with pytest.raises(ckpt.CheckpointError, match=f"{name}: {kind}, not a regular file"):
            ckpt.save(tmp_path / name, {"step": 1})
    assert (tmp_path / "link.pt").is_symlink() and target.read_text() == "kept"

    def full(obj, handle, *args, **kwargs):
        handle.write(b"PK half a checkpoint")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ckpt.torch, "save", full)
    with pytest.raises(OSError, match="No space left"):
        ckpt.save(target, {"step": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.pt", "pipe.pt", "target.pt"]
    assert target.read_text() == "kept"


def test_seeds_are_counted_before_the_list_is_built():
    from denseflow.sample import MAX_SEEDS, parse_seeds

    assert len(parse_seeds(f"0-{MAX_SEEDS - 1}")) == MAX_SEEDS
    with pytest.raises(ConfigError, match=f"1,000,001 seeds, more than the {MAX_SEEDS:,}"):
        parse_seeds(f"5,0-{MAX_SEEDS - 1}")
    with pytest.raises(ConfigError, match="--num 1000000000000: 1,000,000,000,000 seeds"):
        main(["sample", "--checkpoint", "x.pt", "--num", str(10**12), "--debug"])


def test_grid_size_is_the_saved_size(tmp_path):
    from denseflow.sample import check_grid, grid_size, save_grid

    for n, shape, nrow, scale in (
        (5, (1, 28, 28), 8, None),
        (9, (3, 8, 6), 4, 2),
        (1, (3, 5, 7), 3, 1),
    ):
        images = torch.randint(0, 256, (n, *shape))
        path = save_grid(images, tmp_path / "g.png", nrow, scale=scale)
        assert Image.open(path).size == grid_size(n, *shape[1:], nrow, scale=scale)
    # the largest grid Pillow opens passes, one more row does not
    limit = 2 * Image.MAX_IMAGE_PIXELS
    rows = (limit // 690 - 2) // 86  # 28x28 at scale 3, 8 a row: 690 px wide, 86 px a row + 2
    check_grid(8 * rows, 28, 28)
    with pytest.raises(ConfigError, match="more than Pillow opens"):
        check_grid(8 * rows + 1, 28, 28)


def write_cifar(root, n_train=8, n_test=6):
    """CIFAR-10 python batches, in the on-disk format: pickled dicts with bytes keys."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in [*((f"data_batch_{i}", n_train) for i in range(1, 6)), ("test_batch", n_test)]:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": [0] * n}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    return root


@needs_fixtures
def test_import_official_then_evaluate(tmp_path, capsys):
    fixture = PARITY_DIRS[0]
    out = tmp_path / "published.pt"
    args = [
        "import-official",
        str(fixture / "checkpoint.pt"),
        "--args",
        str(fixture / "args.json"),
        "--out",
        str(out),
    ]
    assert main(args) == 0
    assert "8,859,816 parameters" in capsys.readouterr().out
    data = write_cifar(tmp_path / "data")
    assert (
        main(
            [
                "evaluate",
                "--checkpoint",
                str(out),
                "--data-dir",
                str(data),
                "--quiet",
                "--json",
                str(tmp_path / "e.json"),
            ]
        )
        == 0
    )
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["images"] == 6 and result["dataset"] == "cifar10" and 7 < result["bpd"] < 12


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--preset", "nope"], "unknown preset 'nope'"),
        (["train", "--preset", "tiny", "--set", "train.lrr=1"], "unknown key 'train.lrr'"),
        (["train", "--preset", "tiny", "--set", "model.growth_rate=3"], "model.growth_rate=3"),
        (["train", "--preset", "tiny", "--set", "train.epochs=abc"], "train.epochs='abc'"),
        (["evaluate", "--checkpoint", "missing.pt"], "missing.pt: no such checkpoint"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_malformed_yaml_and_foreign_checkpoint(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {epochs: [1, \n")
    assert main(["train", "--preset", str(bad)]) == 2
    assert "malformed YAML" in capsys.readouterr().err
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, foreign)
    assert main(["sample", "--checkpoint", str(foreign)]) == 2
    assert "not a denseflow checkpoint" in capsys.readouterr().err
    if PARITY_DIRS:
        assert main(["sample", "--checkpoint", str(PARITY_DIRS[0] / "checkpoint.pt")]) == 2
        assert "import-official" in capsys.readouterr().err


def test_missing_dataset_is_one_line(tmp_path, capsys):
    argv = [
        "train",
        "--preset",
        "tiny",
        "--set",
        "data.dataset=cifar10",
        "--set",
        "model.image_shape=[3,32,32]",
    ]
    assert main([*argv, "--data-dir", str(tmp_path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(tmp_path) in err and "cifar" in err.lower()


def test_refuses_to_overwrite_a_run(tiny_run, capsys):
    assert main(["train", "--preset", "tiny", "--out", str(tiny_run), "--quiet"]) == 2
    assert "--resume" in capsys.readouterr().err


def test_resuming_a_finished_run_says_so_and_trains_nothing(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    before = {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()}
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert f"{run}: the run had finished (4 of 4 steps); nothing to train" in printed
    assert json.loads(printed.splitlines()[-1])["step"] == 4
    assert {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()} == before


def test_bench_reports_every_measurement(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = [
        "bench",
        "--preset",
        "tiny",
        "--batch-size",
        "2",
        "--steps",
        "2",
        "--warmup",
        "0",
        "--k",
        "4",
        "--kbs",
        "2",
    ]
    profile = tmp_path / "profile.txt"
    assert main([*argv, "--device", "cpu", "--json", str(out), "--profile", str(profile)]) == 0
    tables = profile.read_text()
    for item in ("train", "sample", "iwbo"):  # one operator table per measurement
        assert f"== {item} (batch 2)" in tables
    assert "aten::convolution_backward" in tables and "aten::convolution " in tables
    report = json.loads(out.read_text())
    for item in ("train", "sample", "iwbo"):
        r = report[item]
        assert r["repetitions"] == 2 and r["min_s"] <= r["median_s"] and r["gflop_per_call"] > 0
        assert r["peak_memory_gib"] > 0.05
    assert report["iwbo"]["k"] == 4 and report["parameters"] > 0
    loops = report["iwbo"]["loop_median_s"] / report["iwbo"]["speedup_vs_elbo_loop"]
    assert math.isclose(loops, report["iwbo"]["median_s"], rel_tol=1e-12)  # ratio to the timed call
    printed = capsys.readouterr()
    assert "img/s" in printed.out
    # a bar per measurement over its calls: 2 first, 0 warm-ups, 2 timed, 1 profiled (+ 2 loops)
    for item, calls in (("train", 5), ("sample", 5), ("iwbo", 9)):
        assert re.search(rf"bench {item}:[^\r]*/{calls} \[", printed.err), item
    # --no-loops: the same IWBO measurement without its (on a large model, long) baselines
    assert main([*argv, "--what", "iwbo", "--no-loops", "--json", str(out), "--quiet"]) == 0
    report = json.loads(out.read_text())
    assert report["iwbo"]["repetitions"] == 2 and "loop_median_s" not in report["iwbo"]
    printed = capsys.readouterr()
    assert "elbo calls" not in printed.out and "bench" not in printed.err  # --quiet: no bar


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))  # would create the marker file if ever unpickled


def test_malicious_checkpoint_is_refused_and_never_runs(tmp_path, capsys):
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pt"
    torch.save({"format": "denseflow", "version": 1, "model": {}, "x": _Payload(marker)}, evil)
    assert main(["sample", "--checkpoint", str(evil)]) == 2
    assert "not a readable denseflow checkpoint" in capsys.readouterr().err
    assert not marker.exists()


def test_bench_conv_census_and_kernel_ceiling(tmp_path):
    """`--what convs`: the census counts every convolution by shape (closed form on a hand-made
    call), its FLOPs are the forward convolutions' FLOPs (torch's counter) times 3 (forward, input
    and weight gradients), and every shape is timed."""
    from torch.utils.flop_counter import FlopCounterMode

    from denseflow.bench import conv_census, conv_kernel_seconds
    from denseflow.config import load_config
    from denseflow.model import DenseFlow
    from denseflow.step import train_step
    from denseflow.transforms.glow import Conv1x1

    x, w3, w1 = torch.randn(2, 4, 6, 6), torch.randn(5, 4, 3, 3), torch.randn(3, 4, 1, 1)
    census = conv_census(
        lambda: [F.conv2d(x, w3, padding=1), F.conv2d(x, w3, padding=1), F.conv2d(x, w1, stride=2)]
    )
    assert census == {
        ((2, 4, 6, 6), (5, 4, 3, 3), False, (1, 1), (1, 1), (1, 1), 1): 2,
        ((2, 4, 6, 6), (3, 4, 1, 1), False, (2, 2), (0, 0), (1, 1), 1): 1,
    }
    _, flops = conv_kernel_seconds(
        next(iter(census)), torch.device("cpu"), channels_last=True, reps=1
    )
    assert flops == 3 * 2 * (2 * 5 * 6 * 6) * (4 * 3 * 3)

    out = tmp_path / "bench.json"
    argv = [
        "bench",
        "--preset",
        "tiny",
        "--batch-size",
        "4",
        "--steps",
        "2",
        "--warmup",
        "0",
        "--what",
        "train,convs",
    ]
    assert main([*argv, "--device", "cpu", "--json", str(out)]) == 0
    report = json.loads(out.read_text())["convs"]
    model = DenseFlow(load_config("tiny").model).train()
    optimizer = torch.optim.Adamax(model.parameters())
    images = torch.randint(0, 256, (4, 1, 28, 28))
    with FlopCounterMode(display=False) as counter:
        train_step(model, optimizer, [(images, torch.Generator().manual_seed(0))], 1e-3)
    forward = counter.get_flop_counts()["Global"][torch.ops.aten.convolution]
    assert report["gflop"] == pytest.approx(3 * forward / 1e9, rel=1e-12)
    convs = sum(
        isinstance(m, (torch.nn.Conv2d, Conv1x1)) for m in model.modules()
    )  # each runs once per step
    assert report["calls"] == convs and report["shapes"] >= 2 and report["isolated_s"] > 0
    assert report["train_over_isolated"] > 0


@pytest.mark.parametrize("bug", [ValueError("boom"), KeyError("boom"), OSError("boom")])
def test_an_internal_error_shows_its_traceback_and_asks_for_a_report(bug, monkeypatch, capsys):
    """Only DenseFlowError (and an OSError naming a file) is bad input; any other exception out
    of a command is our bug: traceback, a line asking for a report, exit code 1."""
    import denseflow.train

    def broken(*args, **kwargs):
        raise bug

    monkeypatch.setattr(denseflow.train, "train", broken)
    assert main(["train", "--preset", "tiny", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "in broken" in err
    assert err.strip().splitlines()[-1].startswith("denseflow train: internal error, a bug in")


def test_user_facing_errors_share_one_base_class():
    from denseflow.checkpoint import CheckpointError
    from denseflow.config import ConfigError
    from denseflow.data import DataError
    from denseflow.errors import DenseFlowError
    from denseflow.runlog import LogError
    from denseflow.train import TrainingDiverged

    for error in (CheckpointError, ConfigError, DataError, LogError, TrainingDiverged):
        assert issubclass(error, DenseFlowError) and issubclass(error, ValueError)


def test_recalibrate_a_training_checkpoint_and_evaluate_says_which_statistics(tmp_path, capsys):
    """`denseflow recalibrate` on the last training checkpoint gives the statistics the run's own
    final export carries (same batches, seed and weights); evaluate names them."""
    run = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--quiet", "--out", str(run)]) == 0
    out = tmp_path / "recal.pt"
    last = run / "checkpoints" / "step_0000008.pt"
    assert (
        main(["recalibrate", "--checkpoint", str(last), "--batches", "2", "--out", str(out)]) == 0
    )
    final, recal = ckpt.load(run / "final.pt"), ckpt.load(out)
    assert all(torch.equal(final["model"][k], recal["model"][k]) for k in final["model"])
    assert recal["batchnorm"] == final["batchnorm"]
    assert recal["batchnorm"].startswith(
        "recalibrated: population statistics of 2 training batches"
    )
    bar = capsys.readouterr().err  # its progress bar (--quiet: none)
    assert "recalibrate:" in bar and "0/2 [" in bar
    assert (
        main(["evaluate", "--checkpoint", str(last), "--quiet", "--json", str(tmp_path / "a.json")])
        == 0
    )
    assert "BatchNorm statistics: running averages of training" in capsys.readouterr().out
    assert (
        main(["evaluate", "--checkpoint", str(out), "--quiet", "--json", str(tmp_path / "b.json")])
        == 0
    )
    assert "BatchNorm statistics: recalibrated" in capsys.readouterr().out
    stale, fresh = (json.loads((tmp_path / f"{n}.json").read_text()) for n in "ab")
    assert fresh["batchnorm"].startswith("recalibrated") and fresh["bpd"] != stale["bpd"]
    # more batches than the 64 training images fill: all of them, in the batches that ran
    outs = [tmp_path / f"all{n}.pt" for n in (7, 9)]
    for n, path in zip((7, 9), outs, strict=True):
        args = ["--batches", str(n), "--batch-size", "10", "--out", str(path), "--quiet"]
        assert main(["recalibrate", "--checkpoint", str(last), *args]) == 0
    words = "6 training batches of 10 and 1 of 4 (all 64 training images) (seed 0)"
    printed = capsys.readouterr()
    assert f"BatchNorm statistics recalibrated: population statistics of {words}" in printed.out
    assert "recalibrate" not in printed.err
    seven, nine = (ckpt.load(path) for path in outs)
    assert seven["batchnorm"] == nine["batchnorm"] and seven["batchnorm"].endswith(words)
    assert all(torch.equal(seven["model"][k], nine["model"][k]) for k in seven["model"])


def test_version_debug_after_the_command_and_defaults_in_help(capsys):
    from denseflow import __version__

    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and f"denseflow {__version__}" in capsys.readouterr().out
    with pytest.raises(ConfigError):  # --debug after the command: the traceback, not one line
        main(["sample", "--checkpoint", "x.pt", "--num", "0", "--debug"])
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 64)" in text and "(default: 1.0)" in text and "(default: auto)" in text


def test_library_sampling_refuses_impossible_requests():
    model = DenseFlow(load_config("tiny").model).eval()
    with pytest.raises(ValueError, match="n must be a positive integer, got -1"):
        model.sample(-1)
    with pytest.raises(ValueError, match="temperature must be >= 0, got -1"):
        model.sample(1, temperature=-1)
    with pytest.raises(ValueError, match="temperature must be finite, got inf"):
        model.sample(1, temperature=float("inf"))


def test_convert_official_on_files_that_are_not_official_checkpoints(tmp_path):
    from denseflow import convert_official

    flags = {"dataset": "cifar10", "block_conf": [1, 1], "layers_conf": [1, 1]}
    flags |= {"layer_mid_chnls": [4, 4], "growth_rate": 2}
    (tmp_path / "text.pt").write_text("not a checkpoint")
    with pytest.raises(ckpt.CheckpointError, match="not a readable official checkpoint"):
        convert_official(tmp_path / "text.pt", flags)
    torch.save({"epoch": 3}, tmp_path / "dict.pt")
    with pytest.raises(ckpt.CheckpointError, match="holds no model state dict"):
        convert_official(tmp_path / "dict.pt", flags)
    torch.save({"model": {"blocks.0.weight": torch.zeros(1)}}, tmp_path / "ours.pt")
    with pytest.raises(ckpt.CheckpointError, match="has no counterpart"):
        convert_official(tmp_path / "ours.pt", flags)


def test_evaluate_and_sample_pass_no_cuda_graph_on(tiny_run, tmp_path, monkeypatch):
    """`--no-cuda-graph` reaches the code that picks graphed or eager calls (on the CPU both are
    the model's calls); without it, graphs are asked for."""
    from denseflow import evaluate, graph, sample

    asked = []

    def recording(model, cuda_graph=True, say=None):
        asked.append(cuda_graph)
        return graph.inference(model, cuda_graph, say)

    monkeypatch.setattr(evaluate, "inference", recording)
    monkeypatch.setattr(sample, "inference", recording)
    final = str(tiny_run / "final.pt")
    for extra in ([], ["--no-cuda-graph"]):
        argv = ["evaluate", "--checkpoint", final, "--limit", "4", "--k", "2", "--quiet"]
        assert main([*argv, "--json", str(tmp_path / "e.json"), *extra]) == 0
        argv = ["sample", "--checkpoint", final, "--num", "2", "--quiet"]
        assert main([*argv, "--out", str(tmp_path / "s.png"), *extra]) == 0
    assert asked == [True, True, True, False, False, False]  # ELBO, IWBO, sample; twice


def test_bench_counts_the_operators_of_a_pass(tmp_path, capsys):
    """`--what ops` counts what the passes of train's step run below autograd: as many
    convolutions (and their backward) as the profiler's census of a training step finds."""
    out = tmp_path / "ops.json"
    argv = ["bench", "--preset", "tiny", "--batch-size", "2", "--what", "ops,convs"]
    assert main([*argv, "--device", "cpu", "--json", str(out)]) == 0
    assert "ops: the step's forward and backward passes (graphed) run" in capsys.readouterr().out
    report = json.loads(out.read_text())
    ops = report["ops"]
    assert ops["by_op"]["convolution"] == report["convs"]["calls"] > 0
    assert ops["by_op"]["convolution_backward"] == report["convs"]["calls"]
    assert ops["total"] > 2 * report["convs"]["calls"] and "view" not in ops["by_op"]
    assert ops["step"] == "graphed"  # train's step, GraphedStep on the CPU too
    # bf16 networks: the step train runs casts the conv weights once, train_step one by one
    totals = {}
    for graph in ("true", "false"):
        bf16 = ["--set", "train.precision=bfloat16", "--set", f"train.cuda_graph={graph}"]
        argv = ["bench", "--preset", "tiny", "--batch-size", "2", "--what", "ops", *bf16]
        assert main([*argv, "--device", "cpu", "--json", str(out)]) == 0
        totals[graph] = json.loads(out.read_text())["ops"]["total"]
    assert totals["false"] - totals["true"] > 100  # 2·72 − 2 casts fewer, 2 gathering copies more


def test_help_shows_a_default_of_0_and_says_what_kbs_defaults_to(capsys):
    for command in ("evaluate", "interpolate", "recalibrate"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert re.search(r"--seed SEED [^\[\]-]*\(default: 0\)", text), command
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--seed SEED the noise draws" in text
    assert "(default: the smaller of max(k) and the config's eval.kbs)" in text
    assert "--double evaluate in float64 --seed" in text  # False: no default shown


def test_quiet_silences_notes_and_the_result_file_names_the_images_scored(
    tiny_run, tmp_path, capsys
):
    folder = tmp_path / "mine"
    folder.mkdir()
    for name, size in (("a.png", (30, 28)), ("b.png", (28, 28))):
        Image.new("L", size, 90).save(folder / name)
    argv = ["evaluate", "--checkpoint", str(tiny_run / "final.pt"), "--images", str(folder)]
    assert main([*argv, "--limit", "5"]) == 0  # 2 scored: all of them, not "first5"
    printed = capsys.readouterr()
    assert "1 of 2 images resized" in printed.out + printed.err
    assert (tiny_run / "final.images.elbo.json").is_file()
    assert main([*argv, "--limit", "1", "--quiet"]) == 0
    printed = capsys.readouterr()
    assert "resized" not in printed.out + printed.err
    assert (tiny_run / "final.images.elbo.first1.json").is_file()


def test_a_relative_data_dir_override_is_stored_absolute(tmp_path, monkeypatch, capsys):
    for split in ("train", "test"):
        (tmp_path / "imgs" / split).mkdir(parents=True)
        Image.new("L", (28, 28), 90).save(tmp_path / "imgs" / split / "a.png")
    monkeypatch.chdir(tmp_path)
    argv = ["train", "--preset", "tiny", "--set", "data.dataset=folder", "--dry-run"]
    assert main([*argv, "--set", "data.data_dir=imgs"]) == 0
    assert f"# data: {tmp_path / 'imgs'}\n" in capsys.readouterr().out
    assert load_config("tiny").override(["data.data_dir=imgs"]).data.data_dir == str(
        tmp_path / "imgs"
    )
    # in a YAML file, a relative data_dir is read from the file's folder, wherever it is used
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "mine.yaml").write_text("data: {dataset: folder, data_dir: ../imgs}\n")
    monkeypatch.chdir(tmp_path / "exp")
    assert load_config(tmp_path / "exp" / "mine.yaml").data.data_dir == str(tmp_path / "imgs")
    (tmp_path / "exp" / "abs.yaml").write_text(f"data: {{data_dir: {tmp_path / 'imgs'}}}\n")
    assert load_config(tmp_path / "exp" / "abs.yaml").data.data_dir == str(tmp_path / "imgs")
    assert load_config("tiny").data.data_dir is None
