"""What every reader shares: the error and result types, the registry entry, and small helpers.

A reader is a function of a :class:`Request` that returns the images as a uint8 ``(N, C, H, W)``
tensor and the provenance record of :class:`ImageSet`'s ``source`` (without ``num_images``,
which :func:`denseflow.data.load_images` adds), as a plain pair or, for a reader that knows each
image's file name, as a :class:`Read`; :class:`Reader` is its entry in the registry.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from ..errors import DenseFlowError

_PROGRESS_MIN = 1000  # show a progress bar from this many files on
_MAX_THREADS = 8


class DataError(DenseFlowError):
    """A dataset that cannot be read; the one-line message names the file or folder and what is
    wrong."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).splitlines()))


@dataclass(frozen=True)
class ImageSet:
    """Images of one split of a dataset, as the model consumes them (spec §2).

    Attributes:
        images: uint8 tensor ``(N, C, H, W)``, contiguous, values 0..255.
        name: the dataset name passed to :func:`load_images`.
        split: ``"train"``, ``"test"``, (``folder`` only) ``"all"`` or (the images
            :func:`denseflow.data.hold_out` sets aside) ``"validation"``.
        source: provenance, JSON-serialisable: ``path`` (folder the data was found in),
            ``release``, ``files`` (file or folder name relative to ``path`` -> sha256 hex digest
            of what was read; for a folder of images, the digest of the ``sha256sum``-format
            manifest of the images read, sorted by name), ``num_images``, and reader-specific
            notes such as ``preprocessing`` and (``folder``) ``resized``.
        names: for a ``folder`` dataset, the file name of every image in the order of ``images``,
            relative to the folder of the split (``"cat.png"``); ``None`` for the other readers,
            whose images have only an index.
    """

    images: torch.Tensor
    name: str
    split: str
    source: dict
    names: tuple[str, ...] | None = None


class Read(NamedTuple):
    """What a reader returns: the images, the provenance record and, where the reader knows them,
    the file names of the images (see :class:`ImageSet`). A plain ``(images, source)`` pair
    stands for ``Read(images, source, None)``."""

    images: torch.Tensor
    source: dict
    names: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Request:
    """The checked arguments of :func:`load_images`, as a reader receives them.

    ``root`` is the existing ``data_dir`` or ``None``; ``image_size`` is ``(H, W)`` or ``None``;
    ``channels`` the model's channel count or ``None`` (a ``folder`` reads its images with it).
    """

    name: str
    root: Path | None
    split: str
    image_size: tuple[int, int] | None
    celeba_crop: bool
    limit: int | None
    channels: int | None = None


@dataclass(frozen=True)
class Reader:
    """A registry entry: ``read`` turns a :class:`Request` into ``(images, source)`` or a
    :class:`Read`; ``native_size`` is the ``(H, W)`` of a dataset whose images have a fixed size
    (the only ``image_size`` it accepts), ``None`` for a dataset that resizes; ``splits`` are the
    splits it has."""

    read: Callable[[Request], tuple[torch.Tensor, dict] | Read]
    native_size: tuple[int, int] | None = None
    splits: tuple[str, ...] = ("train", "test")


def fmt(size: tuple[int, int]) -> str:
    """``(H, W)`` as ``"HxW"``."""
    return f"{size[0]}x{size[1]}"


def to_tensor(array: np.ndarray) -> torch.Tensor:
    """A contiguous, writable uint8 tensor (copies only when numpy's array is read-only or
    strided)."""
    array = np.ascontiguousarray(array)
    if not array.flags.writeable:
        array = array.copy()
    return torch.from_numpy(array)


def missing_dir_error(
    name: str, expected: str, data_dir: Path | None, searched: Sequence[Path], hint: str = ""
) -> DataError:
    """The error for a dataset not found: no ``data_dir`` given, or nothing found in the folders
    ``searched``; ``expected`` says what the folder should hold and where to get it; ``hint``
    (``"; ..."``) ends the second message."""
    where = ", ".join(str(p) for p in dict.fromkeys(searched))
    if data_dir is None:
        return DataError(f"{name}: no data_dir given; expected a folder with {expected}")
    return DataError(f"{name}: no dataset files found in {where}; expected {expected}{hint}")


def find_dir(candidates: Sequence[Path], names: Sequence[str]) -> Path | None:
    """The first existing candidate folder that holds at least one of ``names``."""
    for folder in candidates:
        if folder.is_dir() and any((folder / n).is_file() for n in names):
            return folder
    return None


def decode_into(
    out: np.ndarray,
    items: Sequence[Any],
    decode: Callable[[Any], tuple[np.ndarray, Any]],
    desc: str,
) -> list[Any]:
    """``out[i], meta[i] = decode(items[i])`` for every item, on a few threads (PIL decodes
    outside the GIL), writing straight into the preallocated ``out`` ``(N, C, H, W)``; a tqdm bar
    for long runs. Returns the list of ``meta``; the first error is raised."""
    n = len(items)
    threads = min(_MAX_THREADS, os.cpu_count() or 1)

    def work(i: int) -> Any:
        array, meta = decode(items[i])
        out[i] = array
        return meta

    metas = []
    with tqdm(total=n, desc=desc, unit="img", disable=True if n < _PROGRESS_MIN else None) as bar:
        if threads <= 1 or n < 64:
            for i in range(n):
                metas.append(work(i))
                bar.update()
        else:
            with ThreadPoolExecutor(max_workers=threads) as pool:
                for start in range(0, n, 4096):  # bounded number of pending futures
                    for meta in pool.map(work, range(start, min(n, start + 4096))):
                        metas.append(meta)
                        bar.update()
    return metas
