"""The H200 check (scripts/device_check.sh) runs only in sessions lent a GPU, 15 minutes at a time;
its scripts' ``--device cpu`` dry runs keep them working in between. On the CPU every comparison
they make holds bitwise, and the only checks a CPU must fail are those of a captured graph —
which pass too when the graphs are rehearsed (tests/graph_tape.py)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from .conftest import REPO

#: runs a script with tests/graph_tape.py's stand-ins for CUDA graphs and streams installed
REHEARSED = (
    "import runpy, sys; from tests.graph_tape import rehearse; rehearse(); "
    "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
)


def _script(name: str, tmp_path, *args: str, rehearsed: bool = False) -> tuple[int, dict]:
    """Run scripts/<name>.py on the CPU (``rehearsed``: its graphs captured and replayed by
    the stand-ins); its exit code and JSON report."""
    out = tmp_path / f"{name}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, str(REPO / "scripts" / f"{name}.py"), "--device", "cpu"]
    if rehearsed:
        command[1:1] = ["-c", REHEARSED]
    done = subprocess.run(
        [*command, "--json", str(out), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert out.exists(), done.stderr[-6000:]
    return done.returncode, json.loads(out.read_text())


def test_the_device_check_names_scripts_that_exist_and_parses():
    script = (REPO / "scripts" / "device_check.sh").read_text()
    named = set(re.findall(r"scripts/(\w+\.py)", script))
    assert {"graph_check.py", "inference_check.py", "lu_check.py"} <= named
    assert all((REPO / "scripts" / name).exists() for name in named)
    assert subprocess.run(["bash", "-n", str(REPO / "scripts" / "device_check.sh")]).returncode == 0


def test_graph_check_dry_run(tmp_path):
    """Replayed-step stand-ins (the static step) against eager steps: bitwise on the CPU; the
    capture and the masked replay need CUDA and are reported failed, with the reason."""
    code, report = _script("graph_check", tmp_path, "--preset", "tiny", "--batch-size", "8",
                           "--chunks", "2", "--steps", "2")  # fmt: skip
    failed = sorted(name for name, ok in report["passed"].items() if not ok)
    assert code == 1 and failed == ["captured", "masked replay"], report["passed"]
    for pair in ("G_vs_A", "G_vs_E", "B_vs_A"):
        assert all(v["bitwise"] for v in report[pair].values()), (pair, report[pair])
    assert "cuSOLVER" in report["capture"]["refusal"]
    trace = report["capture"]["traceback"]  # where it failed, whole
    assert trace.startswith("Traceback") and "_cusolver" in trace and "graph.py" in trace


def test_graph_check_rehearsed(tmp_path):
    """The same check with the capture rehearsed (tests/graph_tape.py: replays rerun what the
    capture recorded on its memory): every check passes, the replayed copy bitwise the eager
    ones, the planted NaN replay drops its update."""
    code, report = _script("graph_check", tmp_path, "--preset", "tiny", "--batch-size", "8",
                           "--chunks", "2", "--steps", "2", rehearsed=True)  # fmt: skip
    assert code == 0 and report["all_passed"], report["passed"]
    assert report["capture"]["captured"] and report["capture"]["capture_s"] > 0
    assert report["capture"]["traceback"] is None
    for pair in ("G_vs_A", "G_vs_E", "B_vs_A"):
        assert all(v["bitwise"] for v in report[pair].values()), (pair, report[pair])
    assert report["masked_replay"]["untouched"] and report["masked_replay"]["keep_flag"] is False


def test_inference_check_dry_run(tmp_path):
    code, report = _script("inference_check", tmp_path, "--preset", "tiny", "--batch-size", "8",
                           "--calls", "3")  # fmt: skip
    assert code == 1 and report["passed"] == {
        "elbo": True,
        "iwbo_k16_kbs8_b16": True,
        "sample": True,
        "captured": False,
    }
    assert max(report["elbo"]["rel_graphed_vs_eager"]) == 0.0
    assert report["sample"]["differing_pixels"] == [0] * len(report["sample"]["differing_pixels"])
    assert report["traceback"].startswith("Traceback") and "_cusolver" in report["traceback"]


def test_inference_check_rehearsed(tmp_path):
    code, report = _script("inference_check", tmp_path, "--preset", "tiny", "--batch-size", "8",
                           "--calls", "3", rehearsed=True)  # fmt: skip
    assert code == 0 and all(report["passed"].values()), report["passed"]
    assert "traceback" not in report
    assert max(report["elbo"]["rel_graphed_vs_eager"]) == 0.0
    assert report["sample"]["differing_pixels"] == [0] * len(report["sample"]["differing_pixels"])


@pytest.mark.parametrize("preset", ["tiny", "demo"])
def test_lu_check_dry_run(tmp_path, preset):
    """One LU per matrix against one per size and one for all, padded: the same log-determinants
    and gradients to float32 rounding."""
    code, report = _script("lu_check", tmp_path, "--preset", preset, "--calls", "2")
    assert code == 0 and report["matrices"] == sum(report["sizes"].values()) > 0
    for way in ("batched", "padded"):
        assert report[f"{way}_vs_single"]["value_abs"] < 1e-4
        assert report[f"{way}_vs_single"]["grad_rel_max"] < 1e-4
    assert set(report["eager_ms"]) == {"single", "batched", "padded"}
    assert "replay_ms" not in report


def test_device_report_fills_the_target_table(tmp_path):
    """scripts/device_report.py turns a device check's reports into issue 12's target table:
    each graphed figure against its target (bf16 against 1.3x the graphed float32 step, IWBO
    against 3x the eager 394 samples/s of 2026-11-29), the profile's figures, the checks'
    verdicts; a step that left no report is said to be missing."""
    reports = {
        "bench_float32": {
            "device": "NVIDIA H200",
            "train": {
                "images_per_s": 300.0,
                "peak_reserved_gib": 10.5,
                "step": {"captured": True, "capture_s": 12.0, "first_steps_s": 15.0},
            },
            "sample": {"median_s": 0.09, "calls": {"graphed": True}},
        },
        "bench_bf16": {"train": {"images_per_s": 360.0, "step": {"captured": True}}},
        "bench_iwbo": {"iwbo": {"images_per_s": 1500.0}},
        "bench_iwbo_kbs16": {"iwbo": {"images_per_s": 2500.0}},
        "bench_profile": {
            "train": {
                "profile": {
                    "kernels": 31000,
                    "host_launch_calls": 1,
                    "busy_s": 0.15,
                    "busy_fraction": 0.7,
                }
            }
        },
        "graph_cifar10": {
            "passed": {"captured": True, "G_vs_A param": False},
            "all_passed": False,
            "images_per_s": {"eager": 50.0, "replay": 250.0},
        },
        "inference_cifar10": {
            "passed": {"captured": True},
            "all_passed": True,
            "elbo": {"median_eager_s": 0.2, "median_replay_s": 0.05},
        },
    }
    for name, report in reports.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(report))
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "device_report.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
    )
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[1:] for line in done.stdout.splitlines()
            if line.startswith("| ") and " | " in line}  # fmt: skip
    assert rows["train img/s, float32 (TF32 convolutions)"] == [
        "46.0", ">= 230 (stretch 350)", "300.0", "met |"
    ]  # fmt: skip
    assert rows["train img/s, bf16 networks"][1:] == [
        ">= 1.3x float32 (390.0)", "360.0 (1.20x)", "not met |"
    ]  # fmt: skip
    assert rows["sampling 64 images"][1:] == ["<= 0.08 s", "0.090 s", "not met |"]
    assert rows["IWBO k=16, B=16 (importance samples/s)"][1:] == [">= 3x (1,183)", "1,500", "met |"]
    assert rows["capture before the first step"][2:] == ["12.0 s", "met |"]
    assert rows["peak memory, float32 train (reserved: graph pool included)"][2:] == [
        "10.50 GiB", "met |"
    ]  # fmt: skip
    out = done.stdout
    assert "31,000 kernels, 1 host launch calls, GPU busy 0.150 s (70% of the median step)" in out
    assert "- graph_cifar10: failed: G_vs_A param (step: eager 50.0 img/s, replayed 250.0" in out
    assert "- inference_cifar10: all passed (elbo eager 0.200 s, replayed 0.050 s)" in out
    assert "- graph_tiny: missing" in out
    assert "- train.batched_logdets=true: train missing" in out
    assert "16 copies a pass (what `denseflow evaluate --k 16` runs): 2,500 importance" in out
