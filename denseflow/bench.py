"""``denseflow bench``: speed and memory of the steps users run, as medians over repetitions.

Measurements (each on random 8-bit images of the preset's shape):

``train``   the exact step :func:`denseflow.train.train` runs — zero_grad, loss, backward,
            Adamax — from :func:`denseflow.graph.graphed_step`: on CUDA one captured graph
            (``train.cuda_graph``, default on), else ``train_step``; the first two calls (the
            eager recording step, then the capture and first replay) are timed apart
            (``first_steps_s``, ``capture_s``).
``sample``  ``sample(B)`` in eval mode, the sampling noises given (one fixed draw).
``iwbo``    ``iwbo(x, k, chunk)`` in eval mode, against a plain loop of ``k`` ``elbo`` calls
            (as a user writes it, and the same loop under ``torch.no_grad()``; ``loops=False``
            leaves those out, seconds each on a large model); images/s counts importance samples
            of x per second.
            Both run what ``denseflow sample`` and ``denseflow evaluate`` run: on CUDA replayed
            graphs (:class:`denseflow.graph.GraphedInference`, unless ``train.cuda_graph`` is
            off), else the model's own methods; their first two calls (recording, capture) are
            timed apart (``first_calls_s``, ``capture_s``).
``ops``     (opt-in) the operators the forward and backward passes of the training step
            ``train`` runs (:meth:`denseflow.graph.GraphedStep.passes`, or ``train_step``'s)
            launch below autograd, by name, views, copy-free reshapes and allocations excluded:
            a proxy for the kernels a GPU launches (the update's, device-specific, left out).
``convs``   the kernel ceiling (opt-in): every convolution of one training step at batch B,
            grouped by shape, each shape timed alone on random data (forward, then both backward
            products); the sum is what the step's convolutions cost at isolated-kernel speed,
            and ``train``'s median over it says how close the whole step gets to that bound.

For each: median and min seconds over ``steps`` timed repetitions after ``warmup`` untimed ones,
images/s, achieved GFLOP/s (from a FLOP count of the same call on one image, times B), peak
memory during the timed repetitions (resident set size on CPU, sampled every 20 ms; max
allocated on a GPU, and max reserved by the caching allocator, which holds a captured graph's
memory pool), and the torch version, thread count and device. With ``--profile``, each
measurement's profiled call adds kernel launches, host launch calls and the GPU's busy time and
fraction (of the median) to the report.
"""

from __future__ import annotations

import functools
import math
import os
import platform
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from .config import ConfigError, RunConfig
from .graph import (
    GraphedInference,
    GraphedStep,
    capture_refusal,
    draw_noises,
    graphed_step,
    inference,
)
from .model import DenseFlow, eager
from .runtime import prepare
from .step import backpropagate, train_step

TIMED = ("train", "sample", "iwbo")  # the measurements with a row of timings
MEASUREMENTS = (*TIMED, "convs", "ops")


def _rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak resident memory (CPU, sampled) or max allocated memory (CUDA) inside a ``with``
    block."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak = device, 0
        self.reserved: int | None = None  # CUDA: max reserved by the caching allocator

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        self._stop = threading.Event()
        self.peak = _rss()

        def watch() -> None:
            while not self._stop.wait(0.02):
                self.peak = max(self.peak, _rss())

        self._thread = threading.Thread(target=watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
            self.reserved = torch.cuda.max_memory_reserved(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, _rss())


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call (multiply-add = 2), from torch's FLOP counter (convolutions, matmuls);
    compiled nets run eagerly for the count (the counter does not see inside compiled graphs)."""
    with eager(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(
    fn: Callable[[], Any], steps: int, warmup: int, device: torch.device, bar: tqdm | None = None
) -> tuple[list[float], PeakMemory]:
    """Seconds of ``steps`` calls after ``warmup`` untimed ones, and the peak memory meanwhile;
    ``bar`` advances after each call, outside the timed interval."""
    for _ in range(warmup):
        fn()
        if bar is not None:
            bar.update()
    _sync(device)
    times = []
    with PeakMemory(device) as memory:
        for _ in range(steps):
            start = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - start)
            if bar is not None:
                bar.update()
    return times, memory


#: host-side CUDA runtime/driver calls that start work on the GPU, as the profiler names them
LAUNCH_CALLS = ("cudaLaunch", "cuLaunch", "cudaGraphLaunch", "cuGraphLaunch")


def _busy_seconds(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of ``(start, end)`` intervals in microseconds, in seconds."""
    busy, reach = 0.0, -math.inf
    for start, end in sorted(intervals):
        if end > reach:
            busy += end - max(start, reach)
            reach = end
    return busy / 1e6


def profile_table(
    fn: Callable[[], Any], device: torch.device, rows: int = 30
) -> tuple[str, dict[str, float]]:
    """torch.profiler's operator table of one call (sorted by self time on ``device``) and, on
    CUDA, what says whether the GPU is launch-bound: kernels run, host launch calls (one
    ``cudaGraphLaunch`` for a whole replayed graph) and the GPU's busy time (union of the
    kernels' intervals)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        start = time.perf_counter()
        fn()
        _sync(device)
        wall = time.perf_counter() - start
    events = prof.key_averages()
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = events.table(sort_by=key, row_limit=rows)
    stats: dict[str, float] = {"profiled_wall_s": wall}
    if device.type == "cuda":
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        launches = sum(
            e.device_type == torch.autograd.DeviceType.CPU and e.name.startswith(LAUNCH_CALLS)
            for e in prof.events()
        )
        busy = _busy_seconds([(e.time_range.start, e.time_range.end) for e in kernels])
        stats |= {"kernels": len(kernels), "host_launch_calls": launches, "busy_s": busy}
        table += (
            f"\nCUDA kernels launched: {len(kernels)}; host launch calls: {launches}; "
            f"GPU busy {busy:.3f} s of {wall:.3f} s under the profiler"
        )
    return table, stats


def _summary(times: list[float], images: int, flops: int, memory: PeakMemory) -> dict[str, float]:
    median = statistics.median(times)
    summary = {
        "median_s": median,
        "min_s": min(times),
        "images_per_s": images / median,
        "gflop_per_s": flops / median / 1e9,
        "gflop_per_call": flops / 1e9,
        "peak_memory_gib": memory.peak / 2**30,
        "repetitions": len(times),
    }
    if memory.reserved is not None:
        summary["peak_reserved_gib"] = memory.reserved / 2**30
    return summary


#: operators that allocate or read metadata, and launch no kernel on a GPU
_NO_KERNEL = {
    "empty",
    "empty_strided",
    "empty_like",
    "new_empty",
    "new_empty_strided",
    "detach",
    "alias",
    "lift_fresh",
    "set_",
    "_unsafe_view",
}


class _OpCounter(TorchDispatchMode):
    """Counts every operator that reaches the kernels, below autograd (backward ops included),
    views, copy-free reshapes and allocations excluded; by name and, given the stack of running
    modules, by source (see :func:`count_ops`)."""

    def __init__(self, modules: list[str] | None = None) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()
        self.sources: Counter[str] = Counter()
        self.modules = modules
        # the node whose backward pass runs, if any (a private function: guard its absence)
        self._current_node = getattr(torch._C, "_current_autograd_node", lambda: None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not func.is_view and name not in _NO_KERNEL and not name.startswith("_local_scalar"):
            self.counts[name] += 1
            if self.modules is not None:
                self.sources[self._source()] += 1
        return func(*args, **(kwargs or {}))

    def _source(self) -> str:
        node = self._current_node()
        if node is not None:
            return f"backward {node.name()}"
        return f"forward {self.modules[-1]}" if self.modules else "(no module, no node)"


def count_ops(fn: Callable[[], Any], sources: Counter[str] | None = None) -> Counter[str]:
    """The operators one call of ``fn`` runs below autograd, by name: a device-independent
    proxy for the kernels a GPU launches (one or a few per operator). With ``sources``, also
    counts them there by where they come from: ``forward <module class>`` (the innermost module
    running) or ``backward <autograd node>`` (e.g. ``ConvolutionBackward0``, a custom function's
    ``…Backward``; the sums of gradients autograd makes count with the node that produced them)."""
    modules: list[str] | None = None if sources is None else []
    handles = []
    if modules is not None:  # the stack of running modules, kept by global module hooks

        def enter(module: torch.nn.Module, args: Any) -> None:
            modules.append(type(module).__name__)

        def leave(module: torch.nn.Module, args: Any, out: Any) -> None:  # None: output unchanged
            modules.pop()

        register = torch.nn.modules.module
        handles = [
            register.register_module_forward_pre_hook(enter),
            register.register_module_forward_hook(leave),
        ]
    counter = _OpCounter(modules)
    try:
        with counter:
            fn()
    finally:
        for handle in handles:
            handle.remove()
    if sources is not None:
        sources.update(counter.sources)
    return counter.counts


ConvCall = tuple  # input shape, weight shape, has bias, stride, padding, dilation, groups


def conv_census(fn: Callable[[], Any]) -> Counter[ConvCall]:
    """How many convolutions of each kind one call of ``fn`` runs (from the profiler's record)."""
    with torch.profiler.profile(record_shapes=True) as prof:
        fn()
    calls: Counter[ConvCall] = Counter()
    for event in prof.events():
        if event.name == "aten::convolution":
            x, w, b = event.input_shapes[:3]
            stride, padding, dilation, transposed, _, groups = event.concrete_inputs[3:9]
            if transposed:
                raise ValueError("conv_census: transposed convolutions are not timed")
            calls[
                (
                    tuple(x),
                    tuple(w),
                    bool(b),
                    tuple(stride),
                    tuple(padding),
                    tuple(dilation),
                    groups,
                )
            ] += 1
    return calls


def conv_kernel_seconds(
    call: ConvCall, device: torch.device, channels_last: bool, reps: int = 3
) -> tuple[float, int]:
    """Median seconds of one convolution ``call`` alone on random data — forward plus the input-
    and weight-gradient products — and its FLOPs (forward x 3; multiply-add = 2)."""
    x_shape, w_shape, has_bias, stride, padding, dilation, groups = call
    layout = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(x_shape, device=device).contiguous(memory_format=layout)
    w = torch.randn(w_shape, device=device).contiguous(memory_format=layout)
    b = torch.randn(w_shape[0], device=device) if has_bias else None
    g = torch.nn.functional.conv2d(x, w, b, stride, padding, dilation, groups)
    bias_sizes = [w_shape[0]] if has_bias else None

    def once() -> None:
        torch.nn.functional.conv2d(x, w, b, stride, padding, dilation, groups)
        torch.ops.aten.convolution_backward(
            g,
            x,
            w,
            bias_sizes,
            stride,
            padding,
            dilation,
            False,
            [0, 0],
            groups,
            [True, True, has_bias],
        )

    times, _ = _time(once, reps, 1, device)
    return statistics.median(times), 3 * 2 * g.numel() * math.prod(w_shape[1:])


def _train_call(
    model: DenseFlow,
    optimizer: torch.optim.Optimizer,
    config: RunConfig,
    device: torch.device,
    chunks: list[tuple[torch.Tensor, torch.Generator]],
) -> tuple[Callable[[], Any], GraphedStep | None]:
    """One call of the step :func:`denseflow.train.train` would run on ``chunks`` (lr 1e-3), and
    its GraphedStep (None: ``train_step``)."""
    graphed = graphed_step(model, optimizer, config.train, device, say=print)
    if graphed is None:
        return lambda: train_step(model, optimizer, chunks, 1e-3), None
    return lambda: graphed(chunks, 1e-3), graphed


def describe_step(graphed: GraphedStep | None, config: RunConfig, first: float) -> dict:
    """Which step ``train`` measured: graphed or eager (and why), capture time, first calls."""
    if graphed is None:
        return {"graphed": False, "refusal": capture_refusal(config.train), "first_steps_s": first}
    return {
        "graphed": True,
        "captured": graphed.captured,
        "refusal": graphed.refusal,
        "capture_s": graphed.capture_seconds,
        "first_steps_s": first,
    }


def describe_inference(runner: DenseFlow | GraphedInference, first: float) -> dict:
    """Whether ``sample``/``iwbo`` replayed graphs (and why not), capture time, first calls."""
    if not isinstance(runner, GraphedInference):
        return {"graphed": False, "first_calls_s": first}
    return {
        "graphed": True,
        "graphs": runner.graphs,
        "refusal": runner.refusal,
        "capture_s": runner.capture_seconds,
        "first_calls_s": first,
    }


def _elbo_loop(model: DenseFlow, x: torch.Tensor, k: int, generator: torch.Generator) -> None:
    """``k`` calls of ``model.elbo``: IWBO as a user without :meth:`DenseFlow.iwbo` writes it."""
    for _ in range(k):
        model.elbo(x, generator=generator)


def _first_calls(call: Callable[[], Any], device: torch.device, bar: tqdm) -> float:
    """Seconds of two untimed calls: a graphed call records its noise draws, then captures."""
    began = time.perf_counter()
    for _ in range(2):
        call()
        bar.update()
    _sync(device)
    return time.perf_counter() - began


def bench(
    config: RunConfig,
    batch_size: int = 32,
    steps: int = 10,
    warmup: int = 2,
    what: tuple[str, ...] = MEASUREMENTS,
    device: str | torch.device = "cpu",
    k: int = 16,
    kbs: int = 8,
    seed: int = 0,
    profile: str | os.PathLike | None = None,
    loops: bool = True,
    progress: bool = False,
) -> dict[str, Any]:
    """Run the measurements in ``what``; return a JSON-able report. With ``profile``, one more
    call of each measurement runs under torch.profiler and its table is written to that file;
    ``loops=False``: IWBO without its baselines, the loops of ``elbo`` calls. ``progress``: a
    progress bar over each measurement's calls (updated between the timed intervals)."""
    unknown = sorted(set(what) - set(MEASUREMENTS))
    if unknown:
        raise ConfigError(
            f"bench: unknown measurement(s) {unknown}; expected some of {list(MEASUREMENTS)}"
        )
    device = torch.device(device)
    torch.manual_seed(seed)
    model = prepare(DenseFlow(config.model), config.train, device)
    optimizer = torch.optim.Adamax(
        model.parameters(), lr=1e-3, betas=config.train.betas, eps=config.train.eps
    )
    x = torch.randint(
        0, 2**config.model.num_bits, (batch_size, *config.model.image_shape), device=device
    )
    generator = torch.Generator(device=device).manual_seed(seed)
    model.data_init(x, generator=generator)
    report: dict[str, Any] = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "batch_size": batch_size,
        "parameters": sum(p.numel() for p in model.parameters()),
        "image_shape": list(config.model.image_shape),
        "channels_last": config.train.channels_last,
        "low_memory": config.train.low_memory,
        "precision": config.train.precision,
        "batched_logdets": config.train.batched_logdets,
        "compile": config.train.compile
        and f"{config.train.compile_backend}/{config.train.compile_mode}",
    }
    if device.type == "cuda":  # float32 convolutions/matmuls may run as TF32 on tensor cores
        report["tf32"] = {
            "cudnn": torch.backends.cudnn.allow_tf32,
            "matmul": torch.backends.cuda.matmul.allow_tf32,
        }
    tables = []
    for item in what:
        calls = 2 + warmup + steps + (profile is not None)  # first two, warm-ups, timed, profiled
        total = {"iwbo": calls + 2 * (warmup + steps) * loops, "ops": 1, "convs": None}
        bar = tqdm(
            total=total.get(item, calls),
            desc=f"bench {item}",
            unit="call",
            disable=not progress,
            leave=False,
        )
        if item == "train":
            model.train()
            flops = (
                count_flops(lambda: train_step(model, optimizer, [(x[:1], generator)], 1e-3))
                * batch_size
            )
            call, graphed = _train_call(model, optimizer, config, device, [(x, generator)])
            first = _first_calls(call, device, bar)
            times, memory = _time(call, steps, warmup, device, bar)
            report["train"] = _summary(times, batch_size, flops, memory)
            report["train"]["step"] = describe_step(graphed, config, first)
        elif item == "sample":
            model.eval()
            flops = count_flops(lambda: model.sample(1, generator=generator)) * batch_size
            shapes = [(n, (batch_size, *shape)) for n, shape in model.sampling_shapes.items()]
            runner = inference(model, config.train.cuda_graph, say=print)
            call = partial(runner.sample, batch_size, noise=draw_noises(shapes, generator, device))
            first = _first_calls(call, device, bar)
            times, memory = _time(call, steps, warmup, device, bar)
            report["sample"] = _summary(times, batch_size, flops, memory)
            report["sample"]["calls"] = describe_inference(runner, first)
        elif item == "iwbo":
            model.eval()
            flops = (
                count_flops(lambda: model.iwbo(x[:1], k, chunk=kbs, generator=generator))
                * batch_size
            )
            runner = inference(model, config.train.cuda_graph, say=print)
            call = partial(runner.iwbo, x, k, chunk=kbs, generator=generator)
            first = _first_calls(call, device, bar)
            times, memory = _time(call, steps, warmup, device, bar)
            result = _summary(times, batch_size * k, flops, memory)
            result["calls"] = describe_inference(runner, first)
            result["k"], result["kbs"] = k, kbs
            report["iwbo"] = result
            if loops:  # what a user writes: k calls of elbo, with autograd on and off
                loop = partial(_elbo_loop, model, x, k, generator)
                loop_times, _ = _time(loop, steps, warmup, device, bar)
                loop_no_grad_times, _ = _time(torch.no_grad()(loop), steps, warmup, device, bar)
                result["loop_median_s"] = statistics.median(loop_times)
                result["loop_no_grad_median_s"] = statistics.median(loop_no_grad_times)
                result["speedup_vs_elbo_loop"] = result["loop_median_s"] / result["median_s"]
                result["speedup_vs_no_grad_elbo_loop"] = (
                    result["loop_no_grad_median_s"] / result["median_s"]
                )
        elif item == "ops":  # the passes of the step train runs; the update's is device-specific
            model.train()
            model.zero_grad(set_to_none=True)
            chunks = [(x, generator)]
            step, graphed = _train_call(model, optimizer, config, device, chunks)
            sources: Counter[str] = Counter()
            if graphed is None:
                passes = functools.partial(backpropagate, model, chunks, batch_size)
            else:  # one step lays the flat buffers out first (and updates the weights once)
                step()
                passes = functools.partial(graphed.passes, chunks, batch_size)
            counts = count_ops(passes, sources)
            bar.update()
            report["ops"] = {
                "total": sum(counts.values()),
                "by_op": dict(counts.most_common(12)),
                "by_source": dict(sources.most_common(20)),
                "step": "graphed" if graphed else "train_step",
            }
        else:  # convs
            model.train()
            census = conv_census(lambda: train_step(model, optimizer, [(x, generator)], 1e-3))
            bar.reset(total=len(census))  # a call: one convolution shape timed alone
            timed = {}
            for call in census:
                timed[call] = conv_kernel_seconds(call, device, config.train.channels_last)
                bar.update()
            seconds = sum(n * timed[call][0] for call, n in census.items())
            flops = sum(n * timed[call][1] for call, n in census.items())
            report["convs"] = {
                "calls": sum(census.values()),
                "shapes": len(census),
                "isolated_s": seconds,
                "gflop": flops / 1e9,
                "isolated_gflop_per_s": flops / seconds / 1e9,
            }
            if "train" in report:
                report["convs"]["train_over_isolated"] = report["train"]["median_s"] / seconds
        if profile is not None and item in TIMED:
            table, stats = profile_table(call, device)
            bar.update()
            tables.append(f"== {item} (batch {batch_size})\n{table}\n")
            if "busy_s" in stats:
                stats["busy_fraction"] = stats["busy_s"] / report[item]["median_s"]
            report[item]["profile"] = stats
        bar.close()
    if profile is not None:
        Path(profile).write_text("\n".join(tables))
    return report


def format_report(report: dict[str, Any]) -> str:
    """A small text table of a :func:`bench` report."""
    head = (
        f"torch {report['torch']}, {report['threads']} threads, {report['device']}, "
        f"batch {report['batch_size']}, "
        f"{report['parameters']:,} parameters"
    )
    rows = [
        head,
        f"{'':8} {'median s':>9} {'min s':>8} {'img/s':>8} {'GFLOP/s':>8} {'peak GiB':>9}",
    ]
    for item in TIMED:
        if item in report:
            r = report[item]
            rows.append(
                f"{item:8} {r['median_s']:9.3f} {r['min_s']:8.3f} {r['images_per_s']:8.2f} "
                f"{r['gflop_per_s']:8.1f} {r['peak_memory_gib']:9.2f}"
                + (f" ({r['peak_reserved_gib']:.2f} reserved)" if "peak_reserved_gib" in r else "")
            )
            if "profile" in r and "kernels" in r["profile"]:
                q = r["profile"]
                rows.append(
                    f"{'':8} {q['kernels']:,} kernels, {q['host_launch_calls']:,} host launch "
                    f"calls, GPU busy {q['busy_fraction']:.2f} of the median"
                )
    if "train" in report:
        r = report["train"]["step"]
        if r.get("captured"):
            kind = f"one CUDA graph, captured in {r['capture_s']:.1f} s"
        elif r["graphed"]:
            kind = f"static buffers, eager ({r['refusal'] or 'not captured off CUDA'})"
        else:
            kind = f"train_step ({r['refusal']})"
        rows.append(f"train step: {kind}; first two calls {r['first_steps_s']:.2f} s")
    for item in ("sample", "iwbo"):
        if item in report:
            r = report[item]["calls"]
            kind = "the model's own calls"
            if r.get("graphs"):
                kind = f"{r['graphs']} CUDA graph(s), captured in {r['capture_s']:.1f} s"
            elif r["graphed"]:  # on CUDA, but the capture failed
                kind = f"the model's own calls ({r['refusal']})"
            rows.append(f"{item}: {kind}; first two calls {r['first_calls_s']:.2f} s")
    if "iwbo" in report and "speedup_vs_elbo_loop" in report["iwbo"]:
        r = report["iwbo"]
        rows.append(
            f"iwbo k={r['k']} kbs={r['kbs']}: {r['speedup_vs_elbo_loop']:.2f}x a loop of "
            f"{r['k']} elbo calls, "
            f"{r['speedup_vs_no_grad_elbo_loop']:.2f}x the same loop under torch.no_grad()"
        )
    if "ops" in report:
        r = report["ops"]
        top = ", ".join(f"{name} {n:,}" for name, n in list(r["by_op"].items())[:6])
        rows.append(
            f"ops: the step's forward and backward passes ({r['step']}) run {r['total']:,} "
            f"operators ({top}, ...)"
        )
        top = ", ".join(f"{name} {n:,}" for name, n in list(r["by_source"].items())[:6])
        rows.append(f"ops by source: {top}, ...")
    if "convs" in report:
        r = report["convs"]
        line = (
            f"convs: the step's {r['calls']} convolutions ({r['shapes']} shapes, "
            f"{r['gflop']:.0f} GFLOP) "
            f"take {r['isolated_s']:.3f} s timed alone ({r['isolated_gflop_per_s']:.1f} GFLOP/s)"
        )
        if "train_over_isolated" in r:
            line += f"; the whole step takes {r['train_over_isolated']:.2f}x that"
        rows.append(line)
    return "\n".join(rows)
