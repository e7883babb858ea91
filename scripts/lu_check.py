"""Device check of issue 12 (a lead, not a feature): are the 1x1 convolutions' log-determinants
cheaper on a GPU when the matrices of one size share one batched LU factorisation?

    python scripts/lu_check.py --preset cifar10 --json out.json

The 2026-11-29 H200 profile of an eager DenseFlow-74-10 step shows 79 LU factorisations of
single matrices (``aten::linalg_lu_factor_ex``, 216 µs each, 17 ms) and 138 triangular solves
(5 ms) of 217 ms of GPU time: one per invertible 1x1 convolution, 11 sizes from 12 to 308. A
CUDA graph keeps that GPU time. This script times ``log|det W|`` forward and backward for the
preset's matrices (random orthogonal, as the model initialises them) two ways — one
:func:`~denseflow.transforms.glow.log_abs_det` per matrix, as the model computes them, and one
per size on the stacked matrices, and one for all of them padded to the largest size with an
identity block — eagerly and replayed from a CUDA graph (cuSOLVER preferred,
as the training step's capture runs), medians of ``--calls``; it also reports how far the
batched values (absolute: the sum is about 0 for orthogonal matrices) and gradients (relative)
are from the single ones, in float32. Whether the model
should batch them is decided from these figures; nothing in the package depends on it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from denseflow.config import load_config  # noqa: E402
from denseflow.graph import _cusolver  # noqa: E402
from denseflow.model import DenseFlow  # noqa: E402
from denseflow.transforms.glow import Conv1x1, batched_log_dets, log_abs_det  # noqa: E402


def single(convs: list[Conv1x1]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Σ log|det W| one matrix at a time (as the model), and its gradients."""
    ws = [conv.weight for conv in convs]
    total = torch.stack([log_abs_det(w) for w in ws]).sum()
    return total, list(torch.autograd.grad(total, ws))


def batched(convs: list[Conv1x1]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Σ log|det W| with one factorisation per size, as ``train.batched_logdets`` computes it
    (:func:`~denseflow.transforms.glow.batched_log_dets`), and its gradients."""
    with batched_log_dets(convs):
        total = torch.stack([conv.matrix()[1] for conv in convs]).sum()
    return total, list(torch.autograd.grad(total, [conv.weight for conv in convs]))


def padded(convs: list[Conv1x1]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Σ log|det W| with one factorisation of all matrices, each padded to the largest size as
    ``[[W, 0], [0, I]]`` (the same determinant; partial pivoting never picks a padding row), and
    its gradients."""
    ws = [conv.weight for conv in convs]
    n = max(w.shape[0] for w in ws)
    eye = torch.eye(n, dtype=ws[0].dtype, device=ws[0].device)
    tail = torch.stack([eye * (torch.arange(n, device=eye.device) >= w.shape[0]) for w in ws])
    stack = torch.stack([F.pad(w, (0, n - w.shape[0], 0, n - w.shape[0])) for w in ws]) + tail
    total = log_abs_det(stack).sum()
    return total, list(torch.autograd.grad(total, ws))


def median_ms(call, calls: int, cuda: bool) -> float:
    times = []
    for _ in range(calls):
        if cuda:
            torch.cuda.synchronize()
        began = time.perf_counter()
        call()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - began)
    return 1e3 * statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cifar10")
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of this script")
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    model = DenseFlow(load_config(args.preset).model).to(device)
    convs = [m for m in model.modules() if type(m) is Conv1x1]  # the full 1x1 convolutions
    sizes: dict[int, int] = defaultdict(int)
    for conv in convs:
        sizes[conv.weight.shape[0]] += 1
    report: dict = {"preset": args.preset, "device": str(device), "matrices": len(convs)}
    report["sizes"] = dict(sorted(sizes.items()))
    if cuda:
        report["gpu"] = torch.cuda.get_device_name(device)
    report["torch"] = torch.__version__
    with _cusolver() if cuda else nullcontext():
        value_1, grads_1 = single(convs)
        for name, fn in (("batched", batched), ("padded", padded)):
            value, grads = fn(convs)
            report[f"{name}_vs_single"] = {
                "value_abs": (value - value_1).abs().item(),  # Σ log|det| of orthogonal W: ~0
                "grad_rel_max": max(
                    ((b - a).norm() / a.norm()).item() for a, b in zip(grads_1, grads, strict=True)
                ),
            }
        ways = (("single", single), ("batched", batched), ("padded", padded))
        report["eager_ms"] = {
            name: median_ms(lambda fn=fn: fn(convs), args.calls, cuda) for name, fn in ways
        }
        if cuda:
            report["replay_ms"] = {}
            for name, fn in ways:
                side = torch.cuda.Stream(device)
                side.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(side):
                    fn(convs)
                torch.cuda.current_stream(device).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    fn(convs)
                report["replay_ms"][name] = median_ms(graph.replay, args.calls, cuda)
    Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
