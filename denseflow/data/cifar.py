"""CIFAR-10: the python batches ``cifar-10-batches-py/{data_batch_1..5,test_batch}``.

Each batch is a pickled dict whose ``data`` holds one row per image: the R plane, the G plane
and the B plane of a 32x32 image. The downsampled ImageNet batches use the same layout, so
:mod:`denseflow.data.imagenet` reads its rows with :func:`batch_entry` and
:func:`rows_to_images` too.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .base import DataError, Request, find_dir, missing_dir_error, to_tensor
from .files import load_pickle, sha256_file

WHERE_TO_GET = (
    "the python version of CIFAR-10 (cifar-10-python.tar.gz from "
    "https://www.cs.toronto.edu/~kriz/cifar.html, unpacked to cifar-10-batches-py/)"
)


def batch_entry(batch: Any, path: Path, key: str, required: bool = True) -> Any:
    """``batch[key]`` of a dict with str (Python 3) or bytes (Python 2 ``encoding='bytes'``)
    keys; ``None`` for a missing entry that is not ``required``."""
    if not isinstance(batch, dict):
        raise DataError(f"{path}: expected a pickled dict, found {type(batch).__name__}")
    for k in (key, key.encode()):
        if k in batch:
            return batch[k]
    if required:
        raise DataError(f"{path}: no {key!r} entry (keys: {sorted(str(k) for k in batch)[:8]})")
    return None


def rows_to_images(data: Any, path: Path, side: int, labels: Any = None) -> np.ndarray:
    """(N, 3*side*side) uint8 rows, each the R plane, G plane, B plane -> (N, 3, side, side);
    ``labels``, if given, must be one per row."""
    if not isinstance(data, np.ndarray):
        raise DataError(f"{path}: 'data' is a {type(data).__name__}, expected a numpy array")
    if data.dtype != np.uint8:
        raise DataError(f"{path}: 'data' has dtype {data.dtype}, expected uint8")
    if data.ndim != 2 or data.shape[1] != 3 * side * side:
        other = math.isqrt(data.shape[1] // 3) if data.ndim == 2 else 0
        hint = (
            f" ({other}x{other} images)"
            if data.ndim == 2 and 3 * other * other == data.shape[1]
            else ""
        )
        raise DataError(
            f"{path}: 'data' has shape {tuple(data.shape)}{hint}, expected "
            f"(N, {3 * side * side}) rows of {side}x{side} RGB images"
        )
    if labels is not None and len(labels) != data.shape[0]:
        raise DataError(f"{path}: {len(labels)} labels for {data.shape[0]} images")
    return data.reshape(-1, 3, side, side)


def read_cifar10(req: Request) -> tuple[torch.Tensor, dict]:
    """The five training batches or ``test_batch``, from ``data_dir/cifar-10-batches-py/`` or
    ``data_dir`` itself."""
    root, split, limit = req.root, req.split, req.limit
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    candidates = [root / "cifar-10-batches-py", root] if root is not None else []
    folder = find_dir(candidates, names)
    if folder is None:
        raise missing_dir_error("cifar10", WHERE_TO_GET, root, candidates)
    for n in names:
        if not (folder / n).is_file():
            raise DataError(f"{folder / n}: missing (cifar10 {split} needs {', '.join(names)})")
    parts, files, total = [], {}, 0
    for n in names:
        path = folder / n
        files[n] = sha256_file(path)
        batch = load_pickle(path)
        images = rows_to_images(
            batch_entry(batch, path, "data"),
            path,
            32,
            batch_entry(batch, path, "labels", required=False),
        )
        parts.append(images[: None if limit is None else limit - total])
        total += len(parts[-1])
        if limit is not None and total >= limit:
            break
    images = to_tensor(np.concatenate(parts) if len(parts) > 1 else parts[0])
    return images, {
        "path": str(folder),
        "release": "CIFAR-10 python version (pickled batches)",
        "files": files,
    }
