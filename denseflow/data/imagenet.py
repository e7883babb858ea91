"""Downsampled ImageNet 32x32 and 64x64 (spec §15, §16.7).

Either the image-net.org downsampled release (``train_data_batch_1..10`` and ``val_data``, as
pickles in CIFAR-10's row layout or as ``.npz``), or a folder of PNGs (``train_32x32/``,
``valid_32x32/``: the older ``image-net.org/small`` release). The release read is recorded in
the provenance (spec §16.7).
"""

from __future__ import annotations

import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from .base import DataError, Request, decode_into, missing_dir_error, to_tensor
from .cifar import batch_entry, rows_to_images
from .files import load_pickle, manifest_digest, open_image, sha256_file

IMAGENET_RELEASE_PICKLE = "image-net.org downsampled (2017 release, pickle)"
IMAGENET_RELEASE_NPZ = "image-net.org downsampled (2017 release, npz)"
IMAGENET_RELEASE_PNG = "image-net.org/small (PNG, older release)"

_WHERE_TO_GET = {
    32: "the downsampled ImageNet 32x32 batches (Imagenet32_train.zip and Imagenet32_val.zip, or "
    "their _npz variants, from https://image-net.org/download-images, unpacked)",
    64: "the downsampled ImageNet 64x64 batches (Imagenet64_train_part1.zip, "
    "Imagenet64_train_part2.zip and Imagenet64_val.zip, or their _npz variants, from "
    "https://image-net.org/download-images, unpacked)",
}
_PNG_NOTE = (
    "a folder of PNGs is taken to be the older image-net.org/small release; PNGs converted from "
    "the 2017 batches (the official make_imagenet_data.py) share this layout; compare the digest"
)


def read_imagenet32(req: Request) -> tuple[torch.Tensor, dict]:
    """Downsampled ImageNet 32x32: the batches (pickle, else ``.npz``), else the PNG folder."""
    return _read_imagenet(req, 32)


def read_imagenet64(req: Request) -> tuple[torch.Tensor, dict]:
    """Downsampled ImageNet 64x64: the batches (pickle, else ``.npz``), else the PNG folder."""
    return _read_imagenet(req, 64)


def _bases(root: Path, side: int) -> list[Path]:
    return [root, root / f"imagenet{side}", root / f"Imagenet{side}"]


def _batch_dirs(root: Path, side: int) -> list[Path]:
    subs = ["", f"Imagenet{side}_train", f"Imagenet{side}_val"]
    subs += [f"Imagenet{side}_train_part1", f"Imagenet{side}_train_part2"]
    subs += [s + "_npz" for s in subs[1:]]
    dirs = []
    for base in _bases(root, side):
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


def _read_imagenet(req: Request, side: int) -> tuple[torch.Tensor, dict]:
    name, root, split = req.name, req.root, req.split
    if root is None:
        raise missing_dir_error(name, _WHERE_TO_GET[side], None, [])
    stems = [f"train_data_batch_{i}" for i in range(1, 11)] if split == "train" else ["val_data"]
    dirs = _batch_dirs(root, side)
    for suffix, release in (("", IMAGENET_RELEASE_PICKLE), (".npz", IMAGENET_RELEASE_NPZ)):
        found = [_locate(dirs, stem + suffix) for stem in stems]
        if not any(found):
            continue
        missing = [stem + suffix for stem, path in zip(stems, found, strict=True) if path is None]
        if missing:
            raise DataError(
                f"{name}: {missing[0]} is missing (found {sum(p is not None for p in found)} of "
                f"the {len(stems)} {split} batches in {', '.join(str(d) for d in dirs)})"
            )
        paths = [p for p in found if p is not None]
        return _read_batches(name, root, side, paths, release, req.limit)
    png_dir = _find_png_dir(root, side, split)
    if png_dir is not None:
        return _read_png_folder(name, png_dir, side, req.limit)
    raise missing_dir_error(name, _WHERE_TO_GET[side], root, dirs or [root])


def _read_batches(
    name: str, root: Path, side: int, paths: list[Path], release: str, limit: int | None
) -> tuple[torch.Tensor, dict]:
    parts, files, total = [], {}, 0
    for path in tqdm(paths, desc=f"{name} batches", disable=True if len(paths) < 3 else None):
        files[_relative(path, root)] = sha256_file(path)
        if path.suffix == ".npz":
            data, labels = _load_npz(path)
        else:
            batch = load_pickle(path)
            data = batch_entry(batch, path, "data")
            labels = batch_entry(batch, path, "labels", required=False)
        images = rows_to_images(data, path, side, labels)
        parts.append(images[: None if limit is None else limit - total])
        total += len(parts[-1])
        if limit is not None and total >= limit:
            break
    images = to_tensor(np.concatenate(parts) if len(parts) > 1 else parts[0])
    source = {"path": str(root), "release": release, "files": files}
    return images, source


def _load_npz(path: Path) -> tuple[np.ndarray, Any]:
    """``data`` (and ``labels`` if present) of an ``.npz`` batch, read with
    ``allow_pickle=False``."""
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
    for base in _bases(root, side):
        for d in (base / folder, base / "processed" / folder):
            if d.is_dir():
                return d
    return None


def _read_png_folder(
    name: str, folder: Path, side: int, limit: int | None
) -> tuple[torch.Tensor, dict]:
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".png" and p.is_file())
    if not paths:
        raise DataError(f"{folder}: no .png images")
    paths = paths[:limit]

    def decode(path: Path) -> tuple[np.ndarray, str]:
        img, sha = open_image(path)
        with img:
            if img.size != (side, side) or img.mode != "RGB":
                raise DataError(
                    f"{path}: {img.mode} image of {img.size[1]}x{img.size[0]}, "
                    f"expected RGB {side}x{side}"
                )
            return np.asarray(img).transpose(2, 0, 1), sha

    images = np.empty((len(paths), 3, side, side), dtype=np.uint8)
    shas = decode_into(images, paths, decode, desc=f"{name} PNG")
    digest = manifest_digest([(p.name, sha) for p, sha in zip(paths, shas, strict=True)])
    source = {
        "path": str(folder.parent),
        "release": IMAGENET_RELEASE_PNG,
        "files": {folder.name + "/": digest},
        "note": _PNG_NOTE,
    }
    return torch.from_numpy(images), source
