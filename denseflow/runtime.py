"""Where and how a model runs: device, memory layout, precision, compilation, data parallelism.

None of this changes a number the model computes (the parity tests run in every mode); it is
what :func:`denseflow.train.train`, ``denseflow bench`` and the command line share. Nothing here
changes a process-wide setting: the one that low-memory training wants on the CPU (glibc's
allocation threshold, :func:`cap_heap_growth`) is applied by the command-line entry point.
"""

from __future__ import annotations

import ctypes
import warnings
from contextlib import contextmanager

import torch

from . import distributed
from .config import ConfigError, TrainConfig
from .model import DenseFlow


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when available, else the CPU; under torchrun CUDA means this rank's GPU. A
    device this torch cannot compute on (not built in, no such GPU, ``meta``) is one line naming
    it."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(
            f"device {name!r}: not a torch device (auto, cpu, cuda, cuda:N, ...)"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"device {name!r}: this torch ({torch.__version__}) sees no CUDA GPU; use cpu or auto"
        )
    device = distributed.local_device(device)
    # a probe: a sum computed there and read back (the meta device computes shapes, no values);
    # whatever stops it is the reason (torch raises several kinds)
    try:
        torch.ones(1, device=device).sum().cpu()
    except Exception as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0].split(". ")[0]
        raise ConfigError(
            f"device {name!r}: this torch ({torch.__version__}) cannot use it ({reason}); "
            "use cpu or auto"
        ) from None
    return device


def net_dtype(cfg: TrainConfig) -> torch.dtype | None:
    """The conditioner networks' autocast dtype while training (None: float32)."""
    return torch.bfloat16 if cfg.precision == "bfloat16" else None


def prepare(model: DenseFlow, cfg: TrainConfig, device: torch.device) -> DenseFlow:
    """Move ``model`` to ``device`` with the speed/memory settings of ``cfg`` (no change to the
    maths): channels-last memory layout, bf16 networks, batched log-determinants, compiled
    networks, low-memory mode."""
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.set_net_precision(net_dtype(cfg))
    model.set_batched_log_dets(cfg.batched_logdets)
    if cfg.compile:
        mode = {} if cfg.compile_mode == "default" else {"mode": cfg.compile_mode}
        # dynamic shapes trip inductor on this model (sympy "cannot determine truth value")
        model.compile_nets(backend=cfg.compile_backend, dynamic=False, **mode)
    if cfg.low_memory:
        model.set_low_memory(True)
    return model


def cap_heap_growth(threshold: int = 1 << 20) -> None:
    """Make glibc return freed blocks of ``threshold`` bytes or more to the system at once.

    Low-memory training frees and reallocates large activation blocks every step; with glibc's
    dynamic mmap threshold they stay resident. This is a process-wide allocator setting, so the
    library never calls it: the command line does, once, for ``train.low_memory`` on the CPU.
    No effect without glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return
    libc.mallopt(-3, threshold)  # M_MMAP_THRESHOLD; a fixed value also stops its dynamic growth


def wrap_ddp(model: DenseFlow, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel around ``model`` (after the ActNorm init: DDP broadcasts rank 0's
    state). Run its steps inside :func:`ddp_warnings_scope`."""
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


@contextmanager
def ddp_warnings_scope():
    """Silence, inside the block only, DDP's warning about the two valid stride patterns of
    channels-last ``(1, C, 1, 1)`` weights (a harmless one-off mismatch with its buckets)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        yield
