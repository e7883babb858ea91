"""Data-parallel training and evaluation on PyTorch's own distributed engine (``torchrun``).

A training step's global batch of ``B`` images is split into ``train.batch_chunks`` chunks
(``torch.tensor_split``: sizes differ by at most one). Chunk ``j`` is a forward pass of its own —
its own BatchNorm batch statistics and its own noise stream ``(seed, "noise", step, j)`` —
and contributes ``Σ_chunk bpd / B`` to the loss, so the gradient is the global batch mean
whatever the chunk sizes. Rank ``r`` of ``W`` runs chunks ``r·B_c/W … (r+1)·B_c/W − 1`` with
gradient accumulation; one all-reduce sums the gradients over the ranks (the graphed step's own,
:class:`denseflow.graph.GraphedStep` with ``reduce=all_sum``, or DistributedDataParallel's
average where the step is not graphed). Hence a run on ``W``
ranks computes what one process computes with the same ``batch_chunks``, and checkpoints move
freely between the two.

Evaluation splits the test set by batches (rank ``r`` takes batches ``r, r + W, …``; each batch
draws its noise from the stream ``(seed, "eval", batch)``) and sums in float64 across ranks:
exact totals, no padded duplicates, the single-process value.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm


def rank() -> int:
    """This process's rank (0 outside a process group)."""
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    """The number of ranks (1 outside a process group)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """Whether this process is rank 0 (the one that writes files and prints)."""
    return rank() == 0


def launched() -> bool:
    """True inside a process started by ``torchrun`` (or any launcher that sets ``WORLD_SIZE``);
    a ``WORLD_SIZE`` above 1 without the rest of a launcher's variables is a ConfigError."""
    from .config import ConfigError  # (the config module reads data, which imports this one)

    world = os.environ.get("WORLD_SIZE", "1")
    if not world.strip().isdigit():
        raise ConfigError(f"WORLD_SIZE={world!r}: expected the number of ranks (torchrun sets it)")
    if int(world) <= 1:
        return False
    unset = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
    if unset:
        raise ConfigError(
            f"WORLD_SIZE={world} makes this process one of {world} ranks, but {', '.join(unset)} "
            f"{'is' if len(unset) == 1 else 'are'} not set: start it with torchrun, or unset "
            "WORLD_SIZE"
        )
    return True


def init_from_env() -> bool:
    """Join the process group described by torchrun's environment variables (NCCL when CUDA is
    available, gloo otherwise); False when not launched by torchrun or already initialised."""
    if not launched() or dist.is_initialized():
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        dist.init_process_group(backend)
        return True
    # torchrun's agent keeps one store for every restart of the group, so a restarted rank could
    # read the addresses the killed attempt published and connect to a dead port (3 of 6 gloo
    # restarts failed that way here): the ranks of each attempt meet under a prefix of their own
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    agent = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, False)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.PrefixStore(f"denseflow/attempt{attempt}", agent)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world)
    return True


def from_rank_0(tensors: Iterable[torch.Tensor]) -> None:
    """Overwrite ``tensors`` on every rank with rank 0's values (one broadcast per dtype and
    device; every rank must pass the same tensors in the same order)."""
    if world_size() == 1:
        return
    groups: dict[tuple, list[torch.Tensor]] = {}
    for tensor in tensors:
        groups.setdefault((tensor.dtype, tensor.device), []).append(tensor)
    with torch.no_grad():
        for group in groups.values():
            flat = torch.cat([t.reshape(-1) for t in group])
            dist.broadcast(flat, src=0)
            for t, part in zip(group, flat.split([t.numel() for t in group]), strict=True):
                t.copy_(part.view(t.shape))


def leave(finished: bool) -> None:
    """Tear the process group down. When this rank ``finished`` its work normally, the ranks
    first meet at a barrier, so that no rank closes its connections while a peer still reads
    from them (gloo can abort the peer's process: "terminate called without an active
    exception", seen twice in CI on 2 cores, once in a test's teardown and once in a rank that
    torchrun had restarted, where in its run unknown). After an error there is no barrier: the
    peers may never arrive (and a peer that failed while this rank waits ends the barrier with
    a connection error, which is reported and changes nothing else)."""
    try:
        if finished and world_size() > 1:
            dist.barrier()
    except RuntimeError as err:  # a peer is gone; its own exit status says why
        first = (str(err).splitlines() or [""])[0]
        print(f"denseflow: rank {rank()}: the closing barrier failed ({first})", file=sys.stderr)
    finally:
        dist.destroy_process_group()


def local_device(device: torch.device) -> torch.device:
    """This rank's GPU (``LOCAL_RANK``) when ``device`` is CUDA and the process group is running."""
    if device.type == "cuda" and device.index is None and dist.is_initialized():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def effective_chunks(chunks: int, world: int) -> int:
    """``chunks`` rounded up to a multiple of the world size (every rank needs the same number)."""
    return -(-chunks // world) * world


def my_chunks(batch: torch.Tensor, chunks: int) -> list[tuple[int, torch.Tensor]]:
    """This rank's ``(chunk index, images)`` of the global ``batch`` split into ``chunks``."""
    per_rank = chunks // world_size()
    parts = torch.tensor_split(batch, chunks)
    return [(j, parts[j]) for j in range(rank() * per_rank, (rank() + 1) * per_rank)]


def no_sync(module: torch.nn.Module, last: bool):
    """DDP's ``no_sync`` for every chunk but a rank's last (gradient accumulation)."""
    return (
        module.no_sync()
        if isinstance(module, torch.nn.parallel.DistributedDataParallel) and not last
        else nullcontext()
    )


def all_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (the tensor itself in a single process)."""
    if dist.is_initialized() and world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


def decide(choose: Callable[[], Any]) -> Any:
    """``choose()`` run on rank 0 only; every rank gets its result, or raises its exception
    (the same decision everywhere, e.g. which checkpoint to restore)."""
    if world_size() == 1:
        return choose()
    box: list[Any] = [None]
    if is_main():
        try:
            box[0] = (True, choose())
        except Exception as err:  # every rank raises it, none waits forever
            box[0] = (False, err)
    dist.broadcast_object_list(box, src=0)
    ok, value = box[0]
    if not ok:
        raise value
    return value


def say(message: str) -> None:
    """Print ``message`` above any progress bar, from rank 0 only."""
    if is_main():
        tqdm.write(message)


_quiet = False


def note(message: str) -> None:
    """:func:`say` a note that changes nothing (how many images were resized, ...), unless
    within :func:`quiet`."""
    if not _quiet:
        say(message)


@contextmanager
def quiet(on: bool = True) -> Iterator[None]:
    """Within: :func:`note` prints nothing if ``on`` (the command line's ``--quiet``)."""
    global _quiet
    before, _quiet = _quiet, on
    try:
        yield
    finally:
        _quiet = before
