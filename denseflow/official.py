"""Loading the published DenseFlow weights: official flags and state-dict keys -> our model.

An official run directory holds ``args.pickle`` (a pickled ``argparse.Namespace`` of the
training flags) and ``check/checkpoint.pt`` (a dict whose ``model`` entry is the state dict).
The flags are read with a restricted unpickler that admits nothing but a Namespace of plain
values, so a crafted file cannot run code. Every official key is translated to ours by
:func:`official_key`; the buffers we do not keep are checked to hold the constants we assume.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .checkpoint import CheckpointError
from .config import ConfigError, ModelConfig
from .model import DenseFlow

#: image shape (C, H, W) of each dataset name the official code accepts for DenseFlow
OFFICIAL_DATASETS = {
    "cifar10": (3, 32, 32),
    "imagenet32": (3, 32, 32),
    "svhn": (3, 32, 32),
    "imagenet64": (3, 64, 64),
    "celeba": (3, 64, 64),
    "mnist": (1, 28, 28),
}

_PLAIN = (type(None), bool, int, float, str)


class _NamespaceUnpickler(pickle.Unpickler):
    """Admits ``argparse.Namespace`` and the pickle protocol's own plain values, nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("argparse", "Namespace"):
            return argparse.Namespace
        raise pickle.UnpicklingError(
            f"refusing {module}.{name}: an args.pickle may hold only an argparse Namespace"
        )


def load_official_args(args: Mapping[str, Any] | str | os.PathLike) -> dict[str, Any]:
    """The official flags as a dict, from a dict, an ``args.json`` or an ``args.pickle`` (read
    safely)."""
    if isinstance(args, Mapping):
        return dict(args)
    path = Path(args)
    if not path.is_file():
        raise CheckpointError(
            f"{path}: no such file (the official run's flags: --args args.pickle|args.json)"
        )
    data = path.read_bytes()
    if path.suffix == ".json":
        try:
            values = json.loads(data)
        except ValueError as err:
            raise CheckpointError(f"{path}: not readable JSON ({err})") from None
        if not isinstance(values, dict):
            raise CheckpointError(f"{path}: expected a JSON object of official flags")
        return values
    try:
        namespace = _NamespaceUnpickler(io.BytesIO(data)).load()
    except Exception as err:  # any failure of an untrusted file is reported the same way
        raise CheckpointError(f"{path}: not a readable official args.pickle ({err})") from None
    if not isinstance(namespace, argparse.Namespace):
        raise CheckpointError(
            f"{path}: expected a pickled argparse.Namespace, got {type(namespace).__name__}"
        )
    values = vars(namespace)
    for key, value in values.items():
        items = value if isinstance(value, (list, tuple)) else [value]
        if not all(isinstance(v, _PLAIN) for v in items):
            raise CheckpointError(
                f"{path}: flag {key!r} holds a {type(value).__name__}, not a plain value"
            )
    return values


def config_from_official_args(
    flags: Mapping[str, Any], where: str | os.PathLike = "official flags"
) -> ModelConfig:
    """ModelConfig of an official run: ``dataset``, ``num_bits``, ``block_conf``, ``layers_conf``,
    ``layer_mid_chnls``, ``growth_rate``; everything else is fixed in the official code.
    ``where`` (the flags' file) begins every error's message."""
    lists = ("block_conf", "layers_conf", "layer_mid_chnls")
    missing = [k for k in ("dataset", *lists, "growth_rate") if k not in flags]
    if missing:
        raise CheckpointError(f"{where}: missing the flags {missing}")
    dataset = flags["dataset"]
    if not isinstance(dataset, str) or dataset not in OFFICIAL_DATASETS:
        raise CheckpointError(
            f"{where}: dataset {dataset!r} is not one of {sorted(OFFICIAL_DATASETS)}"
        )
    values = {"num_bits": 8} | {
        k: flags[k] for k in (*lists, "growth_rate", "num_bits") if k in flags
    }
    for key, value in values.items():
        many = key in lists
        items = value if many and isinstance(value, (list, tuple)) else [value]
        if (many and items is not value) or not all(_is_int(v) for v in items):
            expected = "a list of integers" if many else "an integer"
            raise CheckpointError(f"{where}: flag {key}={value!r}: expected {expected}")
    try:
        return ModelConfig(image_shape=OFFICIAL_DATASETS[dataset], **values)
    except ConfigError as err:  # e.g. growth_rate=3: must be even
        raise CheckpointError(f"{where}: {err}") from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _dense_block_key(rest: str) -> str | None:
    """``{l}.nn.0.p`` / ``{l}.nn.2.p`` / ``{n}.conv.p`` inside an official DenseBlock -> ours."""
    if m := re.fullmatch(r"(\d+)\.nn\.([02])\.(weight|bias)", rest):
        return f"layers.{m[1]}.{'conv1' if m[2] == '0' else 'conv3'}.{m[3]}"
    if m := re.fullmatch(r"\d+\.conv\.(weight|bias)", rest):
        return f"gate.conv.{m[1]}"
    return None


_COUPLING_NET = {
    "transform.0.": "in_proj.",
    "transform.1.mha.qkv.": "attention.qkv.",
    "transform.1.mha.out_transform.": "attention.out.",
    "transform.1.mix_conv.0.": "fusion.0.",
    "transform.1.mix_conv.2.": "fusion.2.",
    "transform.2.": "out_proj.",
}


def official_key(key: str) -> str | None:
    """Our state-dict key for an official one; ``None`` for the constant buffers we do not keep.

    Raises a ``CheckpointError`` for a key that has no place in a DenseFlow model.
    """
    if key in ("transforms.1._shift", "transforms.1._scale", "transforms.0.ldj_per_dim"):
        return None
    if re.fullmatch(
        r"transforms\.\d+\.dist\.buffer|.*\.transforms\.0\.initialized|.*\.temperature", key
    ):
        return None
    if m := re.fullmatch(r"(transforms\.0\.encoder\.)?base_dist\.(loc|log_scale)", key):
        return f"{'dequantizer.base' if m[1] else 'base'}.{m[2]}"
    if m := re.fullmatch(r"transforms\.0\.encoder\.context_init\.([123])\.(.+)", key):
        if m[1] == "2":
            return f"dequantizer.context_net.down.{m[2]}"
        inner = _dense_block_key(m[2])
        if inner:
            return f"dequantizer.context_net.{'dense_in' if m[1] == '1' else 'dense_out'}.{inner}"
    if m := re.fullmatch(r"transforms\.0\.encoder\.transforms\.(\d+)\.(.+)", key):
        step, rest = m[1], m[2]
        if rest == "weight":
            return f"dequantizer.flow.{step}.weight"
        if n := re.fullmatch(r"coupling_net\.0\.transform\.([02])\.(weight|bias)", rest):
            return f"dequantizer.flow.{step}.net.{'in_proj' if n[1] == '0' else 'out_proj'}.{n[2]}"
        if n := re.fullmatch(r"coupling_net\.0\.transform\.1\.dense\.(.+)", rest):
            inner = _dense_block_key(n[1])
            if inner:
                return f"dequantizer.flow.{step}.net.dense.{inner}"
    if m := re.fullmatch(
        r"transforms\.(\d+)\.noise_params\.(\d+)\.transformation\.([02])\.(weight|bias)", key
    ):
        return (
            f"blocks.{(int(m[1]) - 3) // 2}.couplings.{m[2]}.net."
            f"{'conv' if m[3] == '0' else 'out'}.{m[4]}"
        )
    if m := re.fullmatch(
        r"transforms\.(\d+)\.blocks\.(\d+)\.transforms\.(\d+)\.transforms\.([012])\.(.+)", key
    ):
        prefix = f"blocks.{(int(m[1]) - 3) // 2}.units.{m[2]}.{m[3]}"
        part, rest = m[4], m[5]
        if part == "0" and rest in ("shift", "log_scale"):
            return f"{prefix}.actnorm.{rest}"
        if part == "1" and rest == "weight":
            return f"{prefix}.conv1x1.weight"
        if part == "2" and rest.startswith("coupling_net.0.dn."):
            rest = rest.removeprefix("coupling_net.0.dn.")
            if rest.startswith("transform.1.dense."):
                inner = _dense_block_key(rest.removeprefix("transform.1.dense."))
                if inner:
                    return f"{prefix}.coupling.net.dense.{inner}"
            for theirs, ours in _COUPLING_NET.items():
                if rest.startswith(theirs):
                    return f"{prefix}.coupling.net.{ours}{rest.removeprefix(theirs)}"
    raise CheckpointError(f"official key {key!r} has no counterpart in a DenseFlow model")


def _check_constant(key: str, value: Tensor, num_bits: int) -> None:
    expected = {
        "transforms.1._shift": -0.5,
        "transforms.1._scale": 1.0,
        "transforms.0.ldj_per_dim": -num_bits * math.log(2),
    }.get(key)
    if key.endswith(".temperature"):
        expected = 1.0
    if expected is not None and not torch.allclose(
        value.double(), torch.tensor(expected, dtype=torch.float64)
    ):
        raise CheckpointError(
            f"official buffer {key} = {value.tolist()}, expected {expected}: "
            "not a DenseFlow checkpoint"
        )


def convert_state_dict(state: Mapping[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    """Translate an official model state dict; validates the constant buffers it drops."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        key = key.removeprefix("module.")  # saved from a DataParallel wrapper
        ours = official_key(key)
        if ours is None:
            _check_constant(key, value, config.num_bits)
        else:
            out[ours] = value
    return out


def convert_official(
    checkpoint_path: str | os.PathLike | Mapping[str, Any],
    args: Mapping[str, Any] | str | os.PathLike | None = None,
) -> DenseFlow:
    """A :class:`DenseFlow` holding the weights of an official checkpoint, in eval mode.

    ``checkpoint_path``: an official ``checkpoint.pt`` (its ``model`` entry is used), an
    official run directory (``check/checkpoint.pt`` and ``args.pickle`` inside), or an already
    loaded checkpoint/state dict. ``args``: the official flags as a dict, an ``args.json`` or an
    ``args.pickle`` (default: the run directory's ``args.pickle``). Loaded with
    ``torch.load(weights_only=True)`` on the CPU.
    """
    if isinstance(checkpoint_path, Mapping):
        checkpoint = checkpoint_path
    else:
        path = Path(checkpoint_path)
        if path.is_dir():
            args = path / "args.pickle" if args is None else args
            path = path / "check" / "checkpoint.pt"
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise CheckpointError(f"{path}: no such official checkpoint") from None
        except Exception as err:  # unpickling errors of foreign or damaged files
            raise CheckpointError(
                f"{path}: not a readable official checkpoint ({type(err).__name__})"
            ) from None
    if args is None:
        raise CheckpointError(
            "convert_official: the official flags (args) are needed to rebuild the architecture"
        )
    where = "official flags" if isinstance(args, Mapping) else args
    config = config_from_official_args(load_official_args(args), where)
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, Mapping) else None
    tensors = isinstance(state, Mapping) and all(isinstance(v, Tensor) for v in state.values())
    if not tensors or not state:
        raise CheckpointError("convert_official: the checkpoint holds no model state dict")
    model = DenseFlow(config)
    translated = convert_state_dict(state, config)
    own = model.state_dict()
    missing = sorted(set(own) - set(translated))
    if missing:
        raise CheckpointError(
            f"official checkpoint lacks {len(missing)} weights for this config, e.g. {missing[0]}"
        )
    for key, value in translated.items():
        if key not in own or own[key].shape != value.shape:
            shape = tuple(own[key].shape) if key in own else "absent"
            raise CheckpointError(
                f"official weight for {key} has shape {tuple(value.shape)}, "
                f"the config needs {shape}"
            )
    model.load_state_dict(translated)
    return model.eval()
