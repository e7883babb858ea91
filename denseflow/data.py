"""Image datasets on local disk -> uint8 ``(N, C, H, W)`` tensors, and the training augmentations.

Every reader takes the files in their usual on-disk format, checks them, and returns an
:class:`ImageSet`: the raw 8-bit images (the model's input, spec §2) plus a JSON-serialisable
provenance record (folder, release, sha256 of every file read). Nothing is ever downloaded and
nothing is written anywhere; a missing or damaged file is a :class:`DataError` whose one-line
message names the file and what is wrong.

Readers (spec §15; layouts and sources in ``docs/data.md``):

* ``cifar10``: the python batches ``cifar-10-batches-py/{data_batch_1..5,test_batch}``.
* ``imagenet32`` / ``imagenet64``: the image-net.org downsampled release (``train_data_batch_1..10``
  and ``val_data``, as pickles or ``.npz``), or a folder of PNGs (``train_32x32/``,
  ``valid_32x32/``: the older ``image-net.org/small`` release). The release is recorded (spec §16.7).
* ``celeba``: ``img_align_celeba/*.jpg`` + ``list_eval_partition.txt``; faithful (uncropped,
  squashed) or cropped preprocessing (spec §16.6).
* ``mnist`` / ``fashion_mnist``: IDX files, gzip or raw. Fashion-MNIST falls back to the Debian
  package's folder and then to a subset bundled with the package.
* ``folder``: any folder of PNG/JPEG images, resized on the short side and center-cropped.

Pickled files are read with a restricted unpickler that admits only numpy array reconstruction
and plain values: a crafted pickle cannot run code.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import importlib
import io
import math
import os
import pickle
import struct
import zipfile
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

__all__ = [
    "AUGMENTATIONS",
    "DATASETS",
    "DataError",
    "ImageSet",
    "augment",
    "embedded_fashion_mnist_dir",
    "load_images",
]

DATASETS = ("cifar10", "imagenet32", "imagenet64", "celeba", "mnist", "fashion_mnist", "folder")
AUGMENTATIONS = ("none", "hflip", "eta", "neta")
SPLITS = ("train", "test")

#: native (H, W) of the readers whose images have a fixed size
NATIVE_SIZE = {
    "cifar10": (32, 32),
    "imagenet32": (32, 32),
    "imagenet64": (64, 64),
    "mnist": (28, 28),
    "fashion_mnist": (28, 28),
}
#: CelebA: aligned images are 178 wide, 218 high; the official code's intended crop (spec §16.6)
CELEBA_NATIVE = (218, 178)
CELEBA_CROP_BOX = (15, 40, 15 + 148, 40 + 148)  # (left, top, right, bottom)
CELEBA_DEFAULT_SIZE = (64, 64)

#: where the Debian package ``dataset-fashion-mnist`` installs its files
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
EMBEDDED_FASHION_MNIST_RELEASE = (
    "Fashion-MNIST subset bundled with denseflow: first 10000 train / 2000 test images of Debian "
    "dataset-fashion-mnist 0.0~git20200523.55506a9-1"
)

IMAGENET_RELEASE_PICKLE = "image-net.org downsampled (2017 release, pickle)"
IMAGENET_RELEASE_NPZ = "image-net.org downsampled (2017 release, npz)"
IMAGENET_RELEASE_PNG = "image-net.org/small (PNG, older release)"

_GREY_MODES = ("1", "L", "LA")
_COLOUR_MODES = ("P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr")
_PROGRESS_MIN = 1000  # show a progress bar from this many files on
_MAX_THREADS = 8

_WHERE_TO_GET = {
    "cifar10": "the python version of CIFAR-10 (cifar-10-python.tar.gz from "
    "https://www.cs.toronto.edu/~kriz/cifar.html, unpacked to cifar-10-batches-py/)",
    "imagenet32": "the downsampled ImageNet 32x32 batches (Imagenet32_train.zip and Imagenet32_val.zip, or their _npz "
    "variants, from https://image-net.org/download-images, unpacked)",
    "imagenet64": "the downsampled ImageNet 64x64 batches (Imagenet64_train_part1.zip, Imagenet64_train_part2.zip and "
    "Imagenet64_val.zip, or their _npz variants, from https://image-net.org/download-images, unpacked)",
    "celeba": "CelebA's aligned images (img_align_celeba.zip, unpacked to img_align_celeba/) and "
    "list_eval_partition.txt in one folder, from https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html",
    "mnist": "the MNIST IDX files {train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz] "
    "(from http://yann.lecun.com/exdb/mnist/ or a mirror)",
    "fashion_mnist": "the Fashion-MNIST IDX files {train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz] "
    "(https://github.com/zalandoresearch/fashion-mnist, or apt-get install dataset-fashion-mnist)",
    "folder": "a folder of PNG/JPEG images (optionally with train/ and test/ subfolders)",
}


class DataError(ValueError):
    """A dataset that cannot be read; the one-line message names the file or folder and what is wrong."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).splitlines()))


@dataclass(frozen=True)
class ImageSet:
    """Images of one split of a dataset, as the model consumes them (spec §2).

    Attributes:
        images: uint8 tensor ``(N, C, H, W)``, contiguous, values 0..255.
        name: the dataset name passed to :func:`load_images`.
        split: ``"train"`` or ``"test"``.
        source: provenance, JSON-serialisable: ``path`` (folder the data was found in), ``release``,
            ``files`` (file or folder name relative to ``path`` -> sha256 hex digest of what was read;
            for a folder of images, the digest of the ``sha256sum``-format manifest of the images read,
            sorted by name), ``num_images``, and reader-specific notes such as ``preprocessing``.
    """

    images: torch.Tensor
    name: str
    split: str
    source: dict


# --------------------------------------------------------------------------------------------
# small helpers


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror or err})") from None
    return digest.hexdigest()


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror or err})") from None


def _manifest_digest(entries: Sequence[tuple[str, str]]) -> str:
    """sha256 of the ``sha256sum`` output for ``(name, sha256)`` entries, sorted by name."""
    lines = "".join(f"{sha}  {name}\n" for name, sha in sorted(entries))
    return hashlib.sha256(lines.encode()).hexdigest()


def _fmt(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


def _to_tensor(array: np.ndarray) -> torch.Tensor:
    """A contiguous, writable uint8 tensor (copies only when numpy's array is read-only or strided)."""
    array = np.ascontiguousarray(array)
    if not array.flags.writeable:
        array = array.copy()
    return torch.from_numpy(array)


def _check_size(name: str, image_size: tuple[int, int] | None) -> tuple[int, int]:
    native = NATIVE_SIZE[name]
    if image_size is not None and tuple(image_size) != native:
        raise DataError(f"{name} images are {_fmt(native)}, the model wants {_fmt(image_size)}")
    return native


def _missing_dir_error(name: str, data_dir: Path | None, searched: Sequence[Path]) -> DataError:
    where = ", ".join(str(p) for p in dict.fromkeys(searched))
    if data_dir is None:
        return DataError(f"{name}: no data_dir given; expected a folder with {_WHERE_TO_GET[name]}")
    return DataError(f"{name}: no dataset files found in {where}; expected {_WHERE_TO_GET[name]}")


def _decode_into(
    out: np.ndarray, items: Sequence[Any], decode: Callable[[Any], tuple[np.ndarray, Any]], desc: str
) -> list[Any]:
    """``out[i], meta[i] = decode(items[i])`` for every item, on a few threads (PIL decodes outside the
    GIL), writing straight into the preallocated ``out`` ``(N, C, H, W)``; a tqdm bar for long runs.
    Returns the list of ``meta``; the first error is raised."""
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


# --------------------------------------------------------------------------------------------
# restricted unpickling (CIFAR-10 and ImageNet batches are pickles holding numpy arrays)


class _Refused(Exception):
    def __init__(self, module: str, name: str) -> None:
        super().__init__(f"{module}.{name}")
        self.what = f"{module}.{name}"


def _numpy_attr(submodule: str, name: str) -> Any:
    """``numpy._core.<submodule>.<name>`` (numpy 2) or ``numpy.core.<submodule>.<name>`` (numpy 1)."""
    for prefix in ("numpy._core.", "numpy.core."):
        try:
            return getattr(importlib.import_module(prefix + submodule), name)
        except (ImportError, AttributeError):
            continue
    raise _Refused(f"numpy.core.{submodule}", name)


def _latin1_encode(text: str, encoding: str = "latin1", errors: str = "strict") -> bytes:
    """What protocol-0..2 pickles written by Python 3 use for ``bytes``; only latin-1 is admitted."""
    if codecs.lookup(encoding).name != "iso8859-1" or not isinstance(text, str):
        raise _Refused("_codecs.encode", repr(encoding))
    return text.encode("latin1", errors)


def _allowed_global(module: str, name: str) -> Any:
    if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name in ("_reconstruct", "scalar"):
        return _numpy_attr("multiarray", name)
    if module in ("numpy.core.numeric", "numpy._core.numeric") and name == "_frombuffer":
        return _numpy_attr("numeric", name)  # numpy's pickle protocol 5 form: frombuffer(...).reshape(...)
    if module == "numpy" and name == "ndarray":
        return np.ndarray
    if module == "numpy" and name == "dtype":
        return np.dtype
    if module == "_codecs" and name == "encode":
        return _latin1_encode
    if module in ("builtins", "__builtin__") and name in ("set", "frozenset", "bytearray", "complex"):
        return {"set": set, "frozenset": frozenset, "bytearray": bytearray, "complex": complex}[name]
    raise _Refused(module, name)


class _ArrayUnpickler(pickle.Unpickler):
    """Admits numpy array reconstruction (``_reconstruct``/``_frombuffer``, ``ndarray``, ``dtype``,
    ``scalar``) and the few globals pickle needs for plain values; refuses everything else, so a
    crafted file cannot import or call anything that runs code."""

    def find_class(self, module: str, name: str) -> Any:
        return _allowed_global(module, name)

    def persistent_load(self, pid: Any) -> Any:
        raise _Refused("persistent_load", repr(pid)[:40])


def _load_pickle(path: Path) -> Any:
    """Unpickle a data file with :class:`_ArrayUnpickler` (Python 2 pickles read as latin-1)."""
    try:
        with open(path, "rb") as f:
            return _ArrayUnpickler(f, encoding="latin1").load()
    except _Refused as refused:
        raise DataError(
            f"{path}: the pickle asks for {refused.what}, which a data file never needs; refused "
            "(restricted unpickler: numpy arrays and plain values only)"
        ) from None
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror or err})") from None
    except Exception as err:  # EOFError, UnpicklingError, ValueError, ... of an untrusted file
        raise DataError(f"{path}: not a readable pickle, truncated or corrupt ({type(err).__name__}: {err})") from None


def _key(batch: Any, path: Path, key: str, required: bool = True) -> Any:
    """``batch[key]`` of a dict with str (Python 3) or bytes (Python 2 ``encoding='bytes'``) keys."""
    if not isinstance(batch, dict):
        raise DataError(f"{path}: expected a pickled dict, found {type(batch).__name__}")
    for k in (key, key.encode()):
        if k in batch:
            return batch[k]
    if required:
        raise DataError(f"{path}: no {key!r} entry (keys: {sorted(str(k) for k in batch)[:8]})")
    return None


def _rows_to_images(data: Any, path: Path, side: int, labels: Any = None) -> np.ndarray:
    """(N, 3*side*side) uint8 rows, each the R plane, G plane, B plane -> (N, 3, side, side)."""
    if not isinstance(data, np.ndarray):
        raise DataError(f"{path}: 'data' is a {type(data).__name__}, expected a numpy array")
    if data.dtype != np.uint8:
        raise DataError(f"{path}: 'data' has dtype {data.dtype}, expected uint8")
    if data.ndim != 2 or data.shape[1] != 3 * side * side:
        other = math.isqrt(data.shape[1] // 3) if data.ndim == 2 else 0
        hint = f" ({other}x{other} images)" if data.ndim == 2 and 3 * other * other == data.shape[1] else ""
        raise DataError(
            f"{path}: 'data' has shape {tuple(data.shape)}{hint}, expected (N, {3 * side * side}) rows of "
            f"{side}x{side} RGB images"
        )
    if labels is not None and len(labels) != data.shape[0]:
        raise DataError(f"{path}: {len(labels)} labels for {data.shape[0]} images")
    return data.reshape(-1, 3, side, side)


# --------------------------------------------------------------------------------------------
# CIFAR-10


def _find_dir(candidates: Sequence[Path], names: Sequence[str]) -> Path | None:
    """The first existing candidate folder that holds at least one of ``names``."""
    for folder in candidates:
        if folder.is_dir() and any((folder / n).is_file() for n in names):
            return folder
    return None


def _load_cifar10(root: Path | None, split: str, limit: int | None) -> tuple[torch.Tensor, dict]:
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    candidates = [root / "cifar-10-batches-py", root] if root is not None else []
    folder = _find_dir(candidates, names)
    if folder is None:
        raise _missing_dir_error("cifar10", root, candidates)
    for n in names:
        if not (folder / n).is_file():
            raise DataError(f"{folder / n}: missing (cifar10 {split} needs {', '.join(names)})")
    parts, files, total = [], {}, 0
    for n in names:
        path = folder / n
        files[n] = _sha256_file(path)
        batch = _load_pickle(path)
        images = _rows_to_images(_key(batch, path, "data"), path, 32, _key(batch, path, "labels", required=False))
        parts.append(images[: None if limit is None else limit - total])
        total += len(parts[-1])
        if limit is not None and total >= limit:
            break
    images = _to_tensor(np.concatenate(parts) if len(parts) > 1 else parts[0])
    return images, {"path": str(folder), "release": "CIFAR-10 python version (pickled batches)", "files": files}


# --------------------------------------------------------------------------------------------
# downsampled ImageNet (spec §15, §16.7)


def _imagenet_bases(root: Path, side: int) -> list[Path]:
    return [root, root / f"imagenet{side}", root / f"Imagenet{side}"]


def _imagenet_batch_dirs(root: Path, side: int) -> list[Path]:
    subs = ["", f"Imagenet{side}_train", f"Imagenet{side}_val"]
    subs += [f"Imagenet{side}_train_part1", f"Imagenet{side}_train_part2"]
    subs += [s + "_npz" for s in subs[1:]]
    dirs = []
    for base in _imagenet_bases(root, side):
        dirs += [base / s if s else base for s in subs]
    return [d for d in dict.fromkeys(dirs) if d.is_dir()]


def _locate(dirs: Sequence[Path], filename: str) -> Path | None:
    for d in dirs:
        if (d / filename).is_file():
            return d / filename
    return None


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _load_imagenet(name: str, root: Path | None, split: str, limit: int | None) -> tuple[torch.Tensor, dict]:
    side = NATIVE_SIZE[name][0]
    if root is None:
        raise _missing_dir_error(name, None, [])
    stems = [f"train_data_batch_{i}" for i in range(1, 11)] if split == "train" else ["val_data"]
    dirs = _imagenet_batch_dirs(root, side)
    for suffix, release in (("", IMAGENET_RELEASE_PICKLE), (".npz", IMAGENET_RELEASE_NPZ)):
        found = [_locate(dirs, stem + suffix) for stem in stems]
        if not any(found):
            continue
        missing = [stem + suffix for stem, path in zip(stems, found, strict=True) if path is None]
        if missing:
            raise DataError(
                f"{name}: {missing[0]} is missing (found {sum(p is not None for p in found)} of the {len(stems)} "
                f"{split} batches in {', '.join(str(d) for d in dirs)})"
            )
        return _read_imagenet_batches(name, root, side, [p for p in found if p is not None], release, limit)
    png_dir = _find_png_dir(root, side, split)
    if png_dir is not None:
        return _load_png_folder(name, png_dir, side, limit)
    raise _missing_dir_error(name, root, dirs or [root])


def _read_imagenet_batches(
    name: str, root: Path, side: int, paths: list[Path], release: str, limit: int | None
) -> tuple[torch.Tensor, dict]:
    parts, files, total = [], {}, 0
    for path in tqdm(paths, desc=f"{name} batches", disable=True if len(paths) < 3 else None):
        files[_relative(path, root)] = _sha256_file(path)
        if path.suffix == ".npz":
            data, labels = _load_npz(path)
        else:
            batch = _load_pickle(path)
            data, labels = _key(batch, path, "data"), _key(batch, path, "labels", required=False)
        images = _rows_to_images(data, path, side, labels)
        parts.append(images[: None if limit is None else limit - total])
        total += len(parts[-1])
        if limit is not None and total >= limit:
            break
    images = _to_tensor(np.concatenate(parts) if len(parts) > 1 else parts[0])
    source = {"path": str(root), "release": release, "files": files}
    return images, source


def _load_npz(path: Path) -> tuple[np.ndarray, Any]:
    """``data`` (and ``labels`` if present) of an ``.npz`` batch, read with ``allow_pickle=False``."""
    try:
        with open(path, "rb") as f:
            archive = np.load(f, allow_pickle=False)
            if not isinstance(archive, np.lib.npyio.NpzFile):
                raise DataError(f"{path}: not an .npz archive")
            with archive:
                if "data" not in archive.files:
                    raise DataError(f"{path}: no 'data' array (arrays: {archive.files[:8]})")
                data = archive["data"]
                labels = archive["labels"] if "labels" in archive.files else None
    except DataError:
        raise
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror or err})") from None
    except (ValueError, zipfile.BadZipFile, EOFError, zlib.error) as err:
        raise DataError(f"{path}: not a readable .npz, truncated or corrupt ({err})") from None
    return data, labels


def _find_png_dir(root: Path, side: int, split: str) -> Path | None:
    folder = f"{'train' if split == 'train' else 'valid'}_{side}x{side}"
    for base in _imagenet_bases(root, side):
        for d in (base / folder, base / "processed" / folder):
            if d.is_dir():
                return d
    return None


def _load_png_folder(name: str, folder: Path, side: int, limit: int | None) -> tuple[torch.Tensor, dict]:
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".png" and p.is_file())
    if not paths:
        raise DataError(f"{folder}: no .png images")
    paths = paths[:limit]

    def decode(path: Path) -> tuple[np.ndarray, str]:
        img, sha = _open_image(path)
        with img:
            if img.size != (side, side) or img.mode != "RGB":
                raise DataError(f"{path}: {img.mode} image of {img.size[1]}x{img.size[0]}, expected RGB {side}x{side}")
            return np.asarray(img).transpose(2, 0, 1), sha

    images = np.empty((len(paths), 3, side, side), dtype=np.uint8)
    shas = _decode_into(images, paths, decode, desc=f"{name} PNG")
    source = {
        "path": str(folder.parent),
        "release": IMAGENET_RELEASE_PNG,
        "files": {folder.name + "/": _manifest_digest([(p.name, sha) for p, sha in zip(paths, shas, strict=True)])},
        "note": "a folder of PNGs is taken to be the older image-net.org/small release; PNGs converted from the "
        "2017 batches (the official make_imagenet_data.py) share this layout; compare the digest",
    }
    return torch.from_numpy(images), source


# --------------------------------------------------------------------------------------------
# CelebA (spec §15, §16.6)


def _open_image(path: Path) -> tuple[Image.Image, str]:
    """Decode-ready PIL image of ``path`` and the sha256 of its bytes (read once)."""
    raw = _read_bytes(path)
    try:
        img = Image.open(io.BytesIO(raw))
        img.load()
    except UnidentifiedImageError:
        raise DataError(f"{path}: not a readable image (not a PNG/JPEG file Pillow recognises)") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise DataError(f"{path}: not a readable image ({err})") from None
    return img, hashlib.sha256(raw).hexdigest()


def _find_celeba(root: Path) -> Path | None:
    candidates = [root, root / "celeba", root / "CelebA", root / "raw", root / "celeba" / "raw"]
    if root.name == "img_align_celeba":
        candidates.insert(0, root.parent)
    for folder in candidates:
        if (folder / "img_align_celeba").is_dir() or (folder / "list_eval_partition.txt").is_file():
            return folder
    return None


def _celeba_partition(path: Path, split: str) -> list[str]:
    wanted = 0 if split == "train" else 2
    names = []
    try:
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read ({err})") from None
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
            raise DataError(f"{path}: line {number} is {line.strip()!r}, expected '<name>.jpg <0|1|2>'")
        if int(fields[1]) == wanted:
            names.append(fields[0])
    if not names:
        raise DataError(f"{path}: no images of partition {wanted} ({split})")
    return names


def _load_celeba(
    root: Path | None, split: str, image_size: tuple[int, int] | None, crop: bool, limit: int | None
) -> tuple[torch.Tensor, dict]:
    if root is None:
        raise _missing_dir_error("celeba", None, [])
    folder = _find_celeba(root)
    if folder is None:
        raise _missing_dir_error("celeba", root, [root, root / "celeba"])
    partition, image_dir = folder / "list_eval_partition.txt", folder / "img_align_celeba"
    for needed in (partition, image_dir):
        if not needed.exists():
            raise DataError(f"{needed}: missing (celeba needs img_align_celeba/ and list_eval_partition.txt)")
    names = _celeba_partition(partition, split)[:limit]
    height, width = image_size if image_size is not None else CELEBA_DEFAULT_SIZE

    def decode(filename: str) -> tuple[np.ndarray, str]:
        path = image_dir / filename
        if not path.is_file():
            raise DataError(f"{path}: missing (listed in {partition.name})")
        img, sha = _open_image(path)
        with img:
            if img.size != (CELEBA_NATIVE[1], CELEBA_NATIVE[0]) or img.mode != "RGB":
                raise DataError(
                    f"{path}: {img.mode} image of {img.size[1]}x{img.size[0]} (HxW), expected an aligned CelebA "
                    f"RGB image of {_fmt(CELEBA_NATIVE)}"
                )
            if crop:
                img = img.crop(CELEBA_CROP_BOX)
            img = img.resize((width, height), Image.Resampling.BILINEAR)
            return np.asarray(img).transpose(2, 0, 1), sha

    images = np.empty((len(names), 3, height, width), dtype=np.uint8)
    shas = _decode_into(images, names, decode, desc=f"celeba {split}")
    preprocessing = (
        f"148x148 crop at (left 15, top 40), then PIL bilinear resize to {height}x{width} (the crop the official "
        "code intended, spec §16.6)"
        if crop
        else f"uncropped 178x218 image, PIL bilinear resize to {height}x{width}, aspect squashed (faithful to the "
        "official code, spec §16.6)"
    )
    files = {
        partition.name: _sha256_file(partition),
        image_dir.name + "/": _manifest_digest(list(zip(names, shas, strict=True))),
    }
    source = {
        "path": str(folder),
        "release": "CelebA aligned and cropped images (img_align_celeba, JPEG) with the official partition",
        "files": files,
        "partition": 0 if split == "train" else 2,
        "preprocessing": preprocessing,
    }
    return torch.from_numpy(images), source


# --------------------------------------------------------------------------------------------
# MNIST / Fashion-MNIST IDX files

_IDX_IMAGES, _IDX_LABELS = 2051, 2049


def _read_idx(path: Path, magic: int) -> tuple[np.ndarray, str]:
    """An IDX file (gzip detected by its magic bytes ``1f 8b``, not by name) -> uint8 array, sha256."""
    raw = _read_bytes(path)
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
        raise DataError(f"{path}: {len(data)} bytes{after}, the header {dims} needs {expected}; the file is {state}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims), sha


def _find_idx(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _load_idx_dataset(
    name: str, root: Path | None, split: str, limit: int | None, release: str | None = None
) -> tuple[torch.Tensor, dict]:
    prefix = "train" if split == "train" else "t10k"
    stem = f"{prefix}-images-idx3-ubyte"
    if root is None:
        raise _missing_dir_error(name, None, [])
    if name == "mnist":
        subs = ["", "mnist", "MNIST", "MNIST/raw", "mnist/raw"]
    else:
        subs = ["", "fashion-mnist", "fashion_mnist", "FashionMNIST", "FashionMNIST/raw", "fashion-mnist/raw"]
    candidates = [root / s if s else root for s in subs]
    names = [stem, f"{stem}.gz", f"{prefix}-labels-idx1-ubyte", f"{prefix}-labels-idx1-ubyte.gz"]
    folder = _find_dir(candidates, names)
    if folder is None:
        raise _missing_dir_error(name, root, candidates)
    image_path = _find_idx(folder, stem)
    if image_path is None:
        raise DataError(f"{folder / stem}[.gz]: missing ({name} {split} images)")
    array, sha = _read_idx(image_path, _IDX_IMAGES)
    if array.ndim != 3 or array.shape[1:] != (28, 28):
        raise DataError(f"{image_path}: images of shape {array.shape[1:]}, expected 28x28")
    files = {image_path.name: sha}
    label_path = _find_idx(folder, f"{prefix}-labels-idx1-ubyte")
    if label_path is not None:  # labels are not returned, but a mismatched pair is a mistake worth reporting
        labels, files[label_path.name] = _read_idx(label_path, _IDX_LABELS)
        if labels.ndim != 1 or len(labels) != len(array):
            raise DataError(f"{label_path}: {labels.shape[0]} labels for the {len(array)} images of {image_path.name}")
    images = _to_tensor(array[:limit, None])
    release = release or ("MNIST IDX" if name == "mnist" else "Fashion-MNIST IDX")
    return images, {"path": str(folder), "release": release, "files": files}


def embedded_fashion_mnist_dir() -> Path:
    """Folder of the Fashion-MNIST subset shipped with the package (IDX gzip files, 10000 train /
    2000 test images; see its README.md and LICENSE)."""
    return Path(__file__).resolve().parent / "datasets" / "fashion_mnist"


# --------------------------------------------------------------------------------------------
# plain folder of images


def _folder_for_split(root: Path, split: str) -> Path:
    if not root.is_dir():
        raise DataError(f"{root}: not a folder of images")
    own, other = root / split, root / ("test" if split == "train" else "train")
    if own.is_dir():
        return own
    if other.is_dir():
        raise DataError(f"{own}: missing ({root} has {other.name}/ but no {split}/ subfolder)")
    return root


def _resize_cover_crop(img: Image.Image, height: int, width: int) -> Image.Image:
    """Resize (PIL bilinear) so the image covers ``height x width`` -- for a square target, the short
    side becomes the target side -- then center-crop to exactly that size."""
    w, h = img.size
    if (w, h) != (width, height):
        scale = max(height / h, width / w)
        new_w, new_h = max(width, round(w * scale)), max(height, round(h * scale))
        if (new_w, new_h) != (w, h):
            img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
        left, top = (new_w - width) // 2, (new_h - height) // 2
        img = img.crop((left, top, left + width, top + height))
    return img


def _load_folder(
    root: Path | None, split: str, image_size: tuple[int, int] | None, limit: int | None
) -> tuple[torch.Tensor, dict]:
    if root is None:
        raise _missing_dir_error("folder", None, [])
    if image_size is None:
        raise DataError(f"{root}: image_size is required for a folder of images (the model's (H, W))")
    folder = _folder_for_split(root, split)
    paths = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if not paths:
        raise DataError(f"{folder}: empty folder, no images")
    paths = paths[:limit]
    height, width = image_size

    def decode(path: Path) -> tuple[np.ndarray, tuple[bool, str]]:
        img, sha = _open_image(path)
        with img:
            if img.format not in ("PNG", "JPEG"):
                raise DataError(f"{path}: a {img.format} image, expected PNG or JPEG")
            grey = img.mode in _GREY_MODES
            if not grey and img.mode not in _COLOUR_MODES:
                raise DataError(f"{path}: image mode {img.mode} is not supported (8-bit greyscale or colour only)")
            img = _resize_cover_crop(img.convert("L" if grey else "RGB"), height, width)
            array = np.asarray(img)
        return (array[None] if grey else array.transpose(2, 0, 1)), (grey, sha)

    images = np.empty((len(paths), 3, height, width), dtype=np.uint8)
    metas = _decode_into(images, paths, decode, desc=f"images in {folder.name}")
    if all(grey for grey, _ in metas):
        images = images[:, :1]
    digest = _manifest_digest([(p.name, sha) for p, (_, sha) in zip(paths, metas, strict=True)])
    source = {
        "path": str(folder.parent),
        "release": "plain image folder",
        "files": {folder.name + "/": digest},
        "preprocessing": f"PIL bilinear resize of the short side, center crop to {height}x{width}",
    }
    return _to_tensor(images), source


# --------------------------------------------------------------------------------------------
# public entry point


def load_images(
    name: str,
    split: str = "train",
    data_dir: str | os.PathLike | None = None,
    image_size: tuple[int, int] | None = None,
    celeba_crop: bool = False,
    limit: int | None = None,
) -> ImageSet:
    """Read one split of a dataset from local disk as uint8 ``(N, C, H, W)`` images.

    Args:
        name: one of :data:`DATASETS`.
        split: ``"train"`` or ``"test"`` (the evaluation split: CIFAR-10 ``test_batch``, ImageNet
            ``val_data`` (the 50k validation set), CelebA partition 2, (Fashion-)MNIST ``t10k``;
            a ``folder``'s ``test/`` subfolder, or the folder itself when it has no subfolders).
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

    Returns:
        An :class:`ImageSet`; ``images`` is uint8 ``(N, C, H, W)``, ``C`` 3 (1 for MNIST-like data
        and for a folder of greyscale images).

    Raises:
        DataError: unknown name or split, missing folder or file, truncated or malformed file,
            image of the wrong size or mode, refused pickle content.
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise DataError(f"{name}: unknown split {split!r}; choose 'train' or 'test'")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise DataError(f"{name}: limit must be a positive integer or None, got {limit!r}")
    if image_size is not None:
        size = tuple(image_size)
        if len(size) != 2 or not all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0 for v in size
        ):
            raise DataError(f"{name}: image_size must be (H, W) with positive integers, got {image_size!r}")
        image_size = (int(size[0]), int(size[1]))
    if celeba_crop and name != "celeba":
        raise DataError(f"{name}: celeba_crop applies only to celeba")
    root = Path(data_dir).expanduser() if data_dir is not None else None
    if root is not None and not root.is_dir():
        raise DataError(f"{root}: data_dir does not exist or is not a folder ({name})")

    if name == "cifar10":
        _check_size(name, image_size)
        images, source = _load_cifar10(root, split, limit)
    elif name in ("imagenet32", "imagenet64"):
        _check_size(name, image_size)
        images, source = _load_imagenet(name, root, split, limit)
    elif name == "celeba":
        images, source = _load_celeba(root, split, image_size, celeba_crop, limit)
    elif name == "mnist":
        _check_size(name, image_size)
        images, source = _load_idx_dataset(name, root, split, limit)
    elif name == "fashion_mnist":
        _check_size(name, image_size)
        release = None
        if root is None:
            if DEBIAN_FASHION_MNIST_DIR.is_dir():
                root, release = DEBIAN_FASHION_MNIST_DIR, "Fashion-MNIST IDX (Debian package dataset-fashion-mnist)"
            else:
                root, release = embedded_fashion_mnist_dir(), EMBEDDED_FASHION_MNIST_RELEASE
        images, source = _load_idx_dataset(name, root, split, limit, release)
    else:
        images, source = _load_folder(root, split, image_size, limit)
    source["num_images"] = int(images.shape[0])
    return ImageSet(images=images.contiguous(), name=name, split=split, source=source)


# --------------------------------------------------------------------------------------------
# augmentations (spec §13.4)


def augment(x: torch.Tensor, kind: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """Training augmentation of a batch, each image with its own random draw (spec §13.4).

    Args:
        x: images ``(B, C, H, W)``, uint8 (any dtype and device works).
        kind: ``"none"`` (returns ``x`` itself), ``"hflip"`` (each image mirrored left-right with
            probability 0.5), ``"eta"`` (the official CIFAR/ImageNet augmentation) or ``"neta"``
            (``"eta"`` without the flip).
        generator: CPU generator for the draws (the default generator if ``None``); the result is
            a deterministic function of ``x`` and its state. Draws: ``B`` uniforms for the flips
            (``hflip``, ``eta``), then ``B x 2`` for the translations (``eta``, ``neta``).

    ``eta``: flip (p 0.5) -> edge-pad by ``p_h = ceil(0.04 H)`` rows and ``p_w = ceil(0.04 W)``
    columns -> translate by integers ``t = round(u)``, ``u ~ U[-0.04 (H + 2 p_h), +0.04 (H + 2 p_h)]``
    for rows (``W``, ``p_w`` for columns; round half to even, like Python's ``round``) with zero
    fill -> center crop ``H x W``.
    Equivalently, output row ``i`` is row ``p_h - t_y + i`` of the padded image: a window at offset
    ``p + d`` with ``d = -t``. For 32x32, ``p = 2`` and ``|t| <= 1``; for 64x64, ``p = 3`` and
    ``|t| <= 3``, so the zero fill is never visible at the paper's sizes.

    Returns:
        Tensor like ``x``, ``(B, C, H, W)``.
    """
    if kind not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {kind!r}; choose one of {', '.join(AUGMENTATIONS)}")
    if x.dim() != 4:
        raise ValueError(f"augment expects images (B, C, H, W), got shape {tuple(x.shape)}")
    if kind == "none":
        return x
    b, _, h, w = x.shape
    if kind in ("hflip", "eta"):
        flip = (torch.rand(b, generator=generator) < 0.5).to(x.device)
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    if kind == "hflip":
        return x
    pad_h, pad_w = math.ceil(0.04 * h), math.ceil(0.04 * w)
    max_t = torch.tensor([0.04 * (h + 2 * pad_h), 0.04 * (w + 2 * pad_w)], dtype=torch.float64)
    u = (torch.rand(b, 2, generator=generator, dtype=torch.float64) * 2 - 1) * max_t
    t = torch.round(u).to(torch.int64).to(x.device)  # (B, 2): (t_y, t_x)
    rows = torch.arange(h, device=x.device)[None, :] - t[:, :1]  # (B, H) in original coordinates
    cols = torch.arange(w, device=x.device)[None, :] - t[:, 1:]  # (B, W)
    inside = ((rows >= -pad_h) & (rows < h + pad_h))[:, :, None] & ((cols >= -pad_w) & (cols < w + pad_w))[:, None, :]
    batch = torch.arange(b, device=x.device)[:, None, None]
    out = x.permute(0, 2, 3, 1)[batch, rows.clamp(0, h - 1)[:, :, None], cols.clamp(0, w - 1)[:, None, :]]
    out = out * inside[..., None].to(out.dtype)  # zero fill beyond the edge padding
    return out.permute(0, 3, 1, 2).contiguous()
