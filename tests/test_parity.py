"""Parity with the official code: every fixture under ../shared/parity/*/ (FORMAT.md there).

The converted checkpoint, fed the fixture's inputs and named noises, must reproduce the
reference's per-sample log-likelihood, every intermediate we can observe, and the sampled
images, within the fixture's own tolerances, in float32 and in float64.
"""

from __future__ import annotations

import math

import pytest
import torch

from denseflow import convert_official
from denseflow.transforms.base import Noise, std_normal_log_prob

from .conftest import FIXTURES

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _to(tree, device):
    if isinstance(tree, dict):
        return {key: _to(value, device) for key, value in tree.items()}
    return tree.to(device) if isinstance(tree, torch.Tensor) else tree


def _load(fixture, device="cpu"):
    io = _to(torch.load(fixture / "io.pt", weights_only=True), device)
    model = convert_official(fixture / "checkpoint.pt", fixture / "args.json").to(device)
    return io, model


def _capture_likelihood(model, io, dtype):
    """Run the likelihood path with forward hooks; return {fixture name: tensor}."""
    got: dict[str, torch.Tensor] = {}
    hooks = []

    def on(module, name, pick, pre=False):
        if pre:
            hooks.append(
                module.register_forward_pre_hook(lambda m, args: got.__setitem__(name, pick(args)))
            )
        else:
            hooks.append(
                module.register_forward_hook(lambda m, args, out: got.__setitem__(name, pick(out)))
            )

    deq = model.dequantizer
    on(deq.context_net, "dequant.context", lambda o: o)
    on(deq.flow, "dequant.eps", lambda a: a[0], pre=True)
    on(deq.flow, "dequant.u", lambda o: o[0])
    on(deq.flow, "dequant.flow_total", lambda o: o[1])
    for j, step in enumerate(deq.flow.children()):
        on(step, f"dequant.flow{j}.ldj", lambda o: o[1])
    on(deq, "dequant.z", lambda o: o[0])
    on(deq, "dequant.ldj", lambda o: o[1])
    on(model.blocks[0], "squeeze.out", lambda a: a[0], pre=True)
    for s, block in enumerate(model.blocks, start=1):
        on(block, f"block{s}.out", lambda o: o[0])
        on(block, f"block{s}.ldj", lambda o: o[1])
        if s > 1:
            on(block, f"transition{s - 1}.kept", lambda a: a[0], pre=True)
        for i, unit in enumerate(block.units):
            on(unit, f"block{s}.unit{i}.out", lambda o: o[0])
            on(unit, f"block{s}.unit{i}.ldj", lambda o: o[1])
            for j, step in enumerate(unit.children()):
                p = f"block{s}.unit{i}.step{j}"
                for part in ("actnorm", "conv1x1", "coupling"):
                    on(getattr(step, part), f"{p}.{part}.out", lambda o: o[0])
                    on(getattr(step, part), f"{p}.{part}.ldj", lambda o: o[1])
                net = step.coupling.net
                for sub in ("in_proj", "attention", "dense", "fusion"):
                    on(getattr(net, sub), f"{p}.coupling.net.{sub}", lambda o: o)
                on(net, f"{p}.coupling.net.out", lambda o: o)
        for i, coupling in enumerate(block.couplings, start=1):
            p = f"block{s}.unit{i}.noise"
            on(coupling.net, f"{p}.mu", lambda o: o[0])
            on(coupling.net, f"{p}.log_sigma", lambda o: o[1])
            on(coupling, f"{p}.value", lambda o, g=coupling.growth: o[0][:, -g:])
            on(coupling, f"{p}.term", lambda o: o[1])
    noise = {n: io["noise"][n] for n in io["noise_order_likelihood"]}
    try:
        with torch.no_grad():
            log_prob = model.elbo(io["x"], noise=noise)
            latents = model.encode(io["x"], noise=noise, exact=False)  # the model's dtype
    finally:
        for h in hooks:
            h.remove()
    d = io["x"][0].numel()
    got["log_prob"] = log_prob
    got["bpd"] = -log_prob.mean() / (d * math.log(2))
    got["dequant.log_q"] = -got["dequant.ldj"] - d * math.log(256)
    got["dequant.log_prob_eps"] = got["dequant.log_q"] + got.pop("dequant.flow_total")
    got["latent"] = latents["base"]
    got["base.log_prob"] = model.base.log_prob(latents["base"])
    for t in range(1, len(model.blocks)):
        dropped = latents[f"transition{t}"]
        got[f"transition{t}.dropped"] = dropped
        got[f"transition{t}.log_prob"] = std_normal_log_prob(dropped)
    return got


def _capture_sampling(model, io):
    """Invert the flow layer by layer with the fixture's sampling noises."""
    noise = Noise({n: io["noise"][n] for n in io["noise_order_sample"]})
    got = {}
    dtype = model.base.loc.dtype
    with torch.no_grad():
        z = model.base.sample(io["noise"]["base.eta"].to(dtype))
        got["sample.base.z"] = z
        for s in reversed(range(len(model.blocks))):
            block = model.blocks[s]
            for i in reversed(range(len(block.units))):
                z = block.units[i].inverse(z)
                if i > 0:
                    got[f"sample.block{s + 1}.unit{i}.out"] = z
                    z = block.couplings[i - 1].inverse(z)
            got[f"sample.block{s + 1}.out"] = z
            if s > 0:
                z = model.transitions[s - 1].inverse(z, noise=noise)
                got[f"sample.transition{s}.out"] = z
        got["sample.z_pre_quant"] = torch.nn.functional.pixel_shuffle(z, 2) + 0.5
        got["sample.x"] = model.sample(
            io["x"].shape[0], noise={n: io["noise"][n] for n in io["noise_order_sample"]}
        )
    return got


def _compare(got, io, expected, tolerance, skip=()):
    checked = []
    for name, want in expected.items():
        if name in skip or name == "log_prob_ref" or name == "sample.x":
            continue
        assert name in got, f"intermediate {name} not observed"
        err = (got[name].double() - want.double()).abs().max().item()
        assert err <= tolerance[name], (
            f"{name}: max abs error {err:.3g} > tolerance {tolerance[name]:.3g}"
        )
        checked.append(name)
    return checked


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("fixture", FIXTURES)
@pytest.mark.parametrize("device", DEVICES)
def test_parity_with_official_code(device, fixture, dtype, channels_last, monkeypatch):
    if device == "cuda":  # cuDNN's default TF32 convolutions carry 10-bit mantissas: not float32
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    io, model = _load(fixture, device)
    model = model.to(dtype)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    expected = io["expected"] if dtype == torch.float64 else io["expected_f32"]
    tolerance = io["tolerance_f64"] if dtype == torch.float64 else io["tolerance"]
    got = _capture_likelihood(model, io, dtype)
    got.update(_capture_sampling(model, io))
    checked = _compare(got, io, expected, tolerance)
    if dtype == torch.float64:  # every intermediate of the fixture, not only the headline keys
        assert len(checked) >= len(expected) - 2
    # the float32 model against the float64 reference for every key too (the recommended test)
    if dtype == torch.float32:
        _compare(got, io, io["expected"], io["tolerance"])

    # sampled integers: exact, except where the pre-quantisation value sits on a rounding edge
    levels = 256.0
    pre = io["expected"]["sample.z_pre_quant"] * levels
    edge = (pre - pre.round()).abs() <= levels * io["tolerance"]["sample.z_pre_quant"]
    mismatch = got["sample.x"] != io["expected"]["sample.x"]
    assert not (mismatch & ~edge).any(), f"{int((mismatch & ~edge).sum())} sampled pixels differ"
