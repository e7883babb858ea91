"""Random streams: every random draw of a run comes from a generator of its own.

A stream is named by the run's seed, its purpose and its indices, e.g. ``(0, "noise", 120, 1)``
for the model noise of chunk 1 of step 120. Its generator is seeded with 63 bits of the SHA-256
of that name, so streams of different purposes or indices are unrelated: the batch order of
epoch ``e`` and the augmentation of step ``e`` no longer share a seed, nor do the augmentation
and the model noise of one step (they did up to denseflow 0.1, whose streams were ``seed·1000003
+ index``). Distinct names collide with probability 2⁻⁶³.

Purposes:

``order`` (epoch)              the permutation of the training images in an epoch
``augment`` (step)             the flips and translations of a training batch
``noise`` (step, chunk)        the dequantization and cross-unit noise of a training chunk
``init``                       the noise of the ActNorm data-dependent initialisation
``eval`` (batch)               the noise of an evaluation batch (ELBO or IWBO)
``sample``                     the latent draws of one sampled image (seeded by its own seed)
``recalibrate`` (batch)        the images and noise of BatchNorm recalibration
``validation``                 which training images ``data.validation`` holds out (seed 0)
"""

from __future__ import annotations

import hashlib

import torch

PURPOSES = ("order", "augment", "noise", "init", "eval", "sample", "recalibrate", "validation")


def stream_seed(seed: int, purpose: str, *index: int) -> int:
    """The 63-bit seed of the stream ``(seed, purpose, *index)``."""
    if purpose not in PURPOSES:
        raise ValueError(f"unknown stream purpose {purpose!r}; expected one of {PURPOSES}")
    name = "/".join(str(int(v)) for v in (seed, *index))
    digest = hashlib.sha256(f"denseflow:{purpose}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def stream(
    seed: int, purpose: str, *index: int, device: torch.device | str = "cpu"
) -> torch.Generator:
    """A generator on ``device`` for the draws of ``purpose`` at ``index`` of the run ``seed``."""
    return torch.Generator(device=device).manual_seed(stream_seed(seed, purpose, *index))
