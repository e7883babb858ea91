"""The ablation experiment (``denseflow experiment ablation``): what the paper's ideas buy at
equal budget.

Variants of one small two-scale architecture on 28x28 Fashion-MNIST, each within 5 % of the
reference's parameter count (the coupling-net width ``layer_mid_chnls`` is solved for) and
trained on the same images in the same order for the same number of steps:

``denseflow``            cross-unit coupling + DenseBlock ⊕ official Nyström attention (the paper)
``denseflow_multihead``  the same with the corrected per-pixel multi-head attention
``unconditional_noise``  augmentation noise from a learned Gaussian that ignores earlier latents
``no_augmentation``      no cross-unit noise: constant width, the parameters spent in the nets
``no_attention``         coupling nets without the attention branch (DenseBlock only)
``glow``                 Glow with our layers: one unit of K glow-like steps per scale, Glow's
                         conv coupling net, uniform dequantization, no augmentation

Per variant and seed: test bits/dim by the ELBO (whole test set) and by IWBO-k (the first
``iwbo_images`` test images, with the ELBO of the same images beside it), parameters, images
seen, wall-clock, sample grids. ``results.json``, ``results.md`` and ``ablation.png`` go to ``out``.
A finished run is never repeated: rerunning the same command continues an interrupted experiment.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from . import checkpoint as ckpt
from .config import ConfigError, DataConfig, EvalConfig, ModelConfig, RunConfig, load_config
from .data import load_images
from .evaluate import evaluate_images
from .model import DenseFlow
from .runlog import logged_train_seconds, nan_for_null, run_files, to_json
from .runtime import prepare, resolve_device
from .sample import sample_seeds, save_grid
from .step import train_step
from .train import train

_DEMO = load_config("demo")
#: the reference architecture, the ``demo`` preset's model: 2 scales, 3 + 2 units of 2 steps
BASE = _DEMO.model

#: name -> (changes to BASE, one-line description); the width is then matched to ``denseflow``
VARIANTS: dict[str, tuple[dict[str, Any], str]] = {
    "denseflow": ({}, "cross-unit coupling + DenseBlock ⊕ official attention (the paper's design)"),
    "denseflow_multihead": (
        {"attention": "multihead", "attention_heads": 4},
        "as denseflow, with the corrected per-pixel 4-head attention",
    ),
    "unconditional_noise": (
        {"cross_unit": "unconditional"},
        "augmentation noise from a learned Gaussian independent of earlier latents (VFlow-style)",
    ),
    "no_augmentation": (
        {"growth_rate": 0},
        "no noise augmentation: constant width, wider coupling nets",
    ),
    "no_attention": (
        {"coupling_net": "dense"},
        "coupling nets without the attention branch (DenseBlock only)",
    ),
    "glow": (
        {
            "coupling_net": "glow",
            "growth_rate": 0,
            "block_conf": (1, 1),
            "layers_conf": (8, 8),
            "dequantization": "uniform",
        },
        "Glow: 8 steps per scale, conv 3x3-1x1-3x3 coupling nets, uniform dequantization",
    ),
}

#: the training recipe shared by every variant: the demo preset's (batch 64, lr 2e-3 after 100
#: warm-up steps), no intermediate evaluations or sample grids; ``max_steps`` is the budget
RECIPE = dataclasses.replace(
    _DEMO.train, epochs=1000, max_steps=None, eval_every=1000, num_samples=0, device="auto"
)

DEFAULTS = {"steps": 800, "seeds": 2, "iwbo_k": 100, "iwbo_images": 500, "batch_size": 64}
#: --quick: the pipeline on a tiny subset (CI), not the numbers
QUICK = {
    "steps": 3,
    "seeds": 2,
    "iwbo_k": 100,
    "iwbo_images": 4,
    "batch_size": 16,
    "train_limit": 256,
    "test_limit": 32,
}


def num_params(config: ModelConfig) -> int:
    """Parameter count of the model of ``config``."""
    return sum(p.numel() for p in DenseFlow(config).parameters())


@functools.cache
def matched_config(name: str, base: ModelConfig = BASE) -> ModelConfig:
    """The variant's configuration, its width ``layer_mid_chnls`` chosen (the same at every scale)
    so that its parameter count is the closest to the reference ``denseflow``'s."""
    changes, _ = VARIANTS[name]
    config = dataclasses.replace(base, **changes)
    if name == "denseflow":
        return config
    target = num_params(dataclasses.replace(base, **VARIANTS["denseflow"][0]))
    step = (
        2 * config.attention_heads if config.coupling_net == "fused" else 2
    )  # M//2 divisible by the heads

    def at(width: int) -> ModelConfig:
        return dataclasses.replace(config, layer_mid_chnls=(width,) * config.num_scales)

    lo, hi = 1, 1
    while (
        num_params(at(hi * step)) < target
    ):  # parameters grow with the width: bracket, then bisect
        lo, hi = hi, 2 * hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if num_params(at(mid * step)) < target else (lo, mid)
    return min((at(lo * step), at(hi * step)), key=lambda c: abs(num_params(c) - target))


def run_config(
    name: str, seed: int, steps: int, batch_size: int, limits: dict[str, int | None]
) -> RunConfig:
    """The configuration of one run: a variant's matched model, the shared recipe, a seed. A
    checkpoint every 1,000 steps at most, so that a long run stopped midway (a session's end)
    continues from its last one."""
    train = dataclasses.replace(
        RECIPE,
        max_steps=steps,
        batch_size=batch_size,
        seed=seed,
        checkpoint_every=min(steps, 1000),
    )
    data = DataConfig(dataset="fashion_mnist", augmentation="none", **limits)
    return RunConfig(
        model=matched_config(name), data=data, train=train, eval=EvalConfig(batch_size=250)
    )


def _calibrate(
    names: list[str], batch_size: int, iwbo_k: int, iwbo_images: int, n_test: int
) -> dict[str, float]:
    """Seconds per training step and per evaluation of each variant, from a few timed steps."""
    device = resolve_device(RECIPE.device)
    out = {}
    for name in names:
        model = prepare(DenseFlow(matched_config(name)), RECIPE, device)
        optimizer = torch.optim.Adamax(model.parameters())
        x = torch.randint(0, 256, (batch_size, *BASE.image_shape), device=device)
        times = []
        for _ in range(4):
            tic = time.perf_counter()
            train_step(model, optimizer, [(x, None)], 1e-4)
            times.append(time.perf_counter() - tic)
        model.eval()
        tic = time.perf_counter()
        with torch.no_grad():
            model.elbo(x)
        per_image = (time.perf_counter() - tic) / batch_size
        out[name] = (statistics.median(times[1:]), per_image * (iwbo_k * iwbo_images + 2 * n_test))
    return out


def check_out(out: Path) -> None:
    """An experiment's folder must not be a training run's: its runs would mix with it."""
    held = run_files(out)
    if held:
        raise ConfigError(
            f"--out {out}: a training run's folder ({', '.join(held)}): choose another --out"
        )


def run_ablation(
    out: str | Path,
    data_dir: str | Path | None = None,
    seeds: int | None = None,
    steps: int | None = None,
    budget_minutes: float | None = None,
    quick: bool = False,
    variants: list[str] | None = None,
    progress: bool = True,
    log=print,
) -> dict[str, Any]:
    """Train and evaluate every variant for every seed into ``out``; return the results.

    ``steps`` (default 800, or 3 with ``quick``) is the budget: every variant sees ``steps x 64``
    training images. ``budget_minutes`` instead derives ``steps`` from a short calibration so that
    the whole experiment should take about that long on this machine.
    """
    if budget_minutes is not None and not 0 < budget_minutes < math.inf:
        raise ConfigError(
            f"--budget-minutes {budget_minutes}: expected a positive, finite number of minutes"
        )
    settings = dict(QUICK if quick else DEFAULTS)
    settings["seeds"] = settings["seeds"] if seeds is None else seeds
    names = list(variants or VARIANTS)
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        raise ConfigError(f"unknown variant(s) {unknown}; expected some of {list(VARIANTS)}")
    if settings["seeds"] < 1:
        raise ConfigError(f"seeds must be >= 1, got {settings['seeds']}")
    limits = {"train_limit": settings.get("train_limit"), "test_limit": settings.get("test_limit")}
    testset = load_images("fashion_mnist", "test", data_dir, limit=limits["test_limit"])
    trainset_source = load_images(
        "fashion_mnist", "train", data_dir, limit=limits["train_limit"]
    ).source
    n_train = trainset_source["num_images"]
    if steps is not None and budget_minutes is not None:
        raise ConfigError("give --steps or --budget-minutes, not both")
    if budget_minutes is not None:
        cost = _calibrate(
            names,
            settings["batch_size"],
            settings["iwbo_k"],
            settings["iwbo_images"],
            len(testset.images),
        )
        per_seed_steps = sum(step for step, _ in cost.values())
        per_seed_eval = sum(evaluation for _, evaluation in cost.values())
        steps = int((60 * budget_minutes / settings["seeds"] - per_seed_eval) / per_seed_steps)
        if steps < 1:
            raise ConfigError(
                f"--budget-minutes {budget_minutes}: too short for one step of every variant here"
            )
        log(
            f"calibrated: {steps} steps per run fit {budget_minutes} minutes "
            f"({settings['seeds']} seeds)"
        )
    settings["steps"] = settings["steps"] if steps is None else steps
    if settings["steps"] < 1:
        raise ConfigError(f"steps must be >= 1, got {settings['steps']}")

    out = Path(out)
    check_out(out)
    out.mkdir(parents=True, exist_ok=True)
    iwbo_set = testset.images[: settings["iwbo_images"]]
    runs = []
    for seed in range(settings["seeds"]):
        for name in names:
            config = run_config(name, seed, settings["steps"], settings["batch_size"], limits)
            run_dir = out / f"seed{seed}" / name
            runs.append(
                _run_one(
                    name,
                    config,
                    run_dir,
                    data_dir,
                    n_train,
                    testset.images,
                    iwbo_set,
                    settings,
                    progress,
                    log,
                )
            )
    results = {
        "command": settings | {"budget_minutes": budget_minutes, "quick": quick, "variants": names},
        "machine": _machine(),
        "data": {"train": trainset_source, "test": testset.source, "iwbo_images": len(iwbo_set)},
        "variants": {
            name: {"description": VARIANTS[name][1], "model": matched_config(name).to_dict()}
            for name in names
        },
        "runs": runs,
        "summary": summarize(runs),
    }
    (out / "results.json").write_text(to_json(results, indent=1) + "\n")
    (out / "results.md").write_text(markdown_table(results))
    plot(results, out / "ablation.png", log)
    montage(results, out, "0.7", log)
    return results


def images_seen(n: int, batch_size: int, steps: int) -> int:
    """Training images in ``steps`` steps over ``n`` images (the last batch of an epoch is
    partial)."""
    per_epoch = math.ceil(n / batch_size)
    epochs, rest = divmod(steps, per_epoch)
    return epochs * n + min(rest * batch_size, n)


def _run_one(
    name, config, run_dir, data_dir, len_train, test_images, iwbo_set, settings, progress, log
):
    """Train one variant for one seed (continuing an interrupted run) and evaluate it."""
    done = run_dir / "result.json"
    if done.exists():
        result = nan_for_null(json.loads(done.read_text()))
        if (
            RunConfig.from_dict(result["config"]) == config
        ):  # fields added since then take their defaults
            log(f"{name} seed {config.train.seed}: done before, kept")
            return result
        raise ConfigError(f"{run_dir} holds a run of another configuration: choose another --out")
    log(
        f"{name} seed {config.train.seed}: training {config.train.max_steps} steps of "
        f"{config.train.batch_size}"
    )
    resume = run_dir if any((run_dir / "checkpoints").glob("step_*.pt")) else None
    tic = time.perf_counter()
    summary = train(config, run_dir, data_dir, resume=resume, progress=progress)
    train_s = time.perf_counter() - tic
    model, _ = ckpt.load_model(run_dir / "final.pt", resolve_device(config.train.device))
    if config.train.channels_last:  # the layout train() evaluated in: the same kernels, values
        model = model.to(memory_format=torch.channels_last)
    model.eval()
    seed = config.train.seed
    tic = time.perf_counter()
    elbo = {
        "bpd": summary["test_bpd"]
    }  # train() ends with this evaluation: the whole test set, eval.batch_size 250
    if summary["test_bpd"] is None:  # a resumed run that had finished training
        elbo = evaluate_images(
            model, test_images, 250, seed=seed, progress=progress, desc=f"{name} ELBO"
        )
    elbo_subset = evaluate_images(model, iwbo_set, 250, seed=seed, progress=False)
    k = settings["iwbo_k"]
    iwbo = evaluate_images(
        model, iwbo_set, 5, k, min(k, 50), seed=seed, progress=progress, desc=f"{name} IWBO-{k}"
    )
    eval_s = time.perf_counter() - tic
    grids = {}
    for temperature in (1.0, 0.7):
        path = run_dir / f"samples_t{temperature}.png"
        save_grid(
            sample_seeds(model, list(range(64)), temperature), path, num_bits=config.model.num_bits
        )
        grids[str(temperature)] = str(path.relative_to(run_dir.parent.parent))
    result = {
        "variant": name,
        "seed": seed,
        "params": sum(p.numel() for p in model.parameters()),
        "steps": summary["step"],
        "images_seen": images_seen(len_train, config.train.batch_size, summary["step"]),
        # a resumed run's own clock saw only its last part: the log's estimate covers them all
        "train_seconds": logged_train_seconds(run_dir, config.train)
        if resume
        else summary["train_seconds"],
        "resumed": resume is not None,
        "run_seconds": train_s,
        "eval_seconds": eval_s,
        "elbo_bpd": elbo["bpd"],
        "elbo_bpd_iwbo_images": elbo_subset["bpd"],
        "iwbo_bpd": iwbo["bpd"],
        "iwbo_k": k,
        "samples": grids,
        "config": config.to_dict(),
    }
    done.write_text(to_json(result, indent=1) + "\n")
    log(
        f"{name} seed {seed}: ELBO {elbo['bpd']:.4f} bpd, IWBO-{k} {iwbo['bpd']:.4f} bpd, "
        f"{result['train_seconds'] / 60:.1f} min of training"
        + (f" ({train_s / 60:.1f} in this call)" if resume else "")
    )
    return result


def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean and standard deviation over seeds (0 for one seed) of each variant's figures (NaN
    where a run's figure is not finite)."""
    summary: dict[str, dict[str, float]] = {}
    for name in dict.fromkeys(r["variant"] for r in runs):
        mine = [r for r in runs if r["variant"] == name]
        row: dict[str, float] = {
            "seeds": len(mine),
            "params": mine[0]["params"],
            "images_seen": mine[0]["images_seen"],
        }
        for key in ("elbo_bpd", "elbo_bpd_iwbo_images", "iwbo_bpd", "train_seconds"):
            values = [r[key] for r in mine]
            row[key] = statistics.fmean(values)
            if len(values) == 1:
                row[f"{key}_std"] = 0.0
            else:  # stdev raises on a non-finite value (a diverged run): NaN, as its mean
                finite = all(math.isfinite(v) for v in values)
                row[f"{key}_std"] = statistics.stdev(values) if finite else math.nan
        summary[name] = row
    return summary


def markdown_table(results: dict[str, Any]) -> str:
    """``results.md``: mean ± std per variant, then every run."""
    k = results["command"]["iwbo_k"]
    n = results["data"]["iwbo_images"]
    lines = [
        f"| variant | parameters | images seen "
        f"| test ELBO bpd (all {results['data']['test']['num_images']}) "
        f"| ELBO bpd (first {n}) | IWBO-{k} bpd (first {n}) | train min |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in results["summary"].items():
        lines.append(
            f"| {name} | {row['params']:,} | {row['images_seen']:,} "
            f"| {row['elbo_bpd']:.4f} ± {row['elbo_bpd_std']:.4f} "
            f"| {row['elbo_bpd_iwbo_images']:.4f} ± {row['elbo_bpd_iwbo_images_std']:.4f} "
            f"| {row['iwbo_bpd']:.4f} ± {row['iwbo_bpd_std']:.4f} "
            f"| {row['train_seconds'] / 60:.1f} ± {row['train_seconds_std'] / 60:.1f} |"
        )
    seeds = max(int(row["seeds"]) for row in results["summary"].values())
    lines.append(
        f"\nmean ± standard deviation over {seeds} seed(s); lower bits/dim is better. Every run:\n"
    )
    lines.append(
        f"| variant | seed | test ELBO bpd | ELBO bpd (first {n}) | IWBO-{k} bpd (first {n}) "
        "| train s | eval s |"
    )
    lines.append("|---|---:|---:|---:|---:|---:|---:|")
    for r in results["runs"]:
        lines.append(
            f"| {r['variant']} | {r['seed']} | {r['elbo_bpd']:.4f} "
            f"| {r['elbo_bpd_iwbo_images']:.4f} "
            f"| {r['iwbo_bpd']:.4f} | {r['train_seconds']:.0f} | {r['eval_seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path, log=print) -> None:
    """Bar chart of test ELBO and IWBO bits/dim per variant with ±1 std error bars."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log(f"matplotlib is not installed (pip install 'denseflow[plot]'): no {path.name}")
        return
    names = list(results["summary"])
    rows = [results["summary"][name] for name in names]
    k = results["command"]["iwbo_k"]
    fig, ax = plt.subplots(figsize=(8, 4))
    xs = range(len(names))
    for offset, key, label in (
        (-0.2, "elbo_bpd", "ELBO (whole test set)"),
        (0.2, "iwbo_bpd", f"IWBO-{k} (subset)"),
    ):
        ax.bar(
            [x + offset for x in xs],
            [r[key] for r in rows],
            width=0.4,
            yerr=[r[f"{key}_std"] for r in rows],
            capsize=3,
            label=label,
        )
    values = [r[key] for r in rows for key in ("elbo_bpd", "iwbo_bpd")]
    spread = max(values) - min(values) or 0.1
    ax.set_ylim(min(values) - spread, max(values) + 0.5 * spread)
    ax.set_xticks(list(xs), names, rotation=20, ha="right")
    ax.set_ylabel("test bits/dim (lower is better)")
    ax.set_title(f"Fashion-MNIST ablation, {rows[0]['images_seen']:,} training images per run")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def montage(
    results: dict[str, Any], out: Path, temperature: str, log: Callable[[str], None] = print
) -> Path | None:
    """``samples_t{T}.png``: every variant's sample grid of its first seed that has one on disk,
    side by side, labelled (a kept run may have only its ``result.json``). None if no grid is
    left."""
    from PIL import Image, ImageDraw

    first = {}
    for run in results["runs"]:
        path = out / run["samples"][temperature]
        if path.is_file():
            first.setdefault(run["variant"], path)
    missing = sorted({run["variant"] for run in results["runs"]} - set(first))
    if missing:
        log(f"samples_t{temperature}.png: no sample grid on disk for {', '.join(missing)}")
    if not first:
        return None
    grids = {name: Image.open(path).convert("L") for name, path in first.items()}
    width, height = next(iter(grids.values())).size
    columns = min(3, len(grids))
    rows = -(-len(grids) // columns)
    canvas = Image.new("L", (columns * (width + 8), rows * (height + 22)), 255)
    draw = ImageDraw.Draw(canvas)
    for i, (name, grid) in enumerate(grids.items()):
        x, y = (i % columns) * (width + 8), (i // columns) * (height + 22)
        draw.text((x + 2, y + 4), name, fill=0)
        canvas.paste(grid, (x, y + 20))
    path = out / f"samples_t{temperature}.png"
    canvas.save(path)
    return path


def _machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "date": time.strftime("%Y-%m-%d"),
    }
