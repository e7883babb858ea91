"""The assembled model: closed-form answers, round trips, bounds, sampling, validation."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from denseflow import ConfigError, DenseFlow, ModelConfig
from denseflow.config import load_config
from denseflow.transforms.dequantization import UniformDequantization
from denseflow.transforms.glow import ActNorm, Conv1x1

DT = torch.float64
TINY = dict(
    block_conf=(2, 2, 1),
    layers_conf=(1, 1, 1),
    layer_mid_chnls=(8, 8, 8),
    growth_rate=2,
    dense_depth=2,
    dense_growth=4,
    dequant_width=8,
    dequant_steps=1,
    dequant_depth=1,
    dequant_growth=4,
    dequant_context_growth=2,
)


def tiny(**overrides) -> DenseFlow:
    return DenseFlow(ModelConfig(**{"image_shape": (3, 16, 16), **TINY, **overrides}))


def perturbed(model: DenseFlow, std: float = 0.05) -> DenseFlow:
    """Every zero-initialised output acts; ActNorm off identity; eval mode."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(std * torch.randn_like(p))
    return model.eval()


def images(model: DenseFlow, n: int = 4) -> torch.Tensor:
    return torch.randint(0, 2**model.config.num_bits, (n, *model.config.image_shape))


def test_gaussian_closed_form_at_init():
    """Uniform dequantization and an initial model (identity couplings, N(0, I) cross-unit noise,
    orthogonal 1x1 convs, identity ActNorm, standard-normal base): the cross-unit noise terms
    cancel against their latents and log p̂(x) = −D log 256 + log N(z − 0.5; 0, I) exactly."""
    model = tiny(dequantization="uniform").to(DT).eval()
    with torch.no_grad():  # orthogonal to float64 precision (the init draws them in float32)
        for m in model.modules():
            if isinstance(m, Conv1x1):
                m.weight.copy_(torch.linalg.qr(m.weight)[0])
    x = images(model)
    eta = torch.randn(x.shape, dtype=DT)
    z = (x + torch.special.ndtr(eta)) / 256
    d = x[0].numel()
    want = (
        -d * math.log(256)
        - 0.5 * (z - 0.5).square().flatten(1).sum(1)
        - d * 0.5 * math.log(2 * math.pi)
    )
    got = model.elbo(x, noise={"dequant.eta": eta})
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(
        model.bits_per_dim(x, noise={"dequant.eta": eta}), -want / (d * math.log(2))
    )


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"attention": "multihead", "attention_heads": 2},
        {"conv1x1": "lu"},
        {"dequantization": "uniform"},
        {"growth_rate": 0},
        {"image_shape": (1, 24, 40)},
        {"image_shape": (3, 8, 8)},
        {"block_conf": (3, 2), "layers_conf": (2, 1), "layer_mid_chnls": (8, 6)},
    ],
    ids=["official", "multihead", "lu", "uniform", "no-noise", "24x40-grey", "8x8", "two-scales"],
)
def test_encode_decode_round_trip(overrides):
    """Any image size whose sides survive the squeezes works; decode inverts encode exactly."""
    model = perturbed(tiny(**overrides).to(DT))
    x = images(model, 3)
    latents = model.encode(x)
    assert set(latents) == set(model.latent_shapes)
    for name, shape in model.latent_shapes.items():
        assert latents[name].shape == (3, *shape)
    assert torch.equal(model.decode(latents), x)
    lp = model.elbo(x)
    assert lp.shape == (3,) and torch.isfinite(lp).all()


def test_decode_recovers_the_dequantized_point():
    model = perturbed(tiny().to(DT))
    x = images(model, 2)
    noise = {"dequant.eta": torch.randn(2, 12, 8, 8, dtype=DT)}
    z, _ = model.dequantizer(x, noise=model._noise(noise, None))
    torch.testing.assert_close(
        model.decode(model.encode(x, noise=noise), quantize=False), z, rtol=0, atol=1e-12
    )


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"conv1x1": "lu"},
        {"dequantization": "uniform"},
        {"coupling_net": "glow"},
        {"cross_unit": "unconditional"},
    ],
    ids=["official", "lu", "uniform", "glow-nets", "unconditional-noise"],
)
def test_exact_encode_decode_is_a_float64_copy_bit_for_bit(overrides):
    """The default encode/decode of a float32 model compute exactly what a float64 copy of it
    computes (every step casts its parameters up, the networks through functional_call), draw the
    same noises, and leave the model as it was; ``exact=False`` is the float32 path, whose round
    trip need not be exact even on this tiny model (with uniform dequantization, which puts many
    values near bin edges, it missed one of these 2,304 pixels when measured)."""
    model = perturbed(tiny(**overrides))
    twin = copy.deepcopy(model).to(DT)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = images(model, 3)

    def encode(m: DenseFlow, exact: bool) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return m.encode(x, generator=torch.Generator().manual_seed(1), exact=exact)

    latents, want = encode(model, True), encode(twin, False)
    for name in model.latent_shapes:
        assert latents[name].dtype == DT and torch.equal(latents[name], want[name]), name
    z = model.decode(latents, quantize=False)
    assert z.dtype == DT and torch.equal(z, twin.decode(want, quantize=False, exact=False))
    assert torch.equal(model.decode(latents), x)
    float32 = encode(model, False)  # the float32 pass: the same latents to float32 rounding
    for name in model.latent_shapes:
        assert float32[name].dtype == torch.float32
        torch.testing.assert_close(float32[name].double(), latents[name], rtol=0, atol=1e-4)
    for k, v in model.state_dict().items():
        assert v.dtype == before[k].dtype and torch.equal(v, before[k]), k


def test_demo_model_round_trips_exactly():
    """The demo preset's model (Fashion-MNIST shape), weights perturbed: ``decode(encode(x)) == x``
    by default (float64) and on the float32 path, which on this small model misses nothing."""
    model = perturbed(DenseFlow(load_config("demo").model))
    x = images(model, 8)
    assert torch.equal(model.decode(model.encode(x)), x)
    assert torch.equal(model.decode(model.encode(x, exact=False), exact=False), x)


def test_latent_dimensions_add_up():
    """Data dims + cross-unit noise dims = latent dims (spec §3 bookkeeping)."""
    model = tiny()
    c, h, w = model.config.image_shape
    noise_dims = sum(1 * 2 * (h // 2) * (w // 2) for _ in range(1)) + 1 * 2 * (h // 4) * (w // 4)
    latent_dims = sum(math.prod(s) for s in model.latent_shapes.values())
    assert latent_dims == c * h * w + noise_dims


def test_iwbo_is_the_log_mean_exp_of_elbos_and_tightens():
    model = tiny().to(DT)
    x = images(model, 6)
    model.data_init(x)
    model = perturbed(model)
    # the definition, chunk by chunk, with the same generator stream
    got = model.iwbo(x, k=4, chunk=2, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        w = torch.cat([model.elbo(x.repeat(2, 1, 1, 1), generator=g).view(2, 6) for _ in range(2)])
    torch.testing.assert_close(got, torch.logsumexp(w, 0) - math.log(4), rtol=0, atol=0)
    # log-mean-exp >= mean, and the bound grows with k (averaged over images and repeats)
    g = torch.Generator().manual_seed(2)
    elbo = torch.stack([model.elbo(x, generator=g).detach() for _ in range(8)]).mean()
    iw = {
        k: torch.stack([model.iwbo(x, k, chunk=4, generator=g) for _ in range(2)]).mean()
        for k in (8, 32)
    }
    assert iw[8] > elbo and iw[32] > iw[8]
    # a list of k: row j is the bound of the first j of max(k) draws, one run of max(k)
    rows = model.iwbo(x, [1, 2, 4], chunk=2, generator=torch.Generator().manual_seed(1))
    assert rows.shape == (3, 6) and torch.equal(rows[2], got)  # the k=4 call's draws
    torch.testing.assert_close(rows[0], w[0], rtol=0, atol=0)  # one draw: its ELBO
    torch.testing.assert_close(rows[1], torch.logsumexp(w[:2], 0) - math.log(2), rtol=0, atol=0)
    with pytest.raises(ValueError, match="k must be a positive integer, got 0"):
        model.iwbo(x, [0, 3])


def test_data_init_sets_actnorm_and_leaves_batchnorm_and_mode():
    model = tiny().eval()
    x = images(model, 8)
    before = {k: v.clone() for k, v in model.named_buffers()}
    model.data_init(x)
    assert not model.training
    for k, v in model.named_buffers():
        assert torch.equal(v, before[k]), k
    first = model.blocks[0].units[0][0].actnorm
    inputs = []
    hook = first.register_forward_pre_hook(lambda m, a: inputs.append(a[0]))
    model.train()
    model.elbo(x, generator=torch.Generator().manual_seed(0))
    hook.remove()
    # the first ActNorm sees deterministic data (dequantized x) up to the dequantizer noise
    z, _ = first(inputs[0])
    assert z.mean(dim=(0, 2, 3)).abs().max() < 0.05
    assert (z.std(dim=(0, 2, 3)) - 1).abs().max() < 0.05
    assert all(m.log_scale.abs().sum() > 0 for m in model.modules() if isinstance(m, ActNorm))


def test_sampling_is_seeded_and_tempered():
    model = perturbed(tiny())
    a = model.sample(3, generator=torch.Generator().manual_seed(5))
    b = model.sample(3, generator=torch.Generator().manual_seed(5))
    assert a.dtype == torch.int64 and a.shape == (3, 3, 16, 16)
    assert torch.equal(a, b) and a.min() >= 0 and a.max() <= 255
    cold = model.sample(2, temperature=0.0)
    assert torch.equal(cold[0], cold[1])  # T = 0: every draw is the mode
    noise = {
        "base.eta": torch.zeros(2, *model.latent_shapes["base"]),
        "transition1.eta": torch.zeros(2, *model.latent_shapes["transition1"]),
        "transition2.eta": torch.zeros(2, *model.latent_shapes["transition2"]),
    }
    assert torch.equal(model.sample(2, noise=noise), cold)


def test_noise_names_and_errors():
    model = tiny()
    assert model.noise_names == [
        "dequant.eta",
        "block1.unit1.eta",
        "block2.unit1.eta",
        "base.eta",
        "transition2.eta",
        "transition1.eta",
    ]
    x = images(model, 2)
    with pytest.raises(ValueError, match="block9.unit1.eta"):
        model.elbo(x, noise={"block9.unit1.eta": torch.zeros(1)})
    with pytest.raises(ValueError, match="dequant.eta"):
        model.elbo(x, noise={"dequant.eta": torch.zeros(2, 12, 4, 4)})
    with pytest.raises(TypeError, match="integer"):
        model.elbo(x.float())
    with pytest.raises(ValueError, match="0 .. 255"):
        model.elbo(x + 256)
    with pytest.raises(ValueError, match="shape"):
        model.elbo(x[:, :1])
    with pytest.raises(ValueError, match=r"with B >= 1, got \(0, 3, 16, 16\)"):
        model.elbo(x[:0])


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("growth_rate", 3, "growth_rate"),
        ("image_shape", (3, 28, 28), "divisible"),
        ("attention", "full", "attention"),
        ("layers_conf", (1, 1), "layers_conf"),
        ("attention_heads", 3, "attention_heads"),
        ("conv1x1", "qr", "conv1x1"),
    ],
)
def test_config_errors_name_the_field(field, value, match):
    with pytest.raises(ConfigError, match=match):
        ModelConfig(**{field: value})


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("image_shape", (1.7, 8, 8), "image_shape=1.7: expected int, got float"),
        ("image_shape", "abc", "image_shape='abc': expected a list"),
        ("block_conf", (1.5, 1), "block_conf=1.5: expected int, got float"),
        ("block_conf", 5, "block_conf=5: expected a list"),
        ("num_bits", 5.5, "num_bits=5.5: expected int, got float"),
        ("num_bits", True, "num_bits=True: expected int, got bool"),
        ("growth_rate", 2.0, "growth_rate=2.0: expected int, got float"),
        ("growth_rate", "2", "growth_rate='2': expected int, got str"),
        ("dense_growth", None, "dense_growth=None: expected int, got NoneType"),
        ("dense_depth", 1.5, "dense_depth=1.5: expected int, got float"),
        ("attention", 1, "attention=1: expected str, got int"),
    ],
)
def test_config_takes_integers_only_and_names_the_field(field, value, match):
    with pytest.raises(ConfigError, match=f"^{match}$"):
        ModelConfig(**{field: value})


def test_config_lists_become_tuples_and_a_model_needs_a_config():
    cfg = ModelConfig(image_shape=[3, 16, 16], **{**TINY, "block_conf": [2, 2, 1]})
    assert cfg.image_shape == (3, 16, 16) and cfg.block_conf == (2, 2, 1)
    for bad in ({"image_shape": (3, 16, 16)}, "cifar10"):
        with pytest.raises(TypeError, match="config: expected a ModelConfig"):
            DenseFlow(bad)


def test_non_finite_latents_decode_to_pixel_values():
    z = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.5, 1e30, -1e30])
    assert UniformDequantization(8).inverse(z).tolist() == [0, 255, 0, 128, 255, 0]
    torch.manual_seed(0)
    model = perturbed(tiny())
    hot = model.sample(4, temperature=1e20, generator=torch.Generator().manual_seed(0))
    assert hot.dtype == torch.int64 and 0 <= hot.min() and hot.max() <= 255
    latents = model.encode(images(model, 2))
    nan = model.decode({**latents, "base": torch.full_like(latents["base"], float("nan"))})
    assert torch.equal(nan, torch.zeros_like(nan))


def test_counts_and_generators_of_the_wrong_type_are_named():
    torch.manual_seed(0)
    model = perturbed(tiny())
    x = images(model, 2)
    want = model.iwbo(x, k=2, chunk=1, generator=torch.Generator().manual_seed(3))
    for k, chunk in ((np.int64(2), np.int64(1)), (torch.tensor(2), torch.tensor(1))):
        got = model.iwbo(x, k=k, chunk=chunk, generator=torch.Generator().manual_seed(3))
        assert torch.equal(got, want)
    for k in (2.5, None, True, "10", [2, 1.5]):
        with pytest.raises(ValueError, match="^k must be a positive integer"):
            model.iwbo(x, k=k)
    for chunk in (True, 2.5, 0):
        with pytest.raises(ValueError, match=f"^chunk must be a positive integer, got {chunk}"):
            model.iwbo(x, k=2, chunk=chunk)
    with pytest.raises(ValueError, match=r"x: expected shape \(B, 3, 16, 16\)"):
        model.iwbo(x[0], k=2)
    for call in (
        lambda: model.elbo(x, generator=0),
        lambda: model.iwbo(x, k=2, generator=0),
        lambda: model.sample(2, generator=0),
    ):
        with pytest.raises(
            TypeError, match="^generator: expected a torch.Generator or None, got int"
        ):
            call()
    with pytest.raises(ValueError, match="latents: missing"):
        model.decode({"base": model.encode(x)["base"]})
    assert model.sample(np.int64(2)).shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match="n must be a positive integer, got True"):
        model.sample(True)


def test_config_dict_round_trip_and_unknown_key():
    cfg = ModelConfig(**TINY)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="growth"):
        ModelConfig.from_dict({**cfg.to_dict(), "growth": 4})


def test_float64_model_matches_float32_model():
    model = perturbed(tiny())
    x = images(model, 2)
    noise = {
        name: torch.randn(2, *shape)
        for name, shape in [
            ("dequant.eta", (12, 8, 8)),
            ("block1.unit1.eta", (2, 8, 8)),
            ("block2.unit1.eta", (2, 4, 4)),
        ]
    }
    lp32 = model.elbo(x, noise=noise)
    lp64 = model.to(DT).elbo(x, noise=noise)
    assert lp64.dtype == DT
    torch.testing.assert_close(lp32.double(), lp64, rtol=1e-5, atol=0)


def _loss_and_grads(model, x, noise):
    model.zero_grad(set_to_none=True)
    loss = model.bits_per_dim(x, noise=noise).mean()
    loss.backward()
    return loss.detach(), {
        n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
    }


@pytest.mark.parametrize("mode", ["low_memory", "channels_last"])
def test_speed_and_memory_modes_keep_values_and_gradients(mode):
    """Training mode (batch statistics): the same loss, gradients and BatchNorm updates."""
    torch.manual_seed(3)
    reference = perturbed(tiny().to(DT)).train()
    other = tiny().to(DT)
    other.load_state_dict(reference.state_dict())
    other.train()
    if mode == "low_memory":
        other.set_low_memory(True)
    else:
        other = other.to(memory_format=torch.channels_last)
    x = images(reference, 4)
    noise = {
        n: torch.randn(4, *s, dtype=DT)
        for n, s in [
            ("dequant.eta", (12, 8, 8)),
            ("block1.unit1.eta", (2, 8, 8)),
            ("block2.unit1.eta", (2, 4, 4)),
        ]
    }
    loss_a, grads_a = _loss_and_grads(reference, x, noise)
    loss_b, grads_b = _loss_and_grads(other, x, noise)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-12, atol=0)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 50
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-9, atol=1e-12, msg=name)
    for (name, a), (_, b) in zip(reference.named_buffers(), other.named_buffers(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=0, msg=name)  # statistics updated once


def test_elbo_terms_sum_to_the_elbo_and_each_is_its_closed_form():
    """Where the bits go: the summands of the ELBO, with the draws of elbo, add up to it; the bins
    are exactly num_bits bits/dim; the transitions' and the base's terms are the densities of the
    latents encode returns (bitwise); an unconditional cross-unit coupling's term is
    Σ log σ − log N(η) of the drawn η; without augmentation there is no cross-unit term."""
    from denseflow.transforms.base import std_normal_log_prob
    from denseflow.transforms.glow import bounded_log_scale

    torch.manual_seed(0)
    model = perturbed(tiny(cross_unit="unconditional")).to(DT)
    x = images(model, 3)
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    terms = model.elbo_terms(x, generator=g())
    assert (
        list(terms)
        == model.term_names
        == [
            "bins",
            "dequantization",
            "block1.steps",
            "block1.cross_unit",
            "transition1",
            "block2.steps",
            "block2.cross_unit",
            "transition2",
            "block3.steps",
            "base",
        ]
    )
    elbo = model.elbo(x, generator=g())
    torch.testing.assert_close(sum(terms.values()), elbo, rtol=1e-12, atol=0)
    bits = -terms["bins"] / (model.config.num_dims * math.log(2))
    torch.testing.assert_close(bits, torch.full((3,), 8.0, dtype=DT), rtol=1e-15, atol=0)
    latents = model.encode(x, generator=g(), exact=False)
    for t in ("transition1", "transition2"):
        assert torch.equal(terms[t], std_normal_log_prob(latents[t]))
    assert torch.equal(terms["base"], model.base.log_prob(latents["base"]))
    # block1's one cross-unit coupling, its noise given: −log q(ẽ) = Σ log σ − log N(η; 0, I)
    eta = torch.randn(3, 2, 8, 8, dtype=DT)
    terms = model.elbo_terms(x, noise={"block1.unit1.eta": eta}, generator=g())
    net = model.blocks[0].couplings[0].net
    log_sigma = bounded_log_scale(net.scale).expand(3, 2, 8, 8)
    want = log_sigma.flatten(1).sum(1) - std_normal_log_prob(eta)
    torch.testing.assert_close(terms["block1.cross_unit"], want, rtol=1e-14, atol=0)
    plain = tiny(growth_rate=0)
    assert not any("cross_unit" in name for name in plain.term_names)
    assert list(plain.eval().elbo_terms(images(plain, 2))) == plain.term_names
