"""The static-buffer training step (denseflow.graph) against the eager one, on the CPU.

On the CPU :class:`GraphedStep` runs the function a GPU captures, eagerly; every comparison here
is bitwise (``torch.equal``): parameters, Adamax state, BatchNorm statistics and losses after
several steps, chunks, channels-last, bf16 networks, gradient clipping, non-finite steps and
whole ``train()`` runs with resume. The CUDA capture itself is rehearsed on the CPU with
stand-ins for ``torch.cuda``'s streams and for its graphs that keep a graph's rules
(tests/graph_tape.py: a replay reruns the operators the capture recorded, on the memory it
recorded, without the Python code; the capture fails where the host would read a device value);
what a GPU does with it is checked by scripts/device_check.sh.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import math
from contextlib import nullcontext

import pytest
import torch
import torch.multiprocessing as mp

from denseflow import checkpoint as ckpt
from denseflow import graph as graph_module
from denseflow import runtime
from denseflow.bench import count_ops
from denseflow.config import load_config
from denseflow.graph import (
    FlatState,
    GraphedInference,
    GraphedStep,
    capture_refusal,
    graphed_step,
    masked_adamax_,
)
from denseflow.model import DenseFlow
from denseflow.seeding import stream
from denseflow.step import train_step
from denseflow.train import train
from denseflow.transforms import glow as glow_module
from denseflow.transforms.base import recorded_draws
from denseflow.transforms.glow import Conv1x1, batched_log_dets, inverse, log_abs_det

from . import graph_tape
from .conftest import REPO, gloo_group

TINY = load_config("tiny")
#: a small 3-channel model unlike the tiny preset: uniform dequantization, multi-head attention,
#: LU 1x1 convolutions, three scales, channels-last
SMALL = load_config("tiny").override(
    [
        "model.image_shape=[3, 16, 16]",
        "model.block_conf=[2, 1, 1]",
        "model.layers_conf=[1, 1, 1]",
        "model.layer_mid_chnls=[8, 8, 8]",
        "model.dequantization=uniform",
        "model.attention=multihead",
        "model.attention_heads=2",
        "model.conv1x1=lu",
        "train.channels_last=true",
    ]
)

#: the tiny preset with the 1x1 log-determinants of each pass batched by size
BATCHED = TINY.override(["train.batched_logdets=true"])


# ---------------------------------------------------------------------- capture-safe linear algebra
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["row-major", "column-major", "batch"])
def test_log_abs_det_is_slogdet_bitwise(dtype, layout):
    """Values and gradients equal slogdet's bit for bit (the same LU of W or Wᵀ, the same solve)
    for the sizes of the paper's 1x1 convolutions, whatever the memory layout (a Conv1x1 weight
    starts column-major, from a QR); plain autograd through lu_factor_ex would give other
    gradients (about 3e-6 relative in float32)."""
    for c in (4, 12, 48, 100):
        for _ in range(4):
            w = torch.randn(3, c, c, dtype=dtype) if layout == "batch" else torch.randn(c, c)
            w = w.to(dtype).mT.contiguous().mT if layout == "column-major" else w.to(dtype)
            a = w.clone(memory_format=torch.preserve_format).requires_grad_()
            b = w.clone(memory_format=torch.preserve_format).requires_grad_()
            reference, ours = torch.linalg.slogdet(a)[1], log_abs_det(b)
            grad = torch.randn(reference.shape, dtype=dtype)
            reference.backward(grad)
            ours.backward(grad)
            assert torch.equal(reference, ours) and torch.equal(a.grad, b.grad)


def test_batched_log_dets_factor_once_per_size_with_the_single_values():
    """``batched_log_dets``: one factorisation per matrix size (its operator count), each
    convolution's log|det W| and gradient the single factorisation's to float64 rounding, and
    nothing left behind after the block."""
    torch.manual_seed(0)
    convs = [Conv1x1(c).double() for c in (4, 12, 4, 30, 12, 4)]
    for conv in convs:  # away from orthogonal, where every log-determinant is about 0
        with torch.no_grad():
            conv.weight.add_(torch.randn_like(conv.weight))
    single = [conv.matrix()[1] for conv in convs]
    grads = torch.autograd.grad(sum(single), [conv.weight for conv in convs])
    with batched_log_dets(convs):
        counts = count_ops(lambda: [conv.matrix()[1] for conv in convs])
        batched = [conv.matrix()[1] for conv in convs]
        again = torch.autograd.grad(sum(batched), [conv.weight for conv in convs])
        assert conv.matrix(torch.float32)[1].dtype == torch.float32  # another dtype: its own
    assert counts["linalg_lu_factor_ex"] == 0  # factored before the pass, three sizes at once

    def enter_and_leave():
        with batched_log_dets(convs):
            pass

    assert count_ops(enter_and_leave)["linalg_lu_factor_ex"] == 3
    for a, b in zip(single, batched, strict=True):
        assert abs(a.item()) > 0.05 and b.item() == pytest.approx(a.item(), rel=1e-13, abs=1e-13)
    for a, b in zip(grads, again, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
    assert all("_pass_log_det" not in conv.__dict__ for conv in convs)


def test_a_model_with_batched_log_dets_scores_as_without():
    """``train.batched_logdets``: the same ELBO and gradients to float rounding, in float64
    to 1e-12, with one factorisation per size instead of one per convolution."""
    torch.manual_seed(0)
    model = DenseFlow(TINY.model).double()
    x = torch.randint(0, 256, (3, *TINY.model.image_shape))
    model.data_init(x, generator=stream(0, "init"))
    model.train()
    values = []
    for batched in (False, True):
        model.set_batched_log_dets(batched)
        model.zero_grad()
        counts = count_ops(lambda: values.append(model(x, generator=stream(0, "noise", 0))))
        values[-1].sum().backward()
        values.append([p.grad.clone() for p in model.parameters()])
        sizes = {m.weight.shape[0] for m in model.modules() if type(m) is Conv1x1}
        convs = sum(type(m) is Conv1x1 for m in model.modules())
        assert counts["linalg_lu_factor_ex"] == (len(sizes) if batched else convs) > 0
    torch.testing.assert_close(values[2], values[0], rtol=1e-12, atol=0)
    for a, b in zip(values[1], values[3], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_inverse_is_inv_bitwise(dtype):
    for c in (3, 12, 48, 100):
        w = torch.randn(c, c, dtype=dtype)
        assert torch.equal(inverse(w), torch.linalg.inv(w))


def test_a_cached_inverse_must_be_forgotten_when_weights_change_behind_autograd():
    """A graph replay writes the weights without bumping autograd's version counter (as ``.data``
    writes do here): the cached W⁻¹ is stale until :meth:`Conv1x1.forget_inverse`, which
    GraphedStep calls after every replay; it is then recomputed into the same tensor (which a
    sampling graph reads)."""
    conv = Conv1x1(6)
    with torch.no_grad():
        first = conv._inverse_matrix(torch.float32)
        before = first.clone()
        conv.weight.data.mul_(2)  # no version bump, like a replay
        assert conv._inverse_matrix(torch.float32) is first and torch.equal(first, before)
        conv.forget_inverse()
        assert conv._inverse_matrix(torch.float32) is first
        assert torch.allclose(first, before / 2)


# ---------------------------------------------------------------------- Adamax, masked
def test_masked_adamax_on_flat_buffers_is_torch_adamax_bitwise(monkeypatch):
    """Several steps on tensors of many sizes and layouts gathered into a FlatState (groups of
    100 elements, so tensors straddle groups): equal to torch.optim.Adamax on the separate
    tensors; with ``keep`` False nothing moves. The tensors stay views of the buffers, in their
    layouts."""
    monkeypatch.setitem(graph_module.GROUP_ELEMENTS, "cpu", 100)
    shapes = [(3,), (17,), (8, 4, 3, 3), (1, 5, 1, 1), (64,), (33, 7)]
    ours = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    ours[2].data = ours[2].data.contiguous(memory_format=torch.channels_last)
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    adamax = torch.optim.Adamax(theirs, lr=2e-3, betas=(0.9, 0.999), eps=1e-8)
    mine = torch.optim.Adamax(ours, lr=2e-3, betas=(0.9, 0.999), eps=1e-8)
    flat = FlatState(ours, torch.float32, torch.device("cpu"))
    flat.adopt_state(mine)
    avgs = [mine.state[p]["exp_avg"] for p in ours]
    infs = [mine.state[p]["exp_inf"] for p in ours]
    for t in range(1, 6):
        grads = [torch.randn_like(p) * 10.0 ** (t - 3) for p in ours]
        for p, q, g in zip(theirs, ours, grads, strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        adamax.step()
        flat.gather_grads(torch.tensor(0.0))
        neg = torch.tensor(-(2e-3 / (1 - 0.9**t)))
        before = [x.clone() for x in (*ours, *avgs, *infs)]
        update = flat.param, flat.grad[:-1], flat.exp_avg, flat.exp_inf
        masked_adamax_(*update, torch.tensor(False), neg, (0.9, 0.999), 1e-8)
        assert all(torch.equal(a, b) for a, b in zip((*ours, *avgs, *infs), before, strict=True))
        masked_adamax_(*update, torch.tensor(True), neg, (0.9, 0.999), 1e-8)
        for i, p in enumerate(theirs):
            state = adamax.state[p]
            assert torch.equal(p.detach(), ours[i]), (t, i)
            assert torch.equal(state["exp_avg"], avgs[i]) and torch.equal(state["exp_inf"], infs[i])
    assert ours[2].is_contiguous(memory_format=torch.channels_last)
    for kind, tensors in (("param", ours), ("exp_avg", avgs), ("exp_inf", infs)):
        buffer = getattr(flat, kind).untyped_storage().data_ptr()
        assert all(t.untyped_storage().data_ptr() == buffer for t in tensors), kind
    assert all(q.grad.untyped_storage().data_ptr() == flat.grad.data_ptr() for q in ours)
    starts = [q.data_ptr() - flat.param.data_ptr() for q in ours]  # aligned as tensors of their own
    assert starts[0] == 0 and all(start % 256 == 0 for start in starts), starts
    covered = torch.zeros(flat.param.numel(), dtype=torch.bool)
    for view in flat.views["param"]:
        covered[view.data_ptr() // 4 - flat.param.data_ptr() // 4 :][: view.numel()] = True
    assert not flat.param[~covered].any()  # the gaps between tensors stay zero


def test_flat_state_adopts_replaced_parameters_and_loaded_state():
    """A parameter whose data was replaced is copied back into the buffer; an Adamax state
    loaded by ``load_state_dict`` (new tensors) is copied into the views, an absent one starts
    at zero."""
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))]
    optimizer = torch.optim.Adamax(params)
    flat = FlatState(params, torch.float32, torch.device("cpu"))
    flat.adopt_state(optimizer)
    replacement = torch.randn(5)
    params[1].data = replacement.clone()
    flat.adopt_parameters()
    assert torch.equal(flat.param[64:69], replacement)
    assert params[1].data_ptr() == flat.views["param"][1].data_ptr()
    saved = {"exp_avg": torch.randn(4, 3), "exp_inf": torch.rand(4, 3), "step": torch.tensor(3.0)}
    optimizer.load_state_dict(
        {"state": {0: saved}, "param_groups": optimizer.state_dict()["param_groups"]}
    )
    flat.adopt_state(optimizer)
    assert torch.equal(flat.exp_avg[:12], saved["exp_avg"].reshape(-1))
    assert torch.equal(flat.exp_inf[:12], saved["exp_inf"].reshape(-1))
    assert not flat.exp_avg[12:].any() and float(optimizer.state[params[1]]["step"]) == 0.0
    assert optimizer.state[params[0]]["exp_avg"] is flat.views["exp_avg"][0]
    # the step counts are the elements of one host tensor: counting a step is one addition
    assert all(optimizer.state[p]["step"] is t for p, t in zip(params, flat.steps, strict=True))
    assert flat.step.tolist() == [3.0, 0.0] and flat.step.device.type == "cpu"
    flat.count_step()
    assert [float(optimizer.state[p]["step"]) for p in params] == [4.0, 1.0]


# ---------------------------------------------------------------------- the step against train_step
def _pair(config, precision: str = "float32"):
    """Two identical models (data-initialised, prepared as train() prepares them) with an Adamax
    each."""
    cfg = dataclasses.replace(config.train, precision=precision)
    torch.manual_seed(0)
    model = runtime.prepare(DenseFlow(config.model), cfg, torch.device("cpu"))
    images = torch.randint(0, 256, (8, *config.model.image_shape))
    model.data_init(images, generator=stream(0, "init"))
    model.train()
    twin = copy.deepcopy(model)
    make = lambda m: torch.optim.Adamax(m.parameters(), lr=1e-3, betas=cfg.betas, eps=cfg.eps)  # noqa: E731
    return (model, make(model)), (twin, make(twin))


def _batch(config, step: int, size: int, chunks: int):
    """The chunks of a step as Batches.chunks gives them: a noise stream per (step, chunk)."""
    generator = torch.Generator().manual_seed(1000 + step)
    x = torch.randint(0, 256, (size, *config.model.image_shape), generator=generator)
    return [(part, stream(0, "noise", step, j)) for j, part in enumerate(x.tensor_split(chunks))]


def _assert_same(eager, graphed, where: str) -> None:
    (m1, o1), (m2, o2) = eager, graphed
    for (name, p), q in zip(m1.named_parameters(), m2.parameters(), strict=True):
        assert torch.equal(p, q), f"{where}: parameter {name}"
        s1, s2 = o1.state.get(p, {}), o2.state.get(q, {})
        assert s1.keys() == s2.keys(), f"{where}: Adamax state keys of {name}"
        for key in s1:
            assert torch.equal(s1[key], s2[key]), f"{where}: Adamax {key} of {name}"
            assert s1[key].dtype == s2[key].dtype and s1[key].device == s2[key].device
    for (name, b), c in zip(m1.named_buffers(), m2.buffers(), strict=True):
        assert torch.equal(b, c), f"{where}: buffer {name}"


@pytest.mark.parametrize(
    "config, chunks, sizes, grad_clip, precision",
    [
        pytest.param(TINY, 1, [8] * 5, 0.0, "float32", id="tiny"),
        pytest.param(TINY, 2, [8, 8, 8, 5, 8], 0.0, "float32", id="tiny-2chunks-partial"),
        pytest.param(TINY, 1, [5, 8, 8, 5, 8, 8], 0.0, "float32", id="tiny-partial-first"),
        pytest.param(TINY, 1, [6] * 4, 0.05, "float32", id="tiny-gradclip"),
        pytest.param(TINY, 2, [6] * 4, 0.0, "bfloat16", id="tiny-bf16"),
        pytest.param(SMALL, 2, [7] * 4, 0.0, "float32", id="small-channels_last"),
        pytest.param(SMALL, 1, [7] * 3, 0.0, "bfloat16", id="small-channels_last-bf16"),
        pytest.param(BATCHED, 2, [6] * 3, 0.0, "float32", id="tiny-batched_logdets"),
    ],
)
@pytest.mark.parametrize("packed", [False, True], ids=["", "packed"])
@pytest.mark.parametrize("captured", [False, True], ids=["static", "captured"])
def test_static_step_equals_train_step_bitwise(
    monkeypatch, config, chunks, sizes, grad_clip, precision, packed, captured
):
    """Step after step (the first one eager and recording, the later ones on static buffers; a
    batch of another size on the eager path): the same losses, parameters, Adamax state
    (exp_avg, exp_inf, step) and BatchNorm statistics as ``train_step``, bit for bit. ``packed``:
    gradients and loss go through the flat buffer of data parallelism and an all-reduce that
    adds an identical second rank, doubling them exactly: ``train_step``'s numbers with half
    the batch size (two real ranks: tests/test_distributed.py). ``captured``: the step is
    captured at the second call of a batch shape and replayed after, with stand-in graphs
    that keep a graph's rules (tests/graph_tape.py)."""
    eager, graphed = _pair(config, precision)
    reduced: list = []
    reduce = _second_rank(reduced) if packed else None
    graphs = graph_tape.install(monkeypatch.setattr) if captured else []
    step = GraphedStep(*graphed, grad_clip=grad_clip, capture=captured, reduce=reduce)
    for t, size in enumerate(sizes):
        lr = 1e-3 * (t + 1) / len(sizes)
        half = size / 2 if packed else None  # divides the loss by size/2: exactly twice as much
        a = train_step(*eager, _batch(config, t, size, chunks), lr, grad_clip, half)
        b = step(_batch(config, t, size, chunks), lr)
        assert torch.equal(a, b) and math.isfinite(b.item()), t
        _assert_same(eager, graphed, f"step {t}")
    assert step._key is not None and step.captured == captured and step.refusal is None
    assert len(graphs) == (1 + packed if captured else 0)  # the step, or its two halves
    # one all-reduce a step; the capture's vote of the ranks
    assert reduced.count("reduce") == (len(sizes) if packed else 0)
    assert reduced.count("agree") == (1 if packed and captured else 0)
    # one buffer for each kind: every gradient (then the loss), parameter and Adamax state
    parameters, flat = list(graphed[0].parameters()), step._flat
    assert flat.grad.numel() == graph_module._offsets(parameters)[-1] + 1 and flat.loss.shape == ()
    for kind, tensors in (
        ("grad", [p.grad for p in parameters]),
        ("param", parameters),
        ("exp_avg", [graphed[1].state[p]["exp_avg"] for p in parameters]),
    ):
        buffer = getattr(flat, kind).untyped_storage().data_ptr()
        for p, t, view in zip(parameters, tensors, flat.views[kind], strict=True):
            assert t.shape == p.shape and t.stride() == p.stride() == view.stride()
            assert t.untyped_storage().data_ptr() == buffer and t.data_ptr() == view.data_ptr()
    assert graphed[1].param_groups[0]["lr"] == eager[1].param_groups[0]["lr"]
    if grad_clip:  # both clipped their gradients to the norm grad_clip
        for model, _ in (eager, graphed):
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            assert torch.nn.utils.get_total_norm(grads).item() == pytest.approx(grad_clip, 1e-4)


@pytest.mark.parametrize("config", [TINY, SMALL], ids=["tiny", "small-channels_last"])
def test_bf16_networks_cast_their_convolution_weights_once_a_step(config, monkeypatch):
    """With bf16 networks the static step casts every network convolution's weight and bias in
    one operator forward and one backward, where autocast casts each tensor once each way: the
    step has exactly 2·(number of those tensors) − 2 fewer casts (the values are the same:
    test_static_step_equals_train_step_bitwise, tiny-bf16)."""
    _, (model, optimizer) = _pair(config, "bfloat16")
    step = GraphedStep(model, optimizer)
    for t in range(2):  # the first step lays the flat buffers out
        step(_batch(config, t, 6, 1), 1e-3)
    casts = lambda: count_ops(lambda: step(_batch(config, 2, 6, 1), 1e-3))["_to_copy"]  # noqa: E731
    once = casts()
    monkeypatch.setattr(step, "_net_weights", nullcontext)
    each = casts()
    weights = [p for m in model.modules() if isinstance(m, torch.nn.Conv2d) for p in m.parameters()]
    assert each - once == 2 * len(weights) - 2 and len(weights) > 20
    assert all(r.net_weights is None for r in model.modules() if hasattr(r, "net_weights"))


def test_each_chunk_needs_a_generator_of_its_own():
    _, graphed = _pair(TINY)
    (x1, g), (x2, _) = _batch(TINY, 0, 6, 2)
    for chunks in ([(x1, g), (x2, g)], [(x1, None)]):
        with pytest.raises(ValueError, match="generator of its own"):
            GraphedStep(*graphed)(chunks, 1e-3)


def test_an_optimizer_over_some_parameters_trains_those_alone():
    """The flat update runs over every gradient: an Adamax over a part of the trainable
    parameters is refused; with the rest frozen, the step is train_step's bitwise and the frozen
    parameters stay as they were."""
    eager, graphed = _pair(TINY)
    part = lambda m: [p for name, p in m.named_parameters() if name.startswith("dequant")]  # noqa: E731
    with pytest.raises(ValueError, match="trainable parameters are not in the optimizer"):
        GraphedStep(graphed[0], torch.optim.Adamax(part(graphed[0]), lr=1e-3))
    pairs = []
    for model, _ in (eager, graphed):
        trained = {id(p) for p in part(model)}
        for p in model.parameters():
            p.requires_grad_(id(p) in trained)
        pairs.append((model, torch.optim.Adamax(part(model), lr=1e-3)))
    frozen = {n: p.clone() for n, p in graphed[0].named_parameters() if not p.requires_grad}
    start = [p.clone() for p in part(graphed[0])]
    step = GraphedStep(*pairs[1])
    for t in range(3):
        train_step(pairs[0][0], pairs[0][1], _batch(TINY, t, 6, 2), 1e-3)
        step(_batch(TINY, t, 6, 2), 1e-3)
    _assert_same(pairs[0], pairs[1], "a part trained")
    kept = [torch.equal(p, frozen[n]) for n, p in graphed[0].named_parameters() if n in frozen]
    assert len(kept) == len(frozen) > 0 and all(kept)
    assert any(not torch.equal(p, q) for p, q in zip(part(graphed[0]), start, strict=True))


def test_a_step_refuses_a_bad_learning_rate_batch_size_or_chunks():
    (model, _), graphed = _pair(TINY)
    step = GraphedStep(*graphed)
    chunks = _batch(TINY, 0, 4, 1)
    x, g = chunks[0]
    before = [p.detach().clone() for p in graphed[0].parameters()]
    for lr in (float("nan"), float("inf"), -1.0, None, "1e-3", True):
        with pytest.raises(ValueError, match=f"lr must be a finite number >= 0, got {lr!r}"):
            step(chunks, lr)
    for size in (-4, 0, 2.5):
        with pytest.raises(ValueError, match=f"batch_size must be a positive integer, got {size}"):
            step(chunks, 1e-3, batch_size=size)
    for bad in ([], x, [x], [(x, 5)], [(x, g, g)]):
        with pytest.raises(TypeError, match=r"chunks must be a non-empty list of \(images, torch"):
            step(bad, 1e-3)
    assert all(torch.equal(p, q) for p, q in zip(graphed[0].parameters(), before, strict=True))
    assert torch.isfinite(step(chunks, 0.0))  # lr 0 is allowed


def test_the_recorded_draws_are_the_models_likelihood_noises_in_order():
    (model, _), _ = _pair(TINY)
    x, generator = _batch(TINY, 0, 4, 1)[0]
    with recorded_draws() as draws:
        model(x, generator=generator)
    likelihood = [n for n in model.noise_names if n not in ("base.eta",) and "transition" not in n]
    assert [name for _, name, _ in draws] == likelihood
    assert all(g is generator for g, _, _ in draws) and draws[0][2][0] == 4
    with recorded_draws() as nothing:
        model(x, noise={name: torch.zeros(shape) for _, name, shape in draws})
    assert nothing == []


@pytest.mark.parametrize("poison", ["loss", "gradient"])
def test_a_non_finite_step_changes_nothing_and_says_so(monkeypatch, poison):
    """Step 3 of 5 is made non-finite (a NaN loss, or a NaN in one gradient): on the static path
    its update is dropped on the device — parameters and Adamax state bitwise as before the step
    — the returned loss reads non-finite, and the run goes on exactly as ``train_step``'s."""
    eager, graphed = _pair(TINY)
    step = GraphedStep(*graphed)
    calls = {"n": 0}
    original = DenseFlow.forward

    def poisoned(self, x, noise=None, generator=None):
        value = original(self, x, noise, generator)
        calls["n"] += 1
        if poison == "loss" and calls["n"] in (5, 6):  # the third step of each model
            return value * float("nan")
        return value

    monkeypatch.setattr(DenseFlow, "forward", poisoned)
    target = [p for p in graphed[0].parameters()][3]
    twin = [p for p in eager[0].parameters()][3]
    for t in range(5):
        if poison == "gradient" and t == 2:
            hooks = [p.register_hook(lambda g: g * float("nan")) for p in (target, twin)]
        before = [p.clone() for p in graphed[0].parameters()]
        state = copy.deepcopy(graphed[1].state_dict()["state"])
        a = train_step(*eager, _batch(TINY, t, 6, 1), 1e-3)
        b = step(_batch(TINY, t, 6, 1), 1e-3)
        if t == 2:
            assert not math.isfinite(a.item()) and not math.isfinite(b.item())
            params = zip(graphed[0].parameters(), before, strict=True)
            assert all(torch.equal(p, q) for p, q in params)
            after = graphed[1].state_dict()["state"]
            assert all(torch.equal(after[i][k], state[i][k]) for i in state for k in state[i]), (
                "Adamax state moved on a dropped step"
            )
            for hook in hooks if poison == "gradient" else []:
                hook.remove()
        else:
            assert torch.equal(a, b)
        _assert_same(eager, graphed, f"step {t}")
    steps = {float(s["step"]) for s in graphed[1].state.values()}
    assert steps == {4.0}  # five steps, one dropped


def test_optimizer_reload_and_resume_in_the_middle():
    """A GraphedStep keeps working after ``optimizer.load_state_dict`` (resume, rollback): from a
    state saved after step 2, steps 3-4 equal the uninterrupted steps."""
    eager, graphed = _pair(TINY)
    step = GraphedStep(*graphed)
    for t in range(2):
        step(_batch(TINY, t, 6, 2), 1e-3)
    saved = copy.deepcopy((graphed[0].state_dict(), graphed[1].state_dict()))
    for t in range(2, 4):
        step(_batch(TINY, t, 6, 2), 1e-3)
    graphed[0].load_state_dict(saved[0])
    graphed[1].load_state_dict(saved[1])
    for t in range(4):
        train_step(*eager, _batch(TINY, t, 6, 2), 1e-3)
    for t in range(2, 4):
        step(_batch(TINY, t, 6, 2), 1e-3)
    _assert_same(eager, graphed, "after reload")


# ---------------------------------------------------------------------- the capture, rehearsed
def test_capture_path_rehearsed_on_the_cpu(monkeypatch):
    """The capture code with CPU stand-ins for streams and graphs: the warm-ups and the capture
    leave parameters, Adamax state and BatchNorm statistics as they were (updates masked,
    statistics restored), replays then give train_step's numbers bitwise at a learning rate
    that changes every step (a value the capture froze would show), a partial batch runs
    eagerly in between, a reloaded optimizer state is copied into the captured tensors, and each
    replay forgets the cached 1x1 inverses."""
    eager, graphed = _pair(TINY)
    messages, seen = [], []
    step = GraphedStep(*graphed, capture=True, say=messages.append)
    graphs = graph_tape.install(monkeypatch.setattr)

    def capture(g, pool=None):
        seen.append(("capture", step.allow.item()))
        return graph_tape.capture(g, pool)

    monkeypatch.setattr(torch.cuda, "graph", capture)
    convs = [m for m in graphed[0].modules() if isinstance(m, Conv1x1)]
    saved = None
    for t, size in enumerate([8, 12, 12, 12, 8, 12, 12]):  # resumed at an epoch's last batch
        with torch.no_grad():  # cache every W⁻¹, as sampling does
            [m._inverse_matrix(torch.float32) for m in convs]
        lr = 1e-3 * (t + 1) / 7
        a = train_step(*eager, _batch(TINY, t, size, 2), lr)
        b = step(_batch(TINY, t, size, 2), lr)
        if t == 2:  # the capture call: captured with updates masked, then replayed
            assert seen == [("capture", False)] and step.captured and step.allow.item()
            assert messages and "captured" in messages[0] and step.capture_seconds is not None
        assert torch.equal(a, b), t
        _assert_same(eager, graphed, f"step {t}")  # the warm-ups left no trace
        replayed = size == 12 and t >= 2
        stale = [m._inverses[torch.float32][0] is None for m in convs]
        assert all(forgotten == replayed for forgotten in stale), t
        if t == 3:
            saved = copy.deepcopy(graphed[1].state_dict())
    assert len(graphs) == 1 and graphs[0].replays == 4
    # the graph reads no Adamax step count: torch keeps them on the host (CPU tensors) on a GPU
    steps = {graphed[1].state[p]["step"].data_ptr() for p in graphed[0].parameters()}
    read = {t.data_ptr() for t in graph_tape.tensors_read(graphs[0])}
    assert read and not steps & read
    index = {id(p): i for i, p in enumerate(graphed[0].parameters())}
    flat = step._flat
    captured = list(zip(flat.params, flat.views["exp_avg"], flat.views["exp_inf"], strict=True))
    graphed[1].load_state_dict(saved)  # back to after step 3: the captured tensors stay
    for p, m, u in captured:
        state = graphed[1].state[p]
        assert state["exp_avg"] is m and state["exp_inf"] is u
        assert torch.equal(m, saved["state"][index[id(p)]]["exp_avg"])
        assert torch.equal(u, saved["state"][index[id(p)]]["exp_inf"])


def _second_rank(events: list):
    """A stand-in all-reduce over two ranks whose gradients and loss equal this one's: the sum
    doubles the buffer (exactly). It notes each call: "agree" for the capture's one-element
    vote, else "reduce"."""

    def reduce(tensor: torch.Tensor) -> None:
        events.append("agree" if tensor.numel() == 1 else "reduce")
        tensor.mul_(2)

    return reduce


def test_capture_in_two_halves_around_the_all_reduce_rehearsed(monkeypatch):
    """With ``reduce`` (data parallelism): the warm-ups make no collective call, the capture
    makes two graphs, the second in the first's memory pool, the ranks agree on the outcome,
    and each step replays the first (forward, backward, packing), reduces the flat buffer
    outside any graph, and replays the second (unpacking, guard, update). The reduce here adds
    an identical second rank, so the loss and gradients are exactly twice this rank's: the
    numbers of ``train_step`` with half the batch size (its loss and gradients exactly double),
    bitwise."""
    eager, graphed = _pair(TINY)
    events: list = []
    step = GraphedStep(*graphed, capture=True, reduce=_second_rank(events))
    halves = graph_tape.install(monkeypatch.setattr, events)
    for t in range(4):
        events.clear()
        a = train_step(*eager, _batch(TINY, t, 12, 2), 1e-3, batch_size=6)
        b = step(_batch(TINY, t, 12, 2), 1e-3)
        assert torch.equal(a, b), t
        _assert_same(eager, graphed, f"step {t}")
        expected = {
            0: ["reduce"],  # eager, recording the draws
            1: [(0, None), (1, ("pool", 0)), "agree", "replay0", "reduce", "replay1"],
        }
        assert events == expected.get(t, ["replay0", "reduce", "replay1"]), t
    assert step.captured and len(halves) == 2


def _capture_vote_worker(rank: int, init, out) -> None:
    """One of two gloo ranks stepping its chunk with ``reduce=all_sum`` and the capture
    rehearsed; rank 1's capture fails."""
    with gloo_group(rank, init, 2):
        _, graphed = _pair(TINY)
        step = GraphedStep(*graphed, capture=True, reduce=graph_module.distributed.all_sum)

        def capture(g, pool=None):
            if rank == 1:
                raise RuntimeError("stand-in capture failure")
            return graph_tape.capture(g, pool)

        graph_tape.install(setattr)  # this worker process's own torch.cuda
        torch.cuda.graph = capture
        for t in range(4):
            step(_batch(TINY, t, 12, 2)[rank : rank + 1], 1e-3, batch_size=12)
        parameters = {n: p.detach().clone() for n, p in graphed[0].named_parameters()}
        result = {"refusal": step.refusal, "captured": step.captured, "parameters": parameters}
        torch.save(result, out / f"vote{rank}.pt")


def test_a_capture_that_fails_on_one_rank_runs_every_rank_eagerly(tmp_path):
    """The ranks vote after the capture: rank 1's failed, so rank 0 drops its graphs too and
    says why; both run the same eager steps, one all-reduce each, and end with the single
    process's parameters, bitwise."""
    mp.spawn(_capture_vote_worker, args=(tmp_path / "pg", tmp_path), nprocs=2, join=True)
    eager, _ = _pair(TINY)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank: the same kernels and summation order
    try:
        for t in range(4):
            train_step(*eager, _batch(TINY, t, 12, 2), 1e-3)
    finally:
        torch.set_num_threads(threads)
    ranks = [torch.load(tmp_path / f"vote{r}.pt") for r in range(2)]
    assert ranks[0]["refusal"] == "capture failed on another rank" and not ranks[0]["captured"]
    assert "stand-in capture failure" in ranks[1]["refusal"] and not ranks[1]["captured"]
    for name, value in eager[0].named_parameters():
        for r in range(2):
            assert torch.equal(ranks[r]["parameters"][name], value), (r, name)


def test_the_device_checks_planted_nan_replay_rehearsed(monkeypatch):
    """scripts/graph_check.py's masked replay (a NaN planted in a noise buffer, one replay),
    run with the graphs' stand-ins: the update is dropped and nothing changes, as the H200
    check expects of a real graph."""
    spec = importlib.util.spec_from_file_location("graph_check", REPO / "scripts/graph_check.py")
    graph_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(graph_check)
    _, graphed = _pair(TINY)
    step = GraphedStep(*graphed, capture=True)
    graph_tape.install(monkeypatch.setattr)
    for t in range(2):  # recorded, then captured and replayed
        step(_batch(TINY, t, 6, 1), 1e-3)
    assert step.captured
    result = graph_check.masked_replay(step, *graphed, _batch(TINY, 2, 6, 1))
    assert result["untouched"] and result["keep_flag"] is False, result


def test_a_failed_capture_says_why_and_runs_eagerly(monkeypatch):
    eager, graphed = _pair(TINY)
    messages = []
    step = GraphedStep(*graphed, capture=True, say=messages.append)
    graph_tape.install(monkeypatch.setattr)

    def broken(g):
        raise RuntimeError("operation not permitted when stream is capturing\nmore")

    monkeypatch.setattr(torch.cuda, "graph", broken)
    for t in range(3):
        assert torch.equal(
            train_step(*eager, _batch(TINY, t, 6, 1), 1e-3), step(_batch(TINY, t, 6, 1), 1e-3)
        )
        _assert_same(eager, graphed, f"step {t}")
    assert not step.captured and "operation not permitted" in step.refusal
    assert isinstance(step.failure, RuntimeError) and step.failure.args[0].endswith("more")
    assert messages == [f"train.cuda_graph: {step.refusal}; the step runs eagerly"]


# ---------------------------------------------------------------------- choice of step, train()
def test_uncapturable_setups_say_why_and_run_train_step():
    cfg = TINY.train
    assert capture_refusal(cfg) is None
    for change, words in (
        ({"cuda_graph": False}, "cuda_graph=false"),
        ({"compile": True}, "train.compile"),
        ({"low_memory": True}, "train.low_memory"),
        ({"monitor_every": 2}, "monitor"),
    ):
        assert words in capture_refusal(dataclasses.replace(cfg, **change))
    (model, optimizer), _ = _pair(TINY)
    parallel = graphed_step(model, optimizer, cfg, torch.device("cpu"), world=2)
    assert parallel.reduce is graph_module.distributed.all_sum  # data parallelism: no DDP
    said = []
    low = dataclasses.replace(cfg, low_memory=True)
    assert graphed_step(model, optimizer, low, torch.device("cuda"), say=said.append) is None
    assert said and "low_memory" in said[0]
    assert isinstance(graphed_step(model, optimizer, cfg, torch.device("cpu")), GraphedStep)


def test_train_runs_are_bitwise_the_same_with_and_without_the_option(tmp_path, monkeypatch):
    """A whole train() run (2 chunks, an epoch's last batch smaller than the others, evaluations,
    BatchNorm recalibration and samples between the steps) gives the same final weights, Adamax
    state, weight average (``train.ema_decay``: evaluated in place of the weights) and test bpd
    with ``train.cuda_graph`` on (the static-buffer step) as off (train_step); stopped after step
    4 and resumed, it gives them too; and with every graph captured and replayed as on a GPU
    (rehearsed), from the start and resumed."""
    base = TINY.override(
        [
            "train.batch_size=24",
            "train.batch_chunks=2",
            "train.num_samples=2",
            "train.ema_decay=0.5",
        ]
    )
    runs, made = {}, []
    for name, extra in (
        ("off", ["train.cuda_graph=false"]),
        ("on", []),
        ("resumed", []),
        ("rehearsed", []),
        ("rehearsed-resumed", []),
    ):
        config = base.override(extra)
        if name.startswith("rehearsed") and not made:
            made = graph_tape.install(monkeypatch.setattr)
            graph_tape.capture_on_cpu(monkeypatch.setattr)
        if name.endswith("resumed"):
            train(config, tmp_path / name, progress=False, stop_after=4)
            runs[name] = train(config, tmp_path / name, resume=tmp_path / name, progress=False)
        else:
            runs[name] = train(config, tmp_path / name, progress=False)
    # per rehearsed run: the step's graph (3 replays; resumed: 2 before the stop, and the resumed
    # part records at step 5 and ends on an epoch's smaller batch) and each epoch's evaluation
    # (two test batches: the first records, the second is captured and replayed)
    assert [g.replays for g in made] == [3, 1, 1, 2, 1, 1]
    final = {n: ckpt.load(tmp_path / n / "checkpoints" / "step_0000006.pt") for n in runs}
    for name in runs.keys() - {"off"}:
        assert runs[name]["test_bpd"] == runs["off"]["test_bpd"], name
        for key, value in final["off"]["model"].items():
            assert torch.equal(final[name]["model"][key], value), (name, key)
        for i, state in final["off"]["optimizer"]["state"].items():
            for key, value in state.items():
                assert torch.equal(final[name]["optimizer"]["state"][i][key], value), (name, key)
        assert final[name]["average"]["count"] == final["off"]["average"]["count"] == 6
        for key, value in final["off"]["average"]["weights"].items():
            assert torch.equal(final[name]["average"]["weights"][key], value), (name, key)


def test_bench_times_the_step_train_runs(tmp_path, monkeypatch):
    """`denseflow bench --what train` times the step train() would run: the GraphedStep (here
    eager, on the CPU) or, with train.cuda_graph=false, train_step; the report says which and
    times the first two calls (the recording step, then the capture on CUDA) apart; with the
    capture rehearsed, the replayed step, profiled."""
    from denseflow.bench import _busy_seconds, bench, format_report

    reports = {}
    for graph in (True, False):
        config = TINY.override([f"train.cuda_graph={str(graph).lower()}"])
        report = bench(config, 4, steps=2, warmup=0, what=("train",), profile=tmp_path / "p")
        reports[graph] = report
        assert reports[graph]["train"]["profile"]["profiled_wall_s"] > 0
        assert "first two calls" in format_report(reports[graph])
    on, off = reports[True]["train"]["step"], reports[False]["train"]["step"]
    assert on["graphed"] and not on["captured"] and on["refusal"] is None
    assert not off["graphed"] and off["refusal"] == "train.cuda_graph=false"
    assert on["first_steps_s"] > 0 and on["capture_s"] is None
    graphs = graph_tape.install(monkeypatch.setattr)
    graph_tape.capture_on_cpu(monkeypatch.setattr)
    report = bench(TINY, 4, steps=2, warmup=1, what=("train",), profile=tmp_path / "p")
    step = report["train"]["step"]
    assert step["captured"] and step["refusal"] is None and 0 < step["capture_s"]
    assert "one CUDA graph, captured in" in format_report(report)
    assert len(graphs) == 1 and graphs[0].replays >= 4  # the capture call, warm-up, 2 timed, 1+
    assert _busy_seconds([(0.0, 2.0), (1.0, 3.0), (5.0, 6.0), (5.5, 5.6)]) == 4e-6


# ---------------------------------------------------------------------- evaluation and sampling
def _eval_model(config) -> DenseFlow:
    """A data-initialised model whose BatchNorm statistics moved (two train-mode passes), in
    eval mode."""
    torch.manual_seed(0)
    model = runtime.prepare(DenseFlow(config.model), config.train, torch.device("cpu"))
    images = torch.randint(0, 256, (8, *config.model.image_shape))
    model.data_init(images, generator=stream(0, "init"))
    with torch.no_grad():
        for i in range(2):
            model.elbo(images, generator=stream(0, "noise", i))
    return model.eval()


def _captures(events: list) -> list:
    """The pools the captures noted in ``events`` were given, in order."""
    return [pool for event in events if isinstance(event, tuple) for pool in event[1:]]


def _sampling_noise(model: DenseFlow, n: int, seed: int) -> dict[str, torch.Tensor]:
    g = stream(seed, "sample")
    return {
        name: torch.randn(n, *shape, generator=g) for name, shape in model.sampling_shapes.items()
    }


@pytest.mark.parametrize("capture", [False, True], ids=["static", "captured"])
@pytest.mark.parametrize("config", [TINY, SMALL], ids=["tiny", "small"])
def test_graphed_inference_gives_the_models_values_bitwise(monkeypatch, config, capture):
    """elbo (batches of one size, one smaller), iwbo (passes of 2, 2 and 1 copies) and sample
    (two temperatures) through GraphedInference equal the model's own calls bit for bit — on
    static buffers with pre-drawn noises, and with the capture rehearsed (stand-ins for streams
    and graphs: a call shape is captured at its second call into one shared pool, replayed
    after)."""
    model = _eval_model(config)
    runner = GraphedInference(model, capture=capture)
    events: list = []
    graphs = graph_tape.install(monkeypatch.setattr, events) if capture else []
    shape = config.model.image_shape
    for i, size in enumerate([6, 6, 6, 4, 6]):
        x = torch.randint(0, 256, (size, *shape), generator=torch.Generator().manual_seed(i))
        want = model.elbo(x, generator=stream(0, "eval", i))
        assert torch.equal(runner.elbo(x, stream(0, "eval", i)), want), i
        want = model.iwbo(x, 5, chunk=2, generator=stream(1, "eval", i))
        assert torch.equal(runner.iwbo(x, 5, chunk=2, generator=stream(1, "eval", i)), want), i
    for i, temperature in enumerate([1.0, 0.7, 1.0, 0.7, 1.0]):
        noise = _sampling_noise(model, 4, i)
        want = model.sample(4, temperature, noise=noise)
        assert torch.equal(runner.sample(4, temperature, noise=noise), want), i
    # captured at their second calls, in this order: iwbo's passes of 12 and 6 images (6 is also
    # elbo's), then of 8 and 4 (the smaller batch), sampling at T=1 and at T=0.7
    assert runner.graphs == (6 if capture else 0) and not runner.refusal
    assert _captures(events) == ([None] + [("pool", 0)] * 5 if capture else [])
    assert [g.replays for g in graphs] == ([7, 7, 1, 1, 2, 1] if capture else [])
    assert capture == (runner.capture_seconds > 0)


def test_graphed_inference_follows_the_model(monkeypatch):
    """Weights changed in place reach the next replay; a replaced parameter makes the call shape
    be captured again; training-mode calls run eagerly (BatchNorm statistics updated as the
    model's own call updates them); a failed capture says why once and runs eagerly."""
    model = _eval_model(TINY)
    said: list[str] = []
    runner = GraphedInference(model, capture=True, say=said.append)
    events: list = []
    graph_tape.install(monkeypatch.setattr, events)
    x = torch.randint(0, 256, (6, *TINY.model.image_shape))
    for i in range(3):
        runner.elbo(x, stream(0, "eval", i))
    assert runner.graphs == 1 and len(_captures(events)) == 1
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.01)
    assert torch.equal(
        runner.elbo(x, stream(0, "eval", 3)), model.elbo(x, generator=stream(0, "eval", 3))
    )
    model.base.loc = torch.nn.Parameter(model.base.loc.detach() + 0.1)
    assert torch.equal(
        runner.elbo(x, stream(0, "eval", 4)), model.elbo(x, generator=stream(0, "eval", 4))
    )
    assert len(_captures(events)) == 2 and runner.graphs == 1
    twin = copy.deepcopy(model).train()
    model.train()
    assert torch.equal(
        runner.elbo(x, stream(0, "eval", 5)), twin.elbo(x, generator=stream(0, "eval", 5))
    )
    for (name, b), c in zip(model.named_buffers(), twin.buffers(), strict=True):
        assert torch.equal(b, c), name
    assert len(_captures(events)) == 2
    model.eval()

    def broken(g, pool=None):
        raise RuntimeError("operation not permitted when stream is capturing\nmore")

    monkeypatch.setattr(torch.cuda, "graph", broken)
    for i in range(3):
        noise = _sampling_noise(model, 3, i)
        assert torch.equal(runner.sample(3, noise=noise), model.sample(3, noise=noise))
    assert "operation not permitted" in runner.refusal and len(said) == 1
    assert isinstance(runner.failure, RuntimeError)
    assert said[0] == f"cuda graph: {runner.refusal}; evaluation and sampling run eagerly"
    with pytest.raises(KeyError, match="base.eta"):
        runner.sample(3, noise={})


def test_a_sampling_replay_reads_the_cached_inverses_brought_up_to_date(monkeypatch):
    """A sampling graph inverts nothing: its capture reads the 1x1 convolutions' cached W⁻¹, and
    before each replay the runner recomputes stale ones in place. With graphs that rerun their
    recorded operators on the recorded memory (tests/graph_tape.py), after weights change behind
    autograd (a training replay, then forget_inverse) and in place (version bumped), the samples
    equal a fresh copy's; without the refresh they would not."""
    model = _eval_model(TINY)
    convs = [m for m in model.modules() if isinstance(m, Conv1x1)]
    runner = GraphedInference(model, capture=True)
    graphs = graph_tape.install(monkeypatch.setattr)
    inverted_while_capturing: list = []
    real_inverse = glow_module.inverse

    def counted_inverse(w):
        if graph_tape.is_capturing():
            inverted_while_capturing.append(tuple(w.shape))
        return real_inverse(w)

    monkeypatch.setattr(glow_module, "inverse", counted_inverse)
    noise = _sampling_noise(model, 3, 0)
    replayed = lambda: runner.sample(3, noise=noise)  # noqa: E731

    runner.sample(3, noise=noise)  # eager; the second call is captured and replayed
    assert torch.equal(replayed(), model.sample(3, noise=noise))
    assert runner.graphs == 1 and graphs[0].replays == 1 and inverted_while_capturing == []
    with torch.no_grad():
        for change in ("behind autograd", "in place"):
            for conv in convs:
                if change == "behind autograd":
                    conv.weight.data.mul_(1.1)
                    conv.forget_inverse()
                else:
                    conv.weight.mul_(0.95)
            fresh = copy.deepcopy(model)
            for conv in fresh.modules():
                if isinstance(conv, Conv1x1):
                    conv.forget_inverse()
            assert torch.equal(replayed(), fresh.sample(3, noise=noise)), change
        monkeypatch.setattr(Conv1x1, "refresh_inverses", lambda self: None)
        for conv in convs:
            conv.weight.mul_(1.05)
        fresh = copy.deepcopy(model)
        for conv in fresh.modules():
            if isinstance(conv, Conv1x1):
                conv.forget_inverse()
        assert not torch.equal(replayed(), fresh.sample(3, noise=noise))  # the test can fail
    assert graphs[0].replays == 4 and inverted_while_capturing == []


def test_evaluate_and_sample_replay_graphs_with_the_same_values(monkeypatch):
    """score_images (ELBO and IWBO, a last partial batch) and sample_seeds through graphs (the
    capture rehearsed) give what they give with cuda_graph=False."""
    from denseflow import evaluate, sample

    model = _eval_model(TINY)
    made: list[GraphedInference] = []

    def graphed(model, cuda_graph=True, say=None):
        made.append(GraphedInference(model, capture=cuda_graph, say=say))
        graph_tape.install(monkeypatch.setattr)
        return made[-1]

    images = torch.randint(0, 256, (22, *TINY.model.image_shape), dtype=torch.uint8)
    eager = {k: evaluate.score_images(model, images, 5, k, 2, progress=False) for k in (None, 3)}
    seeds = list(range(11))
    eager_samples = sample.sample_seeds(model, seeds, 0.8, batch_size=4, cuda_graph=False)
    monkeypatch.setattr(evaluate, "inference", graphed)
    monkeypatch.setattr(sample, "inference", graphed)
    for k in (None, 3):
        assert torch.equal(evaluate.score_images(model, images, 5, k, 2, progress=False), eager[k])
    assert torch.equal(sample.sample_seeds(model, seeds, 0.8, batch_size=4), eager_samples)
    assert [r.graphs for r in made] == [1, 2, 1]  # B=5; passes of 10 and 5; sampling 4


def test_bench_times_the_sampling_and_iwbo_that_the_cli_runs(monkeypatch):
    """`denseflow bench --what sample,iwbo` times what `denseflow sample`/`evaluate` run: on the
    CPU the model's calls; where graphs are made (the capture rehearsed) the replays, with the
    capture and the first two calls reported apart."""
    from denseflow import bench as bench_module

    config = TINY
    plain = bench_module.bench(config, 4, steps=2, warmup=0, what=("sample", "iwbo"), k=4, kbs=2)
    for item in ("sample", "iwbo"):
        assert plain[item]["calls"].keys() == {"graphed", "first_calls_s"}
        assert not plain[item]["calls"]["graphed"] and plain[item]["calls"]["first_calls_s"] > 0

    def graphed(model, cuda_graph=True, say=None):
        runner = GraphedInference(model, capture=cuda_graph, say=say)
        graph_tape.install(monkeypatch.setattr)
        return runner

    monkeypatch.setattr(bench_module, "inference", graphed)
    report = bench_module.bench(config, 4, steps=2, warmup=0, what=("sample", "iwbo"), k=4, kbs=2)
    for item in ("sample", "iwbo"):
        calls = report[item]["calls"]
        assert calls["graphed"] and calls["graphs"] == 1 and calls["refusal"] is None
        assert 0 < calls["capture_s"] < calls["first_calls_s"]
        assert f"{item}: 1 CUDA graph(s), captured in" in bench_module.format_report(report)
