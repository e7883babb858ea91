"""Low-memory mode: activation checkpointing for the parts of the flow that hold most
activations."""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

# A plain module global, not a ContextVar: torch.compile traces a global (guarding on its value)
# but breaks the graph at ContextVar.get. The flag is only set while autograd recomputes a
# checkpointed forward inside backward(), during which the thread that called backward() waits.
_recomputing_now = False


def is_recomputing() -> bool:
    """True while a low-memory forward is being recomputed in the backward pass."""
    return _recomputing_now


@contextlib.contextmanager
def _recomputing():
    global _recomputing_now
    previous, _recomputing_now = _recomputing_now, True
    try:
        yield
    finally:
        _recomputing_now = previous


class Recomputable(nn.Module):
    """A module that can trade compute for memory: the affine couplings (with their coupling
    networks), the cross-unit noise nets and the dequantizer's context net.

    With ``low_memory`` set (``DenseFlow.set_low_memory``) and autograd on, only the inputs are
    kept for the backward pass and :meth:`_compute` runs again there (activation checkpointing): the
    same values and gradients, a fraction of the activation memory.
    """

    low_memory = False

    def _compute(self, *args: Tensor | None):
        """What ``forward`` computes (a coupling's pass with its network, or a network alone)."""
        raise NotImplementedError

    def forward(self, *args: Tensor | None):
        if self.low_memory and torch.is_grad_enabled():
            context = lambda: (contextlib.nullcontext(), _recomputing())  # noqa: E731
            return checkpoint(self._compute, *args, use_reentrant=False, context_fn=context)
        return self._compute(*args)
