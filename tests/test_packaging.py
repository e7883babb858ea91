"""What the package declares is true: the torch floor covers every torch API it calls."""

from __future__ import annotations

import re

import tomllib

from .conftest import REPO

#: torch APIs denseflow calls, with the release that introduced them
NEEDS = {
    "torch.nn.utils.get_total_norm / clip_grads_with_norm_ (train_step)": (2, 6),
    "torch.compiler.set_stance (model.eager)": (2, 6),
    "torch._dynamo.config.recompile_limit (nets.runner)": (2, 6),
    "torch.get_autocast_dtype (nets.dense.concat_conv)": (2, 4),
}


def test_the_torch_floor_covers_the_apis_the_package_calls():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    torch_req = next(d for d in project["dependencies"] if d.startswith("torch"))
    floor = tuple(int(v) for v in re.fullmatch(r"torch>=(\d+)\.(\d+)", torch_req).groups())
    for api, since in NEEDS.items():
        assert floor >= since, f"{torch_req} but {api} needs torch >= {since[0]}.{since[1]}"
    import torch

    assert callable(torch.nn.utils.get_total_norm) and callable(torch.compiler.set_stance)
    assert hasattr(torch._dynamo.config, "recompile_limit") and callable(torch.get_autocast_dtype)
