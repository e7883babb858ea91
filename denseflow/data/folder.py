"""A folder of PNG/JPEG images: its ``train/`` and ``test/`` subfolders, or (split ``"all"``)
the image files of the folder itself.

Each image is resized (PIL bilinear) so that it covers the model's ``(H, W)`` -- for a square
size, the short side becomes the target side -- and center-cropped to it; how many were is
printed (rank 0) and recorded in ``source["resized"]``. Greyscale images give one channel when
every image of the folder is greyscale, else three.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..distributed import say
from .base import DataError, Read, Request, decode_into, missing_dir_error, to_tensor
from .files import manifest_digest, open_image

_WHERE_TO_GET = (
    "train/ and test/ subfolders of PNG/JPEG images (for split 'all': the images themselves)"
)
_GREY_MODES = ("1", "L", "LA")
_COLOUR_MODES = ("P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr")


def _folder_for_split(root: Path, split: str) -> Path:
    """``root`` itself for ``"all"``, else its ``train/`` or ``test/`` subfolder, which must
    exist: a folder without them has no held-out test images."""
    if not root.is_dir():
        raise DataError(f"{root}: not a folder of images")
    if split == "all":
        return root
    own, other = root / split, root / ("test" if split == "train" else "train")
    if own.is_dir():
        return own
    if other.is_dir():
        raise DataError(f"{own}: missing ({root} has {other.name}/ but no {split}/ subfolder)")
    raise DataError(
        f"{root}: a folder without train/ and test/ subfolders has no held-out test images; put "
        f"the images in {root / 'train'} and {root / 'test'}, train on them with some held out "
        f"(--set data.validation=N), or score the folder as it is (split 'all': denseflow "
        f"evaluate --images {root})"
    )


def _resize_cover_crop(img: Image.Image, height: int, width: int) -> Image.Image:
    """Resize (PIL bilinear) so the image covers ``height x width`` -- for a square target, the
    short side becomes the target side -- then center-crop to exactly that size."""
    w, h = img.size
    if (w, h) != (width, height):
        scale = max(height / h, width / w)
        new_w, new_h = max(width, round(w * scale)), max(height, round(h * scale))
        if (new_w, new_h) != (w, h):
            img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
        left, top = (new_w - width) // 2, (new_h - height) // 2
        img = img.crop((left, top, left + width, top + height))
    return img


def read_folder(req: Request) -> Read:
    """The images of ``data_dir/<split>/``, or of ``data_dir`` itself for split ``"all"``
    (subfolders ignored), in name order, with their file names; ``image_size`` is required."""
    root, image_size = req.root, req.image_size
    if root is None:
        raise missing_dir_error("folder", _WHERE_TO_GET, None, [])
    if image_size is None:
        raise DataError(
            f"{root}: image_size is required for a folder of images (the model's (H, W))"
        )
    folder = _folder_for_split(root, req.split)
    paths = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if not paths:
        raise DataError(f"{folder}: empty folder, no images")
    paths = paths[: req.limit]
    height, width = image_size
    images, hashes, resized = read_image_files(paths, image_size, desc=f"images in {folder.name}")
    digest = manifest_digest([(p.name, sha) for p, sha in zip(paths, hashes, strict=True)])
    if resized:
        say(
            f"{folder}: {resized} of {len(paths)} images resized to {height}x{width} "
            "(PIL bilinear on the short side, center crop)"
        )
    source = {
        "path": str(folder.parent),
        "release": "plain image folder",
        "files": {folder.name + "/": digest},
        "preprocessing": f"PIL bilinear resize of the short side, center crop to {height}x{width}",
        "resized": resized,
    }
    return Read(images, source, tuple(p.name for p in paths))


def read_image_files(
    paths: Sequence[Path], image_size: tuple[int, int], desc: str = "images"
) -> tuple[torch.Tensor, list[str], int]:
    """PNG/JPEG files as uint8 ``(N, C, H, W)``, each resized to cover ``image_size`` and
    center-cropped; one channel when every file is greyscale, else three. Also the sha256 of
    each file and how many were resized."""
    height, width = image_size

    def decode(path: Path) -> tuple[np.ndarray, tuple[bool, str, bool]]:
        img, sha = open_image(path)
        with img:
            if img.format not in ("PNG", "JPEG"):
                raise DataError(f"{path}: a {img.format} image, expected PNG or JPEG")
            grey = img.mode in _GREY_MODES
            if not grey and img.mode not in _COLOUR_MODES:
                raise DataError(
                    f"{path}: image mode {img.mode} is not supported "
                    "(8-bit greyscale or colour only)"
                )
            resized = img.size != (width, height)
            img = _resize_cover_crop(img.convert("L" if grey else "RGB"), height, width)
            array = np.asarray(img)
        return (array[None] if grey else array.transpose(2, 0, 1)), (grey, sha, resized)

    images = np.empty((len(paths), 3, height, width), dtype=np.uint8)
    metas = decode_into(images, paths, decode, desc=desc)
    if all(grey for grey, _, _ in metas):
        images = images[:, :1]
    return to_tensor(images), [sha for _, sha, _ in metas], sum(r for _, _, r in metas)
