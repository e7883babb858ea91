"""A folder of PNG/JPEG images: its ``train/`` and ``test/`` subfolders, or (split ``"all"``)
the image files of the folder itself.

Each image is resized (PIL bilinear) so that it covers the model's ``(H, W)`` -- for a square
size, the short side becomes the target side -- and center-cropped to it; how many were is
printed (rank 0) and recorded in ``source["resized"]``. Greyscale images (palette images
included whose colours in use are all grey) give one channel when every image of the folder is
greyscale, else three; a model's channel count, where given, decides instead: a greyscale image
is given three equal channels for a colour model, and a colour image for a greyscale model is
an error naming it (colour is never dropped).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..distributed import note
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
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    broken = [p.name for p in entries if p.is_symlink() and not p.exists()]
    if broken:  # an image that is meant to be there and is not: not skipped without a word
        raise DataError(f"{folder}: {broken[0]} is a link to nothing ({len(broken)} such)")
    paths = [p for p in entries if p.is_file()]
    if not paths:
        subfolders = ", ".join(f"{p.name}/" for p in entries if p.is_dir())
        if subfolders:
            raise DataError(
                f"{folder}: no images, only subfolders, which are not read: {subfolders}"
            )
        raise DataError(f"{folder}: empty folder, no images")
    paths = paths[: req.limit]
    height, width = image_size
    images, hashes, resized = read_image_files(
        paths, image_size, desc=f"images in {folder.name}", channels=req.channels
    )
    digest = manifest_digest([(p.name, sha) for p, sha in zip(paths, hashes, strict=True)])
    if resized:
        note(
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


def _is_grey(img: Image.Image) -> bool:
    """Whether an image is greyscale: a grey mode, or a palette whose colours in use are grey."""
    if img.mode not in ("P", "PA"):
        return img.mode in _GREY_MODES
    palette = np.asarray(img.getpalette("RGB") or [], dtype=np.uint8).reshape(-1, 3)
    used = np.unique(np.asarray(img.getchannel("P")))
    colours = palette[used[used < len(palette)]]
    return bool((colours == colours[:, :1]).all())


def read_image_files(
    paths: Sequence[Path],
    image_size: tuple[int, int],
    desc: str = "images",
    channels: int | None = None,
) -> tuple[torch.Tensor, list[str], int]:
    """PNG/JPEG files as uint8 ``(N, C, H, W)``, each resized to cover ``image_size`` and
    center-cropped; one channel when every file is greyscale, else three. ``channels`` (the
    model's, 1 or 3) decides instead: 3 gives a greyscale file three equal channels; for 1, a
    colour file is a DataError naming it. Also the sha256 of each file and how many were
    resized."""
    height, width = image_size

    def decode(path: Path) -> tuple[np.ndarray, tuple[bool, str, bool]]:
        img, sha = open_image(path)
        with img:
            if img.format not in ("PNG", "JPEG"):
                raise DataError(f"{path}: a {img.format} image, expected PNG or JPEG")
            if img.mode not in _GREY_MODES + _COLOUR_MODES:
                raise DataError(
                    f"{path}: image mode {img.mode} is not supported "
                    "(8-bit greyscale or colour only)"
                )
            grey = _is_grey(img)
            if channels == 1 and not grey:
                raise DataError(
                    f"{path}: a colour image (mode {img.mode}), the model takes greyscale images "
                    "(1 channel)"
                )
            resized = img.size != (width, height)
            img = _resize_cover_crop(img.convert("L" if grey else "RGB"), height, width)
            array = np.asarray(img)
        return (array[None] if grey else array.transpose(2, 0, 1)), (grey, sha, resized)

    images = np.empty((len(paths), 3, height, width), dtype=np.uint8)
    metas = decode_into(images, paths, decode, desc=desc)
    if channels == 1 or channels is None and all(grey for grey, _, _ in metas):
        images = images[:, :1]
    return to_tensor(images), [sha for _, sha, _ in metas], sum(r for _, _, r in metas)
