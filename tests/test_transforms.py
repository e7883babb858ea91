"""Every step of the flow against first principles, in float64 on tiny shapes.

Bijections: inverse(forward(x)) == x and delta_logp == log|det| of the autograd Jacobian.
Stochastic steps: with the noise fixed they are bijections in (x, noise); their delta_logp is the
log-det of the noise map minus log N(noise), checked the same way, and their left inverse is exact.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.autograd.functional import jacobian

from denseflow.nets.coupling import CouplingNet, GlowCouplingNet
from denseflow.transforms.base import FlowSequence, Noise, std_normal_log_prob
from denseflow.transforms.cross_unit import (
    CrossUnitCoupling,
    InvertibleDenseBlock,
    coupling_net_factory,
)
from denseflow.transforms.dequantization import UniformDequantization, VariationalDequantization
from denseflow.transforms.glow import (
    ActNorm,
    AffineCoupling,
    ChannelSwap,
    Conv1x1,
    Conv1x1LU,
    Sigmoid,
    Unsqueeze,
    glow_step,
)
from denseflow.transforms.transition import Transition

DT = torch.float64


def perturb(module: torch.nn.Module, std: float = 0.1) -> torch.nn.Module:
    """Move every parameter off its initial value (zero-init outputs included), eval mode,
    float64."""
    module = module.to(DT).eval()
    with torch.no_grad():
        for p in module.parameters():
            p.add_(std * torch.randn_like(p))
    return module


def per_sample_logdet(f, x: torch.Tensor) -> torch.Tensor:
    """log|det ∂f(x_b)/∂x_b| for each sample; ``f(v, b)`` maps sample b given as a batch of one."""
    out = []
    for b in range(x.shape[0]):
        jac = jacobian(lambda v, b=b: f(v.view(1, *x.shape[1:]), b).flatten(), x[b].flatten())
        out.append(torch.linalg.slogdet(jac)[1])
    return torch.stack(out)


def tiny_net(channels: int, attention: str = "official", heads: int = 1) -> CouplingNet:
    return CouplingNet(
        (channels + 1) // 2,
        2 * (channels // 2),
        width=4,
        depth=2,
        growth=3,
        attention=attention,
        heads=heads,
    )


def check_bijection(transform, x, context=None):
    transform = transform.to(DT).eval()
    z, ldj = transform(x, context)
    assert ldj.shape == (x.shape[0],)
    torch.testing.assert_close(transform.inverse(z, context), x, rtol=0, atol=1e-10)
    want = per_sample_logdet(
        lambda v, b: transform(v, None if context is None else context[b : b + 1])[0], x
    )
    torch.testing.assert_close(ldj, want, rtol=1e-9, atol=1e-9)


BIJECTIONS = {
    "actnorm": lambda c: ActNorm(c),
    "conv1x1": lambda c: Conv1x1(c),
    "conv1x1_lu": lambda c: Conv1x1LU(c),
    "coupling_official": lambda c: AffineCoupling(tiny_net(c)),
    "coupling_multihead": lambda c: AffineCoupling(tiny_net(c, "multihead", heads=2)),
    "coupling_no_attention": lambda c: AffineCoupling(
        CouplingNet((c + 1) // 2, 2 * (c // 2), width=4, depth=2, growth=3, attention=None)
    ),
    "coupling_glow_net": lambda c: AffineCoupling(
        GlowCouplingNet((c + 1) // 2, 2 * (c // 2), width=6)
    ),
    "swap": lambda c: ChannelSwap(),
    "sigmoid": lambda c: Sigmoid(),
    "unsqueeze": lambda c: Unsqueeze(),
    "glow_step": lambda c: glow_step(c, tiny_net(c)),
    "glow_step_lu": lambda c: glow_step(c, tiny_net(c), conv1x1="lu"),
    "unit": lambda c: FlowSequence([glow_step(c, tiny_net(c)) for _ in range(3)]),
    "dense_block_one_unit": lambda c: InvertibleDenseBlock(
        c, 1, 2, 2, coupling_net_factory(4, 2, 3, "official", 1, 4), "b"
    ),
}


EVEN_ONLY = ("dense_block_one_unit", "unsqueeze")  # built on even widths / multiples of 4


@pytest.mark.parametrize(
    "name, channels", [(n, c) for n in BIJECTIONS for c in (4, 5) if c == 4 or n not in EVEN_ONLY]
)
def test_bijection_inverse_and_logdet(name, channels):
    transform = perturb(BIJECTIONS[name](channels))
    x = torch.randn(3, channels, 4, 4, dtype=DT)
    check_bijection(transform, x)


def test_conditional_coupling_inverse_and_logdet():
    """The dequantizer's coupling: net(concat(x_a, context))."""
    net = CouplingNet(3 + 2, 4, width=4, depth=2, growth=3)
    context = torch.randn(2, 2, 4, 4, dtype=DT)
    check_bijection(perturb(AffineCoupling(net)), torch.randn(2, 5, 4, 4, dtype=DT), context)


def test_zero_initialised_coupling_starts_as_identity():
    coupling = AffineCoupling(CouplingNet(3, 2, width=8, depth=2, growth=4)).to(DT)
    x = torch.randn(2, 5, 8, 8, dtype=DT)
    z, ldj = coupling(x)
    assert torch.equal(z, x) and torch.equal(ldj, torch.zeros(2, dtype=DT))


def test_actnorm_initialize_standardises_its_input():
    x = 3 + 2 * torch.randn(16, 3, 5, 5, dtype=DT)
    actnorm = ActNorm(3).to(DT)
    actnorm.initialize(x)
    z, _ = actnorm(x)
    torch.testing.assert_close(z.mean(dim=(0, 2, 3)), torch.zeros(3, dtype=DT), rtol=0, atol=1e-12)
    torch.testing.assert_close(z.std(dim=(0, 2, 3)), torch.ones(3, dtype=DT), rtol=0, atol=1e-5)


def test_swap_inverse_differs_from_official_only_for_odd_channels():
    swap = ChannelSwap()
    for c in (4, 5):
        x = torch.arange(c, dtype=DT).view(1, c, 1, 1)
        assert torch.equal(swap.inverse(swap(x)[0]), x)


def test_cross_unit_coupling_is_a_bijection_in_noise():
    """Fixed context: η -> ẽ = μ + σ·η; delta = log|∂ẽ/∂η| − log N(η), left inverse drops ẽ."""
    coupling = perturb(
        CrossUnitCoupling(context_channels=3, growth=2, name="blockX.unit1"), std=0.3
    )
    y = torch.randn(2, 4, 4, 4, dtype=DT)
    context = torch.randn(2, 3, 4, 4, dtype=DT)
    eta = torch.randn(2, 2, 4, 4, dtype=DT)
    out, delta = coupling(y, context, Noise({"blockX.unit1.eta": eta}))
    assert torch.equal(out[:, :4], y)
    assert torch.equal(coupling.inverse(out), y)

    def noise_map(v, b):
        return coupling(y[b : b + 1], context[b : b + 1], Noise({"blockX.unit1.eta": v}))[0][:, 4:]

    logdet = per_sample_logdet(noise_map, eta)
    torch.testing.assert_close(delta, logdet - std_normal_log_prob(eta), rtol=1e-10, atol=1e-10)
    # the noise distribution really depends on the context
    _, delta2 = coupling(y, context + 1, Noise({"blockX.unit1.eta": eta}))
    assert not torch.allclose(delta, delta2)


def test_unconditional_cross_unit_noise_ignores_the_context():
    """The ablation's learned Gaussian: same bijection in the noise, but ẽ and its density are the
    same for any context (only the context's batch and spatial size are read)."""
    coupling = perturb(CrossUnitCoupling(3, 2, "blockX.unit1", conditional=False), std=0.3)
    y, eta = torch.randn(2, 4, 4, 4, dtype=DT), torch.randn(2, 2, 4, 4, dtype=DT)
    context = torch.randn(2, 3, 4, 4, dtype=DT)
    out, delta = coupling(y, context, Noise({"blockX.unit1.eta": eta}))
    out2, delta2 = coupling(y, 5 * torch.randn_like(context), Noise({"blockX.unit1.eta": eta}))
    assert torch.equal(out, out2) and torch.equal(delta, delta2)
    assert not torch.allclose(out[:, 4:], eta)  # learned μ, σ act (perturbed off zero)

    def noise_map(v, b):
        return coupling(y[b : b + 1], context[b : b + 1], Noise({"blockX.unit1.eta": v}))[0][:, 4:]

    logdet = per_sample_logdet(noise_map, eta)
    torch.testing.assert_close(delta, logdet - std_normal_log_prob(eta), rtol=1e-10, atol=1e-10)
    assert sum(p.numel() for p in coupling.parameters()) == 2 * 2  # μ and log σ per channel


def test_dense_block_noise_conditioning_and_left_inverse():
    """Unit i's noise sees x_0, y_0 … y_{i-2}; the left inverse recovers the block input."""
    nets = coupling_net_factory(4, 2, 3, "official", 1, 4)
    block = perturb(
        InvertibleDenseBlock(4, units=3, steps=1, growth=2, net_factory=nets, name="block1")
    )
    assert [c.net.conv.in_channels for c in block.couplings] == [4, 4 + 4]
    x = torch.randn(2, 4, 4, 4, dtype=DT)
    noise = {
        "block1.unit1.eta": torch.randn(2, 2, 4, 4, dtype=DT),
        "block1.unit2.eta": torch.randn(2, 2, 4, 4, dtype=DT),
    }
    y, _ = block(x, noise=Noise(noise))
    assert y.shape == (2, 8, 4, 4) and block.out_channels == 8
    torch.testing.assert_close(block.inverse(y), x, rtol=0, atol=1e-10)


def test_transition_scores_the_dropped_half():
    transition = Transition("transition1")
    x = torch.randn(2, 4, 4, 4, dtype=DT)
    kept, delta = transition(x)
    assert kept.shape == (2, 8, 2, 2)
    kept_too, dropped, delta_too = transition.factor_out(x)
    assert torch.equal(kept_too, kept) and torch.equal(delta_too, delta)
    want = (-0.5 * dropped.square() - 0.5 * math.log(2 * math.pi)).sum(dim=(1, 2, 3))
    torch.testing.assert_close(delta, want, rtol=0, atol=1e-12)
    assert torch.equal(transition.inverse(kept, noise=Noise({"transition1.eta": dropped})), x)
    assert torch.equal(Transition.join(kept, dropped), x)


def test_variational_dequantization_bound_terms():
    """η -> u is a bijection given x; delta = −D log 2^bits − log N(η) + log|∂u/∂η|."""
    deq = perturb(
        VariationalDequantization(
            1, num_bits=5, width=4, steps=2, depth=2, growth=3, context_growth=2
        )
    )
    x = torch.randint(0, 32, (2, 1, 4, 4))
    eta = torch.randn(2, 4, 2, 2, dtype=DT)
    z, delta = deq(x, noise=Noise({"dequant.eta": eta}))
    assert torch.equal(deq.inverse(z), x)
    assert ((z * 32 - x) > 0).all() and ((z * 32 - x) < 1).all()

    def u_of(v, b):
        return deq(x[b : b + 1], noise=Noise({"dequant.eta": v}))[0] * 32 - x[b : b + 1]

    logdet = per_sample_logdet(u_of, eta)
    want = -16 * 5 * math.log(2) - std_normal_log_prob(eta) + logdet
    torch.testing.assert_close(delta, want, rtol=1e-10, atol=1e-9)


@pytest.mark.parametrize("bits", [1, 5, 8])
def test_uniform_dequantization_gives_exactly_num_bits(bits):
    """Uniform dequantization + a uniform density on (0,1)^D: exactly num_bits bits/dim."""
    deq = UniformDequantization(bits).to(DT)
    x = torch.randint(0, 2**bits, (3, 2, 4, 4))
    z, delta = deq(x)
    bpd = -delta / (x[0].numel() * math.log(2))
    torch.testing.assert_close(bpd, torch.full((3,), float(bits), dtype=DT), rtol=0, atol=1e-12)
    assert torch.equal(deq.inverse(z), x)


def test_conv1x1_inverse_is_cached_per_dtype_and_parameter_version():
    """Without autograd the inverse is cached, inverted in the dtype asked for (float64 for the
    exact decode of a float32 model), and recomputed after the parameters change in place."""
    for conv in (Conv1x1(5), Conv1x1LU(5)):
        z = torch.randn(2, 5, 3, 3, dtype=DT)
        with torch.no_grad():
            inv64 = torch.linalg.inv(conv.matrix(DT)[0])
            assert inv64.dtype == DT and torch.equal(conv._inverse_matrix(DT), inv64)
            inv32 = conv._inverse_matrix(torch.float32)
            assert inv32.dtype == torch.float32
            assert conv._inverse_matrix(torch.float32) is inv32  # cached
            stale = inv32.clone()
            next(conv.parameters()).mul_(1.5)  # an optimiser step: in place, version bumped
            assert conv._inverse_matrix(torch.float32) is inv32  # recomputed in place
            assert not torch.equal(inv32, stale)
            assert torch.equal(inv32, torch.linalg.inv(conv.matrix(torch.float32)[0]))
            x = conv.inverse(z)
        assert x.dtype == DT
        torch.testing.assert_close(conv(x)[0], z, rtol=1e-12, atol=1e-12)
