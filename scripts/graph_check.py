"""Device check of issue 12: the graphed training step on CUDA against the eager one.

    python scripts/graph_check.py --preset cifar10 --batch-size 64 --steps 5 --json out.json

Four copies of one data-initialised model take the same 2 + N steps (the same images, lr 1e-3,
the noise streams train() uses):

``A``, ``B``  ``train_step`` (torch's Adamax), twice: their distance is the GPU's own run-to-run
              spread (cuDNN kernels that accumulate with atomics);
``E``         :class:`GraphedStep` with ``capture=False``: the graphed arithmetic, run eagerly;
``G``         :class:`GraphedStep` captured: call 1 eager (recording the noise draws), call 2
              warm-ups + capture + first replay, then N replays.

Reported per step: losses; after the last step, relative L2 distances (‖x − y‖ / ‖y‖ over all
tensors together) of parameters, Adamax exp_avg and exp_inf, BatchNorm running statistics, and
whether they are bitwise equal; medians of the eager and replayed step times over the last N
steps, the capture time, peak memory; then one replay with a NaN planted in a static noise buffer
must leave parameters and Adamax state bitwise as they were and read as non-finite.

Accepted float32 tolerance (cuDNN's default TF32 convolutions in every copy), with
``spread`` = the same distance between A and B:

* G against E (capture alone; the same arithmetic and kernels): <= max(4 · spread, 1e-6);
* G against A (capture plus our Adamax's rounding, ``p + (s·m)/u`` against torch's fused
  ``addcdiv``, a few ulp per step): parameters <= max(4 · spread, 1e-4), Adamax state and
  BatchNorm statistics <= max(4 · spread, 1e-3), each step's loss <= max(4 · spread, 1e-5)
  relative.

Why those floors: a gradient element that differs by rounding changes its Adamax update by at
most ``2·lr`` only where its sign flips (Adamax's update is ``lr·m̂/u`` with ``|m̂/u| <~ 1``),
and by about ``lr`` times its relative difference elsewhere; with TF32 products (10-bit
mantissas) and atomics in the weight-gradient kernels such differences are ~1e-4 relative, so
after 2 + N = 7 steps at lr 1e-3 the parameters (norm ~ 1e3 over 130 M values) move apart by far
less than 1e-4 relative unless something is wrong; the moments, which are the gradients
averaged, carry the gradients' own ~1e-4 and get a 1e-3 floor; the first loss is computed from
identical weights and inputs by the same kernels, so a 1e-5 relative floor (3.5e-5 bits/dim at
3.5) is generous. A wrong binding (a stale buffer, a missed update, a noise drawn in another
order) moves the loss by ~1e-3 and the parameters by whole updates. **Not yet run on a GPU.**
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from denseflow import runtime  # noqa: E402
from denseflow.config import load_config  # noqa: E402
from denseflow.graph import GraphedStep  # noqa: E402
from denseflow.model import DenseFlow  # noqa: E402
from denseflow.seeding import stream  # noqa: E402
from denseflow.step import train_step  # noqa: E402


def distance(x: list[torch.Tensor], y: list[torch.Tensor]) -> float:
    """‖x − y‖ / ‖y‖ over all tensors together (float64); 0 for two zero lists."""
    num = sum(float((a.double() - b.double()).square().sum()) for a, b in zip(x, y, strict=True))
    den = sum(float(b.double().square().sum()) for b in y)
    return math.sqrt(num / den) if den else math.sqrt(num)


def snapshot(model: DenseFlow, optimizer: torch.optim.Optimizer) -> dict[str, list]:
    params = list(model.parameters())
    states = [optimizer.state.get(p, {}) for p in params]
    bn = [b for name, b in model.named_buffers() if "running_" in name]
    return {
        "parameters": [p.detach().clone() for p in params],
        "exp_avg": [s["exp_avg"].clone() for s in states if s],
        "exp_inf": [s["exp_inf"].clone() for s in states if s],
        "batchnorm": [b.clone() for b in bn],
    }


def compare(x: dict, y: dict) -> dict[str, dict]:
    return {
        key: {
            "rel_l2": distance(x[key], y[key]),
            "bitwise": all(torch.equal(a, b) for a, b in zip(x[key], y[key], strict=True)),
        }
        for key in x
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="cifar10")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--chunks", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5, help="N: replays compared and timed")
    parser.add_argument("--precision", default="float32")
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of this script")
    parser.add_argument("--json", required=True)
    a = parser.parse_args()
    device = torch.device(a.device)
    cuda = device.type == "cuda"
    config = load_config(a.preset).override([f"train.precision={a.precision}"])
    report: dict = {"preset": a.preset, "batch_size": a.batch_size, "chunks": a.chunks}
    report |= {"precision": a.precision, "torch": torch.__version__}
    report["device"] = torch.cuda.get_device_name(device) if cuda else "cpu"
    out = Path(a.json)

    def save() -> None:
        out.write_text(json.dumps(report, indent=1) + "\n")

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    torch.manual_seed(0)
    began = time.perf_counter()
    base = runtime.prepare(DenseFlow(config.model), config.train, device).train()
    shape = (a.batch_size, *config.model.image_shape)
    images = [
        torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(100 + t))
        for t in range(a.steps + 2)
    ]
    base.data_init(images[0].to(device), generator=stream(0, "init", device=device))
    report["build_s"] = time.perf_counter() - began

    def chunks(t: int) -> list:
        parts = images[t].to(device).tensor_split(a.chunks)
        return [(x, stream(0, "noise", t, j, device=device)) for j, x in enumerate(parts)]

    def eager(model, optimizer):
        return (lambda c: train_step(model, optimizer, c, 1e-3)), None

    def graphed(capture: bool):
        def make(model, optimizer):
            step = GraphedStep(model, optimizer, capture=capture, say=print)
            return (lambda c: step(c, 1e-3)), step

        return make

    runs = {}
    for name, make in (("A", eager), ("B", eager), ("E", graphed(False)), ("G", graphed(True))):
        model = copy.deepcopy(base)
        optimizer = torch.optim.Adamax(model.parameters(), lr=1e-3, betas=config.train.betas)
        call, step = make(model, optimizer)
        losses, seconds = [], []
        for t in range(a.steps + 2):
            sync()
            start = time.perf_counter()
            losses.append(call(chunks(t)).item())
            seconds.append(time.perf_counter() - start)
        runs[name] = (snapshot(model, optimizer), losses, seconds)
        report[f"{name}_losses"], report[f"{name}_step_s"] = losses, seconds
        if name == "G":
            report["capture"] = {"captured": step.captured, "refusal": step.refusal}
            report["capture"]["traceback"] = failure_trace(step.failure)
            report["capture"]["capture_s"] = step.capture_seconds
            if cuda:
                report["memory_gib"] = {
                    "max_allocated": torch.cuda.max_memory_allocated(device) / 2**30,
                    "reserved": torch.cuda.memory_reserved(device) / 2**30,
                }
            report["masked_replay"] = masked_replay(step, model, optimizer, chunks(0))
        save()
        del model, optimizer, call, step
        if cuda:
            torch.cuda.empty_cache()

    spread = compare(runs["B"][0], runs["A"][0])
    report["B_vs_A"] = spread
    report["E_vs_A"] = compare(runs["E"][0], runs["A"][0])
    report["G_vs_E"] = compare(runs["G"][0], runs["E"][0])
    report["G_vs_A"] = compare(runs["G"][0], runs["A"][0])
    floors = {"parameters": 1e-4, "exp_avg": 1e-3, "exp_inf": 1e-3, "batchnorm": 1e-3}
    passed = {}
    for key, floor in floors.items():
        bound = 4 * spread[key]["rel_l2"]
        passed[f"G_vs_E {key}"] = report["G_vs_E"][key]["rel_l2"] <= max(bound, 1e-6)
        passed[f"G_vs_A {key}"] = report["G_vs_A"][key]["rel_l2"] <= max(bound, floor)
    loss_a, loss_b, loss_g = runs["A"][1], runs["B"][1], runs["G"][1]
    for t, (x, y, z) in enumerate(zip(loss_g, loss_a, loss_b, strict=True)):
        passed[f"loss {t}"] = abs(x - y) <= max(4 * abs(z - y), 1e-5 * abs(y))
    passed["masked replay"] = report["masked_replay"]["untouched"]
    passed["captured"] = bool(report["capture"]["captured"])
    report["passed"], report["all_passed"] = passed, all(passed.values())
    eager_s = statistics.median(runs["A"][2][2:])
    replay_s = statistics.median(runs["G"][2][2:])
    report["median_step_s"] = {"eager": eager_s, "replay": replay_s}
    report["images_per_s"] = {"eager": a.batch_size / eager_s, "replay": a.batch_size / replay_s}
    save()
    print(json.dumps({k: report[k] for k in ("capture", "median_step_s", "images_per_s")}))
    print(json.dumps({"G_vs_A": report["G_vs_A"], "B_vs_A": spread}))
    failed = [key for key, ok in passed.items() if not ok]
    print("all passed" if not failed else f"FAILED: {failed}")
    return 0 if not failed else 1


def failure_trace(err: BaseException | None) -> str | None:
    """A failed capture's whole traceback (printed too: the log is what a device run leaves)."""
    if err is None:
        return None
    trace = "".join(traceback.format_exception(err))
    print(trace)
    return trace


def masked_replay(step, model: DenseFlow, optimizer, chunks: list) -> dict:
    """One replay with a NaN in the first chunk's first noise: the update must be dropped."""
    if not step.captured:
        return {"untouched": False, "why": "not captured"}
    step._fill(chunks)
    first = next(iter(step._noises[0]))
    step._noises[0][first].view(-1)[0] = float("nan")
    before = snapshot(model, optimizer)
    step._graphs[0].replay()  # one process: the whole step is one graph
    keep = bool(step._out[1])
    after = snapshot(model, optimizer)
    same = all(
        torch.equal(x, y)
        for key in ("parameters", "exp_avg", "exp_inf")
        for x, y in zip(before[key], after[key], strict=True)
    )
    return {"untouched": same and not keep, "keep_flag": keep, "noise": first}


if __name__ == "__main__":
    sys.exit(main())
