"""Device check of issue 12: evaluation and sampling from CUDA graphs against the eager calls.

    python scripts/inference_check.py --preset cifar10 --batch-size 64 --json out.json

One data-initialised model in eval mode (its BatchNorm statistics moved by two train-mode
passes), called eagerly and through :class:`denseflow.graph.GraphedInference`:

``elbo``    ``--calls`` batches of B images (noise streams ``(0, "eval", i)``, as ``denseflow
            evaluate`` draws them): relative difference of the per-image values, graphed
            against eager, next to eager against eager (the GPU's own spread);
``iwbo``    k=16 in passes of 8 copies at B=16, the same comparison;
``sample``  B images from fixed noises: pixels that differ, graphed against eager; then every
            parameter is scaled in place by 1.001 (what an optimizer step does to a graph's
            inputs) and both sample again: a graph holding a stale ``W⁻¹`` of a 1x1 convolution
            or stale weights would change most pixels;
timings     medians of eager and replayed calls, and the capture seconds.

Accepted: elbo/iwbo within max(4 · spread, 1e-5) relative (the same kernels replayed; 1e-5 of
~8,000 nats per CIFAR image is 4e-4 nats); sampling: at most 1 % of the pixels differ (float32
sampling through 74 steps is not bit-stable: ~0.1-0.2 % of pixels move by a level between
float32 paths, see DenseFlow.encode's docstring). **Not yet run on a GPU.**
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from denseflow import runtime  # noqa: E402
from denseflow.config import load_config  # noqa: E402
from denseflow.graph import GraphedInference, draw_noises  # noqa: E402
from denseflow.model import DenseFlow  # noqa: E402
from denseflow.seeding import stream  # noqa: E402


def timed(call) -> tuple[torch.Tensor, float]:
    sync = torch.cuda.synchronize if torch.cuda.is_available() else lambda: None
    sync()
    began = time.perf_counter()
    out = call()
    sync()
    return out, time.perf_counter() - began


def rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return ((x.double() - y.double()).norm() / y.double().norm()).item()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cifar10")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--calls", type=int, default=5, help=">= 3: 1 records, 2 captures")
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of the script itself")
    parser.add_argument("--json", required=True)
    a = parser.parse_args()
    if a.calls < 3:
        parser.error("--calls must be at least 3 (the first records, the second captures)")
    device = torch.device(a.device)
    config = load_config(a.preset)
    torch.manual_seed(0)
    model = runtime.prepare(DenseFlow(config.model), config.train, device)
    shape = config.model.image_shape
    x = torch.randint(0, 256, (a.batch_size, *shape), device=device)
    model.data_init(x, generator=stream(0, "init", device=device))
    with torch.no_grad():
        for i in range(2):
            model.elbo(x, generator=stream(0, "noise", i, device=device))
    model.eval()
    runner = GraphedInference(model, capture=True, say=print)  # a CPU dry run: refused
    report: dict = {"preset": a.preset, "batch_size": a.batch_size, "device": str(device)}
    passed: dict[str, bool] = {}

    def compare(name: str, eager, graphed, tolerance: float) -> None:
        rows = []
        for i in range(a.calls):
            want, eager_s = timed(lambda i=i: eager(i))
            again, _ = timed(lambda i=i: eager(i))
            got, replay_s = timed(lambda i=i: graphed(i))
            rows.append((rel(got, want), rel(again, want), eager_s, replay_s))
        spread = max(r[1] for r in rows)
        worst = max(r[0] for r in rows[2:])  # calls 3.. replay (1 records, 2 captures)
        report[name] = {
            "rel_graphed_vs_eager": [r[0] for r in rows],
            "rel_eager_vs_eager": [r[1] for r in rows],
            "median_eager_s": statistics.median(r[2] for r in rows[2:]),
            "median_replay_s": statistics.median(r[3] for r in rows[2:]),
        }
        passed[name] = worst <= max(4 * spread, tolerance)

    compare(
        "elbo",
        lambda i: model.elbo(x, generator=stream(0, "eval", i, device=device)),
        lambda i: runner.elbo(x, stream(0, "eval", i, device=device)),
        1e-5,
    )
    small = x[:16]
    compare(
        "iwbo_k16_kbs8_b16",
        lambda i: model.iwbo(small, 16, 8, stream(0, "eval", i, device=device)),
        lambda i: runner.iwbo(small, 16, 8, stream(0, "eval", i, device=device)),
        1e-5,
    )
    shapes = [(n, (a.batch_size, *s)) for n, s in model.sampling_shapes.items()]
    noise = draw_noises(shapes, stream(0, "sample", device=device), device)
    pixels = a.batch_size * x[0].numel()
    sampling = {"eager_s": [], "replay_s": [], "differing_pixels": []}
    for i in range(4):
        if i == 3:  # an in-place change of every parameter, as an optimizer step makes
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(1.001)
        want, eager_s = timed(lambda: model.sample(a.batch_size, noise=noise))
        got, replay_s = timed(lambda: runner.sample(a.batch_size, noise=noise))
        sampling["eager_s"].append(eager_s)
        sampling["replay_s"].append(replay_s)
        sampling["differing_pixels"].append(int((got != want).sum()))
    report["sample"] = sampling | {"pixels": pixels}
    passed["sample"] = max(sampling["differing_pixels"]) <= 0.01 * pixels
    # one graph per call shape: elbo's batch, iwbo's pass of 8 copies, sampling
    passed["captured"] = runner.graphs == 3 and runner.refusal is None
    report["graphs"], report["refusal"] = runner.graphs, runner.refusal
    if runner.failure is not None:  # the whole traceback, in the report and the log
        report["traceback"] = "".join(traceback.format_exception(runner.failure))
        print(report["traceback"])
    report["capture_s"] = runner.capture_seconds
    if device.type == "cuda":
        report["peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    report["passed"], report["all_passed"] = passed, all(passed.values())
    Path(a.json).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report))
    failed = [key for key, ok in passed.items() if not ok]
    print("all passed" if not failed else f"FAILED: {failed}")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
