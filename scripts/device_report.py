"""Issue 12's target table from a device check's reports, in Markdown, for docs/benchmarks.md.

    python scripts/device_report.py docs/benchmarks/h200-<date>/ [--eager FOLDER]

Reads what scripts/device_check.sh leaves in its $OUT folder (bench_*.json, graph_cifar10.json,
inference_cifar10.json; bench_compile.json from its second call) and the eager H200 figures of
2026-11-29 (``--eager``: another folder of them), and prints the target table (each row's eager
figure, target, graphed figure and whether it is met), then where the time goes (kernels, host
launch calls, GPU busy fraction of the graphed step) and the checks' verdicts. A report that is
missing (a step that did not finish) is a row that says so; nothing is guessed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

EAGER = Path(__file__).resolve().parents[1] / "docs" / "benchmarks" / "h200-2026-11-29"


def _load(folder: Path, name: str) -> dict | None:
    path = folder / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _get(report: dict | None, *keys: str) -> float | None:
    """``report[k1][k2]...``, or None where a report or a key is missing."""
    for key in keys:
        if not isinstance(report, dict) or key not in report:
            return None
        report = report[key]
    return report


def _fmt(value: float | None, unit: str = "", digits: int = 1) -> str:
    return "missing" if value is None else f"{value:,.{digits}f}{unit}"


def _verdict(value: float | None, bound: float | None, at_most: bool = False) -> str:
    if value is None or bound is None:
        return "not measured"
    return "met" if (value <= bound if at_most else value >= bound) else "not met"


def target_rows(new: Path, eager: Path) -> list[tuple[str, str, str, str, str]]:
    """(measurement, eager, target, graphed, verdict) of each row of the issue's target table."""
    f32, bf16, iwbo = (_load(new, f"bench_{n}") for n in ("float32", "bf16", "iwbo"))
    old = {n: _load(eager, f"bench_{n}") for n in ("float32", "bf16", "iwbo")}
    train = _get(f32, "train", "images_per_s")
    train_bf16 = _get(bf16, "train", "images_per_s")
    sample = _get(f32, "sample", "median_s")
    samples_per_s = _get(iwbo, "iwbo", "images_per_s")
    old_iwbo = _get(old["iwbo"], "iwbo", "images_per_s")
    memory = _get(f32, "train", "peak_reserved_gib")
    capture = _get(f32, "train", "step", "capture_s")
    captured = {n: _get(r, "train", "step", "captured") for n, r in (("f32", f32), ("bf16", bf16))}
    eager_note = {
        n: "" if c in (True, None) else " (not captured: eager)" for n, c in captured.items()
    }
    bf16_bound = None if train is None else 1.3 * train
    iwbo_bound = None if old_iwbo is None else 3 * old_iwbo
    return [
        (
            "train img/s, float32 (TF32 convolutions)",
            _fmt(_get(old["float32"], "train", "images_per_s")),
            ">= 230 (stretch 350)",
            _fmt(train) + eager_note["f32"],
            _verdict(train, 230) + ("" if train is None or train < 350 else ", stretch met"),
        ),
        (
            "train img/s, bf16 networks",
            _fmt(_get(old["bf16"], "train", "images_per_s")),
            ">= 1.3x float32" + ("" if bf16_bound is None else f" ({bf16_bound:.1f})"),
            _fmt(train_bf16)
            + ("" if None in (train, train_bf16) else f" ({train_bf16 / train:.2f}x)")
            + eager_note["bf16"],
            _verdict(train_bf16, bf16_bound),
        ),
        (
            "sampling 64 images",
            _fmt(_get(old["float32"], "sample", "median_s"), " s", 3),
            "<= 0.08 s",
            _fmt(sample, " s", 3)
            + ("" if _get(f32, "sample", "calls", "graphed") in (True, None) else " (eager)"),
            _verdict(sample, 0.08, at_most=True),
        ),
        (
            "IWBO k=16, B=16 (importance samples/s)",
            _fmt(old_iwbo, "", 0),
            ">= 3x" + ("" if iwbo_bound is None else f" ({iwbo_bound:,.0f})"),
            _fmt(samples_per_s, "", 0),
            _verdict(samples_per_s, iwbo_bound),
        ),
        (
            "peak memory, float32 train (reserved: graph pool included)",
            _fmt(_get(old["float32"], "train", "peak_memory_gib"), " GiB", 2) + " allocated",
            "<= 11 GiB",
            _fmt(memory, " GiB", 2),
            _verdict(memory, 11, at_most=True),
        ),
        (
            "capture before the first step",
            "—",
            "<= 60 s",
            _fmt(capture, " s"),
            _verdict(capture, 60, at_most=True),
        ),
    ]


def where_the_time_goes(new: Path) -> list[str]:
    """Lines on the graphed step's profile, the leads and the checks."""
    lines = []
    profile = _get(_load(new, "bench_profile"), "train", "profile")
    if profile is None or "kernels" not in profile:
        lines.append("- profile of the graphed step: missing")
    else:
        lines.append(
            f"- graphed float32 step under the profiler: {profile['kernels']:,} kernels, "
            f"{profile['host_launch_calls']:,} host launch calls, GPU busy "
            f"{profile['busy_s']:.3f} s ({profile.get('busy_fraction', 0):.0%} of the median step)"
        )
    one_pass = _get(_load(new, "bench_iwbo_kbs16"), "iwbo", "images_per_s")
    lines.append(
        "- IWBO k=16, B=16, 16 copies a pass (what `denseflow evaluate --k 16` runs): "
        + ("missing" if one_pass is None else f"{one_pass:,.0f} importance samples/s")
    )
    compiled = "torch.compile(mode=reduce-overhead) of the networks"
    for name, what in (("logdets", "train.batched_logdets=true"), ("compile", compiled)):
        report = _load(new, f"bench_{name}")
        rate, first = _get(report, "train", "images_per_s"), _get(report, "train", "step")
        first_s = None if first is None else first.get("first_steps_s")
        took = "" if first_s is None else f", first two steps {first_s:.1f} s"
        lines.append(
            f"- {what}: train " + ("missing" if rate is None else f"{rate:.1f} img/s{took}")
        )
    for name in ("graph_tiny", "graph_cifar10", "inference_cifar10"):
        report = _load(new, name)
        if report is None:
            lines.append(f"- {name}: missing")
            continue
        failed = [k for k, ok in report.get("passed", {}).items() if not ok]
        verdict = "all passed" if report.get("all_passed") else f"failed: {', '.join(failed)}"
        lines.append(f"- {name}: {verdict}{_timings(report)}")
    return lines


def _timings(report: dict) -> str:
    """A check's eager and replayed times, where it reports them."""
    rates = report.get("images_per_s")  # graph_check: the training step
    if rates:
        return f" (step: eager {rates['eager']:.1f} img/s, replayed {rates['replay']:.1f} img/s)"
    calls = [  # inference_check: elbo and iwbo calls
        f"{name} eager {r['median_eager_s']:.3f} s, replayed {r['median_replay_s']:.3f} s"
        for name, r in report.items()
        if isinstance(r, dict) and "median_replay_s" in r
    ]
    return f" ({'; '.join(calls)})" if calls else ""


def markdown(new: Path, eager: Path) -> str:
    f32 = _load(new, "bench_float32") or {}
    where = ", ".join(f"{k} {f32[k]}" for k in ("device", "torch", "batch_size") if k in f32)
    head = [
        f"Reports in {new} ({where or 'bench_float32.json missing'}). The eager column is the"
        " 2026-11-29 run's (another machine of this kind); the same run's eager and replayed"
        " times are beside the checks below the table.",
        "",
        "| measurement (H200, DenseFlow-74-10, B=64) | eager (2026-11-29) | target | graphed | |",
        "|---|---|---|---|---|",
    ]
    rows = [f"| {' | '.join(row)} |" for row in target_rows(new, eager)]
    return "\n".join([*head, *rows, "", *where_the_time_goes(new)]) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reports", type=Path, help="the device check's $OUT folder")
    parser.add_argument("--eager", type=Path, default=EAGER, help="the eager figures' folder")
    a = parser.parse_args(argv)
    if not a.reports.is_dir():
        parser.error(f"{a.reports}: no such folder")
    print(markdown(a.reports, a.eager), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
