"""Data-parallel training and evaluation: 2 gloo ranks on the CPU compute what one process computes.

Both ranks and the single process run one thread each, so the parameters agree bitwise (with
different thread counts the kernels sum in another order: ~1e-6 after 4 Adamax steps).
"""

from __future__ import annotations

import contextlib
import json
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from denseflow import checkpoint as ckpt
from denseflow import distributed
from denseflow import train as train_module
from denseflow.config import RunConfig, load_config
from denseflow.evaluate import evaluate_images, score_images
from denseflow.graph import GraphedStep
from denseflow.model import DenseFlow
from denseflow.sample import sample_seeds

from . import graph_tape
from .conftest import gloo_group

WORLD = 2
CONFIG = load_config("tiny").override(
    [
        "train.epochs=1",
        "train.batch_chunks=2",
        "train.eval_every=5",
        "train.checkpoint_every=3",
        "train.num_samples=3",
        "train.ema_decay=0.5",  # the exports compared hold the weights' average
    ]
)


def _train_worker(
    rank: int,
    init: Path,
    config: dict,
    run_dir: Path,
    stop_after: int | None,
    out: Path,
    perturb: bool = False,
    rehearse: bool = False,
) -> None:
    """train() on this rank; records the ActNorm values right after the data-dependent init and
    every parameter after the last step. ``perturb``: rank 1's weights are moved right after
    the init (a rank whose start differs, e.g. by another GPU's rounding). ``rehearse``: the
    step's two graphs captured and replayed as on a GPU (tests/graph_tape.py)."""
    graphs = graph_tape.install(setattr) if rehearse else []
    if rehearse:
        graph_tape.capture_on_cpu(setattr)
    original_init, original_step = DenseFlow.data_init, train_module.train_step
    original_graphed = GraphedStep.__call__
    seen = {}

    def data_init(model, *args, **kwargs):
        original_init(model, *args, **kwargs)
        seen["init"] = {
            n: p.detach().clone() for n, p in model.named_parameters() if ".actnorm." in n
        }
        if perturb and rank == 1:
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.01)

    def train_step(model, *args, **kwargs):
        loss = original_step(model, *args, **kwargs)
        seen["final"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        seen["kind"] = "ddp"
        return loss

    def graphed_step(step, *args, **kwargs):
        loss = original_graphed(step, *args, **kwargs)
        seen["final"] = {n: p.detach().clone() for n, p in step.model.named_parameters()}
        seen["kind"] = "graphed"
        return loss

    DenseFlow.data_init, train_module.train_step = data_init, train_step
    GraphedStep.__call__ = graphed_step
    with gloo_group(rank, init, WORLD):
        summary = train_module.train(
            RunConfig.from_dict(config), run_dir, progress=False, stop_after=stop_after
        )
        seen["replays"] = [g.replays for g in graphs]
        torch.save(seen, out / f"rank{rank}.pt")
        if rank == 0:
            (out / "summary.json").write_text(json.dumps(summary))


def _spawn(fn, tmp_path: Path, *args) -> None:
    mp.spawn(fn, args=(tmp_path / "pg", *args), nprocs=WORLD, join=True)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The single-process run of the same configuration (global batch 16 in 2 chunks)."""
    run = tmp_path_factory.mktemp("single") / "run"
    with _one_thread():
        return run, train_module.train(CONFIG, run, progress=False)


@contextmanager
def _one_thread():
    """As each rank runs: the same kernels, the same summation order, hence bitwise equal
    results."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _params(path: Path) -> dict[str, torch.Tensor]:
    return dict(ckpt.load(path)["model"])


@pytest.mark.parametrize(
    "cuda_graph, rehearse",
    [(True, False), (True, True), (False, False)],
    ids=["graphed-step", "graphed-step-rehearsed", "ddp-step"],
)
def test_two_ranks_train_what_one_process_trains(tmp_path, single, cuda_graph, rehearse):
    """Each rank's step on static buffers with one all-reduce of gradients and loss between its
    halves (train.cuda_graph, the default), or torch's DDP (train.cuda_graph=false): both the
    single process's parameters, bitwise. Rehearsed: each rank captures the halves as two
    graphs and replays them around the all-reduce, as on GPUs."""
    run = tmp_path / "ddp"
    config = CONFIG.override([f"train.cuda_graph={cuda_graph}"])
    _spawn(_train_worker, tmp_path, config.to_dict(), run, None, tmp_path, False, rehearse)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    assert ranks[0]["kind"] == ranks[1]["kind"] == ("graphed" if cuda_graph else "ddp")
    # rehearsed: the step's two halves captured at step 2 and replayed at steps 2-4
    assert ranks[0]["replays"] == ranks[1]["replays"] == ([3, 3] if rehearse else [])
    # ActNorm init on the global first batch: identical on both ranks (before DDP broadcasts
    # anything)
    assert ranks[0]["init"].keys() and ranks[0]["init"].keys() == ranks[1]["init"].keys()
    for name, value in ranks[0]["init"].items():
        assert torch.equal(value, ranks[1]["init"][name]), name
        assert value.abs().sum() > 0, name  # really initialised from data
    for name, value in ranks[0]["final"].items():
        assert torch.equal(value, ranks[1]["final"][name]), name
    # rank 0 wrote the run; its parameters equal the single-process run's
    assert json.loads((tmp_path / "summary.json").read_text())["step"] == single[1]["step"] == 4
    mine, reference = _params(run / "final.pt"), _params(single[0] / "final.pt")
    for name, value in reference.items():
        if (
            "running_" not in name and "num_batches" not in name
        ):  # BatchNorm statistics follow rank 0's chunk
            torch.testing.assert_close(
                mine[name], value, rtol=0, atol=0, msg=lambda m, n=name: f"{n}: {m}"
            )
    assert (run / "samples").is_dir() and (run / "metrics.jsonl").read_text().count(
        '"kind": "train"'
    ) == 4


@pytest.mark.parametrize("cuda_graph", [True, False], ids=["graphed-step", "ddp-step"])
def test_every_rank_starts_from_rank_0s_weights(tmp_path, single, cuda_graph):
    """Rank 1's weights differ after the init: both ranks still end with the single process's
    parameters, bitwise (rank 0's state is broadcast before the first step; DDP does it
    itself), and the run exports the single process's weight average."""
    config = CONFIG.override([f"train.cuda_graph={cuda_graph}"])
    _spawn(_train_worker, tmp_path, config.to_dict(), tmp_path / "run", None, tmp_path, True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    reference = _params(
        single[0] / "checkpoints" / "step_0000004.pt"
    )  # the weights, not final.pt's average
    for name, value in ranks[0]["final"].items():
        assert torch.equal(value, ranks[1]["final"][name]), name
        assert torch.equal(value, reference[name]), name
    mine, average = _params(tmp_path / "run" / "final.pt"), _params(single[0] / "final.pt")
    for name, value in average.items():
        if "running_" not in name and "num_batches" not in name:
            assert torch.equal(mine[name], value), name


def test_ddp_checkpoint_resumes_in_one_process(tmp_path, single):
    """The DDP part runs in low-memory mode (activation checkpointing under DDP): the same
    values."""
    run = tmp_path / "ddp"
    _spawn(
        _train_worker,
        tmp_path,
        CONFIG.override(["train.low_memory=true"]).to_dict(),
        run,
        3,
        tmp_path,
    )
    state = ckpt.load(run)
    assert state["step"] == 3 and set(state["model"]) == set(DenseFlow(CONFIG.model).state_dict())
    with _one_thread():
        assert train_module.train(CONFIG, run, resume=run, progress=False)["step"] == 4
    mine, reference = _params(run / "final.pt"), _params(single[0] / "final.pt")
    for name, value in reference.items():
        if "running_" not in name and "num_batches" not in name:
            torch.testing.assert_close(
                mine[name], value, rtol=0, atol=0, msg=lambda m, n=name: f"{n}: {m}"
            )


def _perturbed_model() -> DenseFlow:
    torch.manual_seed(0)
    model = DenseFlow(CONFIG.model).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def _images() -> torch.Tensor:
    return torch.randint(
        0, 256, (37, 1, 28, 28), generator=torch.Generator().manual_seed(1), dtype=torch.uint8
    )


def _eval_worker(rank: int, init: Path, out: Path) -> None:
    with gloo_group(rank, init, WORLD):
        model, images = _perturbed_model(), _images()
        result = {
            "elbo": evaluate_images(model, images, batch_size=8, seed=3, progress=False)["bpd"],
            "iwbo": evaluate_images(
                model, images, batch_size=8, k=3, kbs=2, seed=3, progress=False
            )["bpd"],
            "samples": sample_seeds(model, list(range(5))),
            "scores": score_images(model, images, batch_size=8, k=3, kbs=2, seed=3, progress=False),
        }
        # each rank interrupted in its second batch keeps its first; the same call continues
        partial, real, calls = out / "partial", model.elbo, {"n": 0}

        def interrupted(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 3:  # k=3, kbs=2: two passes a batch
                raise KeyboardInterrupt
            return real(*args, **kwargs)

        model.elbo = interrupted
        with contextlib.suppress(KeyboardInterrupt):
            score_images(model, images, 8, 3, 2, seed=3, progress=False, partial=partial)
        result["kept"] = Path(f"{partial}.rank{rank}").exists()
        model.elbo = real
        result["resumed"] = score_images(model, images, 8, 3, 2, 3, False, partial=partial)
        result["removed"] = not Path(f"{partial}.rank{rank}").exists()
        torch.save(result, out / f"eval{rank}.pt")


def test_distributed_evaluation_of_an_odd_sized_set_equals_one_process(tmp_path):
    _spawn(_eval_worker, tmp_path, tmp_path)
    model, images = _perturbed_model(), _images()
    with _one_thread():
        elbo = evaluate_images(model, images, batch_size=8, seed=3, progress=False)
        iwbo = evaluate_images(model, images, batch_size=8, k=3, kbs=2, seed=3, progress=False)
    assert elbo["images"] == iwbo["images"] == 37
    samples = sample_seeds(model, list(range(5)))
    with _one_thread():
        scores = score_images(model, images, batch_size=8, k=3, kbs=2, seed=3, progress=False)
    for rank in range(WORLD):
        result = torch.load(tmp_path / f"eval{rank}.pt")
        assert result["elbo"] == pytest.approx(elbo["bpd"], rel=1e-12)
        assert result["iwbo"] == pytest.approx(iwbo["bpd"], rel=1e-12)
        assert torch.equal(result["samples"], samples)  # seeds split over ranks, gathered in order
        assert torch.equal(result["scores"], scores)  # every image once, in dataset order
        assert result["kept"] and result["removed"] and torch.equal(result["resumed"], scores)
    # one process evaluating in different batches gives a different draw: the check above can fail
    assert (
        evaluate_images(model, images, batch_size=5, seed=3, progress=False)["bpd"] != elbo["bpd"]
    )


def test_batch_chunks_must_split_every_batch():
    with pytest.raises(ValueError, match="more chunks than train.batch_size"):
        CONFIG.override(["train.batch_chunks=17"])


def _rollback_worker(rank: int, init: Path, config: dict, run_dir: Path, out: Path) -> None:
    """Training steps 6 and 7 are non-finite on every rank; rank 1 may not read the run folder
    itself (its load_newest fails), so the rollback must restore what rank 0 chose."""
    original = DenseFlow.forward
    calls = []

    def poisoned(model, x, noise=None, generator=None):
        calls.append(1)
        value = original(model, x, noise, generator)
        return value * float("nan") if len(calls) in (6, 7) else value

    def no_reading(path):
        raise AssertionError(f"rank {rank} read {path} itself")

    original_step, final = train_module.train_step, {}

    def train_step(model, *args, **kwargs):
        loss = original_step(model, *args, **kwargs)
        final.update({n: p.detach().clone() for n, p in model.named_parameters()})
        return loss

    DenseFlow.forward, train_module.train_step = poisoned, train_step
    if rank == 1:
        ckpt.load_newest = no_reading
    with gloo_group(rank, init, WORLD):
        summary = train_module.train(RunConfig.from_dict(config), run_dir, progress=False)
        torch.save({"summary": summary, "final": final}, out / f"rollback{rank}.pt")


def test_a_rollback_under_ddp_restores_the_checkpoint_rank_0_chose_on_every_rank(tmp_path):
    config = CONFIG.override(["train.epochs=2", "train.max_bad_steps=2", "train.max_rollbacks=1"])
    run = tmp_path / "run"
    _spawn(_rollback_worker, tmp_path, config.to_dict(), run, tmp_path)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["lr_scale"]) for r in records if r["kind"] == "rollback"] == [(6, 0.5)]
    results = [torch.load(tmp_path / f"rollback{r}.pt") for r in range(WORLD)]
    assert results[0]["summary"]["step"] == results[1]["summary"]["step"] == 8
    assert results[0]["summary"]["test_bpd"] == results[1]["summary"]["test_bpd"]
    for name, value in results[0]["final"].items():  # both ranks restored the same step
        assert torch.equal(value, results[1]["final"][name]), name
    state = ckpt.load(run)
    assert state["rollbacks"] == 1 and state["skipped_steps"] == 1  # as saved at step 6


def test_two_ranks_hold_out_and_score_the_validation_set_as_one_process(tmp_path):
    """data.validation under data parallelism: every rank trains on the same 48 of tiny's 64
    images and scores the 16 held out; the run's evaluations, its best and its test bpd are the
    single process's, bitwise."""
    config = CONFIG.override(["data.validation=16", "train.eval_every=1", "train.epochs=2"])
    with _one_thread():
        alone = train_module.train(config, tmp_path / "alone", progress=False)
    run = tmp_path / "ddp"
    _spawn(_train_worker, tmp_path, config.to_dict(), run, None, tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["step"] == alone["step"] == 2 * 3  # 48 images in batches of 16
    for key in ("val_bpd", "best_val_bpd", "test_bpd"):
        assert summary[key] == alone[key], key

    def evaluations(folder):
        lines = (folder / "metrics.jsonl").read_text().splitlines()
        return [r for r in map(json.loads, lines) if r["kind"] == "eval"]

    assert evaluations(run) == evaluations(tmp_path / "alone") and len(evaluations(run)) == 2


def _leave_worker(rank: int, init: Path, out: Path, failed_rank: int | None) -> None:
    """Both ranks leave after their work; rank 1 arrives 0.5 s late. ``failed_rank`` leaves as
    after an error (no barrier) at once."""
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=WORLD)
    dist.barrier()  # the group is fully connected before anyone leaves
    if rank == 1:
        time.sleep(0.5)
    arrived = time.monotonic()
    distributed.leave(finished=rank != failed_rank)
    left = time.monotonic()
    (out / f"leave{rank}.json").write_text(
        json.dumps({"arrived": arrived, "left": left, "still": dist.is_initialized()})
    )


def test_ranks_that_finished_leave_the_group_together(tmp_path):
    """A finished rank destroys the group only when its peer has finished too (CLOCK_MONOTONIC
    is one clock for every process of the machine)."""
    _spawn(_leave_worker, tmp_path, tmp_path, None)
    ranks = [json.loads((tmp_path / f"leave{r}.json").read_text()) for r in range(WORLD)]
    assert ranks[0]["left"] >= ranks[1]["arrived"] > ranks[0]["arrived"] + 0.4
    assert not ranks[0]["still"] and not ranks[1]["still"]


def test_a_finished_rank_leaves_without_error_when_its_peer_failed(tmp_path):
    """Rank 0 left after an error (no barrier) and is gone: rank 1's barrier fails, which
    leave() absorbs, and the group is torn down."""
    _spawn(_leave_worker, tmp_path, tmp_path, 0)
    ranks = [json.loads((tmp_path / f"leave{r}.json").read_text()) for r in range(WORLD)]
    assert ranks[0]["left"] < ranks[1]["arrived"]  # rank 0 did not wait
    assert not ranks[0]["still"] and not ranks[1]["still"]


@pytest.mark.parametrize("cuda_graph", [True, False], ids=["graphed-step", "ddp-step"])
def test_every_rank_evaluates_with_the_statistics_the_checkpoint_holds(tmp_path, cuda_graph):
    """``bn_recalibrate=0``: the running statistics, which each rank's own chunks move apart.
    The evaluations inside the run use rank 0's on every rank (those its files hold), so the
    exported model, evaluated in one process, scores the run's test bpd exactly."""
    config = CONFIG.override(
        ["train.ema_decay=0", "train.bn_recalibrate=0", f"train.cuda_graph={cuda_graph}"]
    )
    run = tmp_path / "run"
    _spawn(_train_worker, tmp_path, config.to_dict(), run, None, tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    model, saved = ckpt.load_model(run / "final.pt")
    testset = train_module.load_datasets(saved).test
    with _one_thread():
        result = evaluate_images(
            model.to(memory_format=torch.channels_last),
            testset.images,
            saved.eval.batch_size,
            seed=saved.train.seed,
            progress=False,
        )
    assert summary["batchnorm"] == ckpt.RUNNING_STATISTICS
    assert result["bpd"] == summary["test_bpd"]


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"WORLD_SIZE": "abc"}, "WORLD_SIZE='abc': expected the number of ranks"),
        (
            {"WORLD_SIZE": "2"},
            "WORLD_SIZE=2 makes this process one of 2 ranks, but RANK, MASTER_ADDR, MASTER_PORT "
            "are not set: start it with torchrun, or unset WORLD_SIZE",
        ),
        ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "x"}, "but MASTER_PORT is not set"),
    ],
)
def test_a_launcher_environment_half_set_is_one_line(env, expected, tmp_path, monkeypatch, capsys):
    """WORLD_SIZE without the rest of torchrun's variables: one line, exit code 2, nothing
    joined or written (it was a traceback)."""
    from denseflow.cli import main

    for name in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "s.png"
    assert main(["sample", "--checkpoint", "fashion-mnist", "--num", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1 and not out.exists()
    assert not dist.is_initialized()
