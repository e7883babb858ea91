"""The ablation experiment: matched budgets, variants that are what they claim, the whole
pipeline."""

from __future__ import annotations

import json

import pytest
import torch

from denseflow.cli import main
from denseflow.config import RunConfig
from denseflow.experiment import (
    BASE,
    VARIANTS,
    images_seen,
    matched_config,
    num_params,
    run_config,
)
from denseflow.model import DenseFlow
from denseflow.nets.attention import NystromAttention
from denseflow.nets.coupling import GlowCouplingNet, LearnedGaussianNoise, NoiseNet
from denseflow.runlog import logged_train_seconds
from denseflow.transforms.cross_unit import CrossUnitCoupling
from denseflow.transforms.dequantization import UniformDequantization, VariationalDequantization

from .conftest import strict_json


def test_variants_have_parameter_counts_within_5_percent():
    reference = num_params(matched_config("denseflow"))
    assert reference == num_params(BASE) == 470_684
    for name in VARIANTS:
        count = num_params(matched_config(name))
        assert abs(count - reference) / reference <= 0.05, (name, count, reference)


def _modules(name: str, kind: type) -> list:
    return [m for m in DenseFlow(matched_config(name)).modules() if isinstance(m, kind)]


def test_variants_are_what_they_claim():
    # the reference: conditional noise nets, attention in every coupling net, variational
    # dequantization
    assert (
        len(_modules("denseflow", NoiseNet)) == 3
        and len(_modules("denseflow", NystromAttention)) == 10
    )
    assert {m.kind for m in _modules("denseflow_multihead", NystromAttention)} == {"multihead"}
    unconditional = _modules("unconditional_noise", CrossUnitCoupling)
    assert len(unconditional) == 3 and all(
        isinstance(c.net, LearnedGaussianNoise) for c in unconditional
    )
    assert not _modules("unconditional_noise", NoiseNet)
    assert not _modules("no_augmentation", CrossUnitCoupling) and len(
        _modules("no_augmentation", NystromAttention)
    )
    assert (
        not _modules("no_attention", NystromAttention)
        and len(_modules("no_attention", NoiseNet)) == 3
    )
    assert len(_modules("glow", GlowCouplingNet)) == 16 and not _modules("glow", NystromAttention)
    assert not _modules("glow", CrossUnitCoupling) and _modules("glow", UniformDequantization)
    assert not _modules("glow", VariationalDequantization)


@pytest.mark.parametrize("name", ["no_augmentation", "glow"])
def test_without_augmentation_the_width_never_grows(name):
    model = DenseFlow(matched_config(name))
    widths = [4]  # 1 channel squeezed
    for s, block in enumerate(model.blocks):
        widths += [
            unit[0].actnorm.shift.shape[1] for unit in block.units
        ]  # every unit's input width
        widths.append(block.out_channels)
        if s < len(model.transitions):
            widths.append(2 * block.out_channels)  # after the transition's squeeze and split
    assert widths == [4, 4, 4, 8, 8, 8] if name == "glow" else widths == [4, 4, 4, 4, 4, 8, 8, 8, 8]
    latent_dims = sum(c * h * w for c, h, w in model.latent_shapes.values())
    assert latent_dims == 28 * 28  # a bijection of the (dequantized) data: no extra dimensions
    augmented = DenseFlow(matched_config("denseflow"))
    assert sum(c * h * w for c, h, w in augmented.latent_shapes.values()) > 28 * 28


def test_unconditional_noise_does_not_depend_on_the_input():
    """In the whole model, the appended noise channels are the same for different images."""
    torch.manual_seed(0)
    model = DenseFlow(matched_config("unconditional_noise")).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    g = torch.Generator().manual_seed(1)
    noise = {
        name: torch.randn(2, 4, 14, 14, generator=g)
        for name in ("block1.unit1.eta", "block1.unit2.eta")
    }
    seen = {}
    for coupling in model.blocks[0].couplings:
        coupling.register_forward_hook(
            lambda m, args, out: seen.setdefault(m.name, []).append(out[0][:, -4:])
        )
    x1, x2 = torch.randint(0, 256, (2, 2, 1, 28, 28))
    model.elbo(x1, noise=noise)
    model.elbo(x2, noise=noise)
    for name, (a, b) in seen.items():
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_long_runs_keep_checkpoints_to_continue_from():
    """A run of the default 800 steps checkpoints at its end (the configuration the stored runs
    hold); a 300,000-image run every 1,000 steps, so a stop loses at most 1,000 steps."""
    limits = {"train_limit": None, "test_limit": None}
    assert run_config("denseflow", 0, 800, 64, limits).train.checkpoint_every == 800
    assert run_config("glow", 1, 4688, 64, limits).train.checkpoint_every == 1000


def test_images_seen_counts_partial_batches():
    assert images_seen(100, 32, 3) == 96
    assert images_seen(100, 32, 4) == 100  # the epoch's last batch holds 4
    assert images_seen(100, 32, 6) == 164


def test_quick_ablation_runs_end_to_end_and_continues(tmp_path, capsys):
    out = tmp_path / "ablation"
    assert main(["experiment", "ablation", "--quick", "--out", str(out), "--quiet"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert len(results["runs"]) == 2 * len(VARIANTS)
    assert set(results["summary"]) == set(VARIANTS)
    assert {r["images_seen"] for r in results["runs"]} == {48}  # 3 steps of 16 for every run
    for run in results["runs"]:
        assert 0 < run["iwbo_bpd"] < 16 and 0 < run["elbo_bpd"] < 16 and run["iwbo_k"] == 100
        for grid in run["samples"].values():
            assert (out / grid).is_file()
    for row in results["summary"].values():
        assert row["seeds"] == 2 and row["elbo_bpd_std"] > 0
    assert (out / "ablation.png").stat().st_size > 1000
    assert (out / "samples_t0.7.png").stat().st_size > 1000  # every variant's first grid, labelled
    assert "| denseflow |" in (out / "results.md").read_text()
    # a second call keeps every finished run
    capsys.readouterr()
    assert main(["experiment", "ablation", "--quick", "--out", str(out), "--quiet"]) == 0
    assert capsys.readouterr().out.count("done before, kept") == 2 * len(VARIANTS)
    assert json.loads((out / "results.json").read_text())["runs"] == results["runs"]
    # a run stopped after training, before its result: its time is the logged one, not the resumed
    # call's own (which trained nothing)
    run = out / "seed1" / "glow"
    (run / "result.json").unlink()
    capsys.readouterr()
    assert main(["experiment", "ablation", "--quick", "--out", str(out), "--quiet"]) == 0
    rerun = json.loads((run / "result.json").read_text())
    said = f"{rerun['train_seconds'] / 60:.1f} min of training ("  # logged time, then the call's
    assert said in capsys.readouterr().out
    config = RunConfig.from_dict(rerun["config"])
    assert rerun["resumed"] and rerun["train_seconds"] == logged_train_seconds(run, config.train)
    (before,) = [r for r in results["runs"] if (r["variant"], r["seed"]) == ("glow", 1)]
    assert rerun["train_seconds"] > 0.1 * before["train_seconds"] > 0
    assert rerun["elbo_bpd"] == before["elbo_bpd"]
    # kept runs reduced to their result.json: the montage takes the next seed's grid, says which
    # variant has none left, and the call still succeeds
    for seed in (0, 1):
        for grid in (out / f"seed{seed}" / "glow").glob("samples_t*.png"):
            grid.unlink()
    (out / "seed0" / "denseflow" / "samples_t0.7.png").unlink()
    (out / "samples_t0.7.png").unlink()
    capsys.readouterr()
    assert main(["experiment", "ablation", "--quick", "--out", str(out), "--quiet"]) == 0
    assert "no sample grid on disk for glow" in capsys.readouterr().out
    assert (out / "samples_t0.7.png").stat().st_size > 1000
    # a diverged run's NaN figure: null in strict JSON, kept as NaN in the means and the table
    kept = json.loads((run / "result.json").read_text())
    (run / "result.json").write_text(json.dumps(kept | {"elbo_bpd": None}))
    assert main(["experiment", "ablation", "--quick", "--out", str(out), "--quiet"]) == 0

    strict = strict_json((out / "results.json").read_text())
    assert strict["summary"]["glow"]["elbo_bpd"] is None  # the mean of NaN and a number
    assert strict["summary"]["glow"]["elbo_bpd_std"] is None
    assert strict["summary"]["glow"]["iwbo_bpd"] == results["summary"]["glow"]["iwbo_bpd"]
    assert "| glow | 1 | nan |" in (out / "results.md").read_text()


def test_experiment_errors_are_one_line(tmp_path, capsys):
    assert (
        main(
            ["experiment", "ablation", "--quick", "--out", str(tmp_path), "--variants", "glow,nope"]
        )
        == 2
    )
    assert "unknown variant(s) ['nope']" in capsys.readouterr().err
    assert (
        main(
            [
                "experiment",
                "ablation",
                "--out",
                str(tmp_path),
                "--steps",
                "3",
                "--budget-minutes",
                "1",
            ]
        )
        == 2
    )
    assert "not both" in capsys.readouterr().err
    assert main(["experiment", "ablation", "--quick", "--out", str(tmp_path), "--seeds", "0"]) == 2
    assert "seeds must be >= 1" in capsys.readouterr().err


def test_budget_minutes_derives_the_steps_from_a_calibration(tmp_path, monkeypatch):
    from denseflow import experiment

    cost = experiment._calibrate(["glow"], batch_size=4, iwbo_k=2, iwbo_images=2, n_test=4)["glow"]
    assert all(0 < c < 60 for c in cost)  # seconds per step, seconds of evaluation
    # 0.25 min for 1 seed of one variant costing 1 s per step and 5 s of evaluation: 10 steps
    monkeypatch.setattr(
        experiment, "_calibrate", lambda names, *args: {name: (1.0, 5.0) for name in names}
    )
    lines = []
    results = experiment.run_ablation(
        tmp_path,
        quick=True,
        budget_minutes=0.25,
        seeds=1,
        variants=["glow"],
        progress=False,
        log=lines.append,
    )
    assert results["command"]["steps"] == 10 and "calibrated: 10 steps per run" in lines[0]
    assert results["runs"][0]["steps"] == 10 and results["runs"][0]["images_seen"] == 160
