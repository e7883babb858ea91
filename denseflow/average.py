"""Polyak averaging of the weights (``train.ema_decay``): an option of ours, off in the paper
presets (the official code evaluates the optimizer's weights; Glow's code averages them).

:class:`WeightAverage` keeps, beside the model, an exponential moving average of its parameters
over the optimizer steps, corrected for its start: after ``t`` kept steps it holds

    θ̄_t = Σ_{s≤t} β^(t−s) θ_s / Σ_{s≤t} β^(t−s)

(β = ``decay``, θ_s the weights after step ``s``), updated in place as
``θ̄ ← θ̄ + w_t (θ_t − θ̄)`` with ``w_t = (1 − β) / (1 − β^t)``: the first step copies the
weights (``w_1 = 1``), so the average never holds the initial weights with weight β^t the way a
plain ``θ̄ ← βθ̄ + (1 − β)θ`` started at θ_0 would (0.999^1200 = 0.30 of the demo's 1,200 steps).
It changes nothing the optimizer sees: a run trains exactly as without it, and evaluates and
exports the average (:meth:`WeightAverage.applied`). BatchNorm's running statistics belong to
the optimizer's weights, so the option needs ``train.bn_recalibrate``: the average is evaluated
with statistics recomputed for it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


class WeightAverage:
    """The bias-corrected exponential moving average of ``model``'s parameters (module docstring),
    ``decay`` in [0, 1): 0 keeps the last weights. Call :meth:`update` after each optimizer step
    that changed the weights (not after a skipped one)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0 <= decay < 1:
            raise ValueError(f"WeightAverage: decay={decay!r} must lie in [0, 1)")
        self.decay = decay
        self.names = [name for name, _ in model.named_parameters()]
        self.params = [p for _, p in model.named_parameters()]
        self.average = [p.detach().clone() for p in self.params]
        self.count = 0  # the steps averaged

    @torch.no_grad()
    def update(self) -> None:
        """Average in the parameters as they are now: one more step."""
        self.count += 1
        weight = (1 - self.decay) / (1 - self.decay**self.count)
        torch._foreach_lerp_(self.average, self.params, weight)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Inside the block the model's parameters hold the average (copied in place, so views
        and optimizer references stay valid); on exit they hold their own values again, bit for
        bit. Before the first :meth:`update` the average is the weights themselves."""
        if self.count == 0:
            yield
            return
        with torch.no_grad():
            kept = [p.detach().clone() for p in self.params]
            torch._foreach_copy_(self.params, self.average)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(self.params, kept)

    def state_dict(self) -> dict[str, Any]:
        """What a training checkpoint stores: the decay, the steps averaged and the average."""
        weights = dict(zip(self.names, (a.clone() for a in self.average), strict=True))
        return {"decay": self.decay, "count": self.count, "weights": weights}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Continue the average of a checkpoint (None, from a run without one: start afresh at
        the next step). The decay stays this one's (``train.ema_decay`` may change on resume)."""
        if state is None:
            self.count = 0
            return
        weights = state["weights"]
        if sorted(weights) != sorted(self.names):
            raise ValueError("WeightAverage: the checkpoint's average has other parameters")
        with torch.no_grad():
            for name, average in zip(self.names, self.average, strict=True):
                average.copy_(weights[name])
        self.count = int(state["count"])
