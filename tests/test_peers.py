"""The peer comparison: normflows' Glow as its example builds it, its bound, --quick end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch

from denseflow.cli import main
from denseflow.peers import (
    broken,
    evaluate_glow,
    glow_log_likelihood,
    glow_model,
    sample_health,
)
from denseflow.seeding import stream

from .conftest import strict_json

pytest.importorskip("normflows")


def test_glow_bound_is_the_dequantized_density_minus_the_scaling():
    """``log p((x + u)/256) − D log 256`` with the draw of the generator; IWBO-k >= ELBO."""
    torch.manual_seed(0)
    glow = glow_model((1, 28, 28), L=2, K=1, hidden_channels=4).eval()
    x = torch.randint(0, 256, (3, 1, 28, 28))
    with torch.no_grad():
        got = glow_log_likelihood(glow, x, stream(0, "eval", 0))
        u = torch.rand(x.shape, generator=stream(0, "eval", 0))
        want = glow.log_prob((x.double() + u.double()).float() / 256, None) - 784 * math.log(256)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # ELBO: the first draw of each image; IWBO-k: log-mean-exp of its k draws (sums in float64)
    result = evaluate_glow(glow, x.to(torch.uint8), k=4, seed=0)
    g = stream(0, "eval", 0)
    with torch.no_grad():
        draws = torch.stack([glow_log_likelihood(glow, x, g).double() for _ in range(4)])
    per_dim = 3 * 784 * math.log(2)
    assert result["elbo_bpd"] == pytest.approx(-draws[0].sum().item() / per_dim, rel=1e-12)
    iwbo = (torch.logsumexp(draws, 0) - math.log(4)).sum().item()
    assert result["iwbo_bpd"] == pytest.approx(-iwbo / per_dim, rel=1e-12)
    assert result["iwbo_bpd"] <= -draws.mean(0).sum().item() / per_dim  # log-mean-exp >= mean


def test_broken_values_blew_up_and_clamped_values_are_reported_beside():
    """Broken: non-finite or more than a data range outside [0, 1]; values just outside [0, 1]
    are only clamped by the quantization."""
    z = torch.tensor([[0.0, 1.0, 0.5], [1.5, 0.2, -0.3], [float("nan"), 0.1, 0.1], [2.5, 0, 0]])
    assert broken(z).tolist() == [
        [False] * 3,
        [False] * 3,
        [True, False, False],
        [True, False, False],
    ]
    health = sample_health(z.view(4, 1, 1, 3))
    assert health == pytest.approx(
        {"broken_share": 2 / 4, "broken_values": 2 / 12, "clamped_values": 3 / 12}, abs=0
    )


def test_quick_peer_comparison_end_to_end(tmp_path, capsys):
    out = tmp_path / "peers"
    assert main(["experiment", "peers", "--quick", "--quiet", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    for name in ("denseflow", "glow"):
        r = results[name]
        assert math.isfinite(r["elbo_bpd"]) and math.isfinite(r["iwbo_bpd"])
        assert 0 <= r["broken_share"] <= 1 and (out / f"samples_{name}_t1.0.png").exists()
    assert results["denseflow"]["batchnorm"].startswith("recalibrated")
    assert "| normflows Glow |" in capsys.readouterr().out
    # a rerun reuses both arms' training and bounds (stored beside them) and draws the samples again
    stamps = {name: (out / name).stat().st_mtime_ns for name in ("glow.pt", "denseflow.json")}
    assert main(["experiment", "peers", "--quick", "--quiet", "--out", str(out)]) == 0
    again = json.loads((out / "results.json").read_text())
    assert {name: (out / name).stat().st_mtime_ns for name in stamps} == stamps
    for name in ("denseflow", "glow"):
        assert again[name] == results[name]
    # a diverged arm's NaN bound: null in strict JSON, NaN in the table
    stored = json.loads((out / "glow.json").read_text())
    stored["figures"]["elbo_bpd"] = None
    (out / "glow.json").write_text(json.dumps(stored))
    assert main(["experiment", "peers", "--quick", "--quiet", "--out", str(out)]) == 0

    strict = strict_json((out / "results.json").read_text())
    assert strict["glow"]["elbo_bpd"] is None
    assert strict["glow"]["iwbo_bpd"] == results["glow"]["iwbo_bpd"]
    assert (
        f"| normflows Glow | {results['glow']['params']:,} | nan |"
        in (out / "results.md").read_text()
    )
    assert main(["experiment", "peers", "--steps", "3", "--out", str(out)]) == 2
