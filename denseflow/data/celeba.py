"""CelebA (spec §15, §16.6): ``img_align_celeba/*.jpg`` and ``list_eval_partition.txt``.

The training split is partition 0, the test split partition 2. The aligned 178x218 images are
resized either uncropped, aspect squashed (faithful to the official code), or after the 148x148
crop the official code intended (spec §16.6).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .base import DataError, Request, decode_into, fmt, missing_dir_error
from .files import manifest_digest, open_image, sha256_file

#: aligned images are 178 wide, 218 high; the official code's intended crop (spec §16.6)
CELEBA_NATIVE = (218, 178)
CELEBA_CROP_BOX = (15, 40, 15 + 148, 40 + 148)  # (left, top, right, bottom)
CELEBA_DEFAULT_SIZE = (64, 64)

_WHERE_TO_GET = (
    "CelebA's aligned images (img_align_celeba.zip, unpacked to img_align_celeba/) and "
    "list_eval_partition.txt in one folder, from "
    "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html"
)


def _find_celeba(root: Path) -> Path | None:
    candidates = [root, root / "celeba", root / "CelebA", root / "raw", root / "celeba" / "raw"]
    if root.name == "img_align_celeba":
        candidates.insert(0, root.parent)
    for folder in candidates:
        if (folder / "img_align_celeba").is_dir() or (folder / "list_eval_partition.txt").is_file():
            return folder
    return None


def _partition(path: Path, split: str) -> list[str]:
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
            raise DataError(
                f"{path}: line {number} is {line.strip()!r}, expected '<name>.jpg <0|1|2>'"
            )
        if int(fields[1]) == wanted:
            names.append(fields[0])
    if not names:
        raise DataError(f"{path}: no images of partition {wanted} ({split})")
    return names


def read_celeba(req: Request) -> tuple[torch.Tensor, dict]:
    """The images of the split's partition, resized to ``image_size`` (default 64x64), cropped
    first if ``celeba_crop``."""
    root, split, crop = req.root, req.split, req.celeba_crop
    if root is None:
        raise missing_dir_error("celeba", _WHERE_TO_GET, None, [])
    folder = _find_celeba(root)
    if folder is None:
        raise missing_dir_error("celeba", _WHERE_TO_GET, root, [root, root / "celeba"])
    partition, image_dir = folder / "list_eval_partition.txt", folder / "img_align_celeba"
    for needed in (partition, image_dir):
        if not needed.exists():
            raise DataError(
                f"{needed}: missing (celeba needs img_align_celeba/ and list_eval_partition.txt)"
            )
    names = _partition(partition, split)[: req.limit]
    height, width = req.image_size if req.image_size is not None else CELEBA_DEFAULT_SIZE

    def decode(filename: str) -> tuple[np.ndarray, str]:
        path = image_dir / filename
        if not path.is_file():
            raise DataError(f"{path}: missing (listed in {partition.name})")
        img, sha = open_image(path)
        with img:
            if img.size != (CELEBA_NATIVE[1], CELEBA_NATIVE[0]) or img.mode != "RGB":
                raise DataError(
                    f"{path}: {img.mode} image of {img.size[1]}x{img.size[0]} (HxW), expected an "
                    f"aligned CelebA RGB image of {fmt(CELEBA_NATIVE)}"
                )
            if crop:
                img = img.crop(CELEBA_CROP_BOX)
            img = img.resize((width, height), Image.Resampling.BILINEAR)
            return np.asarray(img).transpose(2, 0, 1), sha

    images = np.empty((len(names), 3, height, width), dtype=np.uint8)
    shas = decode_into(images, names, decode, desc=f"celeba {split}")
    preprocessing = (
        f"148x148 crop at (left 15, top 40), then PIL bilinear resize to {height}x{width} (the "
        "crop the official code intended, spec §16.6)"
        if crop
        else f"uncropped 178x218 image, PIL bilinear resize to {height}x{width}, aspect squashed "
        "(faithful to the official code, spec §16.6)"
    )
    files = {
        partition.name: sha256_file(partition),
        image_dir.name + "/": manifest_digest(list(zip(names, shas, strict=True))),
    }
    source = {
        "path": str(folder),
        "release": "CelebA aligned and cropped images (img_align_celeba, JPEG) with the official "
        "partition",
        "files": files,
        "partition": 0 if split == "train" else 2,
        "preprocessing": preprocessing,
    }
    return torch.from_numpy(images), source
