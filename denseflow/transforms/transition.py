"""Transition between scales (spec §8): squeeze 2x2, factor out half of the channels."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Noise, Transform, std_normal_log_prob
from .glow import squeeze, unsqueeze


class Transition(Transform):
    """``(B, C, H, W) -> (B, 2C, H/2, W/2)`` kept; the other ``2C`` channels are factored out.

    ``delta_logp = log N(dropped; 0, I)`` (a fixed standard normal, not Glow's learned prior).
    The inverse draws the dropped half as ``temperature · η`` with ``η`` = ``{name}.eta``.
    """

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def factor_out(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(kept, dropped, log N(dropped; 0, I))``: :meth:`forward` with the dropped latent."""
        kept, dropped = squeeze(x).chunk(2, dim=1)
        return kept, dropped, std_normal_log_prob(dropped)

    def forward(
        self, x: Tensor, context: Tensor | None = None, noise: Noise | None = None
    ) -> tuple[Tensor, Tensor]:
        kept, _, delta = self.factor_out(x)
        return kept, delta

    def inverse(
        self, z: Tensor, context: Tensor | None = None, noise: Noise | None = None
    ) -> Tensor:
        noise = noise or Noise()
        dropped = noise.temperature * noise.draw(f"{self.name}.eta", tuple(z.shape), like=z)
        return self.join(z, dropped)

    @staticmethod
    def join(kept: Tensor, dropped: Tensor) -> Tensor:
        """Inverse of :meth:`factor_out`: ``(kept, dropped) -> x``."""
        return unsqueeze(torch.cat([kept, dropped], dim=1))
