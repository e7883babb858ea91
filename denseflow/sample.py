"""Images out of a model: samples (image i depends only on seed i), latent interpolations, and
PNG grids and strips scaled up to a readable size."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from tqdm import tqdm

from . import distributed
from .config import ConfigError
from .graph import GraphedInference, inference
from .model import DenseFlow
from .seeding import stream

#: the smallest side, in pixels, that a default grid shows an image at
READABLE = 84

#: the most seeds one command samples: all their images are held in memory until written (a
#: million take 3 GB at 32x32 in colour, 12 GB at 64x64); image i depends only on seed i, so a
#: larger set is sampled in parts with the same images
MAX_SEEDS = 1_000_000


def check_seeds(count: int, given: str) -> None:
    """Refuse, before the list is built, more than :data:`MAX_SEEDS` seeds (``given``: how)."""
    if count > MAX_SEEDS:
        raise ConfigError(
            f"{given}: {count:,} seeds, more than the {MAX_SEEDS:,} one command samples (their "
            "images are held in memory); image i depends only on seed i, so sample a larger set "
            "in parts, e.g. --seeds 0-999999, then --seeds 1000000-1999999"
        )


def parse_seeds(text: str) -> list[int]:
    """``"0-63"``, ``"1,5,9"`` or ``"0-3,10"`` -> a list of seeds (at most :data:`MAX_SEEDS`)."""
    ranges: list[range] = []
    for part in text.split(","):
        lo, dash, hi = part.strip().partition("-")
        try:
            first, last = (int(lo), int(hi)) if dash else (int(lo), int(lo))
        except ValueError:
            raise ConfigError(f"--seeds {text!r}: expected e.g. 0-63 or 1,5,9") from None
        if first < 0:
            raise ConfigError(f"--seeds {text!r}: seeds are non-negative integers")
        if last < first:
            raise ConfigError(f"--seeds {text!r}: the range {part.strip()} is reversed")
        ranges.append(range(first, last + 1))
    check_seeds(sum(r.stop - r.start for r in ranges), f"--seeds {text!r}")
    return [seed for r in ranges for seed in r]


@torch.no_grad()
def sample_seeds(
    model: DenseFlow,
    seeds: list[int],
    temperature: float = 1.0,
    batch_size: int = 64,
    progress: bool = False,
    cuda_graph: bool = True,
) -> torch.Tensor:
    """One image per seed, ``(len(seeds), C, H, W)`` integers (uint8 for up to 8 bits: 50,000
    ImageNet64 samples take 0.6 GB, not 4.9 in int64). The sampling noises of image i are
    drawn from the stream ``(seeds[i], "sample")`` alone, and the model is in eval mode, so the
    image does not depend on the other seeds or on the batch size. In a process group every rank
    calls this with the same seeds and samples every ``W``-th of them; all ranks get all images.
    On a GPU every batch of a size already seen once replays a CUDA graph
    (:class:`denseflow.graph.GraphedInference`, the same images) unless ``cuda_graph`` is False."""
    rank, world = distributed.rank(), distributed.world_size()
    sampler = inference(model, cuda_graph, say=distributed.say)
    show = progress and rank == 0
    mine = _sample(model, sampler, seeds[rank::world], temperature, batch_size, show)
    if world == 1:
        return mine
    shares = [None] * world
    torch.distributed.all_gather_object(shares, mine)
    out = torch.empty(len(seeds), *model.config.image_shape, dtype=mine.dtype)
    for r, share in enumerate(shares):
        out[r::world] = share
    return out


def _sample(
    model: DenseFlow,
    sampler: DenseFlow | GraphedInference,
    seeds: list[int],
    temperature: float,
    batch_size: int,
    progress: bool,
) -> torch.Tensor:
    device = model.base.loc.device
    shapes = model.sampling_shapes
    dtype = torch.uint8 if model.config.num_bits <= 8 else torch.long
    out = [torch.empty(0, *model.config.image_shape, dtype=dtype)]
    for start in tqdm(
        range(0, len(seeds), batch_size), desc="sample", unit="batch", disable=not progress
    ):
        chunk = seeds[start : start + batch_size]
        noise = {name: [] for name in shapes}
        for seed in chunk:
            g = stream(seed, "sample")
            for name, shape in shapes.items():
                noise[name].append(torch.randn(1, *shape, generator=g))
        stacked = {name: torch.cat(parts).to(device) for name, parts in noise.items()}
        images = sampler.sample(len(chunk), temperature=temperature, noise=stacked)
        out.append(images.to("cpu", dtype))
    return torch.cat(out)


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation between two standard-normal draws (per image, over all their
    values): keeps the norm typical of a Gaussian draw, which a straight line would shrink."""
    a64, b64 = a.double().flatten(1), b.double().flatten(1)
    cos = (a64 * b64).sum(1) / (a64.norm(dim=1) * b64.norm(dim=1))
    omega = torch.arccos(cos.clamp(-1, 1))[:, None]
    sin = torch.sin(omega)
    straight = sin.abs() < 1e-6  # (nearly) parallel: a straight line is the same curve
    wa = torch.where(straight, 1 - t, torch.sin((1 - t) * omega) / sin)
    wb = torch.where(straight, t, torch.sin(t * omega) / sin)
    return (wa * a64 + wb * b64).view_as(a).to(a.dtype)


@torch.no_grad()
def interpolate(model: DenseFlow, a: torch.Tensor, b: torch.Tensor, steps: int, seed: int = 0):
    """``steps`` images from ``a`` to ``b`` (integer images ``(C, H, W)``) through the latent
    space: both are encoded (every latent: the factored-out halves and the final latent, which
    holds the cross-unit noise channels; one draw of the noises from the ``(seed, "sample")``
    stream), the latents interpolated spherically — the final one in the base distribution's
    standardised coordinates — and decoded. The ends are the encoded latents themselves, so the
    first and last images are ``a`` and ``b`` exactly (decode inverts encode exactly).
    Returns ``(steps, C, H, W)`` integers."""
    if steps < 2:
        raise ValueError(f"interpolate: steps must be >= 2, got {steps}")
    device = model.base.loc.device
    x = torch.stack([a, b]).to(device).long()
    latents = model.encode(x, generator=stream(seed, "sample", device=device))
    loc, scale = model.base.loc, torch.exp(model.base.log_scale)
    standard = {k: (v - loc) / scale if k == "base" else v for k, v in latents.items()}
    frames = []
    for i in range(steps):
        t = i / (steps - 1)
        if i in (0, steps - 1):
            frame = {k: v[i // (steps - 1) : i // (steps - 1) + 1] for k, v in latents.items()}
        else:
            frame = {k: slerp(v[:1], v[1:], t) for k, v in standard.items()}
            frame["base"] = loc + scale * frame["base"]
        frames.append(model.decode(frame).cpu())
    return torch.cat(frames)


def to_pil(image: torch.Tensor, num_bits: int = 8, scale: int = 1) -> Image.Image:
    """(C, H, W) integers in 0 .. 2^bits-1 -> an 8-bit PIL image (L or RGB), each pixel shown as
    a ``scale x scale`` block."""
    levels = 255 / (2**num_bits - 1)
    array = (image.double() * levels).round().clamp(0, 255).to(torch.uint8)
    array = array.permute(1, 2, 0).numpy()
    img = Image.fromarray(array[..., 0] if array.shape[2] == 1 else array)
    return img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)


def readable_scale(height: int, width: int) -> int:
    """The default enlargement: the smallest integer that shows the image's short side at
    :data:`READABLE` pixels or more (3 for 28x28 and 32x32, 2 for 64x64)."""
    return max(1, math.ceil(READABLE / min(height, width)))


def grid_size(
    n: int, height: int, width: int, nrow: int = 8, padding: int = 2, scale: int | None = None
) -> tuple[int, int]:
    """``(width, height)`` in pixels of the PNG :func:`save_grid` makes of ``n`` images of
    ``height x width``."""
    scale = scale or readable_scale(height, width)
    ncol = min(nrow, n)
    rows = (n + ncol - 1) // ncol
    return ncol * (width * scale + padding) + padding, rows * (height * scale + padding) + padding


def check_grid(
    n: int,
    height: int,
    width: int,
    nrow: int = 8,
    scale: int | None = None,
    what: str = "sample: a grid",
    advice: str = "for many images write one PNG each (--each-dir DIR --no-grid) or sample "
    "fewer seeds",
) -> None:
    """Refuse, before any sampling, a grid larger than Pillow opens (twice
    ``PIL.Image.MAX_IMAGE_PIXELS``: a PNG nobody could read back); the message starts with
    ``what`` and ends with ``advice``."""
    limit = Image.MAX_IMAGE_PIXELS and 2 * Image.MAX_IMAGE_PIXELS
    w, h = grid_size(n, height, width, nrow, scale=scale)
    if limit and w * h > limit:
        raise ConfigError(
            f"{what} of {n:,} images would be {w:,} x {h:,} pixels, more than Pillow opens "
            f"({limit:,}); {advice}"
        )


def save_grid(
    images: torch.Tensor,
    path: str | os.PathLike,
    nrow: int = 8,
    padding: int = 2,
    num_bits: int = 8,
    scale: int | None = None,
    metadata: Mapping[str, object] | None = None,
) -> Path:
    """Tile ``(N, C, H, W)`` integer images into one PNG, ``nrow`` per row, white gaps, each
    pixel enlarged ``scale`` times (nearest; default :func:`readable_scale`); ``metadata`` goes
    into the PNG's text chunks (e.g. the sampling temperature)."""
    n, c, h, w = images.shape
    if n < 1 or nrow < 1:
        raise ValueError(f"save_grid: needs images and nrow >= 1, got {n} images, nrow {nrow}")
    size = grid_size(n, h, w, nrow, padding, scale)
    scale = scale or readable_scale(h, w)
    h, w = h * scale, w * scale
    ncol = min(nrow, n)
    mode = "L" if c == 1 else "RGB"
    grid = Image.new(mode, size, color=255 if c == 1 else (255,) * 3)
    for i in range(n):
        where = (padding + (i % ncol) * (w + padding), padding + (i // ncol) * (h + padding))
        grid.paste(to_pil(images[i], num_bits, scale), where)
    info = PngInfo()
    for key, value in (metadata or {}).items():
        info.add_text(key, str(value))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path, pnginfo=info)
    return path
