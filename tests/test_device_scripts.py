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
