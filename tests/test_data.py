"""Dataset readers on tiny files written here in the exact on-disk formats, and the augmentations.

Every reader is checked pixel-exactly against the layout of its format (CIFAR/ImageNet rows are the
R, G and B planes; IDX is row-major; CelebA and folders against PIL's own resize of the same
decoded image), and every failure mode against a one-line DataError that names the file.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import math
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from denseflow.data import (
    DATASETS,
    IMAGENET_RELEASE_NPZ,
    IMAGENET_RELEASE_PICKLE,
    IMAGENET_RELEASE_PNG,
    DataError,
    ImageSet,
    augment,
    embedded_fashion_mnist_dir,
    load_images,
)
from denseflow.data import idx as idx_module
from denseflow.data.folder import read_image_files

RNG = np.random.default_rng(0)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_set(s: ImageSet, shape: tuple[int, ...]) -> None:
    assert isinstance(s, ImageSet)
    assert s.images.dtype == torch.uint8 and s.images.is_contiguous()
    assert tuple(s.images.shape) == shape
    assert s.source["num_images"] == shape[0]
    json.dumps(s.source)  # provenance is JSON-serialisable


# --------------------------------------------------------------------------------------------
# CIFAR-10


def cifar_batch(n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        b"batch_label": b"batch",
        b"labels": [int(v) for v in rng.integers(0, 10, n)],
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"filenames": [b"x.png"] * n,
    }


def write_cifar(parent: Path, n: int = 3) -> tuple[Path, dict[str, dict]]:
    folder = parent / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = {
        name: cifar_batch(n, i)
        for i, name in enumerate([*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"])
    }
    for name, batch in batches.items():
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    return folder, batches


@pytest.mark.parametrize("given", ["parent", "folder"])
def test_cifar10_pixel_exact_channel_major(tmp_path: Path, given: str) -> None:
    folder, batches = write_cifar(tmp_path)
    data_dir = tmp_path if given == "parent" else folder
    train = load_images("cifar10", "train", data_dir)
    check_set(train, (15, 3, 32, 32))
    rows = np.concatenate([batches[f"data_batch_{i}"][b"data"] for i in range(1, 6)])
    n, c, y, x = 7, 2, 5, 30
    assert (
        train.images[n, c, y, x].item() == rows[n, c * 1024 + y * 32 + x]
    )  # channel-major, row-major
    assert np.array_equal(train.images.numpy().reshape(15, -1), rows)
    assert train.source["path"] == str(folder)
    assert train.source["files"] == {
        f"data_batch_{i}": sha256(folder / f"data_batch_{i}") for i in range(1, 6)
    }
    test = load_images("cifar10", "test", data_dir)
    assert np.array_equal(test.images.numpy().reshape(3, -1), batches["test_batch"][b"data"])
    assert test.split == "test" and test.name == "cifar10"
    assert train.names is None and test.names is None  # images with only an index
    # limit across a batch boundary reads only the files it needs
    part = load_images("cifar10", data_dir=data_dir, limit=4)
    assert torch.equal(part.images, train.images[:4]) and sorted(part.source["files"]) == [
        "data_batch_1",
        "data_batch_2",
    ]


def py2_cifar_pickle(data: np.ndarray, labels: list[int]) -> bytes:
    """A dict pickled the way Python 2's cPickle (protocol 2) writes the real CIFAR batches: byte
    strings as SHORT_BINSTRING/BINSTRING and ``numpy.core.multiarray._reconstruct``."""

    def s(text: bytes) -> bytes:
        return (
            (b"U" + bytes([len(text)]) + text)
            if len(text) < 256
            else (b"T" + struct.pack("<I", len(text)) + text)
        )

    n, d = data.shape
    array = (
        b"cnumpy.core.multiarray\n_reconstruct\n"
        + b"cnumpy\nndarray\n"
        + b"K\x00\x85"
        + s(b"b")
        + b"\x87R"
        + b"(K\x01"
        + b"J"
        + struct.pack("<i", n)
        + b"M"
        + struct.pack("<H", d)
        + b"\x86"
        + b"cnumpy\ndtype\n"
        + s(b"u1")
        + b"\x89\x88\x87R"
        + b"(K\x03"
        + s(b"|")
        + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
        + b"\x89"
        + s(data.tobytes())
        + b"tb"
    )
    label_list = b"](" + b"".join(b"K" + bytes([v]) for v in labels) + b"e"
    return b"\x80\x02}(" + s(b"data") + array + s(b"labels") + label_list + b"u."


def test_cifar10_reads_python2_pickles(tmp_path: Path) -> None:
    folder, _ = write_cifar(tmp_path)
    data = RNG.integers(0, 256, (2, 3072), dtype=np.uint8)
    (folder / "test_batch").write_bytes(py2_cifar_pickle(data, [3, 4]))
    s = load_images("cifar10", "test", folder)
    assert np.array_equal(s.images.numpy().reshape(2, -1), data)


def test_cifar10_errors(tmp_path: Path) -> None:
    folder, _ = write_cifar(tmp_path)
    with pytest.raises(DataError, match=r"cifar10 images are 32x32, the model wants 64x64"):
        load_images("cifar10", data_dir=tmp_path, image_size=(64, 64))
    with pytest.raises(DataError, match="kriz/cifar.html"):
        load_images("cifar10")
    (folder / "data_batch_3").unlink()
    with pytest.raises(DataError, match=r"data_batch_3: missing"):
        load_images("cifar10", data_dir=tmp_path)
    (folder / "test_batch").write_bytes((folder / "data_batch_1").read_bytes()[:500])
    with pytest.raises(DataError, match=r"test_batch: not a readable pickle, truncated"):
        load_images("cifar10", "test", tmp_path)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8)}, f)
    with pytest.raises(DataError, match=r"test_batch: 'data' has shape \(2, 100\)"):
        load_images("cifar10", "test", tmp_path)


def test_missing_data_dir_and_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_images("cifar10", data_dir=tmp_path / "nowhere")
    with pytest.raises(
        DataError, match=r"no dataset files found in .*; expected the python version of CIFAR-10"
    ):
        load_images("cifar10", data_dir=tmp_path)
    with pytest.raises(DataError, match="unknown dataset"):
        load_images("svhn", data_dir=tmp_path)
    with pytest.raises(DataError, match="unknown split"):
        load_images("cifar10", "valid", tmp_path)
    with pytest.raises(DataError, match="limit"):
        load_images("fashion_mnist", limit=0)
    with pytest.raises(DataError, match="celeba_crop applies only to celeba"):
        load_images("fashion_mnist", celeba_crop=True)
    for name in DATASETS:
        if name != "fashion_mnist":
            with pytest.raises(DataError, match=f"{name}: no data_dir given") as err:
                load_images(name, image_size=(32, 32) if name in ("folder", "celeba") else None)
            assert "\n" not in str(err.value)


# --------------------------------------------------------------------------------------------
# the restricted unpickler


class Payload:
    """Unpickling this object calls ``func(*args)``: a stand-in for arbitrary code."""

    def __init__(self, func: object, *args: object) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple:
        return self.func, self.args


@pytest.mark.parametrize("kind", ["mkdir", "exec", "nested"])
def test_malicious_pickle_is_refused_and_its_payload_never_runs(tmp_path: Path, kind: str) -> None:
    folder, _ = write_cifar(tmp_path / "data")
    marker = tmp_path / "pwned"
    if kind == "mkdir":
        evil: object = Payload(os.mkdir, str(marker))
    elif kind == "exec":
        evil = Payload(exec, f"open({str(marker)!r}, 'w').close()")
    else:  # the payload hides among legitimate numpy content
        evil = {b"data": np.zeros((1, 3072), np.uint8), b"labels": [Payload(os.mkdir, str(marker))]}
    blob = pickle.dumps(evil, protocol=2)
    (folder / "test_batch").write_bytes(blob)
    with pytest.raises(
        DataError, match=r"test_batch: the pickle asks for .*(mkdir|exec).*refused"
    ) as err:
        load_images("cifar10", "test", tmp_path / "data")
    assert "\n" not in str(err.value)
    assert not marker.exists()
    pickle.loads(blob)  # the payload is live: a plain unpickler runs it
    assert marker.exists()


def test_codecs_encode_admits_latin1_only(tmp_path: Path) -> None:
    folder, _ = write_cifar(tmp_path)
    # protocol-2 pickles written by Python 3 encode bytes via _codecs.encode(text, 'latin1'):
    # admitted
    s = load_images("cifar10", "test", tmp_path)
    assert s.images.shape[0] == 3
    blob = b"\x80\x02c_codecs\nencode\nX\x02\x00\x00\x00ab" + b"X\x04\x00\x00\x00zlib\x86R."
    (folder / "test_batch").write_bytes(blob)
    with pytest.raises(DataError, match=r"_codecs\.encode.*refused"):
        load_images("cifar10", "test", tmp_path)


# --------------------------------------------------------------------------------------------
# downsampled ImageNet


def imagenet_batch(n: int, side: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (n, 3 * side * side), dtype=np.uint8)
    return {
        "data": data,
        "labels": [int(v) for v in rng.integers(1, 1001, n)],
        "mean": data.mean(0),
    }


def write_imagenet(parent: Path, side: int = 32, n: int = 2, npz: bool = False) -> dict[str, dict]:
    suffix = "_npz" if npz else ""
    batches = {}
    for i in range(1, 11):
        batches[f"train_data_batch_{i}"] = imagenet_batch(n, side, i)
    batches["val_data"] = imagenet_batch(n, side, 0)
    for name, batch in batches.items():
        sub = parent / (
            f"Imagenet{side}_val{suffix}" if name == "val_data" else f"Imagenet{side}_train{suffix}"
        )
        sub.mkdir(parents=True, exist_ok=True)
        if npz:
            np.savez(
                sub / f"{name}.npz",
                data=batch["data"],
                labels=np.array(batch["labels"]),
                mean=batch["mean"],
            )
        else:
            with open(sub / name, "wb") as f:
                pickle.dump(batch, f, protocol=pickle.HIGHEST_PROTOCOL)
    return batches


@pytest.mark.parametrize("npz", [False, True])
def test_imagenet32_planes_release_and_checksums(tmp_path: Path, npz: bool) -> None:
    batches = write_imagenet(tmp_path, npz=npz)
    train = load_images("imagenet32", "train", tmp_path)
    check_set(train, (20, 3, 32, 32))
    rows = np.concatenate([batches[f"train_data_batch_{i}"]["data"] for i in range(1, 11)])
    assert (
        train.images[13, 1, 4, 9].item() == rows[13, 1024 + 4 * 32 + 9]
    )  # R plane, G plane, B plane
    assert np.array_equal(train.images.numpy().reshape(20, -1), rows)
    assert train.source["release"] == (IMAGENET_RELEASE_NPZ if npz else IMAGENET_RELEASE_PICKLE)
    sub, ext = ("Imagenet32_train_npz", ".npz") if npz else ("Imagenet32_train", "")
    expected = {
        f"{sub}/train_data_batch_{i}{ext}": sha256(tmp_path / sub / f"train_data_batch_{i}{ext}")
        for i in range(1, 11)
    }
    assert train.source["files"] == expected
    val = load_images("imagenet32", "test", tmp_path)
    assert np.array_equal(val.images.numpy().reshape(2, -1), batches["val_data"]["data"])
    # the batch folder itself as data_dir
    val2 = load_images(
        "imagenet32", "test", tmp_path / ("Imagenet32_val_npz" if npz else "Imagenet32_val")
    )
    assert torch.equal(val.images, val2.images)


def test_imagenet_errors(tmp_path: Path) -> None:
    write_imagenet(tmp_path, side=32)
    with pytest.raises(DataError, match=r"imagenet32 images are 32x32, the model wants 64x64"):
        load_images("imagenet32", data_dir=tmp_path, image_size=(64, 64))
    (tmp_path / "Imagenet32_train" / "train_data_batch_7").unlink()
    with pytest.raises(DataError, match=r"train_data_batch_7 is missing \(found 9 of the 10"):
        load_images("imagenet32", data_dir=tmp_path)
    with pytest.raises(DataError, match=r"imagenet64: no dataset files"):
        load_images("imagenet64", "test", tmp_path)
    # 32x32 rows handed to the 64x64 reader
    (tmp_path / "Imagenet32_val" / "val_data").rename(tmp_path / "val_data")
    with pytest.raises(
        DataError, match=r"val_data: 'data' has shape \(2, 3072\) \(32x32 images\), expected"
    ):
        load_images("imagenet64", "test", tmp_path)
    (tmp_path / "val_data.npz").write_bytes(b"PK\x03\x04 not really a zip")
    (tmp_path / "val_data").unlink()
    with pytest.raises(DataError, match=r"val_data.npz: not a readable .npz"):
        load_images("imagenet32", "test", tmp_path)
    with open(tmp_path / "val_data.npz", "wb") as f:  # object arrays would need pickle: refused
        np.savez(f, data=np.array([Payload(print)], dtype=object))
    with pytest.raises(DataError, match=r"val_data.npz: .*Object arrays cannot be loaded"):
        load_images("imagenet32", "test", tmp_path)


def test_imagenet64_batches_in_two_parts(tmp_path: Path) -> None:
    for i in range(1, 11):
        part = (
            tmp_path / "Imagenet64_train_part1_npz"
            if i <= 5
            else tmp_path / "Imagenet64_train_part2_npz"
        )
        part.mkdir(exist_ok=True)
        np.savez(part / f"train_data_batch_{i}.npz", data=np.full((1, 3 * 64 * 64), i, np.uint8))
    s = load_images("imagenet64", data_dir=tmp_path, image_size=(64, 64))
    check_set(s, (10, 3, 64, 64))
    assert s.images.flatten(1).float().mean(1).tolist() == list(range(1, 11))  # batch order 1..10
    assert "Imagenet64_train_part2_npz/train_data_batch_10.npz" in s.source["files"]
    assert len(load_images("imagenet64", data_dir=tmp_path, limit=3).source["files"]) == 3


def test_imagenet_png_release(tmp_path: Path) -> None:
    folder = tmp_path / "imagenet64" / "valid_64x64"
    folder.mkdir(parents=True)
    images = RNG.integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / f"{i:05d}.png")
    s = load_images("imagenet64", "test", tmp_path)
    check_set(s, (3, 3, 64, 64))
    assert np.array_equal(s.images.numpy(), images.transpose(0, 3, 1, 2))
    assert s.source["release"] == IMAGENET_RELEASE_PNG
    assert list(s.source["files"]) == ["valid_64x64/"]
    Image.fromarray(images[0][:32, :32]).save(folder / "00009.png")
    with pytest.raises(DataError, match=r"00009.png: RGB image of 32x32, expected RGB 64x64"):
        load_images("imagenet64", "test", tmp_path)


# --------------------------------------------------------------------------------------------
# CelebA


def write_celeba(parent: Path, parts: tuple[int, ...] = (0, 0, 1, 2, 2)) -> Path:
    folder = parent / "celeba"
    (folder / "img_align_celeba").mkdir(parents=True)
    yy, xx = np.mgrid[0:218, 0:178]
    lines = []
    for i, part in enumerate(parts, 1):
        smooth = np.stack([(xx * (i + 1)) % 256, (yy * (i + 2)) % 256, (xx + yy) % 256], -1)
        img = (smooth + RNG.integers(0, 40, smooth.shape)).clip(0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / "img_align_celeba" / f"{i:06d}.jpg", quality=90)
        lines.append(f"{i:06d}.jpg {part}\n")
    (folder / "list_eval_partition.txt").write_text("".join(lines))
    return folder


@pytest.mark.parametrize("crop", [False, True])
def test_celeba_matches_pil_bilinear(tmp_path: Path, crop: bool) -> None:
    folder = write_celeba(tmp_path)
    s = load_images("celeba", "test", tmp_path, celeba_crop=crop)
    check_set(s, (2, 3, 64, 64))
    for k, name in enumerate(["000004.jpg", "000005.jpg"]):
        with Image.open(folder / "img_align_celeba" / name) as img:
            assert img.size == (178, 218)
            ref = (img.crop((15, 40, 163, 188)) if crop else img).resize(
                (64, 64), Image.Resampling.BILINEAR
            )
        assert np.array_equal(s.images[k].numpy(), np.asarray(ref).transpose(2, 0, 1))
    assert s.source["partition"] == 2
    assert ("148x148 crop" in s.source["preprocessing"]) == crop
    assert s.source["files"]["list_eval_partition.txt"] == sha256(
        folder / "list_eval_partition.txt"
    )
    train = load_images(
        "celeba", "train", folder, image_size=(32, 48), celeba_crop=crop
    )  # the folder itself
    check_set(train, (2, 3, 32, 48))
    again = load_images(
        "celeba", "train", folder / "img_align_celeba", image_size=(32, 48), celeba_crop=crop
    )
    assert torch.equal(train.images, again.images)


def test_celeba_errors(tmp_path: Path) -> None:
    folder = write_celeba(tmp_path)
    Image.new("RGB", (64, 64)).save(folder / "img_align_celeba" / "000001.jpg")
    with pytest.raises(
        DataError, match=r"000001.jpg: RGB image of 64x64 \(HxW\), expected an aligned CelebA"
    ):
        load_images("celeba", "train", tmp_path)
    (folder / "img_align_celeba" / "000001.jpg").unlink()
    with pytest.raises(
        DataError, match=r"000001.jpg: missing \(listed in list_eval_partition.txt\)"
    ):
        load_images("celeba", "train", tmp_path)
    (folder / "list_eval_partition.txt").write_text("000002.jpg zero\n")
    with pytest.raises(DataError, match=r"list_eval_partition.txt: line 1 is"):
        load_images("celeba", "train", tmp_path)
    (folder / "list_eval_partition.txt").unlink()
    with pytest.raises(DataError, match=r"list_eval_partition.txt: missing"):
        load_images("celeba", "train", tmp_path)


# --------------------------------------------------------------------------------------------
# MNIST / Fashion-MNIST IDX


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    return struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes()


def write_idx(folder: Path, n: int = 5, gz: bool = True, split: str = "train") -> np.ndarray:
    folder.mkdir(parents=True, exist_ok=True)
    images = RNG.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = RNG.integers(0, 10, n, dtype=np.uint8)
    for stem, payload in (
        (f"{split}-images-idx3-ubyte", idx_bytes(images, 2051)),
        (f"{split}-labels-idx1-ubyte", idx_bytes(labels, 2049)),
    ):
        if gz:
            (folder / f"{stem}.gz").write_bytes(gzip.compress(payload, mtime=0))
        else:
            (folder / stem).write_bytes(payload)
    return images


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("given", ["parent", "folder"])
def test_idx_gzip_and_raw(tmp_path: Path, gz: bool, given: str) -> None:
    images = write_idx(tmp_path / "mnist", gz=gz, split="t10k")
    s = load_images("mnist", "test", tmp_path if given == "parent" else tmp_path / "mnist")
    check_set(s, (5, 1, 28, 28))
    assert np.array_equal(s.images[:, 0].numpy(), images)
    name = "t10k-images-idx3-ubyte" + (".gz" if gz else "")
    assert s.source["files"][name] == sha256(tmp_path / "mnist" / name)
    assert len(s.source["files"]) == 2  # images and labels
    assert s.names is None


def test_idx_gzip_detected_by_magic_not_name(tmp_path: Path) -> None:
    images = write_idx(tmp_path / "fashion-mnist")
    gz = tmp_path / "fashion-mnist" / "train-images-idx3-ubyte.gz"
    gz.rename(gz.with_suffix(""))  # gzip content under the raw name
    s = load_images("fashion_mnist", "train", tmp_path)
    assert np.array_equal(s.images[:, 0].numpy(), images)


def test_idx_errors(tmp_path: Path) -> None:
    folder = tmp_path / "mnist"
    write_idx(folder, gz=False)
    raw = folder / "train-images-idx3-ubyte"
    with pytest.raises(DataError, match=r"mnist images are 28x28, the model wants 32x32"):
        load_images("mnist", data_dir=tmp_path, image_size=(32, 32))
    payload = raw.read_bytes()
    raw.write_bytes(payload[:-100])
    with pytest.raises(
        DataError,
        match=r"train-images-idx3-ubyte: 3836 bytes, the header .* needs 3936; .*truncated",
    ):
        load_images("mnist", data_dir=tmp_path)
    raw.unlink()
    (folder / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(payload)[:-20])
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.gz: truncated or corrupt gzip"):
        load_images("mnist", data_dir=tmp_path)
    (folder / "train-images-idx3-ubyte.gz").write_bytes(
        gzip.compress(struct.pack(">I", 2049) + payload[4:])
    )
    with pytest.raises(
        DataError, match=r"train-images-idx3-ubyte.gz: magic number 2049, expected 2051"
    ):
        load_images("mnist", data_dir=tmp_path)
    (folder / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(payload))
    (folder / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(4, np.uint8), 2049))
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte: 4 labels for the 5 images"):
        load_images("mnist", data_dir=tmp_path)
    (folder / "train-labels-idx1-ubyte").unlink()
    assert load_images("mnist", data_dir=tmp_path).images.shape == (
        5,
        1,
        28,
        28,
    )  # labels are optional
    (folder / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(5, np.uint8), 2049))
    (folder / "train-images-idx3-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\[.gz\]: missing"):
        load_images("mnist", data_dir=tmp_path)


FOLDER_HINT = (
    "; the folder holds images: train on them as data.dataset=folder (--set data.dataset=folder), "
    "or score them as they are (denseflow evaluate --images "
)


@pytest.mark.parametrize("where", ["", "train"])
@pytest.mark.parametrize("name", ["fashion_mnist", "mnist"])
def test_idx_hints_at_the_folder_dataset_for_a_folder_of_images(
    tmp_path: Path, name: str, where: str
) -> None:
    (tmp_path / "notes.txt").write_text("no dataset here")
    with pytest.raises(DataError, match=rf"{name}: no dataset files found in") as err:
        load_images(name, "test", tmp_path)
    assert "the folder holds images" not in str(err.value)
    (tmp_path / where).mkdir(exist_ok=True)
    Image.new("L", (28, 28)).save(tmp_path / where / "shirt.JPG", format="JPEG")
    with pytest.raises(DataError, match=rf"{name}: no dataset files found in") as err:
        load_images(name, "test", tmp_path)
    assert str(err.value).endswith(f"{FOLDER_HINT}{tmp_path / where})")
    assert "\n" not in str(err.value)


# --------------------------------------------------------------------------------------------
# a plain folder of images


def reference_cover_crop(path: Path, height: int, width: int, mode: str) -> np.ndarray:
    with Image.open(path) as img:
        img = img.convert(mode)
        w, h = img.size
        scale = max(height / h, width / w)
        nw, nh = max(width, round(w * scale)), max(height, round(h * scale))
        img = img.resize((nw, nh), Image.Resampling.BILINEAR)
        left, top = (nw - width) // 2, (nh - height) // 2
        return np.asarray(img.crop((left, top, left + width, top + height)))


def test_folder_rgb_resize_and_center_crop(tmp_path: Path) -> None:
    sizes = [(40, 30), (30, 50), (16, 16)]  # (W, H): landscape, portrait, exact
    for i, (w, h) in enumerate(sizes):
        Image.fromarray(RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
            tmp_path / f"b{i}.png"
        )
    Image.fromarray(RNG.integers(0, 256, (20, 20), dtype=np.uint8)).save(tmp_path / "a_grey.jpg")
    s = load_images("folder", "all", tmp_path, image_size=(16, 16))
    check_set(s, (4, 3, 16, 16))
    names = ["a_grey.jpg", "b0.png", "b1.png", "b2.png"]  # sorted by name
    assert s.names == tuple(names) and s.split == "all"
    for k, name in enumerate(names):
        mode = "L" if name.endswith(".jpg") else "RGB"
        ref = reference_cover_crop(tmp_path / name, 16, 16, mode)
        expected = np.broadcast_to(ref, (3, 16, 16)) if mode == "L" else ref.transpose(2, 0, 1)
        assert np.array_equal(s.images[k].numpy(), expected), name
    assert np.array_equal(
        s.images[3].numpy(), np.asarray(Image.open(tmp_path / "b2.png")).transpose(2, 0, 1)
    )
    assert s.source["path"] == str(tmp_path.parent)
    assert list(s.source["files"]) == [tmp_path.name + "/"]


def test_folder_greyscale_and_splits(tmp_path: Path) -> None:
    for split, n in (("train", 3), ("test", 2)):
        (tmp_path / split).mkdir()
        for i in range(n):
            Image.fromarray(RNG.integers(0, 256, (12, 10), dtype=np.uint8)).save(
                tmp_path / split / f"{i}.png"
            )
    s = load_images("folder", "test", tmp_path, image_size=(8, 8))
    check_set(s, (2, 1, 8, 8))
    assert s.source["path"] == str(tmp_path) and list(s.source["files"]) == ["test/"]
    assert s.names == ("0.png", "1.png")  # relative to the split's folder
    assert np.array_equal(
        s.images[1, 0].numpy(), reference_cover_crop(tmp_path / "test" / "1.png", 8, 8, "L")
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.names = ()  # type: ignore[misc]
    part = load_images("folder", "train", tmp_path, image_size=(8, 8), limit=2)
    assert part.images.shape == (2, 1, 8, 8) and part.names == ("0.png", "1.png")
    with pytest.raises(DataError, match=r"no images, only subfolders, which are not read: test/, "):
        load_images("folder", "all", tmp_path, image_size=(8, 8))  # "all": subfolders ignored
    Image.new("L", (8, 8)).save(tmp_path / "top.png")
    top = load_images("folder", "all", tmp_path, image_size=(8, 8))
    assert top.names == ("top.png",) and top.images.shape == (1, 1, 8, 8)


def test_palette_and_grey_alpha_images_take_the_model_s_channels(tmp_path: Path) -> None:
    """A palette image of greys is greyscale (an L image's values); LA drops its alpha as RGBA
    does; a model's channel count decides: grey gets three equal channels for a colour model, and
    a colour image for a greyscale model is an error naming it (never made grey)."""
    grey = RNG.integers(0, 256, (8, 8), dtype=np.uint8)
    Image.fromarray(grey).save(tmp_path / "l.png")
    Image.fromarray(grey).convert("P").save(tmp_path / "p.png")  # a palette of greys
    Image.fromarray(grey).convert("LA").save(tmp_path / "la.png")
    coloured = Image.fromarray(RNG.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    coloured.convert("P", palette=Image.Palette.ADAPTIVE).save(tmp_path / "q.png")
    paths = [tmp_path / n for n in ("l.png", "p.png", "la.png")]
    with Image.open(paths[1]) as img:
        assert img.mode == "P"
    for channels in (None, 1):
        images, _, _ = read_image_files(paths, (8, 8), channels=channels)
        assert images.shape == (3, 1, 8, 8) and (images == torch.from_numpy(grey)).all()
    images, _, _ = read_image_files(paths, (8, 8), channels=3)
    assert images.shape == (3, 3, 8, 8) and (images == torch.from_numpy(grey)).all()
    assert read_image_files([tmp_path / "q.png"], (8, 8))[0].shape == (1, 3, 8, 8)
    with pytest.raises(DataError, match=r"q.png: a colour image \(mode P\), the model takes grey"):
        read_image_files([*paths, tmp_path / "q.png"], (8, 8), channels=1)
    (tmp_path / "all").mkdir()
    for path in paths:
        path.rename(tmp_path / "all" / path.name)
    folder = load_images("folder", "all", tmp_path / "all", (8, 8), channels=3)
    assert folder.images.shape == (3, 3, 8, 8)
    with pytest.raises(
        DataError, match=r"fashion_mnist images have 1 channel\(s\), the model takes 3"
    ):
        load_images("fashion_mnist", "test", limit=1, channels=3)


def test_folder_without_train_and_test_subfolders_is_refused(tmp_path: Path) -> None:
    for i in range(2):
        Image.new("RGB", (8, 8), (i, i, i)).save(tmp_path / f"{i}.png")
    expected = (
        f"{tmp_path}: a folder without train/ and test/ subfolders has no held-out test images; "
        f"put the images in {tmp_path / 'train'} and {tmp_path / 'test'}, train on them with "
        f"some held out (--set data.validation=N), or score the folder as it is (split 'all': "
        f"denseflow evaluate --images {tmp_path})"
    )
    for split in ("train", "test"):
        with pytest.raises(DataError) as err:
            load_images("folder", split, tmp_path, image_size=(8, 8))
        assert str(err.value) == expected
    assert load_images("folder", "all", tmp_path, image_size=(8, 8)).names == ("0.png", "1.png")


def test_split_all_is_for_folder_only(tmp_path: Path) -> None:
    for name in DATASETS:
        if name == "folder":
            continue
        with pytest.raises(DataError) as err:
            load_images(name, "all", tmp_path)
        assert str(err.value) == (
            f"{name}: no split 'all' (it is for a plain folder of images, dataset 'folder'); "
            f"{name} has the splits 'train' and 'test'"
        )
    with pytest.raises(DataError) as err:
        load_images("cifar10", "valid", tmp_path)
    assert str(err.value) == "cifar10: unknown split 'valid'; choose 'train' or 'test'"
    with pytest.raises(DataError) as err:
        load_images("folder", "valid", tmp_path, image_size=(8, 8))
    assert str(err.value) == "folder: unknown split 'valid'; choose 'train', 'test' or 'all'"


def test_folder_counts_and_reports_resized_images(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "train").mkdir()
    (tmp_path / "test").mkdir()
    for name, (w, h) in {
        "a.png": (8, 8),
        "b.png": (12, 10),
        "c.png": (10, 8),
        "d.png": (8, 8),
    }.items():
        Image.new("RGB", (w, h)).save(tmp_path / "train" / name)
    Image.new("RGB", (8, 8)).save(tmp_path / "test" / "e.png")
    train = load_images("folder", "train", tmp_path, image_size=(8, 8))
    assert train.source["resized"] == 2  # b resized and cropped, c cropped only
    assert "center crop to 8x8" in train.source["preprocessing"]
    assert capsys.readouterr().out == (
        f"{tmp_path / 'train'}: 2 of 4 images resized to 8x8 "
        "(PIL bilinear on the short side, center crop)\n"
    )
    test = load_images("folder", "test", tmp_path, image_size=(8, 8))
    assert test.source["resized"] == 0 and capsys.readouterr().out == ""  # said only when any
    assert load_images("folder", "train", tmp_path, (8, 8), limit=1).source["resized"] == 0


def test_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="image_size is required"):
        load_images("folder", data_dir=tmp_path)
    with pytest.raises(DataError, match="empty folder"):
        load_images("folder", "all", tmp_path, image_size=(8, 8))
    Image.new("RGB", (9, 9)).save(tmp_path / "a.png")
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=r"notes.txt: not a readable image"):
        load_images("folder", "all", tmp_path, image_size=(8, 8))
    (tmp_path / "notes.txt").unlink()
    Image.new("RGB", (9, 9)).save(tmp_path / "b.bmp")
    with pytest.raises(DataError, match=r"b.bmp: a BMP image, expected PNG or JPEG"):
        load_images("folder", "all", tmp_path, image_size=(8, 8))
    (tmp_path / "b.bmp").unlink()
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError, match=r"test: missing .* has train/ but no test/"):
        load_images("folder", "test", tmp_path, image_size=(8, 8))


# --------------------------------------------------------------------------------------------
# the bundled Fashion-MNIST subset


def test_embedded_fashion_mnist(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(idx_module, "DEBIAN_FASHION_MNIST_DIR", Path("/nonexistent/fashion-mnist"))
    folder = embedded_fashion_mnist_dir()
    assert {p.name for p in folder.iterdir()} >= {
        "LICENSE",
        "README.md",
        "train-images-idx3-ubyte.gz",
    }
    assert sum(p.stat().st_size for p in folder.iterdir()) < 5.5e6
    train, test = load_images("fashion_mnist", "train"), load_images("fashion_mnist", "test")
    check_set(train, (10000, 1, 28, 28))
    check_set(test, (2000, 1, 28, 28))
    assert (
        train.source["path"] == str(folder)
        and "0.0~git20200523.55506a9-1" in train.source["release"]
    )
    assert 0.2 < train.images.float().mean().item() / 255 < 0.4  # real clothes, not noise or zeros
    for debian in (
        Path("/usr/share/datasets/fashion-mnist"),
        Path("/tmp/fmnist/usr/share/datasets/fashion-mnist"),
    ):
        if (debian / "train-images-idx3-ubyte.gz").is_file():
            break
    else:
        pytest.skip("the Debian dataset-fashion-mnist files are not on this machine")
    for s, prefix in ((train, "train"), (test, "t10k")):
        full = gzip.decompress((debian / f"{prefix}-images-idx3-ubyte.gz").read_bytes())
        n = s.images.shape[0]
        assert s.images.numpy().tobytes() == full[16 : 16 + n * 784]
        labels = gzip.decompress((debian / f"{prefix}-labels-idx1-ubyte.gz").read_bytes())
        ours = gzip.decompress((folder / f"{prefix}-labels-idx1-ubyte.gz").read_bytes())
        assert ours[8:] == labels[8 : 8 + n] and struct.unpack(">II", ours[:8]) == (2049, n)


def test_fashion_mnist_prefers_debian_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    images = write_idx(tmp_path / "debian", n=3)
    monkeypatch.setattr(idx_module, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "debian")
    s = load_images("fashion_mnist")
    assert np.array_equal(s.images[:, 0].numpy(), images) and "Debian" in s.source["release"]


# --------------------------------------------------------------------------------------------
# augmentations (spec §13.4)


def find_window(out: np.ndarray, image: np.ndarray, pad: int) -> list[tuple[bool, int, int]]:
    """All (flipped, d_y, d_x) with ``out`` == the window at offset ``pad + d`` of the
    edge-padded image."""
    hits = []
    for flipped in (False, True):
        src = image[..., ::-1] if flipped else image
        padded = np.pad(src, ((0, 0), (pad, pad), (pad, pad)), mode="edge")
        h, w = image.shape[1:]
        for dy in range(-pad, pad + 1):
            for dx in range(-pad, pad + 1):
                if np.array_equal(padded[:, pad + dy : pad + dy + h, pad + dx : pad + dx + w], out):
                    hits.append((flipped, dy, dx))
    return hits


def test_augment_shapes_identity_and_determinism() -> None:
    x = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    assert augment(x, "none") is x
    for kind in ("hflip", "eta", "neta"):
        a = augment(x, kind, torch.Generator().manual_seed(1))
        b = augment(x, kind, torch.Generator().manual_seed(1))
        c = augment(x, kind, torch.Generator().manual_seed(2))
        assert a.shape == x.shape and a.dtype == torch.uint8 and a.is_contiguous()
        assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError, match="unknown augmentation"):
        augment(x, "horizontal_flip")
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        augment(x[0], "eta")


def test_hflip_is_a_fair_coin_per_image() -> None:
    x = torch.randint(0, 256, (4000, 1, 2, 3), dtype=torch.uint8)
    y = augment(x, "hflip", torch.Generator().manual_seed(0))
    same, flipped = (y == x).flatten(1).all(1), (y == x.flip(-1)).flatten(1).all(1)
    assert bool((same | flipped).all())
    assert abs(flipped.float().mean().item() - 0.5) < 0.04


@pytest.mark.parametrize(
    ("kind", "side", "pad", "max_d"), [("eta", 32, 2, 1), ("neta", 32, 2, 1), ("eta", 64, 3, 3)]
)
def test_eta_windows_are_crops_of_the_edge_padded_image(
    kind: str, side: int, pad: int, max_d: int
) -> None:
    assert pad == math.ceil(0.04 * side) and max_d == round(0.04 * (side + 2 * pad))
    x = torch.randint(0, 256, (300, 2, side, side), dtype=torch.uint8)
    y = augment(x, kind, torch.Generator().manual_seed(3))
    hits = [find_window(y[i].numpy(), x[i].numpy(), pad) for i in range(len(x))]
    assert all(len(h) == 1 for h in hits)  # every output is exactly one window
    flips = np.array([h[0][0] for h in hits])
    offsets = np.array([h[0][1:] for h in hits]).ravel()
    assert np.abs(offsets).max() == max_d  # the full range is reached, never exceeded
    assert set(offsets.tolist()) == set(range(-max_d, max_d + 1))
    if kind == "neta":
        assert not flips.any()
    else:
        assert 0.4 < flips.mean() < 0.6
    if side == 32:  # round(U[-1.44, 1.44]): P(0) = 1/2.88
        assert abs((offsets == 0).mean() - 1 / 2.88) < 0.06


def test_eta_zero_fill_beyond_the_padding_for_large_images() -> None:
    # 300x300: pad 12, translations up to round(0.04 * 324) = 13 -> one row/column of zero fill
    x = torch.full((64, 1, 300, 300), 200, dtype=torch.uint8)
    y = augment(x, "neta", torch.Generator().manual_seed(0))
    zero_rows = (y[:, 0] == 0).all(2)
    zero_cols = (y[:, 0] == 0).all(1)
    assert bool(zero_rows.any() or zero_cols.any())
    assert int(zero_rows.sum(1).max()) <= 1 and int(zero_cols.sum(1).max()) <= 1
    assert bool((zero_rows[:, 1:-1] == 0).all() and (zero_cols[:, 1:-1] == 0).all())
    assert bool(((y == 0) | (y == 200)).all())
