"""Shared test settings: float64 where numerics are checked; where the parity fixtures are.

The parity fixtures (official-format checkpoints of 25-40 MB with the official code's inputs,
named noises and outputs, see FORMAT.md beside them) stay out of the repository. The tests look
for fixture folders (each holding ``io.pt``, ``checkpoint.pt`` and ``args.json``) under
``$DENSEFLOW_PARITY_DIR`` when it is set, else under ``../shared/parity/`` beside the checkout,
and skip the tests that need them with one reason saying so.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

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
