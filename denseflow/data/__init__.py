"""Image datasets on local disk -> uint8 ``(N, C, H, W)`` tensors, and the training augmentations.

Every reader takes the files in their usual on-disk format, checks them, and returns an
:class:`ImageSet`: the raw 8-bit images (the model's input, spec §2) plus a JSON-serialisable
provenance record (folder, release, sha256 of every file read). Nothing is ever downloaded and
nothing is written anywhere; a missing or damaged file is a :class:`DataError` whose one-line
message names the file and what is wrong.

Readers (spec §15; layouts and sources in ``docs/data.md``), one module per on-disk format:
``cifar`` (``cifar10``), ``imagenet`` (``imagenet32``, ``imagenet64``), ``celeba``, ``idx``
(``mnist``, ``fashion_mnist``) and ``folder``; :data:`READERS` maps each dataset name to its
reader. ``files`` reads the files (restricted unpickler, sha256 digests), ``base`` holds what the
readers share, ``augment`` the training augmentations.

:func:`hold_out` splits a validation set off the training images (``data.validation``).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from ..seeding import stream
from .augment import AUGMENTATIONS, augment
from .base import DataError, ImageSet, Read, Reader, Request, fmt
from .celeba import read_celeba
from .cifar import read_cifar10
from .folder import read_folder
from .idx import (
    DEBIAN_FASHION_MNIST_DIR,
    embedded_fashion_mnist_dir,
    read_fashion_mnist,
    read_mnist,
)
from .imagenet import (
    IMAGENET_RELEASE_NPZ,
    IMAGENET_RELEASE_PICKLE,
    IMAGENET_RELEASE_PNG,
    read_imagenet32,
    read_imagenet64,
)

__all__ = [
    "AUGMENTATIONS",
    "DATASETS",
    "DEBIAN_FASHION_MNIST_DIR",
    "IMAGENET_RELEASE_NPZ",
    "IMAGENET_RELEASE_PICKLE",
    "IMAGENET_RELEASE_PNG",
    "DataError",
    "ImageSet",
    "augment",
    "embedded_fashion_mnist_dir",
    "hold_out",
    "load_images",
]

#: the registry: dataset name -> its reader and, for fixed-size images, their native (H, W)
READERS: dict[str, Reader] = {
    "cifar10": Reader(read_cifar10, native_size=(32, 32)),
    "imagenet32": Reader(read_imagenet32, native_size=(32, 32)),
    "imagenet64": Reader(read_imagenet64, native_size=(64, 64)),
    "celeba": Reader(read_celeba),
    "mnist": Reader(read_mnist, native_size=(28, 28)),
    "fashion_mnist": Reader(read_fashion_mnist, native_size=(28, 28)),
    "folder": Reader(read_folder, splits=("train", "test", "all")),
}
DATASETS = tuple(READERS)
#: every split some reader has; ``"all"`` (a folder's own images) only ``folder`` has
SPLITS = ("train", "test", "all")


def _choices(values: tuple[str, ...], conjunction: str = "or") -> str:
    """``('a', 'b', 'c')`` as ``"'a', 'b' or 'c'"`` (or another ``conjunction``)."""
    quoted = [repr(v) for v in values]
    if len(quoted) == 1:
        return quoted[0]
    return f"{', '.join(quoted[:-1])} {conjunction} {quoted[-1]}"


def load_images(
    name: str,
    split: str = "train",
    data_dir: str | os.PathLike | None = None,
    image_size: tuple[int, int] | None = None,
    celeba_crop: bool = False,
    limit: int | None = None,
    channels: int | None = None,
) -> ImageSet:
    """Read one split of a dataset from local disk as uint8 ``(N, C, H, W)`` images.

    Args:
        name: one of :data:`DATASETS`.
        split: ``"train"`` or ``"test"`` (the evaluation split: CIFAR-10 ``test_batch``, ImageNet
            ``val_data`` (the 50k validation set), CelebA partition 2, (Fashion-)MNIST ``t10k``;
            a ``folder``'s ``test/`` subfolder). A ``folder`` without ``train/`` and ``test/``
            subfolders has neither (an error); ``"all"``, for ``folder`` only, reads the image
            files of the folder itself, ignoring any subfolders, ``train/`` and ``test/``
            included (scoring a folder as it is).
        data_dir: the folder holding the dataset's usual top folder (``cifar-10-batches-py/``,
            ``celeba/``, ``fashion-mnist/``, ...) or that folder itself. Only ``fashion_mnist`` may
            omit it (Debian's ``/usr/share/datasets/fashion-mnist``, else the bundled subset).
        image_size: ``(H, W)`` the model wants. Fixed-size datasets (CIFAR-10 32, ImageNet 32/64,
            MNIST 28) only accept their native size (``None`` means native); CelebA defaults to
            64x64; a ``folder`` requires it.
        celeba_crop: CelebA only. ``False`` (default, faithful to the official code, spec §16.6):
            the uncropped 178x218 image resized to ``image_size`` (aspect squashed). ``True``: the
            148x148 crop at (left 15, top 40) the official code intended, then resized.
        limit: keep only the first ``limit`` images (files beyond them are not read).
        channels: the model's channel count (1 or 3), or ``None``. A ``folder`` reads its images
            with it (a greyscale image gets three equal channels for 3; a colour image for 1 is
            an error naming the file); for the other datasets, another count is an error.

    Returns:
        An :class:`ImageSet`; ``images`` is uint8 ``(N, C, H, W)``, ``C`` 3 (1 for MNIST-like data
        and for a folder of greyscale images); ``names`` the images' file names for a
        ``folder``, else ``None``.

    Raises:
        DataError: unknown name or split (or a split the dataset does not have), missing folder
            or file, truncated or malformed file, image of the wrong size or mode, refused pickle
            content.
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    reader = READERS[name]
    if split in SPLITS and split not in reader.splits:
        raise DataError(
            f"{name}: no split {split!r} (it is for a plain folder of images, dataset 'folder'); "
            f"{name} has the splits {_choices(reader.splits, 'and')}"
        )
    if split not in reader.splits:
        raise DataError(f"{name}: unknown split {split!r}; choose {_choices(reader.splits)}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise DataError(f"{name}: limit must be a positive integer or None, got {limit!r}")
    if image_size is not None:
        size = tuple(image_size)
        if len(size) != 2 or not all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0 for v in size
        ):
            raise DataError(
                f"{name}: image_size must be (H, W) with positive integers, got {image_size!r}"
            )
        image_size = (int(size[0]), int(size[1]))
    if celeba_crop and name != "celeba":
        raise DataError(f"{name}: celeba_crop applies only to celeba")
    root = Path(data_dir).expanduser() if data_dir is not None else None
    if root is not None and not root.is_dir():
        raise DataError(f"{root}: data_dir does not exist or is not a folder ({name})")

    native = reader.native_size
    if native is not None and image_size is not None and image_size != native:
        raise DataError(f"{name} images are {fmt(native)}, the model wants {fmt(image_size)}")
    images, source, names = Read(
        *reader.read(Request(name, root, split, image_size, celeba_crop, limit, channels))
    )
    if channels is not None and images.shape[1] != channels:
        raise DataError(
            f"{name} images have {images.shape[1]} channel(s), the model takes {channels}"
        )
    source["num_images"] = int(images.shape[0])
    return ImageSet(images=images.contiguous(), name=name, split=split, source=source, names=names)


def hold_out(trainset: ImageSet, n: int) -> tuple[ImageSet, ImageSet]:
    """Split ``n`` images off a training set as a validation set (``data.validation``): the first
    ``n`` of a fixed permutation of its images, drawn from the stream ``(0, "validation")``, so
    that runs of every ``train.seed`` hold out the same images of a dataset read with the same
    ``data.train_limit``.

    Returns the image sets ``(train, validation)``, each in the order of ``trainset`` (a
    folder's file names follow their images); the ``source`` of both gains ``validation``: how
    many images were held out of how many, and the sha256 of their indices (int64 little-endian).

    Raises:
        DataError: ``n`` is not between 1 and the number of training images minus one.
    """
    total = len(trainset.images)
    if not 0 < n < total:
        raise DataError(
            f"{trainset.name}: data.validation={n} must leave training images: between 1 and "
            f"{total - 1} of the {total} read"
        )
    held = torch.zeros(total, dtype=torch.bool)
    held[torch.randperm(total, generator=stream(0, "validation"))[:n]] = True
    indices = held.nonzero().flatten().numpy().astype("<i8")
    record = {"held_out": n, "of": total, "indices_sha256": hashlib.sha256(indices).hexdigest()}

    def part(keep: torch.Tensor, split: str) -> ImageSet:
        names = trainset.names
        if names is not None:
            names = tuple(name for name, k in zip(names, keep.tolist(), strict=True) if k)
        source = trainset.source | {"num_images": int(keep.sum()), "validation": record}
        return ImageSet(trainset.images[keep].contiguous(), trainset.name, split, source, names)

    return part(~held, "train"), part(held, "validation")
