"""Self-describing checkpoints: the run configuration, state dicts and a format version.

Everything is plain tensors, numbers, strings, lists and dicts, so every file loads with
``torch.load(weights_only=True)``. A training checkpoint carries the optimizer and the loop
position for exact resumption; an inference export carries only the model weights and config.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .config import ConfigError, RunConfig
from .model import DenseFlow

FORMAT = "denseflow"
VERSION = 1


class CheckpointError(ValueError):
    """A file that is not a denseflow checkpoint, or one that does not fit; names the file."""


def save(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Write ``payload`` plus format/version atomically: a temporary file in the same folder, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        torch.save({"format": FORMAT, "version": VERSION, "denseflow_version": __version__, **payload}, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    return path


def load(path: str | os.PathLike) -> dict[str, Any]:
    """Read a denseflow checkpoint (``weights_only=True``); anything else is a CheckpointError."""
    path = Path(path)
    if path.is_dir():
        path = latest(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint") from None
    except Exception as err:  # unpickling errors of foreign or damaged files come in many types
        raise CheckpointError(f"{path}: not a readable denseflow checkpoint ({type(err).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        hint = (
            " (an official DenseFlow checkpoint? use `denseflow import-official`)" if _looks_official(payload) else ""
        )
        raise CheckpointError(f"{path}: not a denseflow checkpoint{hint}")
    if payload.get("version", 0) > VERSION:
        raise CheckpointError(f"{path}: written by a newer denseflow (format {payload['version']} > {VERSION})")
    return payload


def _looks_official(payload: Any) -> bool:
    return isinstance(payload, dict) and "model" in payload and "current_epoch" in payload


def latest(run_dir: Path) -> Path:
    """The newest training checkpoint of a run directory."""
    found = sorted((run_dir / "checkpoints").glob("step_*.pt"), key=lambda p: int(p.stem.split("_")[1]))
    if not found:
        raise CheckpointError(f"{run_dir}: no checkpoints/step_*.pt to resume from")
    return found[-1]


def run_config(payload: dict[str, Any], where: str = "checkpoint") -> RunConfig:
    try:
        return RunConfig.from_dict(payload["config"], where)
    except (KeyError, ConfigError) as err:
        raise CheckpointError(f"{where}: its configuration does not fit this denseflow ({err})") from None


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[DenseFlow, RunConfig]:
    """The model of a training checkpoint or an inference export, in eval mode."""
    payload = load(path)
    config = run_config(payload, str(path))
    model = DenseFlow(config.model)
    try:
        model.load_state_dict(payload["model"])
    except (KeyError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0]
        raise CheckpointError(f"{path}: weights do not fit its configuration ({first})") from None
    return model.to(device).eval(), config


def export(path: str | os.PathLike, model: DenseFlow, config: RunConfig, safetensors: bool = False) -> Path:
    """Inference-only weights + config (no optimizer); ``safetensors=True`` writes that format too."""
    out = save(path, {"kind": "weights", "config": config.to_dict(), "model": model.state_dict()})
    if safetensors:
        import json

        try:
            from safetensors.torch import save_file
        except ImportError:
            raise CheckpointError("safetensors is not installed: pip install safetensors") from None
        tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(
            tensors, str(Path(path).with_suffix(".safetensors")), metadata={"config": json.dumps(config.to_dict())}
        )
    return out
