"""The peer comparison (``denseflow experiment peers``): DenseFlow against another library's Glow.

The peer is normflows' own multi-scale Glow (Stimper et al., 2023; ``pip install
'denseflow[peers]'``, never a core dependency), built as its Glow example builds it and adapted to
1x28x28: ``L = 2`` levels of ``K = 16`` ``GlowBlock``s with 128 hidden channels, a diagonal
Gaussian per level (the example's class conditioning dropped: both models are unconditional),
and the example's preprocessing, uniform dequantization ``z = (x + u)/256``. Its log-likelihood
bound is ``log p(z) − D·log 256`` nats, i.e. its bits/dim are ``−log p(z)/(D·ln 2) + 8``.

DenseFlow is the ``demo`` architecture widened to just under 1 M parameters (coupling nets of
width 48, dense growth 24: 976,172 parameters; Glow has 869,152) with BatchNorm recalibration.

Equal budget: both see the same 300,000 training images (4,688 batches of 64, the same images in
the same order) with Adamax and a cosine decay of the learning rate to 0; each keeps its own
library's peak learning rate (DenseFlow's demo recipe 2e-3 after 100 warm-up steps; the normflows
example's 1e-3 with weight decay 1e-5). Reported for both: test ELBO and IWBO-16 bits/dim on all
10,000 test images (one and 16 dequantization draws per image), sample grids, and the share of
1,000 samples at T = 1 that are broken: a non-finite value, or a value more than a whole data
range outside [0, 1] (below −1 or above 2: a sample that blew up). Values just outside [0, 1] are
normal for a flow on dequantized data (background pixels sit in [0, 1/256)) and are clamped by the
quantization, as the official sampling does; their share among all values is reported beside.

Each arm's training and bounds are stored (``denseflow.json``; ``glow.json`` with ``glow.pt``), so
a rerun into the same folder reuses them and only draws the samples again.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from . import checkpoint as ckpt
from .config import ConfigError, RunConfig, load_config
from .data import load_images
from .evaluate import evaluate_images
from .experiment import _machine, check_out
from .pretrained import open_model
from .runlog import logged_train_seconds, nan_for_null, to_json
from .runtime import resolve_device
from .sample import save_grid
from .seeding import stream
from .train import train

#: what the full comparison runs; ``--quick`` shrinks everything to check the pipeline (CI)
SETTINGS = {
    "images": 300_000,
    "batch_size": 64,
    "iwbo_k": 16,
    "test_limit": None,
    "draws": 1000,
    "glow": {"L": 2, "K": 16, "hidden_channels": 128, "lr": 1e-3, "weight_decay": 1e-5},
    "denseflow": ["model.layer_mid_chnls=[48,48]", "model.dense_growth=24"],
}
QUICK = {
    "images": 96,
    "batch_size": 32,
    "iwbo_k": 2,
    "test_limit": 64,
    "draws": 20,
    "glow": {"L": 2, "K": 2, "hidden_channels": 8, "lr": 1e-3, "weight_decay": 1e-5},
    "denseflow": [],
}


def denseflow_config(settings: dict[str, Any], steps: int, quick: bool) -> RunConfig:
    """The DenseFlow arm: the demo (or, quick, the tiny) preset with the comparison's budget."""
    base = load_config("tiny" if quick else "demo").override(settings["denseflow"])
    return base.override(
        [
            f"train.max_steps={steps}",
            f"train.batch_size={settings['batch_size']}",
            "train.schedule=cosine",
            "train.epochs=1000",
            "train.eval_every=1000",
            "train.num_samples=0",
            "train.checkpoint_every=500",
            "data.dataset=fashion_mnist",
            "data.augmentation=none",
            f"data.test_limit={settings['test_limit'] or 'null'}",
            "data.train_limit=null",
        ]
    )


def glow_model(image_shape: tuple[int, int, int], L: int, K: int, hidden_channels: int):
    """normflows' multi-scale Glow as its example assembles it, for ``image_shape``."""
    try:
        import normflows as nf
    except ImportError:
        raise ConfigError(
            "the peer comparison needs normflows: pip install 'denseflow[peers]'"
        ) from None
    c, h, w = image_shape
    q0, merges, flows = [], [], []
    for i in range(L):
        with warnings.catch_warnings():  # normflows' LU 1x1 init calls the deprecated torch.lu
            warnings.filterwarnings("ignore", message="torch.lu is deprecated")
            level = [
                nf.flows.GlowBlock(c * 2 ** (L + 1 - i), hidden_channels, split_mode="channel")
                for _ in range(K)
            ]
        flows.append([*level, nf.flows.Squeeze()])
        if i > 0:
            merges.append(nf.flows.Merge())
            shape = (c * 2 ** (L - i), h // 2 ** (L - i), w // 2 ** (L - i))
        else:
            shape = (c * 2 ** (L + 1), h // 2**L, w // 2**L)
        q0.append(nf.distributions.DiagGaussian(shape))
    return nf.MultiscaleFlow(q0, flows, merges, class_cond=False)


def glow_log_likelihood(model, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A one-draw lower bound on ``log P(x)`` of 8-bit images ``x`` in nats, ``(B,)``:
    ``log p((x + u)/256) − D·log 256`` with ``u ~ U(0, 1)^D``."""
    u = torch.rand(x.shape, generator=generator, device=generator.device).to(x.device)
    z = (x.double() + u.double()).float() / 256
    return model.log_prob(z, None) - x[0].numel() * math.log(256)


def train_glow(
    model,
    images: torch.Tensor,
    steps: int,
    batch_size: int,
    glow: dict,
    seed: int,
    progress: bool = True,
) -> dict[str, Any]:
    """Adamax with the example's learning rate and weight decay, decayed to 0 by a cosine, on the
    images in the order DenseFlow sees them; a step whose loss is not finite is skipped (as the
    example does)."""
    device = next(model.parameters()).device
    opt = torch.optim.Adamax(model.parameters(), lr=glow["lr"], weight_decay=glow["weight_decay"])
    per_epoch, skipped, order = math.ceil(len(images) / batch_size), 0, None
    bar = tqdm(total=steps, desc="glow", unit="step", disable=not progress, dynamic_ncols=True)
    tic = time.perf_counter()
    for step in range(steps):
        epoch, batch = divmod(step, per_epoch)
        if batch == 0:
            order = torch.randperm(len(images), generator=stream(seed, "order", epoch))
        x = images[order[batch * batch_size : (batch + 1) * batch_size]].to(device).long()
        for group in opt.param_groups:
            group["lr"] = glow["lr"] * 0.5 * (1 + math.cos(math.pi * step / steps))
        loss = -glow_log_likelihood(model, x, stream(seed, "noise", step, 0)).mean()
        opt.zero_grad(set_to_none=True)
        if torch.isfinite(loss):
            loss.backward()
            opt.step()
        else:
            skipped += 1
        bar.update()
        bar.set_postfix(bpd=f"{loss.item() / (x[0].numel() * math.log(2)):.3f}")
    bar.close()
    return {"train_seconds": time.perf_counter() - tic, "skipped_steps": skipped}


@torch.no_grad()
def evaluate_glow(
    model, images: torch.Tensor, k: int, seed: int, batch_size: int = 100
) -> dict[str, float]:
    """Test ELBO (one draw) and IWBO-``k`` bits/dim, noises from the ``(seed, "eval", batch)``
    streams, sums in float64."""
    elbo = iwbo = 0.0
    device = next(model.parameters()).device
    for i, start in enumerate(range(0, len(images), batch_size)):
        x = images[start : start + batch_size].to(device).long()
        g = stream(seed, "eval", i)
        draws = torch.stack([glow_log_likelihood(model, x, g).double() for _ in range(k)])
        elbo += draws[0].sum().item()
        iwbo += (torch.logsumexp(draws, 0) - math.log(k)).sum().item()
    per_dim = len(images) * images[0].numel() * math.log(2)
    return {"elbo_bpd": -elbo / per_dim, "iwbo_bpd": -iwbo / per_dim}


def broken(z: torch.Tensor) -> torch.Tensor:
    """Per value: non-finite, or more than a data range outside [0, 1] (below −1, above 2)."""
    finite = z.nan_to_num(0.5)
    return ~torch.isfinite(z) | (finite < -1) | (finite > 2)


def sample_health(z: torch.Tensor) -> dict[str, float]:
    """Of continuous samples ``z`` ``(N, C, H, W)``: the share of samples with a broken value,
    the share of broken values, and the share of values the quantization clamps (finite, outside
    [0, 1])."""
    bad, finite = broken(z), torch.isfinite(z)
    clamped = finite & ((z.nan_to_num(0.5) < 0) | (z.nan_to_num(0.5) > 1))
    return {
        "broken_share": bad.flatten(1).any(1).double().mean().item(),
        "broken_values": bad.double().mean().item(),
        "clamped_values": clamped.double().mean().item(),
    }


def _once(path: Path, identity: dict[str, Any], compute) -> dict[str, Any]:
    """The figures stored in ``path`` for this ``identity`` (a configuration), or ``compute()``'s,
    stored there; another identity is refused (choose another --out)."""
    if path.exists():
        stored = json.loads(path.read_text())
        if stored.get("identity") != identity:
            raise ConfigError(f"{path} holds an arm of another configuration: choose another --out")
        return nan_for_null(stored["figures"])
    figures = compute()
    path.write_text(to_json({"identity": identity, "figures": figures}, indent=1) + "\n")
    return figures


def quantized(z: torch.Tensor) -> torch.Tensor:
    """8-bit images of continuous samples in [0, 1] (non-finite values shown as 0)."""
    return torch.floor(256 * z.nan_to_num(0.0)).clamp(0, 255).long()


def run_peers(
    out: str | Path,
    data_dir: str | Path | None = None,
    quick: bool = False,
    progress: bool = True,
    log=print,
) -> dict[str, Any]:
    """Train and evaluate both arms into ``out``; write ``results.json``, ``results.md`` and
    the sample grids; return the results. A finished DenseFlow run in ``out`` is resumed, not
    repeated."""
    settings = QUICK if quick else SETTINGS
    out = Path(out)
    check_out(out)
    steps = math.ceil(settings["images"] / settings["batch_size"])
    config = denseflow_config(settings, steps, quick)
    trainset = load_images("fashion_mnist", "train", data_dir)
    testset = load_images("fashion_mnist", "test", data_dir, limit=settings["test_limit"])
    device = resolve_device("auto")
    k, draws, seed = settings["iwbo_k"], settings["draws"], config.train.seed
    out.mkdir(parents=True, exist_ok=True)

    # DenseFlow ---------------------------------------------------------------------------------
    run = out / "denseflow"

    def train_denseflow() -> dict[str, Any]:
        resume = run if any((run / "checkpoints").glob("step_*.pt")) else None
        summary = train(config, run, data_dir, resume=resume, progress=progress)
        model, _ = ckpt.load_model(run / "final.pt", device)
        tic = time.perf_counter()
        elbo = evaluate_images(model, testset.images, 100, seed=seed, progress=progress)
        iwbo = evaluate_images(model, testset.images, 25, k, 8, seed=seed, progress=progress)
        return {
            "elbo_bpd": elbo["bpd"],
            "iwbo_bpd": iwbo["bpd"],
            "train_seconds": logged_train_seconds(run, config.train),
            "eval_seconds": time.perf_counter() - tic,
            "images_seen": summary["images_seen"],
        }

    dense = _once(out / "denseflow.json", config.to_dict(), train_denseflow)
    model, _, batchnorm = open_model(run / "final.pt", device)
    z = torch.cat(
        [
            model.sample(100, generator=stream(seed, "sample", i, device=device), quantize=False)
            for i in range(0, draws, 100)
        ]
    )[:draws].cpu()
    dense |= {"params": sum(p.numel() for p in model.parameters()), **sample_health(z)}
    dense["batchnorm"] = batchnorm
    save_grid(quantized(z[:64]), out / "samples_denseflow_t1.0.png")
    log(f"denseflow: {to_json(dense)}")

    # normflows Glow ----------------------------------------------------------------------------
    architecture = {n: settings["glow"][n] for n in ("L", "K", "hidden_channels")}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        glow = glow_model(config.model.image_shape, **architecture).to(device)

    def train_glow_arm() -> dict[str, Any]:
        glow_run = train_glow(
            glow, trainset.images, steps, settings["batch_size"], settings["glow"], seed, progress
        )
        glow.eval()
        tic = time.perf_counter()
        figures = {**evaluate_glow(glow, testset.images, k, seed), **glow_run}
        torch.save(glow.state_dict(), out / "glow.pt")
        return figures | {"eval_seconds": time.perf_counter() - tic}

    identity = {"glow": settings["glow"], "steps": steps, "batch_size": settings["batch_size"]}
    peer = _once(out / "glow.json", identity, train_glow_arm)
    glow.load_state_dict(torch.load(out / "glow.pt", map_location=device, weights_only=True))
    glow.eval()
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        zg = torch.cat([glow.sample(100, temperature=1.0)[0] for _ in range(0, draws, 100)])
        zg = zg[:draws].cpu()
    peer |= {"params": sum(p.numel() for p in glow.parameters()), **sample_health(zg)}
    save_grid(quantized(zg[:64]), out / "samples_glow_t1.0.png")
    log(f"glow: {to_json(peer)}")

    results = {
        "command": {"quick": quick, **{n: settings[n] for n in ("images", "iwbo_k", "draws")}},
        "machine": _machine(),
        "data": {"train": trainset.source, "test": testset.source},
        "denseflow": {"config": config.to_dict(), **dense},
        "glow": {"settings": settings["glow"], **peer},
        "steps": steps,
        "images_seen": dense["images_seen"],
    }
    (out / "results.json").write_text(to_json(results, indent=1) + "\n")
    (out / "results.md").write_text(markdown_table(results))
    return results


def markdown_table(results: dict[str, Any]) -> str:
    """``results.md``: one row per model."""
    k, n = results["command"]["iwbo_k"], results["command"]["draws"]
    lines = [
        f"| model | parameters | test ELBO bpd | test IWBO-{k} bpd | broken samples (T=1, {n}) "
        "| broken values | values clamped | train minutes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, label in (("denseflow", "DenseFlow (ours)"), ("glow", "normflows Glow")):
        r = results[name]
        lines.append(
            f"| {label} | {r['params']:,} | {r['elbo_bpd']:.4f} | {r['iwbo_bpd']:.4f} "
            f"| {100 * r['broken_share']:.1f} % | {100 * r['broken_values']:.3f} % "
            f"| {100 * r['clamped_values']:.2f} % | {r['train_seconds'] / 60:.1f} |"
        )
    return "\n".join(lines) + "\n"
