"""BatchNorm recalibration: exact population statistics, deterministic, invisible to training."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.multiprocessing as mp

from denseflow import checkpoint as ckpt
from denseflow.config import load_config
from denseflow.model import DenseFlow
from denseflow.recalibrate import (
    batchnorms,
    describe,
    recalibrate_batchnorm,
    recalibrated,
    recalibration_batches,
)
from denseflow.train import train

from .conftest import gloo_group

CONFIG = load_config("tiny")


def _model(dtype=torch.float32) -> DenseFlow:
    torch.manual_seed(0)
    model = DenseFlow(CONFIG.model).to(dtype)
    with torch.no_grad():
        for p in model.parameters():  # active couplings: BatchNorm inputs depend on the weights
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def _images(n: int = 40) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (n, 1, 28, 28), generator=g, dtype=torch.uint8)


def test_statistics_are_the_population_mean_and_variance_of_the_recorded_inputs():
    model, images = _model(torch.float64), _images()
    layers = batchnorms(model)
    assert layers
    seen = {i: [] for i in range(len(layers))}
    hooks = [
        m.register_forward_pre_hook(lambda m, a, i=i: seen[i].append(a[0].detach().clone()))
        for i, m in enumerate(layers)
    ]
    params = {n: p.clone() for n, p in model.named_parameters()}
    used = recalibrate_batchnorm(model, images, batches=3, batch_size=16, seed=0)
    for h in hooks:
        h.remove()
    assert used == 3  # 16 + 16 + 8 images: uneven batches are weighted by their size
    for i, m in enumerate(layers):
        assert len(seen[i]) == 3
        x = torch.cat([t.transpose(0, 1).flatten(1) for t in seen[i]], dim=1)  # (C, all values)
        torch.testing.assert_close(m.running_mean, x.mean(1), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(m.running_var, x.var(1, unbiased=True), rtol=1e-10, atol=1e-12)
    assert not model.training and all(
        torch.equal(p, params[n]) for n, p in model.named_parameters()
    )


def test_recalibration_is_deterministic_and_the_context_restores_the_statistics():
    a, b, images = _model(), _model(), _images()
    recalibrate_batchnorm(a, images, 2, 16, seed=5)
    recalibrate_batchnorm(b, images, 2, 16, seed=5)
    for x, y in zip(batchnorms(a), batchnorms(b), strict=True):
        assert torch.equal(x.running_mean, y.running_mean) and torch.equal(
            x.running_var, y.running_var
        )
    before = {k: v.clone() for k, v in b.state_dict().items()}
    with recalibrated(b, images, 2, 16, seed=6):
        changed = [not torch.equal(m.running_mean, before[k]) for k, m in _means(b)]
        assert any(changed)
    assert all(torch.equal(v, before[k]) for k, v in b.state_dict().items())


def _means(model):
    names = {m: n for n, m in model.named_modules()}
    return [(f"{names[m]}.running_mean", m) for m in batchnorms(model)]


def test_recalibrated_evaluation_leaves_training_and_resume_bitwise_unchanged(tmp_path):
    """With train.bn_recalibrate the run's checkpoints (weights, optimizer, running averages)
    are bitwise those of a run without it; only what it evaluates and exports differs. An
    interrupted recalibrating run resumes to the same result."""
    plain = train(CONFIG.override(["train.bn_recalibrate=0"]), tmp_path / "plain", progress=False)
    config = CONFIG.override(["train.bn_recalibrate=2"])
    full = train(config, tmp_path / "full", progress=False)
    a, b = ckpt.load(tmp_path / "plain"), ckpt.load(tmp_path / "full")
    assert a["step"] == b["step"] == 8
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert full["test_bpd"] != plain["test_bpd"]
    assert plain["batchnorm"] == ckpt.RUNNING_STATISTICS  # the summary says which statistics
    assert full["batchnorm"] == describe(2, config.train.batch_size, config.train.seed)
    final = ckpt.load(tmp_path / "full" / "final.pt")["model"]
    stale = [k for k in final if "running_mean" in k and torch.equal(final[k], b["model"][k])]
    assert not stale  # the export carries the recalibrated statistics
    run = tmp_path / "stopped"
    train(config, run, progress=False, stop_after=5)
    again = train(config, run, resume=run, progress=False)
    assert again["test_bpd"] == full["test_bpd"]
    resumed = ckpt.load(run / "final.pt")["model"]
    assert all(torch.equal(resumed[k], final[k]) for k in final)


def _worker(rank: int, init: Path, out: Path) -> None:
    with gloo_group(rank, init, 2):
        model = _model()
        recalibrate_batchnorm(model, _images(), 3, 16, seed=2)
        torch.save(
            {k: v for k, v in model.state_dict().items() if "running" in k}, out / f"{rank}.pt"
        )


def test_two_ranks_compute_the_single_process_statistics(tmp_path):
    """Batches 0 and 2 on rank 0, batch 1 on rank 1: both ranks get the single-process values."""
    mp.spawn(_worker, args=(tmp_path / "pg", tmp_path), nprocs=2, join=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = _model()
        recalibrate_batchnorm(model, _images(), 3, 16, seed=2)
    finally:
        torch.set_num_threads(threads)
    single = {k: v for k, v in model.state_dict().items() if "running" in k}
    for rank in range(2):
        got = torch.load(tmp_path / f"{rank}.pt")
        assert all(torch.equal(got[k], single[k]) for k in single), rank


def test_describe_says_the_batches_that_ran():
    """With fewer training images than batches x batch size, the words name the batches that
    ran over all of them (the last one partial), not the batches asked for."""
    assert describe(100, 64, 3) == (
        "recalibrated: population statistics of 100 training batches of 64 (seed 3)"
    )
    assert describe(1, 64, images=64).endswith("of 1 training batch of 64 (seed 0)")
    assert describe(100, 5000, images=64).endswith(
        "of 1 training batch of 64 (all 64 training images) (seed 0)"
    )
    assert describe(100, 128, images=10_000).endswith(
        "of 78 training batches of 128 and 1 of 16 (all 10000 training images) (seed 0)"
    )
    assert describe(2, 128, images=256).endswith("of 2 training batches of 128 (seed 0)")
    assert len(recalibration_batches(torch.zeros(10_000, 1), 100, 128, 0)) == 79
