"""Weights in the Hugging Face layout, and the one loader behind every --checkpoint."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch

from denseflow import DenseFlow
from denseflow import checkpoint as ckpt
from denseflow.cli import main
from denseflow.config import load_config
from denseflow.data.idx import embedded_fashion_mnist_dir
from denseflow.pretrained import PUBLISHED_DIR, load, open_model, published
from denseflow.train import train

CONFIG = load_config("tiny")


def _same(a: DenseFlow, b: DenseFlow) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_save_pretrained_round_trip(tmp_path):
    model = DenseFlow(CONFIG.model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    folder = model.save_pretrained(tmp_path / "m", CONFIG, batchnorm="recalibrated: test")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    modes = {(folder / f).stat().st_mode & 0o777 for f in ("config.json", "model.safetensors")}
    assert len(modes) == 1  # the weights get the permissions of any file written (not 0600)
    meta = json.loads((folder / "config.json").read_text())
    assert meta["model"] == CONFIG.model.to_dict() and meta["batchnorm"] == "recalibrated: test"
    loaded, config, batchnorm = open_model(folder)
    assert _same(loaded, model) and config == CONFIG and batchnorm == "recalibrated: test"
    assert not loaded.training and _same(DenseFlow.from_pretrained(str(folder)), model)


def test_damaged_weights_are_refused(tmp_path):
    folder = DenseFlow(CONFIG.model).save_pretrained(tmp_path / "m", CONFIG)
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-3] ^= 1
    (folder / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match="damaged"):
        DenseFlow.from_pretrained(folder)


def test_a_run_folder_and_a_checkpoint_file_load_too(tmp_path):
    train(CONFIG.override(["train.epochs=1"]), tmp_path / "run", progress=False)
    final = ckpt.load_model(tmp_path / "run" / "final.pt")[0]
    assert _same(DenseFlow.from_pretrained(tmp_path / "run"), final)
    assert _same(DenseFlow.from_pretrained(tmp_path / "run" / "final.pt"), final)
    with pytest.raises(ckpt.CheckpointError, match="no such checkpoint, model folder"):
        load(tmp_path / "nothing")
    # saving into the run's folder would put its config.json in front of final.pt: refused
    files = sorted(p.name for p in (tmp_path / "run").iterdir())
    with pytest.raises(ckpt.CheckpointError, match="a training run's folder"):
        final.save_pretrained(tmp_path / "run", CONFIG)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == files
    other = CONFIG.override(["model.growth_rate=4"])
    with pytest.raises(ValueError, match="not the model's architecture"):
        final.save_pretrained(tmp_path / "elsewhere", other)
    with pytest.raises(TypeError, match="a RunConfig"):
        final.save_pretrained(tmp_path / "elsewhere", other.to_dict())
    assert not (tmp_path / "elsewhere").exists()


def test_hub_repository_ids_go_through_snapshot_download(tmp_path, monkeypatch):
    """A fake huggingface_hub: the loader asks it for the repository and reads what it returns
    (no network in tests); without the package the message says what to install."""
    folder = DenseFlow(CONFIG.model).save_pretrained(tmp_path / "cache" / "snap", CONFIG)
    calls = []

    def snapshot_download(repo_id, allow_patterns):
        calls.append((repo_id, tuple(allow_patterns)))
        return str(folder)

    hub = types.ModuleType("huggingface_hub")
    hub.snapshot_download = snapshot_download
    monkeypatch.setitem(sys.modules, "huggingface_hub", hub)
    model = DenseFlow.from_pretrained("someone/denseflow-tiny")
    assert calls == [("someone/denseflow-tiny", ("config.json", "model.safetensors"))]
    assert _same(model, open_model(folder)[0])
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # not installed
    with pytest.raises(ckpt.CheckpointError, match="pip install huggingface_hub"):
        DenseFlow.from_pretrained("someone/denseflow-tiny")


def test_the_command_line_takes_a_model_folder(tmp_path, capsys):
    folder = DenseFlow(CONFIG.model).save_pretrained(tmp_path / "m", CONFIG)
    out = tmp_path / "e.json"
    assert main(["evaluate", "--checkpoint", str(folder), "--quiet", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["images"] == 32  # tiny's test_limit


CARD = Path(__file__).resolve().parents[1] / "docs" / "model_card.md"


def _card_figure(row: str) -> float:
    """The bits/dim the model card's results table gives in the row that starts with ``row``."""
    for line in CARD.read_text().splitlines():
        if line.startswith(f"| {row} |"):
            return float(line.split("|")[2].strip().strip("*"))
    raise AssertionError(f"{CARD}: no row {row!r}")


def test_the_published_model_loads_by_name_and_reproduces_its_card(tmp_path):
    """``fashion-mnist`` ships with the package (<= 5 MB, recalibrated statistics); the
    command line's ELBO on the bundled 2,000 test images is the model card's figure."""
    assert "fashion-mnist" in published()
    folder = PUBLISHED_DIR / "fashion-mnist"
    assert sum(f.stat().st_size for f in folder.iterdir()) <= 5 * 2**20
    model, config, batchnorm = open_model("fashion-mnist")
    assert sum(p.numel() for p in model.parameters()) == 976_172
    assert config.model.image_shape == (1, 28, 28) and batchnorm.startswith("recalibrated")
    out = tmp_path / "e.json"
    bundled = str(embedded_fashion_mnist_dir())
    argv = ["evaluate", "--checkpoint", "fashion-mnist", "--data-dir", bundled]
    assert main([*argv, "--quiet", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["images"] == 2000
    assert result["bpd"] == pytest.approx(_card_figure("ELBO, first 2,000 test images"), abs=6e-5)
