"""Official DenseFlow-74-10: layout, parameter count, safe flag loading, full-size numerics."""

from __future__ import annotations

import argparse
import json
import pickle
import re

import pytest
import torch

from denseflow import DenseFlow, ModelConfig, convert_official, model_config
from denseflow.checkpoint import CheckpointError
from denseflow.official import config_from_official_args, load_official_args, official_key

from .conftest import LAYOUT_JSON, PARITY_DIRS, needs_fixtures


def test_parameter_count_of_densenet_74_10():
    for name in ("cifar10", "imagenet32", "imagenet64", "celeba64"):
        model = DenseFlow(model_config(name))
        assert sum(p.numel() for p in model.parameters()) == 130_647_294, name


def test_parameter_breakdown_matches_spec():
    """Spec §18.1: per-component parameter counts of the CIFAR configuration."""
    model = DenseFlow(model_config("cifar10"))

    def count(module):
        return sum(p.numel() for p in module.parameters())

    assert count(model.dequantizer) == 2_395_784
    assert [count(b) for b in model.blocks] == [48_061_410, 46_453_404, 33_736_080]
    assert count(model.base) == 616
    nets = [b.units[0][0].coupling.net for b in model.blocks]
    assert [count(n) for n in nets] == [1_569_716, 1_577_892, 1_591_324]
    assert (
        count(nets[0].dense) == 1_559_264
        and count(nets[0].attention) == 4_728
        and count(nets[0].fusion) == 4_800
    )
    noise = [count(c.net) for b in model.blocks for c in b.couplings]
    assert noise == [6_212, 22_772, 80_060, 225_596, 528_500, 563_972, 2_234_996, 5_285_372]


@pytest.mark.skipif(not LAYOUT_JSON.exists(), reason=f"{LAYOUT_JSON} not present")
def test_converter_maps_the_full_official_layout_one_to_one():
    layout = json.loads(LAYOUT_JSON.read_text())
    flags = {
        "block_conf": (6, 4, 1),
        "layers_conf": (5, 6, 20),
        "layer_mid_chnls": (48, 48, 48),
        "growth_rate": 10,
    }
    config = config_from_official_args({**flags, "dataset": "cifar10", "num_bits": 8})
    assert config == model_config("cifar10")
    ours = {k: tuple(v.shape) for k, v in DenseFlow(config).state_dict().items()}
    mapped, dropped = {}, []
    for entry in layout["entries"]:
        key = official_key(entry["key"])
        if key is None:
            dropped.append(entry["key"])
            continue
        assert key not in mapped, f"two official keys map to {key}"
        mapped[key] = tuple(entry["shape"])
    assert mapped == ours
    assert len(mapped) + len(dropped) == layout["num_state_dict_entries"] == 3725
    # the dropped entries are exactly the constant buffers: 74 ActNorm flags, shift, 2 transition
    # holders, the sigmoid temperature and -log 256
    assert sum(".initialized" in k for k in dropped) == 74
    assert sorted(k for k in dropped if ".initialized" not in k) == sorted(
        [
            "transforms.1._shift",
            "transforms.1._scale",
            "transforms.4.dist.buffer",
            "transforms.6.dist.buffer",
            "transforms.0.encoder.transforms.10.temperature",
            "transforms.0.ldj_per_dim",
        ]
    )
    with pytest.raises(CheckpointError, match="no counterpart"):
        official_key(
            "transforms.3.blocks.0.transforms.0.transforms.2.coupling_net.0.dn.transform.9.weight"
        )


class Payload:
    """Would record that it ran if unpickling ever called it."""

    ran = False

    def __reduce__(self):
        return (Payload.mark, ())

    @staticmethod
    def mark():
        Payload.ran = True
        return "pwned"


def test_args_pickle_is_read_safely(tmp_path):
    flags = argparse.Namespace(
        dataset="cifar10",
        num_bits=8,
        block_conf=[2, 2, 1],
        layers_conf=[1, 1, 1],
        layer_mid_chnls=[16, 16, 16],
        growth_rate=4,
        device="cuda",
        parallel=None,
    )
    good = tmp_path / "args.pickle"
    good.write_bytes(pickle.dumps(flags))
    assert load_official_args(good)["block_conf"] == [2, 2, 1]

    evil = tmp_path / "evil.pickle"
    evil.write_bytes(pickle.dumps(argparse.Namespace(dataset="cifar10", hook=Payload())))
    with pytest.raises(ValueError, match="refusing"):
        load_official_args(evil)
    assert not Payload.ran

    # a classic os.system payload, written as raw pickle opcodes
    shell = tmp_path / "shell.pickle"
    marker = tmp_path / "ran"
    shell.write_bytes(b"cos\nsystem\n(V touch " + str(marker).encode() + b"\ntR.")
    with pytest.raises(ValueError, match="refusing os.system"):
        load_official_args(shell)
    assert not marker.exists()


@needs_fixtures
def test_convert_official_from_run_directory_and_pickle(tmp_path):
    fixture = PARITY_DIRS[0]
    run = tmp_path / "run"
    (run / "check").mkdir(parents=True)
    (run / "check" / "checkpoint.pt").symlink_to(fixture / "checkpoint.pt")
    flags = json.loads((fixture / "args.json").read_text())
    (run / "args.pickle").write_bytes(pickle.dumps(argparse.Namespace(**flags)))
    model = convert_official(run)
    assert not model.training
    reference = convert_official(fixture / "checkpoint.pt", flags)
    for (k, a), (_, b) in zip(
        model.state_dict().items(), reference.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), k
    with pytest.raises(ValueError, match="shape"):
        convert_official(fixture / "checkpoint.pt", {**flags, "growth_rate": 6})


def _active_densenet_74_10(std: float, images: int) -> tuple[DenseFlow, torch.Tensor]:
    """DenseFlow-74-10 (CIFAR shape) with every coupling acting, in eval mode, and ``images``
    random CIFAR-shaped images (drawn before the data-init batch, as the measurements were).

    The zero-initialised output layers get weights N(0, std²/fan_in); then ActNorm data init and
    BatchNorm running statistics from one batch, as after the first training steps.
    """
    torch.manual_seed(0)
    model = DenseFlow(model_config("cifar10"))
    x = torch.randint(0, 256, (images, 3, 32, 32))
    batch = torch.randint(0, 256, (8, 3, 32, 32))
    with torch.no_grad():  # make every zero-initialised output layer act
        for name, p in model.named_parameters():
            if re.search(r"out_proj|couplings\.\d+\.net\.out", name):
                p.normal_(0, std / p[0].numel() ** 0.5)
    model.data_init(batch)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in norms:
        m.momentum = 1.0  # running statistics := this batch's
    with torch.no_grad():
        model.train().elbo(batch)
    for m in norms:
        m.momentum = 0.1
    return model.eval(), x


@pytest.mark.slow
def test_densenet_74_10_float32_round_trip_and_float64_elbo():
    """Spec acceptance: two CIFAR-shaped images through the full model, every coupling acting
    (:func:`_active_densenet_74_10` with std 0.25), the float32 path (``exact=False``).

    Measured (torch 2.13 CPU): max error 3.5e-5 here; with 0.5²/fan_in (a random model at 17 bpd)
    it grows to 1.5e-3, most of it through the official attention's iterative pseudo-inverse
    (1.0e-4 with the attention output zeroed) — see docs/paper_map.md, "Numerical health".
    """
    model, x = _active_densenet_74_10(0.25, images=2)
    noise = {"dequant.eta": torch.randn(2, 12, 16, 16)}
    z, _ = model.dequantizer(x, noise=model._noise(noise, None))
    latents = model.encode(x, noise=noise, exact=False)
    assert latents["base"].dtype == torch.float32
    recon = model.decode(latents, quantize=False, exact=False)
    err = (recon - z).abs().max().item()
    assert err <= 1e-4, err
    assert torch.equal(model.decode(latents, exact=False), x)
    with torch.no_grad():
        lp32 = model.elbo(x, noise=noise, generator=torch.Generator().manual_seed(1))
        lp64 = model.to(torch.float64).elbo(
            x, noise=noise, generator=torch.Generator().manual_seed(1)
        )
    assert lp64.dtype == torch.float64 and torch.isfinite(lp64).all()
    gap = (lp32.double() - lp64).abs().max().item()
    print(
        f"float32 round trip {err:.2e}; float32 vs float64 log-likelihood {gap:.2e} nats "
        f"on {lp64.abs().max():.3g}"
    )
    assert gap <= 1e-5 * lp64.abs().max().item(), (
        gap
    )  # relative 1e-5: float32 rounding, not an error


@pytest.mark.slow
def test_densenet_74_10_round_trip_is_exact():
    """``decode(encode(x)) == x`` bit for bit on DenseFlow-74-10 with active couplings
    (:func:`_active_densenet_74_10` with std 0.4, a random model at 13.8 bits/dim), four random
    8-bit images (12,288 pixels), the float32 model's default (float64) encode and decode.

    Measured (torch 2.13 CPU): the float32 path (``exact=False``) misses 18 of these 12,288 pixels
    by one level (16 to 30 per batch of four over five batches; std 0.45: 95 to 115): its round
    trip error reaches 0.04-0.06 of a level, and a pixel whose dequantized value lies closer than
    that to a bin edge comes back on the other side. The float64 round trip error is ~1e-10 of a
    level, and no pixel is that close to an edge.
    """
    model, x = _active_densenet_74_10(0.4, images=4)
    noise = {"dequant.eta": torch.randn(4, 12, 16, 16)}

    def encode(exact: bool) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return model.encode(x, noise, torch.Generator().manual_seed(1), exact=exact)

    float32, exact = encode(False), encode(True)
    assert float32["base"].dtype == torch.float32 and exact["base"].dtype == torch.float64
    misses = int((model.decode(float32, exact=False) != x).sum())
    assert torch.equal(model.decode(exact), x)
    # the same forward pass: the float32 latents are the float64 ones to float32 rounding
    for name, latent in exact.items():
        drift = (float32[name].double() - latent).abs().max().item()
        assert drift <= 1e-3 * latent.abs().max().item(), (name, drift)
    z, _ = model.dequantizer(x, noise=model._noise(noise, None), dtype=torch.float64)
    err = (model.decode(exact, quantize=False) - z).abs().max().item() * 256  # in levels
    print(f"float32 path misses {misses} of {x.numel()} pixels; exact round trip {err:.1e} level")
    assert err <= 1e-6, err
    assert misses > 0  # the float32 path really is inexact on this model (18 measured)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_model_config_presets_and_unknown_name():
    assert model_config("imagenet64").image_shape == (3, 64, 64)
    assert model_config("celeba64") == ModelConfig(image_shape=(3, 64, 64))
    with pytest.raises(ValueError, match="unknown model preset"):
        model_config("svhn")
