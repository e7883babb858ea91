"""MNIST and Fashion-MNIST: the IDX files ``{train,t10k}-{images-idx3,labels-idx1}-ubyte``,
gzip or raw.

Without a ``data_dir``, Fashion-MNIST falls back to the Debian package's folder
(:data:`DEBIAN_FASHION_MNIST_DIR`) and then to a subset bundled with the package
(:func:`embedded_fashion_mnist_dir`). The labels are not returned, but a label file that does not
match its images is reported. A ``data_dir`` without IDX files but with PNG/JPEG images gets a
hint to use the ``folder`` dataset.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from .base import DataError, Request, find_dir, missing_dir_error, to_tensor
from .files import read_bytes

#: where the Debian package ``dataset-fashion-mnist`` installs its files
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
EMBEDDED_FASHION_MNIST_RELEASE = (
    "Fashion-MNIST subset bundled with denseflow: first 10000 train / 2000 test images of Debian "
    "dataset-fashion-mnist 0.0~git20200523.55506a9-1"
)

_IDX_IMAGES, _IDX_LABELS = 2051, 2049
_WHERE_TO_GET = {
    "mnist": "the MNIST IDX files {train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz] "
    "(from http://yann.lecun.com/exdb/mnist/ or a mirror)",
    "fashion_mnist": "the Fashion-MNIST IDX files "
    "{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz] "
    "(https://github.com/zalandoresearch/fashion-mnist, or apt-get install dataset-fashion-mnist)",
}
_SUBFOLDERS = {
    "mnist": ["", "mnist", "MNIST", "MNIST/raw", "mnist/raw"],
    "fashion_mnist": [
        "",
        "fashion-mnist",
        "fashion_mnist",
        "FashionMNIST",
        "FashionMNIST/raw",
        "fashion-mnist/raw",
    ],
}
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def embedded_fashion_mnist_dir() -> Path:
    """Folder of the Fashion-MNIST subset shipped with the package (IDX gzip files, 10000 train /
    2000 test images; see its README.md and LICENSE)."""
    return Path(__file__).resolve().parent.parent / "datasets" / "fashion_mnist"


def read_mnist(req: Request) -> tuple[torch.Tensor, dict]:
    """MNIST from ``data_dir`` or its ``mnist/``, ``MNIST/raw/``, ... subfolder."""
    return _read_idx_dataset("mnist", req.root, req.split, req.limit, "MNIST IDX")


def read_fashion_mnist(req: Request) -> tuple[torch.Tensor, dict]:
    """Fashion-MNIST from ``data_dir`` or its ``fashion-mnist/``, ... subfolder; without a
    ``data_dir``, from the Debian package's folder, else from the bundled subset."""
    root, release = req.root, "Fashion-MNIST IDX"
    if root is None:
        if DEBIAN_FASHION_MNIST_DIR.is_dir():
            root = DEBIAN_FASHION_MNIST_DIR
            release = "Fashion-MNIST IDX (Debian package dataset-fashion-mnist)"
        else:
            root, release = embedded_fashion_mnist_dir(), EMBEDDED_FASHION_MNIST_RELEASE
    return _read_idx_dataset("fashion_mnist", root, req.split, req.limit, release)


def _read_idx(path: Path, magic: int) -> tuple[np.ndarray, str]:
    """An IDX file (gzip detected by its magic bytes ``1f 8b``, not by name) -> uint8 array,
    sha256."""
    raw = read_bytes(path)
    sha = hashlib.sha256(raw).hexdigest()
    gzipped = raw[:2] == b"\x1f\x8b"
    if gzipped:
        try:
            data = gzip.decompress(raw)
        except (EOFError, OSError, zlib.error) as err:
            raise DataError(f"{path}: truncated or corrupt gzip file ({err})") from None
    else:
        data = raw
    what = "images" if magic == _IDX_IMAGES else "labels"
    if len(data) < 4:
        raise DataError(f"{path}: {len(data)} bytes, too short for an IDX header")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise DataError(f"{path}: magic number {found}, expected {magic} (IDX {what} file)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated IDX header ({len(data)} bytes)")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = header + math.prod(dims)
    if len(data) != expected:
        state = "truncated" if len(data) < expected else "longer than its header says"
        after = " after gunzip" if gzipped else ""
        raise DataError(
            f"{path}: {len(data)} bytes{after}, the header {dims} needs {expected}; "
            f"the file is {state}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims), sha


def _folder_hint(root: Path) -> str:
    """For a ``root`` whose own or ``train/`` files include a PNG/JPEG (by its name; an
    unreadable folder holds none): what to do with them, in train or evaluate; else ``""``."""
    for folder in (root, root / "train"):
        try:
            if folder.is_dir() and any(
                p.suffix.lower() in _IMAGE_SUFFIXES and p.is_file() for p in folder.iterdir()
            ):
                return (
                    "; the folder holds images: train on them as data.dataset=folder (--set "
                    "data.dataset=folder), or score them as they are (denseflow evaluate "
                    f"--images {folder})"
                )
        except OSError:
            continue
    return ""


def _find_idx(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _read_idx_dataset(
    name: str, root: Path | None, split: str, limit: int | None, release: str
) -> tuple[torch.Tensor, dict]:
    prefix = "train" if split == "train" else "t10k"
    stem = f"{prefix}-images-idx3-ubyte"
    if root is None:
        raise missing_dir_error(name, _WHERE_TO_GET[name], None, [])
    candidates = [root / s if s else root for s in _SUBFOLDERS[name]]
    names = [stem, f"{stem}.gz", f"{prefix}-labels-idx1-ubyte", f"{prefix}-labels-idx1-ubyte.gz"]
    folder = find_dir(candidates, names)
    if folder is None:
        raise missing_dir_error(name, _WHERE_TO_GET[name], root, candidates, _folder_hint(root))
    image_path = _find_idx(folder, stem)
    if image_path is None:
        raise DataError(f"{folder / stem}[.gz]: missing ({name} {split} images)")
    array, sha = _read_idx(image_path, _IDX_IMAGES)
    if array.ndim != 3 or array.shape[1:] != (28, 28):
        raise DataError(f"{image_path}: images of shape {array.shape[1:]}, expected 28x28")
    files = {image_path.name: sha}
    label_path = _find_idx(folder, f"{prefix}-labels-idx1-ubyte")
    # labels are not returned, but a mismatched pair is a mistake worth reporting
    if label_path is not None:
        labels, files[label_path.name] = _read_idx(label_path, _IDX_LABELS)
        if labels.ndim != 1 or len(labels) != len(array):
            raise DataError(
                f"{label_path}: {labels.shape[0]} labels for the {len(array)} images of "
                f"{image_path.name}"
            )
    images = to_tensor(array[:limit, None])
    return images, {"path": str(folder), "release": release, "files": files}
