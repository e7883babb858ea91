"""The README's Python examples run as written."""

from __future__ import annotations

import re

from .conftest import REPO


def test_the_library_examples_run(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    assert len(blocks) >= 2
    monkeypatch.chdir(tmp_path)  # the examples write runs/tiny and my-model here
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102
    assert namespace["summary"]["step"] == 4 and (tmp_path / "my-model" / "config.json").exists()
    assert namespace["nats"].shape == (4,)
    assert list(namespace["terms"]) == namespace["small"].term_names
    assert namespace["loss"].isfinite() and namespace["step"]._flat is not None
