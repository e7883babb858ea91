"""Random streams: every purpose and position draws from a stream of its own."""

from __future__ import annotations

import itertools

import pytest
import torch

from denseflow.config import load_config
from denseflow.seeding import PURPOSES, stream, stream_seed
from denseflow.step import Batches
from denseflow.train import LoopState


def test_no_two_streams_coincide():
    """Every (seed, purpose, position) of a long run gets its own generator seed; in particular
    the pairs denseflow 0.1 shared (epoch e's order and step e's augmentation; step t's
    augmentation and chunk 0's noise; the eval batch i and step i) are apart."""
    seeds = {}
    for seed in range(4):
        names = [(seed, "init"), (seed, "sample")]
        names += [
            (seed, purpose, i) for purpose in ("order", "augment", "eval") for i in range(2000)
        ]
        names += [(seed, "noise", t, j) for t, j in itertools.product(range(2000), range(4))]
        names += [(i, "sample") for i in range(2000)]
        for name in names:
            seeds.setdefault(stream_seed(*name), set()).add(name)
    shared = {k: v for k, v in seeds.items() if len(v) > 1}
    assert not shared, list(shared.values())[:3]
    assert all(0 <= k < 2**63 for k in seeds)


def test_the_streams_of_one_step_are_unrelated_draws():
    a, b = stream(0, "augment", 5), stream(0, "noise", 5, 0)
    c, d = stream(0, "order", 5), stream(0, "eval", 5)
    draws = [torch.rand(8, generator=g) for g in (a, b, c, d)]
    for x, y in itertools.combinations(draws, 2):
        assert not torch.equal(x, y)
    same = stream(0, "noise", 5, 0)  # a stream is a function of its name alone
    assert torch.equal(torch.rand(8, generator=same), draws[1])


def test_batch_order_and_augmentation_of_a_training_run_are_independent_streams():
    """The flips of step e do not follow from the permutation of epoch e (with denseflow 0.1 both
    started from the seed ``seed·1000003 + e``)."""
    config = load_config("tiny")
    images = torch.arange(64, dtype=torch.uint8).view(64, 1, 1, 1).expand(64, 1, 28, 28)
    batches = Batches(images.contiguous(), config.train, "none")
    order = torch.randperm(64, generator=stream(0, "order", 1))
    got = batches(LoopState(step=1, epoch=1, batch=0))[:, 0, 0, 0].long()
    assert torch.equal(got, order[:16])
    flips = torch.rand(16, generator=stream(0, "augment", 1))
    assert not torch.equal(torch.rand(16, generator=stream(0, "order", 1)), flips)


def test_unknown_purpose_is_refused():
    with pytest.raises(ValueError, match="unknown stream purpose 'noize'"):
        stream(0, "noize")
    assert set(PURPOSES) == {
        "order",
        "augment",
        "noise",
        "init",
        "eval",
        "sample",
        "recalibrate",
        "validation",
    }
