"""Model configuration: one frozen dataclass whose fields follow the official flags.

``block_conf``, ``layers_conf``, ``layer_mid_chnls`` and ``growth_rate`` carry the names of the
official command-line flags; the other fields are constants of the official code made
explicit (their defaults are DenseFlow-74-10's) or named options that are ours.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .data import DATASETS
from .data.augment import AUGMENTATIONS
from .errors import DenseFlowError

ATTENTION_KINDS = ("official", "multihead")
DEQUANTIZATIONS = ("variational", "uniform")
CONV1X1_KINDS = ("full", "lu")
COUPLING_NETS = ("fused", "dense", "glow")
CROSS_UNIT_KINDS = ("conditional", "unconditional")


class ConfigError(DenseFlowError):
    """A configuration value that cannot work; the message names the field."""


@functools.cache
def _field_types(kind: type) -> dict[str, Any]:
    return typing.get_type_hints(kind)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check ``value`` against a field's type hint; ints are accepted for floats, lists for
    tuples."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r}: expected a list")
        inner = args[:1] * len(value) if args[-1] is Ellipsis else args
        if len(inner) != len(value):
            raise ConfigError(f"{key}={value!r}: expected {len(inner)} values")
        return tuple(_coerce(v, t, key) for t, v in zip(inner, value, strict=True))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 as a string
        try:
            return float(value)
        except ValueError:
            pass
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{key}={value!r}: expected {hint.__name__}, got {type(value).__name__}")
    return value


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a DenseFlow model (spec §1-§9).

    Defaults are DenseFlow-74-10 on 32x32 RGB images: 3 scales with ``block_conf`` invertible
    units, each of ``layers_conf`` glow-like steps, coupling networks of width
    ``layer_mid_chnls``, and ``growth_rate`` noise channels per cross-unit coupling.
    """

    image_shape: tuple[int, int, int] = (3, 32, 32)
    num_bits: int = 8
    block_conf: tuple[int, ...] = (6, 4, 1)
    layers_conf: tuple[int, ...] = (5, 6, 20)
    layer_mid_chnls: tuple[int, ...] = (48, 48, 48)
    growth_rate: int = 10
    # cross-unit noise (spec §5): "conditional" on earlier representations (the paper's), or
    # "unconditional" (a learned per-channel Gaussian, VFlow-style augmentation: an ablation)
    cross_unit: str = "conditional"
    # coupling network (spec §7): "fused" DenseBlock ⊕ attention (the paper's); the ablations
    # "dense" (no attention branch) and "glow" (Glow's conv net, width layer_mid_chnls)
    coupling_net: str = "fused"
    dense_depth: int = 7
    dense_growth: int = 64
    attention: str = "official"
    attention_heads: int = 1
    attention_landmarks: int = 4
    # invertible 1x1 convolution: "full" matrix (official) or "lu" parametrisation
    conv1x1: str = "full"
    # dequantization (spec §4): "variational" (official) or "uniform"
    dequantization: str = "variational"
    dequant_width: int = 64
    dequant_steps: int = 4
    dequant_depth: int = 4
    dequant_growth: int = 64
    dequant_context_growth: int = 16

    def __post_init__(self) -> None:
        for name, hint in _field_types(ModelConfig).items():  # no silent int(1.7), lists as tuples
            object.__setattr__(self, name, _coerce(getattr(self, name), hint, name))
        self.validate()

    @property
    def num_scales(self) -> int:
        """S, the number of scales (dense blocks)."""
        return len(self.block_conf)

    @property
    def num_dims(self) -> int:
        """D = C*H*W, the data dimensions that bits/dim is measured over."""
        c, h, w = self.image_shape
        return c * h * w

    def validate(self) -> None:
        """Raise a ConfigError naming the first field whose value cannot work."""

        def need(ok: bool, name: str, why: str) -> None:
            if not ok:
                raise ConfigError(f"{name}={getattr(self, name)!r}: {why}")

        need(
            len(self.image_shape) == 3 and min(self.image_shape) > 0,
            "image_shape",
            "expected (C, H, W) > 0",
        )
        need(1 <= self.num_bits <= 16, "num_bits", "expected 1 .. 16")
        s = len(self.block_conf)
        need(s >= 1, "block_conf", "need at least one scale")
        need(all(k >= 1 for k in self.block_conf), "block_conf", "every scale needs >= 1 unit")
        need(len(self.layers_conf) == s, "layers_conf", f"needs one entry per scale ({s})")
        need(all(k >= 1 for k in self.layers_conf), "layers_conf", "every unit needs >= 1 step")
        need(len(self.layer_mid_chnls) == s, "layer_mid_chnls", f"needs one entry per scale ({s})")
        need(all(m >= 2 for m in self.layer_mid_chnls), "layer_mid_chnls", "widths must be >= 2")
        need(
            self.growth_rate >= 0 and self.growth_rate % 2 == 0,
            "growth_rate",
            "must be even and >= 0",
        )
        _, h, w = self.image_shape
        side = 2**s
        need(
            h % side == 0 and w % side == 0,
            "image_shape",
            f"H and W must be divisible by 2**scales = {side}",
        )
        need(self.dense_depth >= 1, "dense_depth", "must be >= 1")
        need(self.dense_growth >= 1, "dense_growth", "must be >= 1")
        need(self.coupling_net in COUPLING_NETS, "coupling_net", f"expected one of {COUPLING_NETS}")
        need(
            self.cross_unit in CROSS_UNIT_KINDS, "cross_unit", f"expected one of {CROSS_UNIT_KINDS}"
        )
        need(self.attention in ATTENTION_KINDS, "attention", f"expected one of {ATTENTION_KINDS}")
        need(self.attention_landmarks >= 1, "attention_landmarks", "must be >= 1")
        need(self.attention_heads >= 1, "attention_heads", "must be >= 1")
        if self.attention == "official":
            need(
                self.attention_heads == 1,
                "attention_heads",
                "the official attention is single-head",
            )
        else:
            bad = [m for m in self.layer_mid_chnls if (m // 2) % self.attention_heads]
            need(not bad, "attention_heads", f"must divide every embedding width M//2 (M = {bad})")
        need(self.conv1x1 in CONV1X1_KINDS, "conv1x1", f"expected one of {CONV1X1_KINDS}")
        need(
            self.dequantization in DEQUANTIZATIONS,
            "dequantization",
            f"expected one of {DEQUANTIZATIONS}",
        )
        for name in (
            "dequant_width",
            "dequant_steps",
            "dequant_depth",
            "dequant_growth",
            "dequant_context_growth",
        ):
            need(getattr(self, name) >= 1, name, "must be >= 1")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-able values (tuples as lists)."""
        return _plain(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        """Build from plain values; unknown keys and wrongly typed values are errors naming them."""
        return _build(cls, dict(values), "model")


_IMAGE_SHAPES = {
    "cifar10": (3, 32, 32),
    "imagenet32": (3, 32, 32),
    "imagenet64": (3, 64, 64),
    "celeba64": (3, 64, 64),
}


def model_config(name: str) -> ModelConfig:
    """DenseFlow-74-10 for one of the paper's datasets: cifar10, imagenet32, imagenet64, celeba64.

    The network is identical for all four (130,647,294 parameters); only the image size differs.
    """
    if not isinstance(name, str) or name not in _IMAGE_SHAPES:
        raise ConfigError(
            f"unknown model preset {name!r}; expected one of {', '.join(_IMAGE_SHAPES)}"
        )
    return ModelConfig(image_shape=_IMAGE_SHAPES[name])


# ---------------------------------------------------------------------------------------------
# Run configuration: model + data + training + evaluation, YAML presets, checked overrides.

SCHEDULES = ("official", "exponential", "cosine")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
PRECISIONS = ("float32", "bfloat16")


@dataclass(frozen=True)
class DataConfig:
    """Which images to train and evaluate on (``denseflow.data``); ``augmentation`` as spec
    §13.4. ``data_dir``: the absolute folder a run read its data from (``--data-dir``); later
    evaluations, recalibrations and resumes read it again unless told otherwise. ``None``: the
    dataset's default place (Fashion-MNIST: the Debian package's folder, else the bundled
    subset). ``validation`` > 0: that many training images (of the ``train_limit`` read) are held
    out (:func:`denseflow.data.hold_out`: the same ones for every ``train.seed``): the run never
    trains or recalibrates on them, evaluates on them during training and chooses ``best.pt`` by
    them; the test set is evaluated once, at the end. 0 (the paper presets, as the official code):
    every evaluation reads the test set, and ``best.pt`` is the best on it."""

    dataset: str = "cifar10"
    augmentation: str = "eta"
    celeba_crop: bool = False
    train_limit: int | None = None
    test_limit: int | None = None
    data_dir: str | None = None
    validation: int = 0

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ConfigError(f"data.dataset={self.dataset!r}: expected one of {DATASETS}")
        if self.augmentation not in AUGMENTATIONS:
            raise ConfigError(
                f"data.augmentation={self.augmentation!r}: expected one of {AUGMENTATIONS}"
            )
        for name in ("train_limit", "test_limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"data.{name}={value!r}: must be >= 1 or null")
        if self.validation < 0:
            raise ConfigError(f"data.validation={self.validation!r}: must be >= 0")


@dataclass(frozen=True)
class TrainConfig:
    """The training recipe (spec §13). Defaults: the official CIFAR-10 command.

    ``schedule="official"`` is the official code's *effective* schedule (spec §13.2): linear
    warm-up from 0 over ``warmup`` steps, then constant, except that the first step of every
    epoch after the first runs at ``lr·gamma``; then ``finetune_epochs`` at ``finetune_lr``
    (``train_more.py``). ``exponential`` (``lr·gamma^epoch``) and ``cosine`` are real decays.
    ``max_steps`` ends training earlier, after that many optimizer steps (a compute budget).
    ``channels_last`` stores conv weights and activations NHWC (faster oneDNN/cuDNN kernels, same
    arithmetic); ``low_memory`` recomputes the conditioner nets in the backward pass.
    ``batch_chunks`` splits each batch into forward passes of their own (BatchNorm statistics and
    noise per chunk, gradients accumulated; a multiple of the torchrun world size, see
    :mod:`denseflow.distributed`). ``precision="bfloat16"`` runs the coupling, noise and
    dequantizer networks under bf16 autocast (everything else in float32); ``compile`` compiles
    those networks with ``torch.compile`` (``compile_backend``: any registered dynamo backend,
    e.g. ``cudagraphs`` to capture each net's kernels without code generation; ``compile_mode``:
    inductor's mode, e.g. ``reduce-overhead``). ``cuda_graph``: the whole step on static buffers
    (:class:`denseflow.graph.GraphedStep`), captured as one CUDA graph and replayed on a GPU; the
    same numbers as the eager step on the CPU; under ``torchrun`` each rank's step, with one
    all-reduce between its two halves instead of DDP; setups it cannot capture (``compile``,
    ``low_memory``, ``monitor_every``) say why and run the eager step. ``batched_logdets``: the
    full 1x1 convolutions' log-determinants of each pass from one batched factorisation per
    matrix size instead of one per convolution (the same values to float rounding; a lead for
    GPUs, measured by ``denseflow bench``, off until measured). ``bn_recalibrate`` > 0:
    every evaluation, sample grid and export of the run uses BatchNorm statistics recomputed over
    that many training batches (:mod:`denseflow.recalibrate`); the training state keeps its
    running averages, so resuming is unchanged. 0 (the paper presets): the running averages, as
    the official code. ``ema_decay`` > 0: the run evaluates, samples and exports a Polyak average
    of its weights over the optimizer steps with that decay (:mod:`denseflow.average`; training
    itself is unchanged; needs ``bn_recalibrate``, as the running statistics belong to the raw
    weights); 0 (the paper presets): the weights themselves.
    """

    epochs: int = 400
    max_steps: int | None = None
    finetune_epochs: int = 20
    finetune_lr: float = 2e-5
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 5000
    schedule: str = "official"
    gamma: float = 0.9975
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float = 0.0
    max_bad_steps: int = 20
    max_rollbacks: int = 3
    rollback_lr_factor: float = 0.5
    seed: int = 0
    device: str = "auto"
    channels_last: bool = True
    low_memory: bool = False
    batch_chunks: int = 1
    precision: str = "float32"
    compile: bool = False
    compile_backend: str = "inductor"
    compile_mode: str = "default"
    cuda_graph: bool = True
    batched_logdets: bool = False
    eval_every: int = 1
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    log_every: int = 10
    monitor_every: int = 0
    num_samples: int = 64
    sample_temperature: float = 1.0
    bn_recalibrate: int = 0
    ema_decay: float = 0.0
    tensorboard: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        positive = (
            "epochs",
            "batch_size",
            "eval_every",
            "checkpoint_every",
            "keep_checkpoints",
            "log_every",
            "max_bad_steps",
            "batch_chunks",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name}={getattr(self, name)!r}: must be >= 1")
        for name in ("finetune_epochs", "warmup", "num_samples", "monitor_every", "bn_recalibrate"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name}={getattr(self, name)!r}: must be >= 0")
        for name in ("lr", "finetune_lr", "eps", "grad_clip", "sample_temperature"):
            if not math.isfinite(getattr(self, name)):  # the one-sided bounds below let inf pass
                raise ConfigError(f"train.{name}={getattr(self, name)!r}: must be a finite number")
        for name in ("lr", "finetune_lr", "eps"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"train.{name}={getattr(self, name)!r}: must be > 0")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"train.max_steps={self.max_steps!r}: must be >= 1 or null")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"train.precision={self.precision!r}: expected one of {PRECISIONS}")
        if self.compile_mode not in COMPILE_MODES:
            raise ConfigError(
                f"train.compile_mode={self.compile_mode!r}: expected one of {COMPILE_MODES}"
            )
        if self.compile_mode != "default" and self.compile_backend != "inductor":
            raise ConfigError(
                f"train.compile_mode={self.compile_mode!r}: a mode of the inductor backend only"
            )
        if self.compile:
            import torch._dynamo

            if self.compile_backend not in torch._dynamo.list_backends(exclude_tags=()):
                raise ConfigError(
                    f"train.compile_backend={self.compile_backend!r}: expected one of "
                    f"{torch._dynamo.list_backends()} or a debug backend such as 'aot_eager'"
                )
        if self.batch_chunks > self.batch_size:
            raise ConfigError(
                f"train.batch_chunks={self.batch_chunks}: more chunks than train.batch_size"
            )
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"train.schedule={self.schedule!r}: expected one of {SCHEDULES}")
        if not 0 < self.gamma <= 1:
            raise ConfigError(f"train.gamma={self.gamma!r}: must lie in (0, 1]")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"train.betas={self.betas!r}: expected two values in [0, 1)")
        if self.max_rollbacks < 0:
            raise ConfigError(f"train.max_rollbacks={self.max_rollbacks!r}: must be >= 0")
        if not 0 < self.rollback_lr_factor <= 1:
            raise ConfigError(
                f"train.rollback_lr_factor={self.rollback_lr_factor!r}: must lie in (0, 1]"
            )
        if self.grad_clip < 0:
            raise ConfigError(f"train.grad_clip={self.grad_clip!r}: must be >= 0 (0 = off)")
        if self.sample_temperature < 0:
            raise ConfigError(f"train.sample_temperature={self.sample_temperature!r}: must be >= 0")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"train.ema_decay={self.ema_decay!r}: must lie in [0, 1) (0 = off)")
        if self.ema_decay and not self.bn_recalibrate:
            raise ConfigError(
                f"train.ema_decay={self.ema_decay!r} needs train.bn_recalibrate > 0 (the running "
                "BatchNorm statistics belong to the raw weights, not to their average): add "
                "--set train.bn_recalibrate=100"
            )


@dataclass(frozen=True)
class EvalConfig:
    """Test-set evaluation (spec §11): batch size, and importance samples ``k`` in chunks of
    ``kbs``."""

    batch_size: int = 64
    k: int = 1000
    kbs: int = 50

    def __post_init__(self) -> None:
        for name in ("batch_size", "k", "kbs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"eval.{name}={getattr(self, name)!r}: must be >= 1")


SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "eval": EvalConfig}


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs; saved in every checkpoint."""

    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain nested values (YAML/JSON-able), one mapping per section."""
        return {name: _plain(getattr(self, name)) for name in SECTIONS}

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "config") -> RunConfig:
        """Build from nested plain values; unknown sections/keys and wrongly typed values are
        errors naming ``section.key``. A ``model`` section may name a preset:
        ``{preset: cifar10}``."""
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: expected a mapping of sections {list(SECTIONS)}")
        unknown = sorted(map(str, set(values) - set(SECTIONS)))
        if unknown:
            raise ConfigError(f"{where}: unknown section(s) {unknown}; expected {list(SECTIONS)}")
        sections = {}
        for name, kind in SECTIONS.items():
            given = values.get(name) or {}
            if not isinstance(given, dict):
                raise ConfigError(
                    f"{where}: section '{name}': expected a mapping of {name}.* keys, got "
                    f"{type(given).__name__}"
                )
            given = dict(given)
            base = {}
            if name == "model" and "preset" in given:
                base = model_config(given.pop("preset")).to_dict()
            sections[name] = _build(kind, {**base, **given}, name)
        return cls(**sections)

    def with_data_dir(self, data_dir: str | Path | None) -> RunConfig:
        """This configuration reading its data from ``data_dir`` (made absolute); unchanged
        for ``None``."""
        if data_dir is None:
            return self
        folder = _absolute(data_dir)
        return dataclasses.replace(self, data=dataclasses.replace(self.data, data_dir=folder))

    def override(self, assignments: list[str]) -> RunConfig:
        """Apply ``section.key=value`` assignments (values parsed as YAML, then type-checked).
        A ``data.data_dir`` given is made absolute (from the current folder), as
        :meth:`with_data_dir` makes it: a run remembers its data wherever it is used later."""
        values = self.to_dict()
        for item in assignments:
            key, sep, raw = item.partition("=")
            section, dot, field_name = key.strip().partition(".")
            if not sep or not dot:
                raise ConfigError(
                    f"override {item!r}: expected section.key=value, e.g. train.lr=2e-4"
                )
            if section not in SECTIONS:
                raise ConfigError(
                    f"override {item!r}: unknown section {section!r}; expected {list(SECTIONS)}"
                )
            if field_name not in _field_types(SECTIONS[section]):
                raise ConfigError(f"override {item!r}: unknown key {key.strip()!r}")
            try:
                value = yaml.safe_load(raw) if raw.strip() else None
            except yaml.YAMLError as err:
                raise ConfigError(
                    f"override {item!r}: cannot parse the value ({err.problem})"
                ) from None
            if (section, field_name) == ("data", "data_dir") and isinstance(value, str):
                value = _absolute(value)
            values[section][field_name] = value
        return RunConfig.from_dict(values, "overrides")


def _absolute(folder: str | Path) -> str:
    """``folder`` as an absolute path (``~`` expanded, symbolic links resolved)."""
    return str(Path(folder).expanduser().resolve())


def _plain(section: Any) -> dict[str, Any]:
    out = {f.name: getattr(section, f.name) for f in dataclasses.fields(section)}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


def _build(kind: type, values: dict[str, Any], section: str) -> Any:
    types_ = _field_types(kind)
    unknown = sorted(map(str, set(values) - set(types_)))
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(f'{section}.{k}' for k in unknown)}")
    checked = {k: _coerce(v, types_[k], f"{section}.{k}") for k, v in values.items()}
    try:
        return kind(**checked)
    except ConfigError as err:
        message = str(err)
        raise ConfigError(
            message if message.startswith(f"{section}.") else f"{section}.{message}"
        ) from None


PRESET_DIR = Path(__file__).parent / "configs"


def preset_names() -> list[str]:
    """Names of the bundled presets (``denseflow/configs/*.yaml``)."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_config(source: str | Path) -> RunConfig:
    """A run configuration from a preset name (``cifar10``, ``demo`` …) or a YAML file path."""
    path = Path(source)
    if path.suffix not in (".yaml", ".yml"):
        path = PRESET_DIR / f"{source}.yaml"
        if not path.exists():
            raise ConfigError(
                f"unknown preset {str(source)!r}; expected one of {', '.join(preset_names())}"
            )
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise ConfigError(
            f"{path}: malformed YAML{where}: {getattr(err, 'problem', err)}"
        ) from None
    try:
        config = RunConfig.from_dict(values or {}, str(path))
    except ConfigError as err:  # a value's or a key's error, named with the file it is in
        message = str(err)
        named = message if message.startswith(f"{path}: ") else f"{path}: {message}"
        raise ConfigError(named) from None
    folder = config.data.data_dir  # a relative one: from the file's folder, wherever it is used
    return config.with_data_dir(path.parent / Path(folder).expanduser() if folder else None)
