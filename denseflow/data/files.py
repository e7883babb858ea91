"""Reading untrusted data files: bytes, sha256 digests, images, and pickles.

Pickled files are read with a restricted unpickler that admits only numpy array reconstruction
and plain values: a crafted pickle cannot run code. Every failure is a :class:`DataError` that
names the file.
"""

from __future__ import annotations

import codecs
import hashlib
import importlib
import io
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from .base import DataError


def read_bytes(path: Path) -> bytes:
    """The whole file."""
    try:
        return path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror or err})") from None


def sha256_file(path: Path) -> str:
    """sha256 hex digest of the file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror or err})") from None
    return digest.hexdigest()


def manifest_digest(entries: Sequence[tuple[str, str]]) -> str:
    """sha256 of the ``sha256sum`` output for ``(name, sha256)`` entries, sorted by name."""
    lines = "".join(f"{sha}  {name}\n" for name, sha in sorted(entries))
    return hashlib.sha256(lines.encode()).hexdigest()


def open_image(path: Path) -> tuple[Image.Image, str]:
    """Decode-ready PIL image of ``path`` and the sha256 of its bytes (read once)."""
    raw = read_bytes(path)
    try:
        img = Image.open(io.BytesIO(raw))
        img.load()
    except UnidentifiedImageError:
        raise DataError(
            f"{path}: not a readable image (not a PNG/JPEG file Pillow recognises)"
        ) from None
    except Image.DecompressionBombError:  # Image.open refuses it by its header's size
        raise DataError(
            f"{path}: not a readable image (more than the {2 * Image.MAX_IMAGE_PIXELS:,} pixels "
            "Pillow opens)"
        ) from None
    except (OSError, SyntaxError, ValueError) as err:
        raise DataError(f"{path}: not a readable image ({err})") from None
    return img, hashlib.sha256(raw).hexdigest()


# --------------------------------------------------------------------------------------------
# restricted unpickling (CIFAR-10 and ImageNet batches are pickles holding numpy arrays)


class _Refused(Exception):
    def __init__(self, module: str, name: str) -> None:
        super().__init__(f"{module}.{name}")
        self.what = f"{module}.{name}"


def _numpy_attr(submodule: str, name: str) -> Any:
    """``numpy._core.<submodule>.<name>`` (numpy 2) or ``numpy.core.<submodule>.<name>``
    (numpy 1)."""
    for prefix in ("numpy._core.", "numpy.core."):
        try:
            return getattr(importlib.import_module(prefix + submodule), name)
        except (ImportError, AttributeError):
            continue
    raise _Refused(f"numpy.core.{submodule}", name)


def _latin1_encode(text: str, encoding: str = "latin1", errors: str = "strict") -> bytes:
    """What protocol-0..2 pickles written by Python 3 use for ``bytes``; only latin-1 is
    admitted."""
    if codecs.lookup(encoding).name != "iso8859-1" or not isinstance(text, str):
        raise _Refused("_codecs.encode", repr(encoding))
    return text.encode("latin1", errors)


def _allowed_global(module: str, name: str) -> Any:
    if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name in (
        "_reconstruct",
        "scalar",
    ):
        return _numpy_attr("multiarray", name)
    if module in ("numpy.core.numeric", "numpy._core.numeric") and name == "_frombuffer":
        # numpy's pickle protocol 5 form: frombuffer(...).reshape(...)
        return _numpy_attr("numeric", name)
    if module == "numpy" and name == "ndarray":
        return np.ndarray
    if module == "numpy" and name == "dtype":
        return np.dtype
    if module == "_codecs" and name == "encode":
        return _latin1_encode
    if module in ("builtins", "__builtin__") and name in (
        "set",
        "frozenset",
        "bytearray",
        "complex",
    ):
        return {"set": set, "frozenset": frozenset, "bytearray": bytearray, "complex": complex}[
            name
        ]
    raise _Refused(module, name)


class _ArrayUnpickler(pickle.Unpickler):
    """Admits numpy array reconstruction (``_reconstruct``/``_frombuffer``, ``ndarray``,
    ``dtype``, ``scalar``) and the few globals pickle needs for plain values; refuses everything
    else, so a crafted file cannot import or call anything that runs code."""

    def find_class(self, module: str, name: str) -> Any:
        return _allowed_global(module, name)

    def persistent_load(self, pid: Any) -> Any:
        raise _Refused("persistent_load", repr(pid)[:40])


def load_pickle(path: Path) -> Any:
    """Unpickle a data file with the restricted unpickler (Python 2 pickles read as latin-1)."""
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
        raise DataError(
            f"{path}: not a readable pickle, truncated or corrupt ({type(err).__name__}: {err})"
        ) from None
