"""The CPU stand-in for CUDA graphs (tests/graph_tape.py) keeps a CUDA graph's rules: what the
rehearsals in tests/test_graph.py prove rests on these."""

from __future__ import annotations

import pytest
import torch

from denseflow import model as model_module
from denseflow.transforms import glow as glow_module

from . import graph_tape
from .graph_tape import CaptureError, TapeGraph, capture


def test_a_replay_reruns_the_capture_on_its_memory_with_its_python_values():
    """A replay reads the captured tensors' current values, but a Python number read during the
    capture keeps its capture-time value, and a tensor the code would make anew is the
    capture's: the mistakes a stand-in that calls the Python code again would hide."""
    x, step_size = torch.ones(3), torch.full((), 0.5)
    state = {"scale": 2.0}

    def fn():
        return x * state["scale"] + step_size, torch.full((), state["scale"], device=x.device)

    graph = TapeGraph()
    with capture(graph):
        out, made = fn()
    assert out.isnan().all() and made.isnan()  # a capture computes nothing
    x.copy_(torch.tensor([1.0, 2.0, 3.0]))
    step_size.fill_(10.0)
    state["scale"] = 100.0  # frozen in the graph
    graph.replay()
    assert torch.equal(out, torch.tensor([12.0, 14.0, 16.0])) and made.item() == 2.0
    assert graph.replays == 1


def test_a_capture_changes_nothing_and_each_replay_applies_it_once():
    """Tensors written during the capture are as before it (views of them included); each
    replay writes them once more; replays leave autograd's version counters alone."""
    p = torch.arange(6.0).requires_grad_()
    buffer = torch.zeros(2, 3)
    graph = TapeGraph()
    with capture(graph), torch.no_grad():
        p.add_(1)
        buffer[0].add_(p[:3])
        buffer.mul_(2)
    assert torch.equal(p.detach(), torch.arange(6.0)) and not buffer.any()
    versions = p._version, buffer._version
    graph.replay()
    graph.replay()
    assert torch.equal(p.detach(), torch.arange(6.0) + 2)
    # first replay: row 0 = 2*(1..3); second: 2*(2*(1..3) + (2..4))
    assert torch.equal(buffer[0], torch.tensor([8.0, 14.0, 20.0])) and not buffer[1].any()
    assert (p._version, buffer._version) == versions


def test_forward_and_backward_replayed_with_new_inputs_equal_eager():
    """A captured forward and backward pass (gradients made during the capture, as a graph's
    first backward makes them) replayed on new inputs gives autograd's gradients bitwise."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3, padding=1), torch.nn.ReLU())
    twin = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3, padding=1), torch.nn.ReLU())
    twin.load_state_dict(net.state_dict())
    x = torch.randn(3, 2, 5, 5)
    graph = TapeGraph()
    with capture(graph):
        loss = net(x).square().mean()
        loss.backward()
    for seed in (1, 2):
        x.copy_(torch.randn(3, 2, 5, 5, generator=torch.Generator().manual_seed(seed)))
        graph.replay()
        twin.zero_grad(set_to_none=True)
        want = twin(x).square().mean()
        want.backward()
        assert torch.equal(loss, want)
        for p, q in zip(net.parameters(), twin.parameters(), strict=True):
            assert torch.equal(p.grad, q.grad)


def test_an_operator_that_may_return_a_view_is_replayed_when_it_copied():
    """Under inference mode ``to`` reaches the recorder whole (an operator that may alias its
    input); a conversion that copied is replayed, one that returned its input is not needed."""
    x = torch.zeros(2, dtype=torch.int64)
    graph = TapeGraph()
    with torch.inference_mode(), capture(graph):
        y = x.to(torch.float32) * 2
        z = y.to(torch.float32) + 1
    x.copy_(torch.tensor([3, 4]))
    with torch.inference_mode():
        graph.replay()
    assert torch.equal(y, torch.tensor([6.0, 8.0])) and torch.equal(z, torch.tensor([7.0, 9.0]))


@pytest.mark.parametrize(
    "body, words",
    [
        (lambda t: t.sum().item(), "reads a device value"),
        (lambda t: bool(t.sum() > 0), "reads a device value"),
        (lambda t: torch.nonzero(t), "reads a device value"),
        (lambda t: torch.equal(t, t), "reads a device value"),
        (
            lambda t: torch.linalg.inv(torch.eye(2, device=t.device) + t[:4].view(2, 2)),
            "reads a device value",
        ),
        (lambda t: torch.randn(3, generator=torch.Generator()), "random draw"),
        (lambda t: t.clone().normal_(), "random draw"),
        (lambda t: t + torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], device=t.device), "host data"),
        (lambda t: t.mul_(torch.full((), 2.0)), "without a device"),
        (lambda t: t + torch.zeros(5), "without a device"),
    ],
    ids=["item", "bool", "nonzero", "equal", "inv", "randn", "normal_", "tensor", "full", "zeros"],
)
def test_a_capture_fails_where_a_cuda_capture_fails(body, words):
    """What a CUDA capture cannot hold raises there, as the real capture does."""
    t = torch.ones(5)
    with pytest.raises(CaptureError, match=words), capture(TapeGraph()):
        t.mul_(3)  # undone: the failed capture launched nothing
        body(t)
    assert not graph_tape.is_capturing() and torch.equal(t, torch.ones(5))


def test_install_answers_the_packages_capture_question(monkeypatch):
    """``capturing`` (what the model asks before reading image values on the host, what the 1x1
    convolutions ask before caching an inverse) is True inside a capture, False outside."""
    made = graph_tape.install(monkeypatch.setattr)
    t = torch.zeros(1)
    graph = torch.cuda.CUDAGraph()
    assert made == [graph] and not model_module.capturing(t)
    with torch.cuda.graph(graph):
        inside = model_module.capturing(t), glow_module.capturing(t)
    assert inside == (True, True) and not glow_module.capturing(t)
