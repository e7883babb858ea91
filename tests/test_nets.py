"""Conditioner networks: Nyström attention (both kinds), its pseudo-inverse, the DenseBlock."""

from __future__ import annotations

import math

import pytest
import torch

from denseflow.bench import count_ops
from denseflow.nets.attention import NystromAttention, iterative_pinv, segment_means
from denseflow.nets.dense import DenseBlock, concat_conv

DT = torch.float64


def test_iterative_pinv_converges_to_the_inverse():
    a = torch.softmax(torch.randn(3, 4, 4, dtype=DT), dim=-1)
    torch.testing.assert_close(
        iterative_pinv(a, iters=30), torch.linalg.inv(a), rtol=1e-8, atol=1e-8
    )


def test_pinv_scaling_is_per_matrix():
    """One sample's result never depends on the rest of the batch (the official code agrees)."""
    a = torch.softmax(torch.randn(2, 4, 4, dtype=DT), dim=-2)
    big = torch.cat([a, 50 * a[:1]])
    torch.testing.assert_close(iterative_pinv(big)[:2], iterative_pinv(a), rtol=0, atol=0)


def _pinv_start(a: torch.Tensor) -> torch.Tensor:
    """``Z₀ = Aᵀ / (max column |A| sum · max row |A| sum)``, per matrix, written out."""
    abs_a = a.abs()
    col = abs_a.sum(dim=-2).amax(dim=-1, keepdim=True).unsqueeze(-1)
    row = abs_a.sum(dim=-1).amax(dim=-1, keepdim=True).unsqueeze(-1)
    return a.transpose(-1, -2) / (col * row)


def test_pinv_is_the_nystromformer_iteration_in_few_operators():
    """The batched-GEMM form with its written-out backward pass computes
    ``Z ← ¼·Z·(13I − AZ(15I − AZ(7I − AZ)))`` (written out plainly here, differentiated by
    autograd) and its gradient to float64 rounding, for one head and for several, and agrees
    with finite differences; forward and backward it runs 109 operators for 6 iterations (the
    plain form: 192), a proxy for the kernels a GPU launches in each of DenseFlow-74-10's 74
    attentions. Second derivatives (autograd's, through ``create_graph``) agree with finite
    differences too."""
    for shape in ((2, 1, 4, 4), (3, 2, 5, 5)):
        a = torch.softmax(torch.randn(shape, dtype=DT), dim=-2).requires_grad_()
        z = _pinv_start(a)
        eye = torch.eye(shape[-1], dtype=DT)
        for _ in range(6):
            az = a @ z
            z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
        got = iterative_pinv(a)
        torch.testing.assert_close(got, z, rtol=1e-12, atol=1e-12)
        w = torch.randn(shape, dtype=DT)
        (grad,), (want,) = (torch.autograd.grad((t * w).sum(), a) for t in (got, z))
        torch.testing.assert_close(grad, want, rtol=1e-12, atol=1e-12 * want.abs().max().item())
    untied = (torch.rand(2, 1, 4, 4, dtype=DT) + 0.1).requires_grad_()  # amax without ties
    assert torch.autograd.gradcheck(iterative_pinv, (untied,))
    assert torch.autograd.gradgradcheck(iterative_pinv, (untied,))
    a = torch.softmax(torch.randn(2, 1, 4, 4), dim=-1).requires_grad_()
    assert sum(count_ops(lambda: iterative_pinv(a).sum().backward()).values()) == 109


@pytest.mark.parametrize("m", [4, 64])
def test_pinv_forward_is_the_plain_gemms_bit_for_bit(m):
    """The ¼ folded into the last GEMM's scalar changes no bit of the iteration written as
    separate products, sums and a scaling (float32; 4x4 takes the small-matrix kernel on the CPU,
    64x64 the BLAS one)."""
    a = torch.softmax(torch.randn(8, 1, m, m), dim=-2)
    z = _pinv_start(a).reshape(-1, m, m)
    neg_a, eye = -a.reshape(-1, m, m), torch.eye(m)
    for _ in range(6):
        n = torch.bmm(neg_a, z)
        inner = torch.baddbmm(13 * eye, n, torch.baddbmm(15 * eye, n, 7 * eye + n))
        z = torch.bmm(z, inner).mul_(0.25)
    assert torch.equal(iterative_pinv(a), z.reshape(a.shape))


def test_operator_census_names_where_each_operator_comes_from():
    """`count_ops(fn, sources)` counts every operator once, under the innermost module running it
    forward or the autograd node running it backward: a dense layer's forward pass is its
    concatenation, 1x1 convolution and two ReLUs (the 3x3 convolution is its child's); the
    pseudo-inverse's written-out backward pass is 8 GEMMs an iteration."""
    from collections import Counter

    torch.manual_seed(0)
    block = DenseBlock(4, 4, depth=3, growth=2)
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    sources: Counter[str] = Counter()
    counts = count_ops(lambda: block(x).sum().backward(), sources)
    assert sum(sources.values()) == sum(counts.values())
    assert sources["forward DenseLayer"] == 4 * 3 and sources["forward Conv2d"] == 3
    assert sources["backward _ConcatConvBackward"] > 0
    att = NystromAttention(8, "official", landmarks=4)
    h = torch.randn(2, 8, 4, 4, requires_grad=True)
    sources.clear()
    counts = count_ops(lambda: att(h).sum().backward(), sources)
    assert sum(sources.values()) == sum(counts.values())
    assert sources["backward _PinvIterationsBackward"] == 6 * 8
    hooks = (
        torch.nn.modules.module._global_forward_pre_hooks,
        torch.nn.modules.module._global_forward_hooks,
    )
    assert not any(hooks)  # the census removed its module hooks


def test_segment_means_are_one_reduction_when_the_groups_are_equal():
    x = torch.randn(2, 3, 12, 5, dtype=DT, requires_grad=True)
    groups = torch.stack([part.mean(dim=-2) for part in x.tensor_split(4, dim=-2)], dim=-2)
    torch.testing.assert_close(segment_means(x, 4), groups, rtol=1e-15, atol=1e-15)
    assert sum(count_ops(lambda: segment_means(x, 4).sum().backward()).values()) <= 4


def test_segment_means_handle_uneven_groups():
    x = torch.arange(10, dtype=DT).view(1, 10, 1)
    assert segment_means(x, 4).flatten().tolist() == [1.0, 4.0, 6.5, 8.5]  # groups 3, 3, 2, 2


def exact_attention(att: NystromAttention, h: torch.Tensor) -> torch.Tensor:
    """Softmax attention per pixel and head, with the residual on V and the output conv."""
    b, _, height, width = h.shape
    e, heads = att.embed, att.heads
    q, k, v = (
        att.qkv(h)
        .flatten(2)
        .transpose(1, 2)
        .unflatten(-1, (3, heads, e // heads))
        .permute(2, 0, 3, 1, 4)
    )
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(e // heads), dim=-1)
    o = weights @ v + v
    return att.out(o.permute(0, 1, 3, 2).reshape(b, e, height, width))


def test_multihead_attention_with_all_tokens_as_landmarks_is_exact_attention():
    att = NystromAttention(8, kind="multihead", heads=2, landmarks=16, pinv_iters=60).to(DT)
    h = torch.randn(2, 8, 4, 4, dtype=DT)
    torch.testing.assert_close(att(h), exact_attention(att, h), rtol=1e-6, atol=1e-6)


def test_official_attention_is_per_sample_and_differs_from_per_pixel():
    """Same weights, same input: the memory-reinterpreted tokens give another result than
    per-pixel tokens; each sample's output is independent of the rest of the batch."""
    att = NystromAttention(8, kind="official").to(DT)
    pixel = NystromAttention(8, kind="multihead", heads=1).to(DT)
    pixel.load_state_dict(att.state_dict())
    h = torch.randn(3, 8, 4, 4, dtype=DT)
    assert not torch.allclose(att(h), pixel(h), atol=1e-3)
    torch.testing.assert_close(att(h)[1:2], att(h[1:2]), rtol=0, atol=1e-14)


def test_dense_block_widths_and_residual():
    block = DenseBlock(5, 5, depth=3, growth=4, residual=True).to(DT)
    assert [layer.conv1.in_channels for layer in block.layers] == [5, 9, 13]
    assert block.gate.conv.in_channels == 17 and block.gate.conv.out_channels == 15
    x = torch.randn(2, 5, 3, 3, dtype=DT)
    with torch.no_grad():
        block.gate.conv.weight.zero_()
        block.gate.conv.bias.zero_()
    assert torch.equal(block(x), x)  # α + β·σ(γ) = 0 -> residual only


def test_concat_conv_gradients_equal_the_plain_concatenation():
    torch.manual_seed(0)
    block = DenseBlock(3, 4, depth=3, growth=2).to(DT)
    x = torch.randn(2, 3, 5, 5, dtype=DT, requires_grad=True)
    block(x).square().sum().backward()
    fast = [x.grad.clone()] + [p.grad.clone() for p in block.parameters()]

    def plain(h):
        for layer in block.layers:
            h = torch.cat([h, torch.relu(layer.conv3(torch.relu(layer.conv1(h))))], dim=1)
        a, b, g = block.gate.conv(h).chunk(3, dim=1)
        return a + b * torch.sigmoid(g)

    x.grad = None
    block.zero_grad()
    plain(x).square().sum().backward()
    slow = [x.grad] + [p.grad for p in block.parameters()]
    for a, b in zip(fast, slow, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def _per_piece(block: DenseBlock, x: torch.Tensor) -> torch.Tensor:
    """The block's forward pass with concat-convs that return every piece's gradient (autograd
    adds them up per piece)."""
    pieces = [x]
    for layer in block.layers:
        pieces.append(torch.relu_(layer.conv3(torch.relu_(concat_conv(pieces, layer.conv1)))))
    a, b, g = concat_conv(pieces, block.gate.conv).chunk(3, dim=1)
    return x + a + b * torch.sigmoid(g) if block.residual else a + b * torch.sigmoid(g)


def _concatenated(block: DenseBlock, x: torch.Tensor) -> torch.Tensor:
    """The block's forward pass as the official code writes it: each layer's input the previous
    one's with the new feature map concatenated."""
    h = x
    for layer in block.layers:
        h = torch.cat([h, torch.relu(layer.conv3(torch.relu(layer.conv1(h))))], dim=1)
    a, b, g = block.gate.conv(h).chunk(3, dim=1)
    return x + a + b * torch.sigmoid(g) if block.residual else a + b * torch.sigmoid(g)


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_block_shared_gradient_is_autograds_sum_bit_for_bit(residual, dtype):
    """The concat-convs' shared gradient buffer gives every gradient bit for bit as autograd's
    per-piece sums (float32, and bf16 under autocast with a float32 input), also when the graph
    is run backward twice and when the input needs no gradient; in float32 without a residual
    also the official code's growing concatenations bit for bit. 2d - 1 additions instead of
    d(d+1)/2."""
    torch.manual_seed(1)
    depth = 5
    block = DenseBlock(6, 6, depth=depth, growth=3, residual=residual)
    x0, w = torch.randn(3, 6, 4, 4), torch.randn(3, 6, 4, 4)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)

    def grads(forward, x_grad=True, twice=False):
        x = (x0 * 1).requires_grad_(x_grad)  # a non-leaf when it needs a gradient
        leaves = [*block.parameters(), *([x] if x_grad else [])]
        with autocast:
            out = forward(block, x)
        first = torch.autograd.grad((out.float() * w).sum(), leaves, retain_graph=twice)
        if twice:
            again = torch.autograd.grad((out.float() * w).sum(), leaves)
            for a, b in zip(first, again, strict=True):
                assert torch.equal(a, b)
        return first

    for x_grad in (True, False):
        shared = grads(DenseBlock.forward, x_grad, twice=True)
        references = [grads(_per_piece, x_grad)]
        if dtype == torch.float32 and not residual:
            references.append(grads(_concatenated, x_grad))
        for reference in references:
            assert len(shared) == len(reference)
            for a, b in zip(shared, reference, strict=True):
                assert a.dtype == b.dtype and torch.equal(a, b)
    x = x0.clone().requires_grad_()
    leaves = [x, *block.parameters()]
    counts = count_ops(lambda: torch.autograd.grad(block(x).sum(), leaves))
    reference = count_ops(lambda: torch.autograd.grad(_per_piece(block, x).sum(), leaves))
    additions = lambda c: c["add"] + c["add_"]  # noqa: E731
    assert additions(reference) - additions(counts) == depth * (depth + 1) // 2 - (2 * depth - 1)


def test_concat_conv_matches_conv_of_the_concatenation_and_refuses_what_it_cannot_do():
    """The memory-efficient concat-conv gives conv(cat(pieces)) and its gradients, and refuses a
    convolution its custom backward does not handle (stride, dilation, groups, uneven padding)."""
    pieces = [torch.randn(2, c, 5, 5, dtype=DT, requires_grad=True) for c in (3, 4)]
    conv = torch.nn.Conv2d(7, 6, 3, padding=1).double()
    want = conv(torch.cat(pieces, 1))
    got = concat_conv(pieces, conv)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    grads = torch.autograd.grad(got.square().sum(), [*pieces, conv.weight])
    wants = torch.autograd.grad(want.square().sum(), [*pieces, conv.weight])
    for g, w in zip(grads, wants, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    for bad in (
        dict(stride=2, padding=1),
        dict(dilation=2, padding=2),
        dict(groups=7, padding=1),
        dict(padding=(1, 0)),
        dict(padding="same"),
    ):
        out_channels = 7 if "groups" in bad else 6
        with pytest.raises(ValueError, match="concat_conv: needs stride 1"):
            concat_conv(pieces, torch.nn.Conv2d(7, out_channels, 3, **bad).double())
