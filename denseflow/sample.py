"""Sampling to PNG: a grid and/or one file per seed; image i depends only on seed i."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from PIL import Image

from . import distributed
from .config import ConfigError
from .model import DenseFlow
from .seeding import stream


def parse_seeds(text: str) -> list[int]:
    """``"0-63"``, ``"1,5,9"`` or ``"0-3,10"`` -> a list of seeds."""
    seeds: list[int] = []
    for part in text.split(","):
        lo, dash, hi = part.strip().partition("-")
        try:
            seeds += list(range(int(lo), int(hi) + 1)) if dash else [int(lo)]
        except ValueError:
            raise ConfigError(f"seeds {text!r}: expected e.g. 0-63 or 1,5,9") from None
    if not seeds or min(seeds) < 0:
        raise ConfigError(f"seeds {text!r}: expected non-negative integers")
    return seeds


@torch.no_grad()
def sample_seeds(
    model: DenseFlow, seeds: list[int], temperature: float = 1.0, batch_size: int = 64
) -> torch.Tensor:
    """One image per seed, ``(len(seeds), C, H, W)`` integers. The sampling noises of image i are
    drawn from a generator seeded with ``seeds[i]`` alone, and the model is in eval mode, so the
    image does not depend on the other seeds or on the batch size. In a process group every rank
    calls this with the same seeds and samples every ``W``-th of them; all ranks get all images."""
    rank, world = distributed.rank(), distributed.world_size()
    if world == 1:
        return _sample(model, seeds, temperature, batch_size)
    shares = [None] * world
    torch.distributed.all_gather_object(
        shares, _sample(model, seeds[rank::world], temperature, batch_size)
    )
    out = torch.empty(len(seeds), *model.config.image_shape, dtype=torch.long)
    for r, share in enumerate(shares):
        out[r::world] = share
    return out


def _sample(
    model: DenseFlow, seeds: list[int], temperature: float, batch_size: int
) -> torch.Tensor:
    device = model.base.loc.device
    shapes = {"base.eta": model.latent_shapes["base"]}
    shapes |= {f"{t.name}.eta": model.latent_shapes[t.name] for t in model.transitions}
    out = [torch.empty(0, *model.config.image_shape, dtype=torch.long)]
    for start in range(0, len(seeds), batch_size):
        chunk = seeds[start : start + batch_size]
        noise = {name: [] for name in shapes}
        for seed in chunk:
            g = stream(seed, "sample")
            for name, shape in shapes.items():
                noise[name].append(torch.randn(1, *shape, generator=g))
        stacked = {name: torch.cat(parts).to(device) for name, parts in noise.items()}
        out.append(model.sample(len(chunk), temperature=temperature, noise=stacked).cpu())
    return torch.cat(out)


def to_pil(image: torch.Tensor, num_bits: int = 8) -> Image.Image:
    """(C, H, W) integers in 0 .. 2^bits-1 -> an 8-bit PIL image (L or RGB)."""
    scale = 255 / (2**num_bits - 1)
    array = (image.double() * scale).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(array[..., 0] if array.shape[2] == 1 else array)


def save_grid(
    images: torch.Tensor,
    path: str | os.PathLike,
    nrow: int = 8,
    padding: int = 2,
    num_bits: int = 8,
) -> Path:
    """Tile ``(N, C, H, W)`` integer images into one PNG, ``nrow`` per row, white gaps."""
    n, c, h, w = images.shape
    ncol = min(nrow, n)
    rows = (n + ncol - 1) // ncol
    mode = "L" if c == 1 else "RGB"
    grid = Image.new(
        mode,
        (ncol * (w + padding) + padding, rows * (h + padding) + padding),
        color=255 if c == 1 else (255,) * 3,
    )
    for i in range(n):
        grid.paste(
            to_pil(images[i], num_bits),
            (padding + (i % ncol) * (w + padding), padding + (i // ncol) * (h + padding)),
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path
