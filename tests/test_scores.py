"""Per-image bits/dim, scoring a folder of one's own images, and latent interpolation."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from denseflow.cli import main
from denseflow.config import load_config
from denseflow.evaluate import (
    evaluate_images,
    score_images,
    score_terms,
    standard_error,
    to_bits_per_dim,
)
from denseflow.model import DenseFlow
from denseflow.sample import interpolate, sample_seeds, slerp
from denseflow.seeding import stream


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("run") / "run"
    argv = ["train", "--preset", "tiny", "--quiet", "--out", str(folder)]
    assert main([*argv, "--set", "train.epochs=1"]) == 0
    return folder


def _model() -> DenseFlow:
    torch.manual_seed(0)
    model = DenseFlow(load_config("tiny").model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def test_per_image_scores_average_to_the_evaluation():
    model = _model()
    images = torch.randint(0, 256, (11, 1, 28, 28), dtype=torch.uint8)
    nats = score_images(model, images, batch_size=4, seed=2, progress=False)
    assert nats.shape == (11,) and nats.dtype == torch.float64
    mean = evaluate_images(model, images, batch_size=4, seed=2, progress=False)
    assert to_bits_per_dim(model, nats.mean()).item() == pytest.approx(mean["bpd"], rel=1e-12)
    # image i's score depends on its batch's noise stream only: the same with one image per batch
    alone = score_images(model, images[4:8], batch_size=4, seed=2, progress=False)
    assert not torch.equal(alone, nats[4:8])  # batch 0 of a new call draws other noise
    again = score_images(model, images, batch_size=4, seed=2, progress=False)
    assert torch.equal(again, nats)
    iwbo = score_images(model, images, batch_size=4, k=6, kbs=3, seed=2, progress=False)
    curve = score_images(model, images, batch_size=4, k=[3, 12, 6], kbs=3, seed=2, progress=False)
    assert curve.shape == (3, 11) and torch.equal(curve[2], iwbo)  # kbs 3 divides 6: same draws
    for i, start in enumerate((0, 4, 8)):  # batch i: model.iwbo with the stream (2, "eval", i)
        x = images[start : start + 4].long()
        want = model.iwbo(x, 6, chunk=3, generator=stream(2, "eval", i))
        assert torch.equal(iwbo[start : start + 4], want.double())


def test_scoring_refuses_what_it_would_score_wrongly():
    model = _model()
    x = torch.randint(0, 256, (5, 1, 28, 28), dtype=torch.uint8)
    pixels = r"images: expected an integer tensor of images \(pixel values 0 \.\. 255, not scaled\)"
    for score in (score_images, score_terms, evaluate_images):
        with pytest.raises(TypeError, match=pixels):
            score(model, x.float() / 255, progress=False)
        with pytest.raises(TypeError, match="images: expected an integer tensor"):
            score(model, x.numpy(), progress=False)
        with pytest.raises(
            ValueError, match=r"images: expected shape \(B, 1, 28, 28\) with B >= 1"
        ):
            score(model, x[:0], progress=False)
        with pytest.raises(ValueError, match="images: expected shape"):
            score(model, x[0], progress=False)
        for size in (-1, 0, 2.5):
            with pytest.raises(
                ValueError, match=f"^batch_size must be a positive integer, got {size}"
            ):
                score(model, x, batch_size=size, progress=False)
        with pytest.raises(
            TypeError, match=r"model: expected a DenseFlow, got str .*from_pretrained"
        ):
            score("fashion-mnist", x, progress=False)
    for k, kbs in ((2.5, None), ([], None), (2, 0), (2, 1.5)):
        with pytest.raises(ValueError, match="^(k|kbs) must be a positive integer"):
            score_images(model, x, k=k, kbs=kbs, progress=False)
    want = score_images(model, x, batch_size=2, k=2, progress=False)
    assert torch.equal(score_images(model, x, np.int64(2), k=np.int64(2), progress=False), want)


def test_evaluate_writes_per_image_scores_of_a_folder_of_ones_own_images(run, tmp_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("b.png", "a.png", "c.png"):
        Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).save(folder / name)
    out, scores = tmp_path / "missing" / "e.json", tmp_path / "scores.csv"
    argv = ["evaluate", "--checkpoint", str(run / "final.pt"), "--images", str(folder)]
    assert main([*argv, "--k", "3", "--per-image", str(scores), "--json", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())  # the folder of --json was made before the work
    rows = list(csv.DictReader(scores.open()))
    assert [r["file"] for r in rows] == ["a.png", "b.png", "c.png"]
    assert list(rows[0]) == ["index", "file", "elbo_bpd", "iwbo3_bpd"]
    iwbo, elbo = (np.array([float(r[c]) for r in rows]) for c in ("iwbo3_bpd", "elbo_bpd"))
    assert iwbo.mean() == pytest.approx(result["bpd"], abs=1e-5) and result["dataset"] == "folder"
    assert elbo.mean() == pytest.approx(result["elbo_bpd"], abs=1e-5)
    # standard errors over the images (the CSV's 6 decimals bound the difference)
    for values, key in (
        (iwbo, "bpd_sem"),
        (elbo, "elbo_bpd_sem"),
        (elbo - iwbo, "elbo_minus_bpd_sem"),
    ):
        assert values.std(ddof=1) / np.sqrt(3) == pytest.approx(result[key], abs=2e-6), key
    gap = result["elbo_bpd"] - result["bpd"]  # (3 images, k=3: its sign is noise here)
    assert (
        f"images iwbo3 bits/dim: {result['bpd']:.4f} ± {result['bpd_sem']:.4f} "
        f"(ELBO {result['elbo_bpd']:.4f} ± {result['elbo_bpd_sem']:.4f}; "
        f"ELBO − IWBO {gap:.4f} ± {result['elbo_minus_bpd_sem']:.4f}, paired; "
        "± one standard error over the 3 images; BatchNorm statistics: "
    ) in printed


def test_standard_error_of_the_mean():
    values = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert standard_error(values) == pytest.approx((5 / 3) ** 0.5 / 2, rel=1e-15)
    assert standard_error(torch.tensor([7.0])) is None
    assert standard_error(torch.full((5,), 3.25)) == 0.0


def test_evaluate_a_list_of_k_scores_the_bound_s_tightening_in_one_run(run, tmp_path, capsys):
    """`--k 1,2,4`: IWBO-j of the first j of 4 draws for each j; the largest is the result's
    bound, and with a --kbs that divides j each equals a separate --k j run bit for bit."""
    argv = ["evaluate", "--checkpoint", str(run / "final.pt"), "--limit", "6", "--quiet"]
    argv += ["--kbs", "2"]
    scores = tmp_path / "c.csv"
    assert (
        main(
            [*argv, "--k", "4,1,2", "--json", str(tmp_path / "c.json"), "--per-image", str(scores)]
        )
        == 0
    )
    curve, printed = json.loads((tmp_path / "c.json").read_text()), capsys.readouterr().out
    assert curve["k"] == 4 and list(curve["iwbo_bpd"]) == ["1", "2", "4"]
    assert curve["iwbo_bpd"]["4"]["bpd"] == curve["bpd"]
    rows = list(csv.DictReader(scores.open()))
    assert list(rows[0]) == ["index", "elbo_bpd", "iwbo1_bpd", "iwbo2_bpd", "iwbo4_bpd"]
    words = ", ".join(
        f"k={j} {c['bpd']:.4f} ± {c['bpd_sem']:.4f}" for j, c in curve["iwbo_bpd"].items()
    )
    assert f"IWBO-k bits/dim of the first k of 4 draws: {words}" in printed
    for j in (2, 4):
        assert main([*argv, "--k", str(j), "--json", str(tmp_path / f"{j}.json")]) == 0
        alone = json.loads((tmp_path / f"{j}.json").read_text())
        assert alone["bpd"] == curve["iwbo_bpd"][str(j)]["bpd"] and "iwbo_bpd" not in alone


def test_default_result_names_do_not_overwrite_each_other(run, capsys):
    final = str(run / "final.pt")
    assert main(["evaluate", "--checkpoint", final, "--quiet"]) == 0
    assert main(["evaluate", "--checkpoint", final, "--quiet", "--limit", "8", "--double"]) == 0
    assert main(["evaluate", "--checkpoint", final, "--quiet", "--k", "2"]) == 0
    names = sorted(p.name for p in run.glob("final.*.json"))
    assert names == [
        "final.test.elbo.first8.float64.json",
        "final.test.elbo.json",
        "final.test.iwbo2.json",
    ]


def test_slerp_keeps_the_ends_and_the_norm_of_orthogonal_draws():
    a, b = torch.zeros(1, 4, dtype=torch.float64), torch.zeros(1, 4, dtype=torch.float64)
    a[0, 0], b[0, 1] = 2.0, 2.0
    assert torch.equal(slerp(a, b, 0.0), a) and torch.equal(slerp(a, b, 1.0), b)
    mid = slerp(a, b, 0.5)
    torch.testing.assert_close(mid.norm(), torch.tensor(2.0, dtype=torch.float64))
    torch.testing.assert_close(mid[0, :2], torch.full((2,), 2**0.5, dtype=torch.float64))


def test_interpolation_strip_starts_and_ends_at_the_inputs_bit_for_bit(run, tmp_path, capsys):
    model = _model()
    a, b = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8)
    strip = interpolate(model, a, b, steps=5, seed=1)
    assert strip.shape == (5, 1, 28, 28)
    assert torch.equal(strip[0], a.long()) and torch.equal(strip[-1], b.long())
    assert not torch.equal(strip[2], strip[0])
    Image.fromarray(a[0].numpy()).save(tmp_path / "a.png")
    (tmp_path / "notes.txt").write_text("not an image")  # the file is read alone, not its folder
    out = tmp_path / "strip.png"
    argv = ["interpolate", "--checkpoint", str(run / "final.pt"), "--a", str(tmp_path / "a.png")]
    assert main([*argv, "--b", "3", "--steps", "4", "--out", str(out)]) == 0
    grid = np.asarray(Image.open(out))
    assert grid.shape == (86 + 2, 4 * 86 + 2)  # 28 px shown at 84 px
    assert np.array_equal(grid[2:86:3, 2:86:3], a[0].numpy())  # the first frame is the file
    assert "resized" not in capsys.readouterr().out
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(tmp_path / "big.png")
    assert main([*argv, "--b", str(tmp_path / "big.png"), "--out", str(tmp_path / "s2.png")]) == 0
    assert f"interpolate: --b {tmp_path / 'big.png'}: resized to 28x28" in capsys.readouterr().out


def test_sample_seeds_are_uint8_images_each_of_its_own_seed():
    model = _model()
    images = sample_seeds(model, [3, 5, 8], temperature=0.8, batch_size=2)
    assert images.dtype == torch.uint8 and images.shape == (3, 1, 28, 28)
    for image, seed in zip(images, (3, 5, 8), strict=True):
        g = stream(seed, "sample")  # image i: the draws of the stream (seed_i, "sample") alone
        shapes = model.sampling_shapes.items()
        noise = {name: torch.randn(1, *shape, generator=g) for name, shape in shapes}
        assert torch.equal(model.sample(1, 0.8, noise=noise)[0], image.long())


def test_evaluate_terms_split_the_elbo_where_the_bits_go(run, tmp_path, capsys):
    """`evaluate --terms`: each summand's bits/dim in the JSON, the printout and the per-image
    CSV; they add up to the ELBO of the same draws (in float64 here: to float64 rounding)."""
    out, scores = tmp_path / "t.json", tmp_path / "t.csv"
    argv = ["evaluate", "--checkpoint", str(run / "final.pt"), "--limit", "5", "--quiet"]
    argv.append("--double")
    assert main([*argv, "--terms", "--json", str(out), "--per-image", str(scores)]) == 0
    result, printed = json.loads(out.read_text()), capsys.readouterr().out
    model = DenseFlow.from_pretrained(run / "final.pt")
    assert list(result["terms_bpd"]) == model.term_names
    assert result["terms_bpd"]["bins"] == pytest.approx(8.0, abs=1e-12)
    assert sum(result["terms_bpd"].values()) == pytest.approx(result["elbo_bpd"], abs=1e-9)
    for name, value in result["terms_bpd"].items():
        assert f"  {name} " in printed and f"{value:+9.4f}" in printed
    rows = list(csv.DictReader(scores.open()))
    assert list(rows[0]) == ["index", "elbo_bpd", *(f"term.{n}_bpd" for n in model.term_names)]
    for row in rows:  # 6 decimals a column: the sum of 8 rounded values is within 4e-6
        parts = sum(float(row[f"term.{n}_bpd"]) for n in model.term_names)
        assert parts == pytest.approx(float(row["elbo_bpd"]), abs=5e-6)


def _interrupting(real, after: int, calls: dict):
    """``real`` that raises KeyboardInterrupt at its call number ``after`` (counted in calls)."""

    def call(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == after:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    return call


def test_an_interrupted_evaluation_continues_where_it_stopped(tmp_path, monkeypatch, capsys):
    """With ``partial=``, an interrupted score_images keeps the batches it scored; the same call
    scores only the rest and gives bitwise the uninterrupted values; the file then goes. A file
    of other settings, or a damaged one, is not used."""
    model = _model()
    images = torch.randint(0, 256, (11, 1, 28, 28), dtype=torch.uint8)
    args = dict(batch_size=4, k=3, kbs=3, seed=2, progress=False)  # 3 batches, 1 pass each
    want = score_images(model, images, **args)
    calls, path = {"n": 0}, tmp_path / "scores.partial"
    monkeypatch.setattr(model, "elbo", _interrupting(model.elbo, 3, calls))
    with pytest.raises(KeyboardInterrupt):
        score_images(model, images, **args, partial=path)
    assert path.exists() and "the scores so far are kept" in capsys.readouterr().out
    calls["n"] = 100  # no more interruptions; count the passes from here
    assert torch.equal(score_images(model, images, **args, partial=path), want)
    assert calls["n"] == 101 and not path.exists()  # only the third batch was scored
    assert "continuing a partial evaluation" in capsys.readouterr().out
    # another seed: the kept scores do not apply
    calls["n"] = 0
    with pytest.raises(KeyboardInterrupt):
        score_images(model, images, **args, partial=path)
    calls["n"] = 100
    other = score_images(model, images, **(args | {"seed": 3}), partial=path)
    assert torch.equal(other, score_images(model, images, **(args | {"seed": 3})))
    assert "another model, images or settings" in capsys.readouterr().out
    path.write_bytes(b"damaged")
    assert torch.equal(score_images(model, images, **args, partial=path), want)
    assert "scoring from the start" in capsys.readouterr().out and not path.exists()


def test_evaluate_interrupted_continues_with_the_same_command(run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "r.json"
    argv = ["evaluate", "--checkpoint", str(run / "final.pt"), "--quiet", "--json", str(out)]
    argv += ["--k", "2", "--kbs", "2", "--batch-size", "8"]  # 32 test images: 4 batches
    assert main(argv) == 0
    want = json.loads(out.read_text())
    out.unlink()
    calls = {"n": 0}
    monkeypatch.setattr(DenseFlow, "elbo", _interrupting(DenseFlow.elbo, 4 + 3, calls))
    assert main(argv) == 130  # the ELBO pass (4 calls) done, the IWBO pass interrupted at batch 3
    assert not out.exists() and "the scores so far are kept" in capsys.readouterr().out
    kept = tmp_path / ".r.json.iwbo2.partial"
    assert kept.exists() and not (tmp_path / ".r.json.elbo.partial").exists()
    calls["n"] = 100
    assert main(argv) == 0
    assert calls["n"] == 100 + 4 + 2  # the ELBO pass again (it had completed), IWBO batches 3-4
    assert json.loads(out.read_text()) == want and not kept.exists()
