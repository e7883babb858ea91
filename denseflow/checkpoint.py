"""Self-describing checkpoints: the run configuration, state dicts and a format version.

Everything is plain tensors, numbers, strings, lists and dicts, so every file loads with
``torch.load(weights_only=True)``. A training checkpoint carries the optimizer and the loop
position for exact resumption; an inference export carries only the model weights and config.
Files are written to a temporary name, flushed, fsynced and renamed, and the folder is fsynced,
so a crash never leaves a half-written checkpoint under the real name nor loses the rename.

Every file carries a SHA-256 of its contents (``checksum``), verified on load after
``torch.load``: any change of a tensor's bytes, dtype or shape, of a key or of a plain value is
refused, and so is a truncated file (it does not unpickle). The digest is taken over the loaded
contents rather than the file's bytes, so that a file is checked by what it holds, whatever
zip layout the torch that wrote it chose, and a load reads the file once. Which digest a file
carries follows from its format ``version``:

* 2 (written now): :func:`checksum`. Every value is tagged with its type and every string and
  number is length-prefixed, so no two different nests feed the same bytes; tensor bytes are
  hashed in place, without copies. SHA-256 is also the fastest of hashlib's digests on CPUs with
  SHA extensions (1.9 GB/s against 1.3 for BLAKE2b on the AMD EPYC of ``docs/reliability.md``).
* 1 (still read): :func:`checksum_v1`, which fed plain values untagged and unseparated, so
  ``[1, 23]`` and ``[12, 3]``, ``{0: x}`` and ``{"0": x}``, or a tuple and a list, looked alike.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from . import __version__, distributed
from .config import ConfigError, RunConfig
from .errors import DenseFlowError
from .model import DenseFlow

FORMAT = "denseflow"
VERSION = 2  # 2: the type-tagged checksum; files of version 1 are still read


class CheckpointError(DenseFlowError):
    """A file that is not a denseflow checkpoint, or one that does not fit; names the file."""


def checksum(value: Any) -> str:
    """SHA-256 over a nest of dicts, lists, tuples, tensors and plain values (format version 2):
    tensor dtypes, shapes and bytes; type-tagged, length-prefixed keys and values."""
    digest = hashlib.sha256()

    def feed(v: Any) -> None:
        if isinstance(v, torch.Tensor):  # its dtype and shape fix how many bytes follow
            digest.update(f"T{v.dtype}{tuple(v.shape)}".encode())
            digest.update(_tensor_bytes(v))
        elif isinstance(v, dict):
            digest.update(f"D{len(v)}:".encode())
            for key in sorted(v, key=lambda k: (type(k).__name__, str(k))):
                feed(key)
                feed(v[key])
        elif isinstance(v, (list, tuple)):
            digest.update(f"{'L' if isinstance(v, list) else 'U'}{len(v)}:".encode())
            for item in v:
                feed(item)
        else:
            data = v.encode() if isinstance(v, str) else repr(v).encode()
            digest.update(f"V{type(v).__name__}:{len(data)}:".encode())
            digest.update(data)

    feed(value)
    return digest.hexdigest()


def checksum_v1(value: Any) -> str:
    """The SHA-256 of format version 1 (kept to verify its files): like :func:`checksum`, but keys
    are fed as strings and plain values as bare reprs, untagged and unseparated."""
    digest = hashlib.sha256()

    def feed(v: Any) -> None:
        if isinstance(v, torch.Tensor):
            digest.update(f"T{v.dtype}{tuple(v.shape)}".encode())
            digest.update(_tensor_bytes(v))
        elif isinstance(v, dict):
            digest.update(f"D{len(v)}".encode())
            for key in sorted(v, key=str):
                feed(str(key))
                feed(v[key])
        elif isinstance(v, (list, tuple)):
            digest.update(f"L{len(v)}".encode())
            for item in v:
                feed(item)
        else:
            digest.update(json.dumps(v).encode() if isinstance(v, str) else repr(v).encode())

    feed(value)
    return digest.hexdigest()


_CHECKSUMS = {1: checksum_v1, 2: checksum}  # format version: the digest its files carry


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    """A tensor's bytes in memory order, without a copy for a contiguous CPU tensor (any dtype:
    viewed as uint8 first, which bfloat16 needs)."""
    flat = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    return memoryview(flat.numpy())


def check_target(path: str | os.PathLike) -> Path:
    """``path`` if a checkpoint may be written there: nothing or a regular file is there. A
    checkpoint is renamed over what is there, which would replace a symbolic link (not its
    target), a device or a named pipe with a regular file: a CheckpointError instead."""
    path = Path(path)
    try:
        mode = path.lstat().st_mode
    except OSError:  # nothing there
        return path
    if not stat.S_ISREG(mode):
        kind = {"l": "a symbolic link", "p": "a named pipe", "d": "a folder"}.get(
            stat.filemode(mode)[0], "a device or socket"
        )
        raise CheckpointError(
            f"{path}: {kind}, not a regular file; writing a checkpoint would replace it: choose "
            "another name"
        )
    return path


def check_export_target(path: str | os.PathLike) -> Path:
    """``path`` if weights may be exported there (:func:`check_target`), and it is not a training
    checkpoint: weights over one would lose its optimizer state, and the run could not resume."""
    path = check_target(path)
    if path.is_file() and is_denseflow_checkpoint(path):
        held = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        if "optimizer" in held:
            raise CheckpointError(
                f"{path}: a training checkpoint; weights written over it would lose its "
                "optimizer state (a resume needs it): choose another name"
            )
    return path


def save(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Write ``payload`` plus format, version and checksum atomically and durably (temporary file,
    fsync, rename, fsync of the folder) to ``path``, which holds nothing or a regular file
    (:func:`check_target`); a failed write leaves no temporary file."""
    path = check_target(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    content = {"format": FORMAT, "version": VERSION, "denseflow_version": __version__, **payload}
    try:
        with open(tmp, "wb") as handle:
            torch.save({**content, "checksum": checksum(content)}, handle)
            handle.flush()
            os.fsync(handle.fileno())
    except Exception:  # a full disk, say (a process that dies leaves it: the next save replaces it)
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    _fsync_folder(path.parent)
    return path


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable; skipped where a folder cannot be opened or fsynced
    (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load(path: str | os.PathLike) -> dict[str, Any]:
    """Read a denseflow checkpoint (``weights_only=True``, checksum verified); anything else is a
    CheckpointError. For a run directory: its newest checkpoint that loads and verifies — a damaged
    newer one (truncated, altered) is skipped, saying which."""
    return load_newest(path)[1]


def load_on_every_rank(path: str | os.PathLike) -> dict[str, Any]:
    """:func:`load` in a process group: rank 0 chooses the checkpoint (the newest good one of a
    run directory) and every other rank loads the very file it chose, so all ranks restore the
    same step even if the folder changes meanwhile or a file is damaged."""
    chosen: dict[str, Any] = {}

    def choose() -> Path:
        found, chosen["payload"] = load_newest(path)
        return found

    found = distributed.decide(choose)
    return chosen["payload"] if "payload" in chosen else _load_file(found)


def load_newest(path: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    """``(file, payload)``: the file itself, or a run directory's newest good checkpoint."""
    path = Path(path)
    if not path.is_dir():
        return path, _load_file(path)
    found = sorted(
        (path / "checkpoints").glob("step_*.pt"), key=lambda p: int(p.stem.split("_")[1])
    )
    if not found:
        raise CheckpointError(f"{path}: no checkpoints/step_*.pt to resume from")
    for candidate in reversed(found):
        try:
            payload = _load_file(candidate)
        except CheckpointError as err:
            tqdm.write(f"skipping {err}")
            continue
        if candidate != found[-1]:
            tqdm.write(f"resuming from {candidate.name} instead of the damaged {found[-1].name}")
        return candidate, payload
    raise CheckpointError(f"{path}: every checkpoint in checkpoints/ is damaged")


def _load_file(path: Path) -> dict[str, Any]:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint") from None
    except Exception as err:  # unpickling errors of foreign or damaged files come in many types
        raise CheckpointError(
            f"{path}: not a readable denseflow checkpoint ({type(err).__name__})"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        hint = (
            " (an official DenseFlow checkpoint? use `denseflow import-official`)"
            if _looks_official(payload)
            else ""
        )
        raise CheckpointError(f"{path}: not a denseflow checkpoint{hint}")
    version = payload.get("version")
    if isinstance(version, int) and version > VERSION:
        raise CheckpointError(
            f"{path}: written by a newer denseflow (format {version} > {VERSION})"
        )
    stored, verify = payload.pop("checksum", None), _CHECKSUMS.get(version)
    if verify is None or stored != verify(payload):
        raise CheckpointError(
            f"{path}: damaged (its contents do not match the checksum it carries)"
        )
    return payload


def is_denseflow_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a file of ours (judged by its format field, not verified)."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # any unreadable or foreign file
        return False
    return isinstance(payload, dict) and payload.get("format") == FORMAT


def _looks_official(payload: Any) -> bool:
    return isinstance(payload, dict) and "model" in payload and "current_epoch" in payload


def run_config(payload: dict[str, Any], where: str = "checkpoint") -> RunConfig:
    """The run configuration a checkpoint carries; a CheckpointError if it no longer fits."""
    try:
        return RunConfig.from_dict(payload["config"], where)
    except (KeyError, ConfigError) as err:
        raise CheckpointError(
            f"{where}: its configuration does not fit this denseflow ({err})"
        ) from None


#: what a checkpoint's BatchNorm statistics are when it does not say (training checkpoints)
RUNNING_STATISTICS = "running averages of training (momentum 0.1)"


def load_model(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[DenseFlow, RunConfig]:
    """The model of a training checkpoint or an inference export, in eval mode."""
    return model_from(load(path), path, device)


def model_from(
    payload: dict[str, Any], where: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[DenseFlow, RunConfig]:
    """The model of a loaded checkpoint (``where`` names it in errors), in eval mode."""
    config = run_config(payload, str(where))
    model = DenseFlow(config.model)
    try:
        model.load_state_dict(payload["model"])
    except (KeyError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0]
        raise CheckpointError(f"{where}: weights do not fit its configuration ({first})") from None
    return model.to(device).eval(), config


def batchnorm_statistics(payload: dict[str, Any]) -> str:
    """Which BatchNorm running statistics a checkpoint carries, in words."""
    return payload.get("batchnorm", RUNNING_STATISTICS)


def export(
    path: str | os.PathLike,
    model: DenseFlow,
    config: RunConfig,
    batchnorm: str = RUNNING_STATISTICS,
) -> Path:
    """Inference-only weights + config (no optimizer); ``batchnorm`` says which BatchNorm
    statistics the weights carry. (:func:`denseflow.pretrained.save_pretrained` writes the
    safetensors layout.)"""
    payload = {"kind": "weights", "config": config.to_dict(), "model": model.state_dict()}
    return save(check_export_target(path), payload | {"batchnorm": batchnorm})
