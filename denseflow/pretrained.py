"""Weights as the ecosystem keeps them: a folder with ``config.json`` and ``model.safetensors``
(the Hugging Face layout), and one loader for every place weights can come from.

:func:`load` accepts, in this order: the name of a model published with the package
(:func:`published`, e.g. ``"fashion-mnist"``), a folder in the layout above, a run folder (its
``final.pt``, else its newest training checkpoint), a denseflow checkpoint file, or — with
``huggingface_hub`` installed — a Hub repository id ``owner/name``, downloaded into the Hub's
cache and read as a folder. ``config.json`` holds the run configuration (model, data, train,
eval), which BatchNorm statistics the weights carry, and the SHA-256 of ``model.safetensors``,
verified on load like a checkpoint's checksum.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from . import __version__
from . import checkpoint as ckpt
from .config import RunConfig
from .data.files import sha256_file
from .model import DenseFlow
from .runlog import run_files

#: models published with the package, one folder each (``config.json``, ``model.safetensors``)
PUBLISHED_DIR = Path(__file__).resolve().parent / "published"
WEIGHTS, CONFIG = "model.safetensors", "config.json"


def published() -> list[str]:
    """Names of the models published with the package."""
    return sorted(p.name for p in PUBLISHED_DIR.glob("*") if (p / CONFIG).is_file())


def save_pretrained(
    folder: str | os.PathLike,
    model: DenseFlow,
    config: RunConfig | None = None,
    batchnorm: str = ckpt.RUNNING_STATISTICS,
) -> Path:
    """Write ``model`` as ``folder/model.safetensors`` + ``folder/config.json`` (``config``: the
    run configuration to keep with it, default: the model's own with default data and recipe)."""
    from safetensors.torch import save

    folder = Path(folder)
    held = run_files(folder)
    if held:  # its config.json would be read in place of the run's final.pt from then on
        raise ckpt.CheckpointError(
            f"{folder}: a training run's folder ({', '.join(held)}): save the model elsewhere"
        )
    if not isinstance(model, DenseFlow) or not isinstance(config, RunConfig | None):
        raise TypeError("save_pretrained: needs a DenseFlow and a RunConfig (or None)")
    config = config or RunConfig(model=model.config)
    if config.model != model.config:
        raise ValueError(
            "save_pretrained: config.model is not the model's architecture (model.config)"
        )
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = folder / f".{WEIGHTS}.tmp"
    # bytes written by open(): the file gets the usual permissions (save_file's are 0600)
    tmp.write_bytes(save(state, metadata={"format": ckpt.FORMAT}))
    os.replace(tmp, folder / WEIGHTS)
    meta = {"format": ckpt.FORMAT, "denseflow_version": __version__, "batchnorm": batchnorm}
    meta |= {"weights_sha256": sha256_file(folder / WEIGHTS), **config.to_dict()}
    (folder / f".{CONFIG}.tmp").write_text(json.dumps(meta, indent=1) + "\n")
    os.replace(folder / f".{CONFIG}.tmp", folder / CONFIG)
    return folder


def _read_folder(folder: Path) -> dict[str, Any]:
    """A checkpoint-like payload (``config``, ``model``, ``batchnorm``) of a pretrained folder."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        meta = json.loads((folder / CONFIG).read_text())
    except (OSError, ValueError) as err:
        raise ckpt.CheckpointError(f"{folder / CONFIG}: not a readable config ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != ckpt.FORMAT:
        raise ckpt.CheckpointError(f"{folder / CONFIG}: not a denseflow model's config.json")
    if meta.get("weights_sha256") != sha256_file(folder / WEIGHTS):
        raise ckpt.CheckpointError(
            f"{folder / WEIGHTS}: damaged (its bytes do not match the SHA-256 in {CONFIG})"
        )
    try:
        state = load_file(str(folder / WEIGHTS))
    except (SafetensorError, OSError) as err:
        raise ckpt.CheckpointError(f"{folder / WEIGHTS}: not readable ({err})") from None
    sections = {k: v for k, v in meta.items() if k in ("model", "data", "train", "eval")}
    return {"config": sections, "model": state, "batchnorm": meta.get("batchnorm")}


def load(source: str | os.PathLike) -> dict[str, Any]:
    """The payload (``config``, ``model`` state dict, ``batchnorm``) of weights from any source
    the module docstring lists; a CheckpointError naming the source otherwise."""
    text, path = str(source), Path(source)
    if text in published():
        path = PUBLISHED_DIR / text
    if text and path.is_dir():
        return _read_dir(path)
    if text and path.exists():
        return ckpt.load(path)
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        return _read_folder(_download(text))
    raise ckpt.CheckpointError(
        f"{text or repr(text)}: no such checkpoint, model folder, run folder or published model "
        f"({', '.join(published()) or 'none installed'})"
    )


def _read_dir(folder: Path) -> dict[str, Any]:
    """The payload of a model folder, a run folder's ``final.pt`` or its newest training
    checkpoint; for a folder of training checkpoints (a run's ``checkpoints/``), an error naming
    the newest."""
    if (folder / CONFIG).is_file():
        return _read_folder(folder)
    if (folder / "final.pt").is_file():
        return ckpt.load(folder / "final.pt")
    if any((folder / "checkpoints").glob("step_*.pt")):
        return ckpt.load(folder)
    steps = sorted(folder.glob("step_*.pt"))
    if steps:
        raise ckpt.CheckpointError(
            f"{folder}: a folder of training checkpoints: give one of them, e.g. {steps[-1]}"
        )
    raise ckpt.CheckpointError(
        f"{folder}: not a model: found no final.pt, {CONFIG} with {WEIGHTS}, or "
        "checkpoints/step_*.pt in it"
    )


def _download(repo_id: str) -> Path:
    """A Hub repository's files (config.json, model.safetensors) in the local Hub cache."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ckpt.CheckpointError(
            f"{repo_id}: no such file or folder; to read it as a Hugging Face Hub repository "
            "pip install huggingface_hub"
        ) from None
    try:
        return Path(snapshot_download(repo_id=repo_id, allow_patterns=[CONFIG, WEIGHTS]))
    except Exception as err:  # offline, unknown repository, ...: the Hub's own message
        message = f"{repo_id}: cannot download ({type(err).__name__}: {err})"
        raise ckpt.CheckpointError(message) from None


def open_model(
    source: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[DenseFlow, RunConfig, str]:
    """``(model in eval mode, run configuration, BatchNorm statistics)`` of any source."""
    payload = load(source)
    model, config = ckpt.model_from(payload, source, device)
    return model, config, payload.get("batchnorm") or ckpt.RUNNING_STATISTICS
