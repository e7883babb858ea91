"""A CPU stand-in for a CUDA graph that keeps a CUDA graph's rules (issue 12).

A CUDA graph records the kernels its capture launches and a replay reruns exactly those kernels
on exactly that memory: the Python code that launched them does not run again. So a Python
number read during the capture (a learning rate, a step count, a branch taken on the host) is
frozen into the graph, a tensor the code would create anew is the capture's tensor for ever,
and the host cannot read a value mid-graph (the capture fails). A stand-in that replays by
calling the Python function again hides all of this.

:class:`TapeGraph` records every operator the capture runs below autograd (a
``TorchDispatchMode``: forward, backward and optimizer alike), with the very tensors it read and
wrote, and a replay reruns those operators on those tensors, writing each result where the
capture's result lives; views and allocations are not rerun (on a GPU they launch nothing), and
the tensors' version counters are left as they were (a replay bypasses autograd's bookkeeping).
During the capture it raises, as a CUDA capture fails, on what a graph cannot hold:

* the host reading a device value: ``.item()``, ``int(t)``, ``bool(t)`` (all of them
  ``_local_scalar_dense``), ``torch.equal``, operators whose output shape depends on the values
  (``nonzero``, ``unique``, ``masked_select``), the linalg error checks (``info`` read on the
  host);
* a random draw (a graph holds the default generator's draws only, not the run's streams);
* host data entering the graph (``torch.tensor(...)`` inside the capture: its value is frozen
  and on CUDA it is a copy from pageable host memory), and tensors made without a device (on a
  GPU run they would be host tensors, computed once at the capture).

What it cannot model: which tensors made before the capture would live on the host on a GPU
(every tensor here is on the CPU, so an operation on such a tensor inside the capture is
recorded and replayed as if it were a kernel), streams, and the graph's memory pool (every
temporary here keeps its own memory).

``install(set_attribute)`` puts it in place of ``torch.cuda.CUDAGraph`` and ``torch.cuda.graph``
(with stand-ins for the streams around a capture) and returns the list of graphs made;
``rehearse()`` does so for a whole process (the device scripts' rehearsed dry runs).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from denseflow import graph as graph_module
from denseflow.transforms.base import capturing

#: allocations: a graph launches nothing for them
_ALLOCATIONS = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"}

#: operators whose output shape depends on the values, or which read a value on the host
_HOST_READS = {
    "nonzero",
    "nonzero_static",
    "unique",
    "_unique",
    "_unique2",
    "unique_consecutive",
    "unique_dim",
    "masked_select",
    "is_nonzero",
    "equal",
    "allclose",
    "_linalg_check_errors",
    "_assert_async",
    "repeat_interleave",
    "bincount",
}

#: random draws (with or without an explicit generator)
_RANDOM = {
    "normal",
    "normal_",
    "uniform",
    "uniform_",
    "bernoulli",
    "bernoulli_",
    "rand",
    "rand_like",
    "randn",
    "randn_like",
    "randint",
    "randint_like",
    "randperm",
    "random_",
    "exponential_",
    "geometric_",
    "log_normal_",
    "cauchy_",
    "multinomial",
    "native_dropout",
}


#: the default device inside a capture: a tensor made there without a device would be a host
#: tensor on a GPU run (its operations run once, at the capture, their values frozen)
_NO_DEVICE = torch.device("meta")


class CaptureError(RuntimeError):
    """What a CUDA capture would fail on."""


class TapeGraph:
    """One captured graph: the operators of its capture and the tensors they read and wrote."""

    def __init__(self, index: int = 0, events: list | None = None) -> None:
        self.index, self.events = index, events  # events: (index, pool) captures, replays
        self.tape: list[tuple[Any, tuple, dict, list]] = []
        self.replays = 0
        self._touched: tuple[torch.Tensor, ...] = ()
        self._pool: object = ("pool", index)  # the pool given to its capture, else its own

    def pool(self) -> object:
        return self._pool

    def replay(self) -> None:
        """Rerun the recorded operators on the recorded tensors, results written where the
        capture's live; version counters as they were."""
        self.replays += 1
        if self.events is not None:
            self.events.append(f"replay{self.index}")
        with _versions_kept(self._touched), torch.inference_mode():
            for func, args, kwargs, outs in self.tape:
                result, _ = tree_flatten(func(*args, **kwargs))
                for new, old in zip(result, outs, strict=True):
                    if isinstance(old, torch.Tensor) and not _same_memory(new, old):
                        old.copy_(new)


def _tensors(tape: list, outputs: bool) -> Iterator[torch.Tensor]:
    """The tensors the recorded operators take as arguments, and with ``outputs`` make."""
    for _, args, kwargs, outs in tape:
        for t in (*tree_flatten((args, kwargs))[0], *(outs if outputs else ())):
            if isinstance(t, torch.Tensor):
                yield t


def tensors_read(graph: TapeGraph) -> list[torch.Tensor]:
    """The tensors the recorded operators of ``graph`` take as arguments."""
    return list(_tensors(graph.tape, outputs=False))


@contextmanager
def _versions_kept(tensors: tuple[torch.Tensor, ...]) -> Iterator[None]:
    """Writes that autograd does not see: the version counters as they were before."""
    versions = tuple(t._version for t in tensors)
    yield
    torch._C._autograd._unsafe_set_version_counter(tensors, versions)


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.data_ptr() == b.data_ptr()
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.dtype == b.dtype
    )


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


class _Recorder(TorchDispatchMode):
    """Records the capture's operators into ``graph`` and raises on what a capture cannot hold.
    A capture launches nothing: on exit the tensors it wrote that existed before are put back as
    they were, and the float tensors it made are filled with NaN (a graph's memory holds
    nothing meaningful before its first replay)."""

    def __init__(self, graph: TapeGraph) -> None:
        super().__init__()
        self.graph = graph
        self.made: set[int] = set()  # storages the capture allocated
        self.before: list[tuple[torch.Tensor, torch.Tensor]] = []  # (tensor, its old value)
        self.kept: set[tuple] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "profiler":  # record_function's markers: no kernel, not replayed
            return func(*args, **kwargs)
        name = func.overloadpacket.__name__
        where = f"{func} inside a CUDA graph capture"
        if name in _HOST_READS or name.startswith("_local_scalar"):
            raise CaptureError(f"{where}: the host reads a device value")
        if name in _RANDOM:
            raise CaptureError(f"{where}: a random draw")
        if name.startswith("lift_fresh"):
            raise CaptureError(f"{where}: host data enters the graph")
        if kwargs.get("device") == _NO_DEVICE:
            raise CaptureError(f"{where}: a tensor made without a device (on a GPU, a host one)")
        written = self._keep_written(func, args, kwargs)
        read = {_storage(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        out = func(*args, **kwargs)
        outs = tree_flatten(out)[0]
        made = {_storage(t) for t in outs if isinstance(t, torch.Tensor)} - read
        self.made |= made
        # what writes or makes memory is a kernel; a view, a reshape without copy, ``to`` that
        # returned its input, a question about dtypes or shapes launch nothing; nor does an
        # allocation
        if (written or made) and name not in _ALLOCATIONS:
            self.graph.tape.append((func, args, kwargs, outs))
        return out

    def _keep_written(self, func, args: tuple, kwargs: dict) -> bool:
        """The value, before the capture, of each tensor this operator writes that the capture
        did not make (once per tensor); whether it writes any tensor."""
        schema = func._schema.arguments
        given = {a.name: v for a, v in zip(schema, args, strict=False)} | kwargs
        written = False
        for argument in schema:
            if argument.alias_info is None or not argument.alias_info.is_write:
                continue
            value = given.get(argument.name)
            for t in value if isinstance(value, list | tuple) else [value]:
                if not isinstance(t, torch.Tensor):
                    continue
                written = True
                key = (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype)
                if _storage(t) not in self.made and key not in self.kept:
                    self.kept.add(key)
                    self.before.append((t, t.clone()))
        return written

    def undo(self) -> None:
        """The capture's effects taken back (see the class); the graph's tensors noted."""
        tape = self.graph.tape
        tensors = {id(t): t for t in _tensors(tape, outputs=True) if not t.is_inference()}
        self.graph._touched = touched = tuple(tensors.values())
        with _versions_kept(touched), torch.inference_mode():
            for t, old in reversed(self.before):
                t.copy_(old)
            for _, _, _, outs in tape:
                for t in outs:
                    if isinstance(t, torch.Tensor) and _storage(t) in self.made:
                        if t.is_floating_point():
                            t.fill_(float("nan"))


_capturing = [0]  # captures under way


@contextmanager
def capture(graph: TapeGraph, pool: object = None, **_: object) -> Iterator[None]:
    """``torch.cuda.graph``'s stand-in: records what runs inside into ``graph``."""
    if graph.events is not None:
        graph.events.append((graph.index, pool))
    if pool is not None:
        graph._pool = pool
    _capturing[0] += 1
    recorder = _Recorder(graph)
    try:
        with recorder, _NO_DEVICE:  # the default device of tensors made without one
            yield
    finally:  # a failed capture launched nothing either
        _capturing[0] -= 1
        recorder.undo()


def is_capturing() -> bool:
    """Whether a :func:`capture` is under way."""
    return _capturing[0] > 0


def _capturing_now(t: torch.Tensor) -> bool:
    """:func:`denseflow.transforms.base.capturing`'s stand-in: True inside :func:`capture`."""
    return is_capturing()


class _Stream:
    def wait_stream(self, other: object) -> None:
        pass


def install(
    set_attribute: Callable[[object, str, object], None], events: list | None = None
) -> list[TapeGraph]:
    """``TapeGraph`` and :func:`capture` in place of ``torch.cuda.CUDAGraph`` and
    ``torch.cuda.graph``; stand-ins for the streams, synchronisation and cache around a capture
    (no cuSOLVER switch); and the package's question "is a graph being captured?"
    (:func:`denseflow.transforms.base.capturing`, wherever it was imported) answered by
    them (``set_attribute``: ``monkeypatch.setattr``, or ``setattr`` in a spawned process).
    The graphs made go to the list returned, numbered in order; with ``events``, each capture
    notes ``(index, pool)`` there and each replay ``"replay<index>"``."""
    made: list[TapeGraph] = []

    def new_graph() -> TapeGraph:
        made.append(TapeGraph(len(made), events))
        return made[-1]

    set_attribute(torch.cuda, "CUDAGraph", new_graph)
    set_attribute(torch.cuda, "graph", capture)
    set_attribute(torch.cuda, "Stream", lambda device=None: _Stream())
    set_attribute(torch.cuda, "current_stream", lambda device=None: _Stream())
    set_attribute(torch.cuda, "stream", lambda stream: nullcontext())
    set_attribute(torch.cuda, "synchronize", lambda device=None: None)
    set_attribute(torch.cuda, "empty_cache", lambda: None)
    set_attribute(graph_module, "_cusolver", nullcontext)
    for name, module in list(sys.modules.items()):
        if name.split(".")[0] == "denseflow" and getattr(module, "capturing", None) is capturing:
            set_attribute(module, "capturing", _capturing_now)
    return made


def capture_on_cpu(set_attribute: Callable[[object, str, object], None]) -> None:
    """The package's places that capture graphs on CUDA only (the training step of ``train()``
    and ``denseflow bench``; evaluation, sampling and bench's inference) capture on the CPU
    too: with :func:`install`, a whole run rehearses its graphs."""
    from denseflow import bench, evaluate, sample

    real = graph_module.graphed_step

    def graphed_step(*args: Any, **kwargs: Any) -> graph_module.GraphedStep | None:
        step = real(*args, **kwargs)
        if step is not None:
            step.capture = True
        return step

    def inference(model, cuda_graph: bool = True, say=None):
        return graph_module.GraphedInference(model, capture=True, say=say) if cuda_graph else model

    set_attribute(graph_module, "graphed_step", graphed_step)  # train() imports it when called
    set_attribute(bench, "graphed_step", graphed_step)
    for module in (bench, evaluate, sample):
        set_attribute(module, "inference", inference)


def rehearse() -> None:
    """:func:`install` for the rest of this process."""
    install(setattr)
