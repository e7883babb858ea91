"""Publish a trained run as a model shipped with the package (``DenseFlow.from_pretrained(NAME)``).

    python scripts/publish_model.py runs/peers/denseflow fashion-mnist

writes ``denseflow/published/NAME/{config.json,model.safetensors}`` from the run's ``final.pt``
(its inference export, with the BatchNorm statistics the run evaluated with) and prints the
figures the model card quotes come from: parameters, file sizes and the SHA-256 of the weights.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

from denseflow import checkpoint as ckpt
from denseflow.pretrained import PUBLISHED_DIR, save_pretrained


def main(run: str, name: str) -> None:
    payload = ckpt.load(Path(run) / "final.pt")
    model, config = ckpt.model_from(payload, run)
    statistics = ckpt.batchnorm_statistics(payload)
    folder = save_pretrained(PUBLISHED_DIR / name, model, config, statistics)
    weights = (folder / "model.safetensors").read_bytes()
    print(f"{folder}: {sum(p.numel() for p in model.parameters()):,} parameters")
    print(f"model.safetensors {len(weights):,} bytes, sha256 {hashlib.sha256(weights).hexdigest()}")
    print(f"BatchNorm statistics: {statistics}")


if __name__ == "__main__":
    main(*sys.argv[1:])
