"""What ``train.ema_decay`` buys: one training run, the weights and their averages at several
decays evaluated side by side.

The average changes nothing the optimizer sees, so one run serves every decay: the run trains
with ``train.ema_decay`` set to the first of ``--decays`` (its exports hold that average) and
keeps averages at the other decays beside it, updated after the same steps. At the end the
weights themselves and each average are evaluated as the run evaluates (``train.evaluation``:
BatchNorm statistics recalibrated over ``train.bn_recalibrate`` training batches for those very
weights): test ELBO and IWBO-``--k`` bits/dim on the whole test set, with the run's seed, and
each average's difference from the weights with its paired standard error (per image: the same
images and noises, so the image-to-image spread cancels). Prints one JSON object and writes it
to ``<out>/average_check.json``.

Run from the repository root (the demo preset: about 30 minutes on 2 cores)::

    PYTHONPATH=. python scripts/average_check.py --out /tmp/average --decays 0.99,0.98,0.995,0.999
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from denseflow import train as training
from denseflow.average import WeightAverage
from denseflow.config import load_config
from denseflow.evaluate import score_images, standard_error, to_bits_per_dim


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--decays", default="0.999,0.99,0.995")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    a = parser.parse_args()
    decays = [float(d) for d in a.decays.split(",")]
    config = load_config(a.preset).override([f"train.ema_decay={decays[0]}", *a.overrides])
    kept: dict[str, object] = {}

    class Averages(WeightAverage):  # the run's average, and the others updated with it
        def __init__(self, model, decay):
            super().__init__(model, decay)
            self.others = [WeightAverage(model, d) for d in decays[1:]]
            kept["model"], kept["averages"] = model, [self, *self.others]

        def update(self):
            super().update()
            for other in self.others:
                other.update()

    training.WeightAverage = Averages
    began = time.perf_counter()
    summary = training.train(config, a.out, progress=True)
    train_wall = time.perf_counter() - began
    model, cfg = kept["model"], config.train
    trainset, testset, _ = training.load_datasets(config)
    rows, trained = [], {}  # trained: the weights' per-image bits/dim, by bound
    for average in [None, *kept["averages"]]:
        with training.evaluation(model, config, trainset.images, average):
            row = {"weights": "trained" if average is None else f"average {average.decay:g}"}
            for name, k in (("elbo", None), (f"iwbo{a.k}", a.k)):
                kbs = min(k or 1, config.eval.kbs)  # as `denseflow evaluate` chooses it
                nats = score_images(model, testset.images, config.eval.batch_size, k, kbs, cfg.seed)
                bpd = to_bits_per_dim(model, nats)
                row[f"{name}_bpd"] = bpd.mean().item()
                if average is None:
                    trained[name] = bpd
                else:  # paired over the images: average minus trained weights
                    row[f"{name}_minus_trained"] = (bpd - trained[name]).mean().item()
                    row[f"{name}_minus_trained_sem"] = standard_error(bpd - trained[name])
        rows.append(row)
        print(json.dumps(row), flush=True)
    report = {
        "preset": a.preset,
        "overrides": a.overrides,
        "steps": summary["step"],
        "test_images": len(testset.images),
        "bn_recalibrate": cfg.bn_recalibrate,
        "train_seconds": round(train_wall, 1),
        "run_test_bpd": summary["test_bpd"],
        "rows": rows,
    }
    text = json.dumps(report, indent=1)
    (a.out / "average_check.json").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
