"""Shared test settings: float64 where numerics are checked; where the parity fixtures are.

The parity fixtures (official-format checkpoints of 25-40 MB with the official code's inputs,
named noises and outputs, see FORMAT.md beside them) stay out of the repository. The tests look
for fixture folders (each holding ``io.pt``, ``checkpoint.pt`` and ``args.json``) under
``$DENSEFLOW_PARITY_DIR`` when it is set, else under ``../shared/parity/`` beside the checkout,
and skip the tests that need them with one reason saying so.
"""

from __future__ import annotations

import faulthandler
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from denseflow import distributed

REPO = Path(__file__).resolve().parents[1]
PARITY_ENV = "DENSEFLOW_PARITY_DIR"
PARITY_ROOT = Path(os.environ.get(PARITY_ENV, REPO.parent / "shared" / "parity"))
PARITY_DIRS = sorted(p.parent for p in PARITY_ROOT.glob("*/io.pt"))
LAYOUT_JSON = PARITY_ROOT / "df74_10_cifar_layout.json"
NO_FIXTURES = (
    f"no parity fixtures in {PARITY_ROOT}: set {PARITY_ENV} to a folder of fixture folders "
    "(io.pt, checkpoint.pt, args.json each; produced by running the official DenseFlow code)"
)
needs_fixtures = pytest.mark.skipif(not PARITY_DIRS, reason=NO_FIXTURES)
#: one parameter per fixture folder, or a single skipped one that says why
FIXTURES = [pytest.param(p, id=p.name) for p in PARITY_DIRS] or [
    pytest.param(None, id="none", marks=pytest.mark.skip(reason=NO_FIXTURES))
]

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@contextmanager
def gloo_group(rank: int, init: Path, world: int) -> Iterator[None]:
    """A spawned test worker's gloo process group, one thread per rank, left as the command
    line leaves its group (:func:`denseflow.distributed.leave`: a barrier after success). A
    SIGABRT in the worker prints the Python stacks (faulthandler) before the process dies."""
    faulthandler.enable()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    finished = False
    try:
        yield
        finished = True
    finally:
        distributed.leave(finished)


def strict_json(text: str):
    """``json.loads`` that refuses Python's NaN and Infinity tokens (not JSON)."""

    def refuse(token):
        raise ValueError(f"not strict JSON: {token}")

    return json.loads(text, parse_constant=refuse)
