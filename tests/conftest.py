"""Shared test settings: float64 where numerics are checked, the fixtures in ../shared."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

SHARED = Path(os.environ.get("DENSEFLOW_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
PARITY_DIRS = sorted(p.parent for p in (SHARED / "parity").glob("*/io.pt"))
LAYOUT_JSON = SHARED / "parity" / "df74_10_cifar_layout.json"

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


REPO = Path(__file__).resolve().parents[1]
