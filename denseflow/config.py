"""Model configuration: one frozen dataclass whose fields follow the official flags.

``block_conf``, ``layers_conf``, ``layer_mid_chnls`` and ``growth_rate`` carry the names of the
official command-line flags; the other fields are constants of the official code made
explicit (their defaults are DenseFlow-74-10's) or named options that are ours.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

ATTENTION_KINDS = ("official", "multihead")
DEQUANTIZATIONS = ("variational", "uniform")
CONV1X1_KINDS = ("full", "lu")


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the field."""


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a DenseFlow model (spec §1-§9).

    Defaults are DenseFlow-74-10 on 32x32 RGB images: 3 scales with ``block_conf`` invertible
    units, each of ``layers_conf`` glow-like steps, coupling networks of width
    ``layer_mid_chnls``, and ``growth_rate`` noise channels per cross-unit coupling.
    """

    image_shape: tuple[int, int, int] = (3, 32, 32)
    num_bits: int = 8
    block_conf: tuple[int, ...] = (6, 4, 1)
    layers_conf: tuple[int, ...] = (5, 6, 20)
    layer_mid_chnls: tuple[int, ...] = (48, 48, 48)
    growth_rate: int = 10
    # coupling network (spec §7): DenseBlock depth/growth and the attention branch
    dense_depth: int = 7
    dense_growth: int = 64
    attention: str = "official"
    attention_heads: int = 1
    attention_landmarks: int = 4
    # invertible 1x1 convolution: "full" matrix (official) or "lu" parametrisation
    conv1x1: str = "full"
    # dequantization (spec §4): "variational" (official) or "uniform"
    dequantization: str = "variational"
    dequant_width: int = 64
    dequant_steps: int = 4
    dequant_depth: int = 4
    dequant_growth: int = 64
    dequant_context_growth: int = 16

    def __post_init__(self) -> None:
        for name in ("image_shape", "block_conf", "layers_conf", "layer_mid_chnls"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        self.validate()

    @property
    def num_scales(self) -> int:
        return len(self.block_conf)

    @property
    def num_dims(self) -> int:
        """D = C*H*W, the data dimensions that bits/dim is measured over."""
        c, h, w = self.image_shape
        return c * h * w

    def validate(self) -> None:
        def need(ok: bool, name: str, why: str) -> None:
            if not ok:
                raise ConfigError(f"{name}={getattr(self, name)!r}: {why}")

        need(len(self.image_shape) == 3 and min(self.image_shape) > 0, "image_shape", "expected (C, H, W) > 0")
        need(1 <= self.num_bits <= 16, "num_bits", "expected 1 .. 16")
        s = len(self.block_conf)
        need(s >= 1, "block_conf", "need at least one scale")
        need(all(k >= 1 for k in self.block_conf), "block_conf", "every scale needs >= 1 unit")
        need(len(self.layers_conf) == s, "layers_conf", f"needs one entry per scale ({s})")
        need(all(k >= 1 for k in self.layers_conf), "layers_conf", "every unit needs >= 1 step")
        need(len(self.layer_mid_chnls) == s, "layer_mid_chnls", f"needs one entry per scale ({s})")
        need(all(m >= 2 for m in self.layer_mid_chnls), "layer_mid_chnls", "widths must be >= 2")
        need(self.growth_rate >= 0 and self.growth_rate % 2 == 0, "growth_rate", "must be even and >= 0")
        _, h, w = self.image_shape
        side = 2**s
        need(h % side == 0 and w % side == 0, "image_shape", f"H and W must be divisible by 2**scales = {side}")
        need(self.dense_depth >= 1, "dense_depth", "must be >= 1")
        need(self.dense_growth >= 1, "dense_growth", "must be >= 1")
        need(self.attention in ATTENTION_KINDS, "attention", f"expected one of {ATTENTION_KINDS}")
        need(self.attention_landmarks >= 1, "attention_landmarks", "must be >= 1")
        need(self.attention_heads >= 1, "attention_heads", "must be >= 1")
        if self.attention == "official":
            need(self.attention_heads == 1, "attention_heads", "the official attention is single-head")
        else:
            bad = [m for m in self.layer_mid_chnls if (m // 2) % self.attention_heads]
            need(not bad, "attention_heads", f"must divide every embedding width M//2 (M = {bad})")
        need(self.conv1x1 in CONV1X1_KINDS, "conv1x1", f"expected one of {CONV1X1_KINDS}")
        need(self.dequantization in DEQUANTIZATIONS, "dequantization", f"expected one of {DEQUANTIZATIONS}")
        for name in ("dequant_width", "dequant_steps", "dequant_depth", "dequant_growth", "dequant_context_growth"):
            need(getattr(self, name) >= 1, name, "must be >= 1")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-able values (tuples as lists)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        """Build from plain values; an unknown key is an error that names it."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown model config key(s): {', '.join(unknown)}")
        return cls(**values)


_IMAGE_SHAPES = {
    "cifar10": (3, 32, 32),
    "imagenet32": (3, 32, 32),
    "imagenet64": (3, 64, 64),
    "celeba64": (3, 64, 64),
}


def model_config(name: str) -> ModelConfig:
    """DenseFlow-74-10 for one of the paper's datasets: cifar10, imagenet32, imagenet64, celeba64.

    The network is identical for all four (130,647,294 parameters); only the image size differs.
    """
    if name not in _IMAGE_SHAPES:
        raise ConfigError(f"unknown model preset {name!r}; expected one of {', '.join(_IMAGE_SHAPES)}")
    return ModelConfig(image_shape=_IMAGE_SHAPES[name])
