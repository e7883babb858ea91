"""The training step, evaluation and sampling on static buffers, captured as CUDA graphs on a
GPU (issue 12).

On an H200 the eager DenseFlow-74-10 step is bound by the host issuing about 46,600 kernels one
by one (docs/benchmarks.md). :class:`GraphedStep` computes what :func:`denseflow.step.train_step`
computes — the same chunks, noises, loss, gradients, Adamax update and non-finite guard — in a
form a CUDA graph can hold:

* the chunk images are copied into static buffers, and every named noise the forward pass draws
  is drawn *before* the step, from the chunk's own generator, in the order and shapes the eager
  forward draws them (recorded once, :func:`denseflow.transforms.base.recorded_draws`), into
  static buffers passed as ``noise=``: the same values bit for bit, so seeding, resume and the
  noise streams of :mod:`denseflow.seeding` are untouched, and no generator is used inside the
  graph;
* Adamax is :func:`masked_adamax_`: torch's arithmetic, op for op, with the step size
  ``-lr / (1 - beta1**t)`` computed on the host in float64 as torch does and filled into a 0-dim
  device tensor before each step, run over flat buffers that hold every parameter, gradient and
  Adamax state tensor (:class:`FlatState`): with the gathering of the gradients, the norm and
  the guard, 56 operators for DenseFlow-74-10 instead of three or more per tensor;
* the non-finite guard is decided on the device: the update is kept or dropped element-wise
  with ``torch.where`` (parameters and Adamax state bitwise untouched by a non-finite step), and
  the host reads the flag only after the step, to count Adamax's steps (CPU tensors, as torch
  keeps them) and for the loop's skip and rollback logic;
* with bf16 networks (``train.precision``) their convolution weights are cast from the flat
  buffer once a step, and their gradients back in one kernel (:class:`_NetWeights`), instead of
  one cast per weight each way by autocast: the same values, 6,084 fewer operators;
* the 1x1 convolutions' log-determinants use :func:`denseflow.transforms.glow.log_abs_det`
  (slogdet's own factorisation and gradient without an error check: bitwise slogdet on the CPU).

On the CPU the same step function runs eagerly and gives bitwise the weights, Adamax state and
BatchNorm statistics of ``train_step`` (tests/test_graph.py). On CUDA the step is captured once,
whole — every chunk's forward and backward, the norm, the guard and the update — and replayed.
Under data parallelism (``reduce``) it is captured in two halves, and the gradients and loss,
packed into one flat buffer by the first, are summed over the ranks by one all-reduce run
between the two replays (collectives stay outside the graphs; no DDP).

:class:`GraphedInference` does the same for ``elbo``, ``iwbo`` and ``sample`` in eval mode:
one graph per call shape, the noises drawn before each call into its buffers.

**Not yet run on a GPU.** The capture paths (:meth:`GraphedStep._capture`,
:meth:`GraphedInference._capture`) follow PyTorch's rules for whole-network capture and are
rehearsed on the CPU with a stand-in graph that keeps a graph's rules (tests/graph_tape.py: the
replays rerun the recorded operators on the recorded memory, the capture fails where the host
would read a device value); scripts/device_check.sh holds the check that compares replayed steps
against eager ones on an H200 and times them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import Tensor
from torch.optim.optimizer import _get_scalar_dtype

from . import distributed
from .config import TrainConfig
from .model import DenseFlow, positive_int
from .nets.runner import NetRunner
from .step import backpropagate
from .transforms.base import recorded_draws, standard_normal
from .transforms.glow import Conv1x1

#: elements per group of :func:`masked_adamax_`: on a GPU a bound on its temporaries (3 x 128 MiB
#: in float32) with few launches; on the CPU cache-sized groups (the chain of operations on a group
#: stays in cache)
GROUP_ELEMENTS = {"cuda": 1 << 25, "cpu": 1 << 16}

Chunks = Sequence[tuple[Tensor, torch.Generator]]


@contextmanager
def _cusolver() -> Iterator[None]:
    """cuSOLVER for the 1x1 convolutions' LU factorisations and solves inside the block (torch's
    default for single small matrices already; MAGMA's hybrid LU would work on the host, which
    a graph cannot hold). The process-wide preference is restored on exit."""
    previous = torch.backends.cuda.preferred_linalg_library()
    torch.backends.cuda.preferred_linalg_library("cusolver")
    try:
        yield
    finally:
        torch.backends.cuda.preferred_linalg_library(previous)


def draw_noises(
    order: Sequence[tuple[str, tuple[int, ...]]],
    generator: torch.Generator | None,
    device: torch.device,
) -> dict[str, Tensor]:
    """The standard normals a pass draws fresh, in its order (``(name, shape)``, as
    :func:`~denseflow.transforms.base.recorded_draws` recorded them), drawn before the pass with
    the function :class:`~denseflow.transforms.base.Noise` draws with: the same values."""
    return {name: standard_normal(shape, generator, device) for name, shape in order}


def _failure(err: Exception) -> str:
    """A failed capture in one line: the exception's type and first line."""
    first_line = (str(err).splitlines() or [""])[0]
    return f"capture failed ({type(err).__name__}: {first_line})"


#: entries a view of a flat buffer starts at a multiple of (256 bytes in float32): the parameters'
#: data keeps the alignment of a tensor of its own, which vectorised CPU and GPU kernels rely on
ALIGNMENT = 64


def _offsets(like: Sequence[Tensor]) -> list[int]:
    """Where each tensor of ``like`` starts in a flat buffer (aligned), and its end last."""
    offsets = [0]
    for t in like:
        offsets.append(-(-(offsets[-1] + t.numel()) // ALIGNMENT) * ALIGNMENT)
    return offsets


def _layout(like: Sequence[Tensor]) -> list[tuple[torch.Size, tuple[int, ...], int]]:
    """``(shape, strides, offset)`` of each tensor of ``like`` in a flat buffer: at
    :func:`_offsets`, laid out as that tensor (its dense strides: channels-last stays
    channels-last)."""
    return [
        (t.shape, torch.empty_like(t, device="meta").stride(), offset)
        for t, offset in zip(like, _offsets(like), strict=False)
    ]


def _views(flat: Tensor, layout: Sequence[tuple[torch.Size, tuple[int, ...], int]]) -> list[Tensor]:
    """Views of ``flat`` at the places of :func:`_layout`."""
    return [flat.as_strided(shape, strides, offset) for shape, strides, offset in layout]


class FlatState:
    """The parameters an update touches, their gradients and their Adamax state, each kind in
    one contiguous buffer: a parameter's entries are the same range of :attr:`param`,
    :attr:`grad`, :attr:`exp_avg` and :attr:`exp_inf`, laid out as the parameter and starting
    at a multiple of :data:`ALIGNMENT`. The parameters' data, their ``.grad`` after a step and
    their Adamax state tensors are views of these buffers, so the update is a few kernels over
    whole buffers instead of a few per tensor (3,423 tensors in DenseFlow-74-10). :attr:`grad`
    holds one more entry, :attr:`loss`: one all-reduce sums the gradients and the loss
    together. The Adamax step counts, host tensors as torch keeps them, are the elements of
    :attr:`step` (one CPU tensor): counting a step is one addition, not one per parameter."""

    def __init__(self, params: list[Tensor], dtype: torch.dtype, device: torch.device) -> None:
        n = _offsets(params)[-1]  # the gaps' zero gradients leave their zero parameters at 0
        self.params = params
        self.param, self.exp_avg, self.exp_inf = (
            torch.zeros(n, dtype=dtype, device=device) for _ in range(3)
        )
        self.grad = torch.zeros(n + 1, dtype=dtype, device=device)
        self.loss = self.grad[n]
        self.step = torch.zeros(len(params), dtype=_get_scalar_dtype())
        self.steps = list(self.step.unbind())  # each parameter's, a view
        self.layout = _layout(params)
        self.views = {
            kind: _views(getattr(self, kind), self.layout)
            for kind in ("param", "grad", "exp_avg", "exp_inf")
        }
        with torch.no_grad():
            for p, view in zip(params, self.views["param"], strict=True):
                view.copy_(p)
                p.data = view
        self._addresses = [p.data_ptr() for p in params]

    def adopt_parameters(self) -> None:
        """Bring back into :attr:`param` a parameter whose data was replaced (``p.data = ...``;
        ``load_state_dict`` copies in place and needs nothing)."""
        if [p.data_ptr() for p in self.params] == self._addresses:
            return
        with torch.no_grad():
            for p, view in zip(self.params, self.views["param"], strict=True):
                if p.data_ptr() != view.data_ptr():
                    view.copy_(p)
                    p.data = view

    def adopt_state(self, optimizer: torch.optim.Optimizer) -> None:
        """Make every parameter's Adamax state (created as torch.optim.Adamax creates it, or
        copied from the tensors ``load_state_dict`` made) the views of the flat buffers."""
        kinds = (self.params, self.views["exp_avg"], self.views["exp_inf"], self.steps)
        views = zip(*kinds, strict=True)
        for p, avg, inf, step in views:
            state = optimizer.state[p]
            if not state:
                state["step"] = step.zero_()
                avg.zero_()
                inf.zero_()
            elif state["exp_avg"] is not avg:
                avg.copy_(state["exp_avg"])
                inf.copy_(state["exp_inf"])
            if state["step"] is not step:
                step.copy_(state["step"])
            state["step"], state["exp_avg"], state["exp_inf"] = step, avg, inf

    def count_step(self) -> None:
        """Add the step just made to every parameter's Adamax step count (``step += 1``, as
        torch's Adamax counts, in one addition)."""
        self.step.add_(1.0)

    def gather_grads(self, loss: Tensor) -> None:
        """The parameters' gradients and ``loss`` into :attr:`grad`; each ``.grad`` becomes its
        view (the autograd-made tensors are released)."""
        torch._foreach_copy_(self.views["grad"], [p.grad for p in self.params])
        self.loss.copy_(loss)
        for p, view in zip(self.params, self.views["grad"], strict=True):
            p.grad = view


class _NetWeights(torch.autograd.Function):
    """The networks' convolution weights in the autocast dtype, as autocast would cast them one
    by one, from one cast of the flat parameter buffer; backward: their gradients copied into one
    low-precision buffer (a multi-tensor copy), cast back in one kernel, each parameter's
    gradient a view of it (autograd stores such a gradient without copying it). The same values
    as autocast's casts, forward and backward."""

    @staticmethod
    def forward(ctx, flat: FlatState, layout: list, dtype: torch.dtype, *params: Tensor):
        ctx.flat, ctx.layout = flat, layout
        return tuple(_views(flat.param.to(dtype), layout))

    @staticmethod
    def backward(ctx, *grads: Tensor | None):
        present = [i for i, g in enumerate(grads) if g is not None]
        if not present:
            return (None,) * (3 + len(grads))
        low = ctx.flat.param.new_empty(ctx.flat.param.shape, dtype=grads[present[0]].dtype)
        views = _views(low, ctx.layout)  # the gaps and other parameters' places are not read
        torch._foreach_copy_([views[i] for i in present], [grads[i] for i in present])
        wide = _views(low.to(ctx.flat.param.dtype), ctx.layout)
        return None, None, None, *(wide[i] if g is not None else None for i, g in enumerate(grads))


@torch.no_grad()
def masked_adamax_(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_inf: Tensor,
    keep: Tensor,
    neg_step_size: Tensor,
    betas: tuple[float, float],
    eps: float,
) -> None:
    """torch.optim.Adamax's update (no weight decay, minimising) of the flat buffers of
    :class:`FlatState` where the 0-dim bool tensor ``keep`` is True; where it is False, nothing
    changes, bit for bit.

    ``neg_step_size``: 0-dim tensor ``-lr / (1 - beta1**t)`` for the step ``t`` this update
    makes. The arithmetic is torch's non-capturable Adamax, op for op (``lerp_``, ``mul_``,
    ``abs().add_(eps)``, ``maximum``, ``addcdiv_`` as ``p + (s·m) / u``), element-wise, so on
    the CPU the results equal ``Adamax.step()`` on the separate tensors bitwise; the new values
    are computed out of place (a group of :data:`GROUP_ELEMENTS` at a time: 11 kernels each) and
    selected with ``torch.where``. No host synchronisation.
    """
    beta1, beta2 = betas
    group = GROUP_ELEMENTS["cuda" if keep.is_cuda else "cpu"]
    for start in range(0, param.numel(), group):
        part = slice(start, start + group)
        p, g, m, u = param[part], grad[part], exp_avg[part], exp_inf[part]
        new_m = torch.lerp(m, g, 1 - beta1)
        new_u = u * beta2
        torch.maximum(new_u, g.abs().add_(eps), out=new_u)
        new_p = new_m * neg_step_size
        new_p.div_(new_u).add_(p)
        for old, new in ((p, new_p), (m, new_m), (u, new_u)):
            torch.where(keep, new, old, out=old)


class GraphedStep:
    """:func:`denseflow.step.train_step` on static buffers; on CUDA one captured graph.

    ``step(chunks, lr, batch_size=None)`` takes what ``train_step`` takes (``chunks``: the
    ``(images, noise generator)`` parts of the batch, each chunk with a generator of its own) and
    returns the loss, non-finite when the update was dropped. ``optimizer`` must be a
    ``torch.optim.Adamax`` without weight decay; its state stays the usual per-parameter state
    (checkpoints, ``load_state_dict`` and rollbacks work unchanged). From the first step on, the
    parameters' data, their gradients and that state are views of flat buffers
    (:class:`FlatState`), which the update (:func:`masked_adamax_`) runs over whole.

    The first call runs the step eagerly and records the noise draws of its batch shape; a second
    call of that shape fills the static buffers and runs the step on them — eagerly on the CPU
    (and wherever ``capture`` is False), on CUDA replayed from a graph captured at that call
    (after ``warmups`` masked warm-up steps on a side stream that leave parameters, Adamax state
    and BatchNorm statistics as they were). Until a graph is captured, a call of another shape
    records again; once one is, calls of other shapes (an epoch's last, partial batch) run
    eagerly with the same arithmetic.
    ``reduce``: a function summing a tensor over the data-parallel ranks in place
    (:func:`denseflow.distributed.all_sum`), called once a step on the flat buffer of every
    gradient and the loss, between the step's two halves (two graphs on CUDA); None: one process.
    :attr:`capture_seconds` says how long the warm-up and capture took; a capture that fails says
    why (``say``, :attr:`refusal`; the exception itself in :attr:`failure`) and the step runs
    eagerly from then on.

    **The CUDA capture has not yet run on a GPU** (see the module docstring).
    """

    def __init__(
        self,
        model: DenseFlow,
        optimizer: torch.optim.Optimizer,
        grad_clip: float = 0.0,
        capture: bool | None = None,
        warmups: int = 3,
        say: Callable[[str], None] | None = None,
        reduce: Callable[[Tensor], object] | None = None,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Adamax):
            raise TypeError(f"GraphedStep: needs torch.optim.Adamax, got {type(optimizer)}")
        settings = {(tuple(g["betas"]), g["eps"]) for g in optimizer.param_groups}
        if len(settings) != 1 or any(
            g["weight_decay"] or g["maximize"] for g in optimizer.param_groups
        ):
            raise ValueError(
                "GraphedStep: Adamax with one (betas, eps), no weight decay, not maximising"
            )
        ((self.betas, self.eps),) = settings
        owned = {id(p) for g in optimizer.param_groups for p in g["params"]}
        trainable = [p for p in model.parameters() if p.requires_grad]
        outside = sum(id(p) not in owned for p in trainable)
        if outside:  # the flat update runs over every gradient: it would train them too
            raise ValueError(
                f"GraphedStep: {outside} of the model's {len(trainable)} trainable parameters are "
                "not in the optimizer: freeze them (requires_grad_(False)) or give it them all"
            )
        self.model, self.optimizer, self.grad_clip = model, optimizer, float(grad_clip)
        device = next(model.parameters()).device
        self.capture = device.type == "cuda" if capture is None else capture
        self.warmups, self.say, self.reduce = warmups, say or (lambda message: None), reduce
        self.neg_step_size = torch.zeros((), device=device)
        self.allow = torch.ones((), dtype=torch.bool, device=device)  # False: warm-up, no update
        self.capture_seconds: float | None = None
        self.refusal: str | None = None
        self.failure: BaseException | None = None  # what a failed capture raised (diagnosis)
        self._convs = [m for m in model.modules() if isinstance(m, Conv1x1)]
        self._runners = [m for m in model.modules() if isinstance(m, NetRunner)]
        self._key: tuple | None = None  # the batch shape the noise draws were recorded for
        self._draws: list[list[tuple[str, tuple[int, ...]]]] = []  # per chunk, in draw order
        self._images: list[Tensor] = []
        self._noises: list[dict[str, Tensor]] = []
        self._graphs: list[torch.cuda.CUDAGraph] = []  # the step, or its two halves (reduce)
        self._out: tuple[Tensor, Tensor] | None = None  # the captured (loss, keep)
        self._flat: FlatState | None = None  # laid out at the first step
        self._conv_weights: tuple[list, list] | None = None  # what _NetWeights casts
        optimizer.register_load_state_dict_post_hook(lambda opt: self._adopt_state())

    @property
    def captured(self) -> bool:
        """Whether the step replays a captured CUDA graph."""
        return bool(self._graphs)

    # ------------------------------------------------------------------ the step
    def __call__(
        self,
        chunks: Chunks,
        lr: float,
        batch_size: int | None = None,
        ddp: torch.nn.Module | None = None,
    ) -> Tensor:
        """One step on ``chunks`` at learning rate ``lr``; returns the loss (as ``train_step``)."""
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 <= lr < float("inf"):
            raise ValueError(f"GraphedStep: lr must be a finite number >= 0, got {lr!r}")
        if batch_size is not None:
            batch_size = positive_int(batch_size, "GraphedStep: batch_size")
        if (
            not isinstance(chunks, Sequence)
            or not chunks
            or not all(isinstance(c, (tuple, list)) and len(c) == 2 for c in chunks)
            or not all(g is None or isinstance(g, torch.Generator) for _, g in chunks)
        ):
            raise TypeError(
                "GraphedStep: chunks must be a non-empty list of (images, torch.Generator) "
                f"pairs, got {type(chunks).__name__}"
            )
        if ddp is not None:
            raise ValueError("GraphedStep: DDP steps run denseflow.step.train_step (or reduce=)")
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total = batch_size or sum(len(x) for x, _ in chunks)
        key = (total, tuple((tuple(x.shape), x.dtype, x.device) for x, _ in chunks))
        self._set_step_size(lr)
        if self._flat is not None:
            self._flat.adopt_parameters()
        if self._key is None or key != self._key and not self._graphs:
            # eager, recording the draws of this batch shape (the first shape that comes twice in
            # a row is captured: a run resumed at an epoch's last, smaller batch is not stuck)
            generators = [g for _, g in chunks]
            if None in generators or len({id(g) for g in generators}) < len(chunks):
                raise ValueError("GraphedStep: every chunk needs a noise generator of its own")
            with recorded_draws() as draws:
                loss, keep = self._body(chunks, total)
            self._record(chunks, draws, key)
            self._check_steps()
            return self._finish(loss, keep)
        if key != self._key:  # another batch shape than the captured one: eager
            return self._finish(*self._body(chunks, total))
        self._fill(chunks)
        static = list(zip(self._images, self._noises, strict=True))
        if self.capture and not self._graphs and self.refusal is None:
            self._capture(static, total)
        if self._graphs:
            self._graphs[0].replay()
            if self.reduce is not None:  # between the halves, outside any graph
                self.reduce(self._flat.grad)
                self._graphs[1].replay()
            for conv in self._convs:  # replays change W behind autograd's version counters
                conv.forget_inverse()
            return self._finish(*self._out)
        return self._finish(*self._body(static, total))

    def _body(self, chunks: Sequence[tuple[Tensor, object]], total: int) -> tuple[Tensor, Tensor]:
        """The step itself, free of host synchronisation: (loss, whether the update was kept)."""
        self.passes(chunks, total)
        if self.reduce is not None:
            self.reduce(self._flat.grad)
        return self._update()

    def passes(self, chunks: Sequence[tuple[Tensor, object]], total: int) -> None:
        """Every chunk's forward and backward pass; the gradients and this process's share of the
        loss are then copied into the flat buffer (:class:`FlatState`), laid out at the first
        step over the parameters that received a gradient."""
        self.optimizer.zero_grad(set_to_none=True)
        with self._net_weights():
            loss = backpropagate(self.model, chunks, total)
        if self._flat is None:
            params = [p for p in self.model.parameters() if p.grad is not None]
            dtypes = {p.dtype for p in params} | {loss.dtype}
            if len(dtypes) > 1:
                raise ValueError(f"GraphedStep: parameters and loss of one dtype, got {dtypes}")
            self._flat = FlatState(params, loss.dtype, loss.device)
            self._adopt_state()
        self._flat.gather_grads(loss)

    @contextmanager
    def _net_weights(self) -> Iterator[None]:
        """With the networks under autocast (``train.precision``) and the flat buffers laid out:
        their convolution weights cast once for the step's passes (:class:`_NetWeights`, read
        by :meth:`~denseflow.nets.runner.NetRunner.run_net`) instead of one by one where each is
        used: the same values, 6,084 fewer operators a step in DenseFlow-74-10."""
        runners = self._runners
        dtypes = {r.net_dtype for r in runners}
        if self._flat is None or len(dtypes) != 1 or None in dtypes:
            yield
            return
        flat = self._flat
        if self._conv_weights is None:  # the networks' convolution parameters, their places
            convs = [m for m in self.model.modules() if isinstance(m, torch.nn.Conv2d)]
            ids = {id(p) for m in convs for p in m.parameters(recurse=False)}
            picks = [i for i, p in enumerate(flat.params) if id(p) in ids]
            self._conv_weights = [flat.params[i] for i in picks], [flat.layout[i] for i in picks]
        params, layout = self._conv_weights
        weights = _NetWeights.apply(flat, layout, dtypes.pop(), *params)
        table = {id(p): w for p, w in zip(params, weights, strict=True)}
        for runner in runners:
            runner.net_weights = table
        try:
            yield
        finally:
            for runner in runners:
                runner.net_weights = None

    def _update(self) -> tuple[Tensor, Tensor]:
        """Norm, guard, clipping and the masked Adamax update on the flat buffers (with
        ``reduce``, the gradients and loss summed over the ranks): (loss, whether the update was
        kept)."""
        flat = self._flat
        loss, grads = flat.loss, flat.grad[:-1]
        norm = torch.nn.utils.get_total_norm(flat.views["grad"])  # as gradient_norm sums it
        bad = loss + norm
        keep = torch.isfinite(bad) & self.allow
        if self.grad_clip:  # torch.nn.utils.clip_grads_with_norm_'s factor
            grads.mul_(torch.clamp(self.grad_clip / (norm + 1e-6), max=1.0))
        masked_adamax_(
            flat.param,
            grads,
            flat.exp_avg,
            flat.exp_inf,
            keep,
            self.neg_step_size,
            self.betas,
            self.eps,
        )
        return torch.where(keep, loss, bad), keep

    def _finish(self, loss: Tensor, keep: Tensor) -> Tensor:
        """After the step: the host reads the flag (the step's one synchronisation) and counts
        the Adamax step of every updated parameter, as torch does (CPU tensors)."""
        if bool(keep):
            self._flat.count_step()
        return loss.clone()

    def _set_step_size(self, lr: float) -> None:
        """``-lr / (1 - beta1**t)`` for the step ``t`` about to be made, in float64 on the host as
        torch's Adamax computes it, into the device tensor the update reads."""
        params = self._flat.params if self._flat else self.model.parameters()
        state = next((s for p in params if (s := self.optimizer.state.get(p))), None)
        t = (float(state["step"]) if state else 0.0) + 1
        self.neg_step_size.fill_(-(lr / (1 - self.betas[0] ** t)))

    def _check_steps(self) -> None:
        """One step size serves every parameter: their Adamax step counts must agree."""
        counts = {float(self.optimizer.state[p]["step"]) for p in self._flat.params}
        if len(counts) > 1:
            raise ValueError(f"GraphedStep: Adamax states at different steps {sorted(counts)}")

    # ------------------------------------------------------------------ static buffers
    def _record(self, chunks: Chunks, draws: list, key: tuple) -> None:
        """Keep, per chunk, the ``(name, shape)`` of each draw its generator made, in order."""
        chunk_of = {id(g): j for j, (_, g) in enumerate(chunks)}
        per_chunk: list[list[tuple[str, tuple[int, ...]]]] = [[] for _ in chunks]
        for generator, name, shape in draws:
            j = chunk_of.get(id(generator))
            if j is None:
                raise ValueError(f"GraphedStep: {name!r} was drawn from no chunk's generator")
            if any(name == seen for seen, _ in per_chunk[j]):
                raise ValueError(f"GraphedStep: the forward pass draws {name!r} twice")
            per_chunk[j].append((name, shape))
        self._key, self._draws = key, per_chunk
        self._images = [torch.empty_like(x) for x, _ in chunks]
        self._noises = [
            {name: torch.empty(shape, device=x.device) for name, shape in chunk}
            for (x, _), chunk in zip(chunks, per_chunk, strict=True)
        ]

    def _fill(self, chunks: Chunks) -> None:
        """Images and noises of this step into the static buffers: each noise drawn from the
        chunk's generator exactly as the eager forward pass draws it (float32, same order)."""
        for (x, generator), image, noises, draws in zip(
            chunks, self._images, self._noises, self._draws, strict=True
        ):
            self.model._check_images(x)  # the graph cannot: its values are never read on the host
            image.copy_(x)
            for name, noise in draw_noises(draws, generator, x.device).items():
                noises[name].copy_(noise)

    # ------------------------------------------------------------------ CUDA graph
    def _capture(self, static: list[tuple[Tensor, dict[str, Tensor]]], total: int) -> None:
        """Warm up on a side stream (updates masked, BatchNorm statistics restored), then capture
        the whole step — every chunk's forward and backward, the guard and the update — in one
        graph whose temporaries live in its private memory pool; with ``reduce``, in two graphs
        sharing that pool (forward, backward and the gathering of gradients and loss into their
        flat buffer; norm, guard and update), the all-reduce running between their replays. The
        warm-ups make no collective call, and the ranks then agree (one all-reduce): if any
        rank's capture failed, every rank runs eagerly, so the ranks' all-reduces stay paired.
        **Not yet run on a GPU.**"""
        device = self.neg_step_size.device
        began = time.perf_counter()
        buffers = {name: b.clone() for name, b in self.model.named_buffers()}
        self.allow.fill_(False)
        graphs: list[torch.cuda.CUDAGraph] = []
        try:
            with _cusolver():
                side = torch.cuda.Stream(device)
                side.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(side):
                    for _ in range(self.warmups):  # masked; no all-reduce, which is never
                        self.passes(static, total)  # captured: the ranks stay in step
                        self._update()
                torch.cuda.current_stream(device).wait_stream(side)
                self.optimizer.zero_grad(set_to_none=True)  # captured backward allocates .grad
                # the warm-ups' cached blocks: the capture allocates from a private pool only
                torch.cuda.empty_cache()
                graphs.append(torch.cuda.CUDAGraph())
                if self.reduce is None:
                    with torch.cuda.graph(graphs[0]):
                        self._out = self._body(static, total)
                else:
                    with torch.cuda.graph(graphs[0]):
                        self.passes(static, total)
                    graphs.append(torch.cuda.CUDAGraph())
                    with torch.cuda.graph(graphs[1], pool=graphs[0].pool()):
                        self._out = self._update()
        except Exception as err:  # any failure: say why, run eagerly
            graphs, self.refusal, self.failure = [], _failure(err), err
        finally:
            self.allow.fill_(True)
            for name, b in self.model.named_buffers():
                b.copy_(buffers[name])
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        if self.reduce is not None:  # every rank replays its graphs, or none does
            failures = torch.tensor(float(not graphs), device=device)
            self.reduce(failures)
            if failures.item() and graphs:
                graphs, self.refusal = [], "capture failed on another rank"
        if not graphs:
            self.say(f"train.cuda_graph: {self.refusal}; the step runs eagerly")
            self.optimizer.zero_grad(set_to_none=True)
            return
        self._graphs = graphs
        self.capture_seconds = time.perf_counter() - began
        self.say(f"train.cuda_graph: step captured in {self.capture_seconds:.1f} s")

    def _adopt_state(self) -> None:
        """The Adamax state as views of the flat buffers, which a captured graph reads and
        writes; after ``optimizer.load_state_dict`` (resume, rollback) the loaded values are
        copied into them."""
        if self._flat is not None:
            self._flat.adopt_state(self.optimizer)


class _Captured(NamedTuple):
    """One captured call: its static inputs, the output the replays overwrite, the graph, the
    function captured, and the model tensors it reads (their addresses, to notice a swap)."""

    inputs: dict[str, Tensor]
    output: Tensor
    graph: torch.cuda.CUDAGraph
    fn: Callable[[dict[str, Tensor]], Tensor]
    tensors: list[int]


class GraphedInference:
    """:meth:`~denseflow.model.DenseFlow.elbo`, :meth:`~denseflow.model.DenseFlow.iwbo` and
    :meth:`~denseflow.model.DenseFlow.sample` on static buffers; on CUDA one graph per call shape,
    captured at the shape's second call and replayed from the third (issue 12).

    The methods take what the model's take and give their values: :func:`denseflow.evaluate.
    score_images` and :func:`denseflow.sample.sample_seeds` call them in place of the model's on a
    GPU. ``elbo`` records, at the first call of a batch shape, the noises the pass draws (as
    :class:`GraphedStep` does); later calls draw them before the pass from the same generator, in
    the same order, so every value is the eager one (bitwise on the CPU, tests/test_graph.py).
    ``iwbo`` is the model's, its passes scored by this ``elbo``; ``sample`` needs every sampling
    noise given (``base.eta`` and each ``transition{t}.eta``), as :func:`denseflow.sample.
    sample_seeds` gives them. A sampling graph reads the 1x1 convolutions' cached ``W⁻¹``,
    brought up to date in place before each replay: nothing is inverted inside the graph.

    A graph reads the model's parameters and buffers where they live: updates in place
    (optimizer steps, ``load_state_dict``, BatchNorm recalibration) reach the next replay, and a
    graph whose model tensors were replaced is captured again. Calls in training mode, and every
    call after a capture failed (said once through ``say``, :attr:`refusal`; the exception in
    :attr:`failure`), run eagerly.
    Settings that change the computation (``set_net_precision``, ``set_low_memory``) belong
    before the first call.
    """

    def __init__(
        self,
        model: DenseFlow,
        capture: bool | None = None,
        say: Callable[[str], None] | None = None,
    ) -> None:
        self.model = model
        device = model.base.loc.device
        self.capture = device.type == "cuda" if capture is None else capture
        self.say = say or (lambda message: None)
        self.refusal: str | None = None
        self.failure: BaseException | None = None  # what a failed capture raised (diagnosis)
        self.capture_seconds = 0.0  # all captures so far, warm-ups included
        self._orders: dict[tuple, list[tuple[str, tuple[int, ...]]]] = {}  # elbo's draws
        self._seen: set[tuple] = set()  # call shapes run once (eagerly)
        self._graphs: dict[tuple, _Captured] = {}
        self._pool = None  # one memory pool for every graph: they replay one after another
        self._convs = [m for m in model.modules() if isinstance(m, Conv1x1)]

    @property
    def graphs(self) -> int:
        """How many call shapes replay a captured graph."""
        return len(self._graphs)

    @torch.inference_mode()
    def elbo(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``model.elbo(x, generator=generator)``."""
        self.model._check_images(x)
        key = ("elbo", tuple(x.shape), x.dtype, x.device)
        order = self._orders.get(key)
        if order is None:  # the shape's first call: eager, recording what it draws
            with recorded_draws() as draws:
                out = self.model.elbo(x, generator=generator)
            if any(g is not generator for g, _, _ in draws):
                raise ValueError("GraphedInference: the pass drew from another generator")
            self._orders[key] = [(name, shape) for _, name, shape in draws]
            self._seen.add(key)
            return out
        inputs = {"x": x, **draw_noises(order, generator, x.device)}
        return self._run(key, inputs, self._elbo)

    def _elbo(self, inputs: dict[str, Tensor]) -> Tensor:
        noise = {name: t for name, t in inputs.items() if name != "x"}
        return self.model.elbo(inputs["x"], noise=noise)

    @torch.inference_mode()
    def iwbo(
        self,
        x: Tensor,
        k: int | Sequence[int],
        chunk: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """``model.iwbo(x, k, chunk, generator)``: each pass of ``chunk`` copies through
        :meth:`elbo` (one graph per pass size)."""
        return self.model.iwbo(x, k, chunk, elbo=lambda copies: self.elbo(copies, generator))

    @torch.inference_mode()
    def sample(
        self, n: int, temperature: float = 1.0, noise: Mapping[str, Tensor] | None = None
    ) -> Tensor:
        """``model.sample(n, temperature, noise=noise)``; ``noise`` holds every sampling noise."""
        names = list(self.model.sampling_shapes)
        missing = [name for name in names if name not in (noise or {})]
        if missing:
            raise KeyError(f"GraphedInference.sample: noise {missing} not given")
        device = self.model.base.loc.device
        inputs = {name: noise[name].to(device) for name in names}
        key = ("sample", n, float(temperature), *(t.dtype for t in inputs.values()))
        return self._run(key, inputs, lambda s: self.model.sample(n, temperature, noise=s))

    def _run(
        self, key: tuple, inputs: dict[str, Tensor], fn: Callable[[dict[str, Tensor]], Tensor]
    ) -> Tensor:
        """``fn(inputs)``: from the graph of ``key`` (which fixes the inputs' names, shapes and
        dtypes; they are copied into its buffers), else eagerly."""
        if self.model.training:  # eager: BatchNorm normalises with, and updates, batch statistics
            return fn(inputs)
        entry = self._graphs.get(key)
        if entry is not None and entry.tensors != self._tensors():
            del self._graphs[key]  # the model's tensors were replaced: capture again
            entry = None
        if entry is None:
            if key not in self._seen or not self.capture or self.refusal:
                self._seen.add(key)
                return fn(inputs)
            entry = self._capture(key, inputs, fn)
            if entry is None:
                return fn(inputs)
        for name, t in inputs.items():
            entry.inputs[name].copy_(t)
        if key[0] == "sample":  # the graph reads the cached W⁻¹: up to date first, in place
            for conv in self._convs:
                conv.refresh_inverses()
        entry.graph.replay()
        return entry.output.clone()

    def _tensors(self) -> list[int]:
        return [t.data_ptr() for t in (*self.model.parameters(), *self.model.buffers())]

    def _capture(
        self, key: tuple, inputs: dict[str, Tensor], fn: Callable[[dict[str, Tensor]], Tensor]
    ) -> _Captured | None:
        """One warm-up on a side stream (eval mode: nothing changes), then the capture into the
        shared pool. A failure says why once; everything runs eagerly from then on."""
        device = self.model.base.loc.device
        began = time.perf_counter()
        static = {name: t.clone() for name, t in inputs.items()}
        try:
            with _cusolver():
                side = torch.cuda.Stream(device)
                side.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(side):
                    fn(static)
                torch.cuda.current_stream(device).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self._pool):
                    output = fn(static)
            self._pool = graph.pool()
        except Exception as err:  # any failure: say why, run eagerly
            self.refusal, self.failure = _failure(err), err
            self.say(f"cuda graph: {self.refusal}; evaluation and sampling run eagerly")
            return None
        finally:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        self.capture_seconds += time.perf_counter() - began
        entry = _Captured(static, output, graph, fn, self._tensors())
        self._graphs[key] = entry
        return entry


def inference(
    model: DenseFlow, cuda_graph: bool = True, say: Callable[[str], None] | None = None
) -> DenseFlow | GraphedInference:
    """What runs ``elbo``, ``iwbo`` and ``sample`` for a caller with many batches: a
    :class:`GraphedInference` on a GPU when ``cuda_graph`` is on, else the model itself."""
    if cuda_graph and model.base.loc.is_cuda:
        return GraphedInference(model, say=say)
    return model


def capture_refusal(cfg: TrainConfig) -> str | None:
    """Why the step of this setup cannot be a :class:`GraphedStep` (one line), or None."""
    if not cfg.cuda_graph:
        return "train.cuda_graph=false"
    if cfg.compile:
        return "train.compile: torch.compile makes its own graphs (compile_mode=reduce-overhead)"
    if cfg.low_memory:
        return (
            "train.low_memory: activation checkpointing under graph capture works only in a "
            "limited case (the RNG state it saves and restores)"
        )
    if cfg.monitor_every:
        return "train.monitor_every: the layer monitor reads values on the host mid-step"
    return None


def graphed_step(
    model: DenseFlow,
    optimizer: torch.optim.Optimizer,
    cfg: TrainConfig,
    device: torch.device,
    world: int = 1,
    say: Callable[[str], None] | None = None,
) -> GraphedStep | None:
    """The :class:`GraphedStep` that :func:`denseflow.train.train` runs and ``denseflow bench``
    times for this setup (captured on CUDA; on the CPU eager, with ``train_step``'s numbers), or
    None where :func:`capture_refusal` says why not: then they run ``train_step``, and on CUDA the
    reason is said in one line through ``say``. On ``world`` > 1 ranks each rank runs its own
    step, the gradients and loss summed by one all-reduce between its two halves
    (:func:`denseflow.distributed.all_sum`) instead of DDP."""
    refusal = capture_refusal(cfg)
    if refusal is None:
        reduce = distributed.all_sum if world > 1 else None
        return GraphedStep(
            model, optimizer, cfg.grad_clip, device.type == "cuda", say=say, reduce=reduce
        )
    if say is not None and device.type == "cuda" and cfg.cuda_graph:
        say(f"train.cuda_graph: not captured: {refusal}; the steps run train_step")
    return None
