"""Importing denseflow, building and preparing a model, and training change no process-wide
setting: dynamo's configuration and the warnings filters are as before, and ``train`` leaves the
global random state where it found it (building a model draws from it, as torch modules do)."""

from __future__ import annotations

import subprocess
import sys

from .conftest import REPO

SCRIPT = r"""
import pickle, warnings, torch, torch._dynamo
def snapshot():
    config = torch._dynamo.config.get_config_copy()
    return pickle.dumps(sorted((k, repr(v)) for k, v in config.items())), list(warnings.filters)
before = snapshot()
import denseflow
from denseflow.config import load_config
from denseflow.model import DenseFlow
from denseflow.runtime import prepare
from denseflow.train import train
config = load_config("tiny").override(
    ["train.compile=true", "train.compile_backend=aot_eager", "train.low_memory=true",
     "train.epochs=1", "train.max_steps=2", "train.num_samples=2"])
model = prepare(DenseFlow(config.model), config.train, torch.device("cpu"))
x = torch.randint(0, 256, (2, *config.model.image_shape))
model(x).sum().backward()
rng = torch.random.get_rng_state()
train(config, sys.argv[1], progress=False)
assert torch.equal(rng, torch.random.get_rng_state()), "train changed the global random state"
after = snapshot()
for name, a, b in zip(("dynamo config", "warnings filters"), before, after):
    assert a == b, name + " changed"
print("unchanged")
"""


def test_import_build_prepare_and_train_change_no_global_setting(tmp_path):
    out = subprocess.run(
        [sys.executable, "-c", "import sys\n" + SCRIPT, str(tmp_path / "run")],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert out.returncode == 0 and out.stdout.strip().endswith("unchanged"), out.stderr[-2000:]
