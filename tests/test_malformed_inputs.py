"""Every malformed input of docs/reliability.md: one line naming what and where, exit code 2.

Each case builds its bad input in a temporary folder and runs the command line; the message
must contain the documented text, stay on one line and show no traceback.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import pickle
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from denseflow import checkpoint as ckpt
from denseflow.cli import main

from .conftest import PARITY_DIRS, needs_fixtures

TINY = ["train", "--preset", "tiny", "--quiet"]


def _idx(folder, images: bytes, magic: int = 2051, count: int = 2):
    folder.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">IIII", magic, count, 28, 28)
    for split in ("train", "t10k"):
        (folder / f"{split}-images-idx3-ubyte.gz").write_bytes(gzip.compress(header + images))
    return folder


def _checkpoint(tmp):
    path = tmp / "ours.pt"
    config = ckpt.RunConfig.from_dict({"model": {"preset": "cifar10"}}).override(
        [
            "model.block_conf=[1,1]",
            "model.layers_conf=[1,1]",
            "model.layer_mid_chnls=[4,4]",
            "model.growth_rate=2",
        ]
    )
    ckpt.export(path, ckpt.DenseFlow(config.model), config)
    return path


def _evil_pickle(tmp, marker):
    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    return Payload()


CASES = {
    "unknown preset": (lambda t: ["train", "--preset", "nope"], "unknown preset 'nope'"),
    "unknown override key": (lambda t: [*TINY, "--set", "train.lrr=1"], "unknown key 'train.lrr'"),
    "unknown override section": (
        lambda t: [*TINY, "--set", "optim.lr=1"],
        "unknown section 'optim'",
    ),
    "override without =": (lambda t: [*TINY, "--set", "train.lr"], "expected section.key=value"),
    "wrongly typed value": (
        lambda t: [*TINY, "--set", "train.epochs=abc"],
        "train.epochs='abc': expected int",
    ),
    "unparsable value": (lambda t: [*TINY, "--set", "train.epochs=[1"], "cannot parse the value"),
    "odd growth rate": (
        lambda t: [*TINY, "--set", "model.growth_rate=3"],
        "model.growth_rate=3: must be even",
    ),
    "image size the squeezes cannot take": (
        lambda t: [*TINY, "--set", "model.image_shape=[1,28,30]"],
        "H and W must be divisible by 2**scales = 4",
    ),
    "negative learning rate": (
        lambda t: [*TINY, "--set", "train.lr=-1"],
        "train.lr=-1.0: must be > 0",
    ),
    "one beta": (
        lambda t: [*TINY, "--set", "train.betas=[0.9]"],
        "train.betas=[0.9]: expected 2 values",
    ),
    "unknown augmentation": (
        lambda t: [*TINY, "--set", "data.augmentation=rotate"],
        "data.augmentation='rotate'",
    ),
    "unknown attention kind": (
        lambda t: [*TINY, "--set", "model.attention=full"],
        "model.attention='full'",
    ),
    "missing config file": (
        lambda t: ["train", "--preset", str(t / "none.yaml")],
        "none.yaml: no such config file",
    ),
    "malformed YAML": (
        lambda t: ["train", "--preset", str(_write(t / "bad.yaml", "train: {epochs: [1, \n"))],
        "malformed YAML",
    ),
    "config that is not a mapping": (
        lambda t: ["train", "--preset", str(_write(t / "list.yaml", "- 1\n- 2\n"))],
        "expected a mapping of sections",
    ),
    "missing dataset folder": (
        lambda t: [
            *TINY,
            "--set",
            "data.dataset=cifar10",
            "--set",
            "model.image_shape=[3,32,32]",
            "--data-dir",
            str(t),
        ],
        "no dataset files found",
    ),
    "truncated IDX file": (
        lambda t: [*TINY, "--data-dir", str(_idx(t / "fm", bytes(784)))],
        "truncated",
    ),
    "wrong IDX magic number": (
        lambda t: [*TINY, "--data-dir", str(_idx(t / "fm", bytes(2 * 784), magic=2049))],
        "magic",
    ),
    "empty image folder": (
        lambda t: [
            *TINY,
            "--set",
            "data.dataset=folder",
            "--data-dir",
            str(_mkdir(t / "empty" / "train").parent),
        ],
        "empty",
    ),
    "non-image file in an image folder": (
        lambda t: [
            *TINY,
            "--set",
            "data.dataset=folder",
            "--data-dir",
            str(_write(_mkdir(t / "f" / "train") / "a.png", "x").parent.parent),
        ],
        "a.png",
    ),
    "missing checkpoint": (
        lambda t: ["sample", "--checkpoint", str(t / "gone.pt")],
        "gone.pt: no such checkpoint",
    ),
    "truncated checkpoint": (
        lambda t: ["sample", "--checkpoint", str(_truncate(_checkpoint(t)))],
        "not a readable denseflow checkpoint",
    ),
    "altered checkpoint": (
        lambda t: ["sample", "--checkpoint", str(_alter(_checkpoint(t)))],
        "damaged (its contents do not match the checksum it carries)",
    ),
    "foreign torch file": (
        lambda t: ["sample", "--checkpoint", str(_save(t / "foreign.pt", {"state_dict": {}}))],
        "not a denseflow checkpoint",
    ),
    "resume without checkpoints": (
        lambda t: ["train", "--resume", str(_mkdir(t / "run"))],
        "no checkpoints/step_*.pt to resume from",
    ),
    "training into an existing run": (
        lambda t: [*TINY, "--out", str(_fake_run(t))],
        "already holds a run's checkpoints",
    ),
    "malformed seeds": (
        lambda t: ["sample", "--checkpoint", str(_checkpoint(t)), "--seeds", "a-b"],
        "seeds 'a-b'",
    ),
    "k below 1": (
        lambda t: [
            "evaluate",
            "--checkpoint",
            str(_checkpoint(t)),
            "--k",
            "0",
            "--data-dir",
            str(t),
        ],
        "--k must be >= 1, got 0",
    ),
    "args.pickle that runs code": (
        lambda t: [
            "import-official",
            str(t),
            "--args",
            str(_evil_args(t)),
            "--out",
            str(t / "o.pt"),
        ],
        "refusing",
    ),
    "args.json that is not an object": (
        lambda t: [
            "import-official",
            str(_write(t / "c.pt", "not read before the flags")),
            "--args",
            str(_write(t / "a.json", "[1]")),
            "--out",
            "o.pt",
        ],
        "expected a JSON object of official flags",
    ),
    "unknown compile backend": (
        lambda t: [*TINY, "--set", "train.compile=true", "--set", "train.compile_backend=nope"],
        "train.compile_backend='nope': expected one of",
    ),
    "compile mode without inductor": (
        lambda t: [
            *TINY,
            "--set",
            "train.compile_mode=reduce-overhead",
            "--set",
            "train.compile_backend=cudagraphs",
        ],
        "a mode of the inductor backend only",
    ),
    "device that does not exist": (
        lambda t: ["bench", "--preset", "tiny", "--device", "tpu"],
        "device 'tpu': not a torch device",
    ),
    "malformed line inside a run's log": (
        lambda t: ["train", "--quiet", "--resume", str(_run_with_a_malformed_log_line(t))],
        "logged/metrics.jsonl, line 3: malformed record (Expecting value",
    ),
    "image folder without train/ and test/": (
        lambda t: [
            *TINY,
            "--set",
            "data.dataset=folder",
            "--data-dir",
            str(_write(_mkdir(t / "flat") / "a.png", "x").parent),
        ],
        "a folder without train/ and test/ subfolders has no held-out test images",
    ),
    "sample no images": (
        lambda t: ["sample", "--checkpoint", str(_checkpoint(t)), "--num", "0"],
        "sample: --num must be >= 1, got 0",
    ),
    "sample a negative number": (
        lambda t: ["sample", "--checkpoint", str(_checkpoint(t)), "--num", "-5"],
        "sample: --num must be >= 1, got -5",
    ),
    "sample grid rows 0": (
        lambda t: ["sample", "--checkpoint", str(_checkpoint(t)), "--nrow", "0"],
        "sample: --nrow must be >= 1, got 0",
    ),
    "negative temperature": (
        lambda t: ["sample", "--checkpoint", str(_checkpoint(t)), "--temperature", "-1"],
        "sample: --temperature must be >= 0, got -1.0",
    ),
    "empty seed list": (
        lambda t: ["sample", "--checkpoint", str(_checkpoint(t)), "--seeds", ""],
        "--seeds '': expected e.g. 0-63 or 1,5,9",
    ),
    "reversed seed range": (
        lambda t: ["sample", "--checkpoint", str(_checkpoint(t)), "--seeds", "5-2"],
        "--seeds '5-2': the range 5-2 is reversed",
    ),
    "architecture change on resume": (
        lambda t: ["train", "--resume", str(_tiny_run(t)), "--set", "model.growth_rate=4"],
        "--resume: model.growth_rate was 2 in the checkpoint, now 4; a run keeps its "
        "architecture and dataset: start a new run (another --out)",
    ),
    "unknown dataset in a dry run": (
        lambda t: [*TINY, "--set", "data.dataset=nope", "--dry-run"],
        "data.dataset='nope': expected one of ('cifar10', 'imagenet32', 'imagenet64', 'celeba', "
        "'mnist', 'fashion_mnist', 'folder')",
    ),
    "import a missing path": (
        lambda t: ["import-official", str(t / "nothing.pt"), "--out", str(t / "o.pt")],
        "nothing.pt: no such file or folder",
    ),
    "import one of our own checkpoints": (
        lambda t: ["import-official", str(_checkpoint(t)), "--out", str(t / "o.pt")],
        "ours.pt is already a denseflow checkpoint: use it as it is (--checkpoint)",
    ),
    "checkpoint that does not exist": (
        lambda t: ["evaluate", "--checkpoint", str(t / "nowhere")],
        "nowhere: no such checkpoint, model folder, run folder or published model",
    ),
    "run folder that is a file": (
        lambda t: [*TINY, "--out", str(_write(t / "taken", "x"))],
        "taken: is a file, not a folder",
    ),
    "sample folder that is a file": (
        lambda t: [
            "sample",
            "--checkpoint",
            str(_checkpoint(t)),
            "--each-dir",
            str(_write(t / "taken", "x")),
        ],
        "taken: is a file, not a folder",
    ),
    "output file below a file": (
        lambda t: [
            "sample",
            "--checkpoint",
            str(_checkpoint(t)),
            "--out",
            str(_write(t / "taken", "x") / "grid.png"),
        ],
        "taken is a file, not a folder",
    ),
    "device this torch cannot use": (
        lambda t: [*TINY, "--out", str(t / "run"), "--set", "train.device=xpu"],
        "device 'xpu': this torch",
    ),
    "bench without timed steps": (
        lambda t: ["bench", "--preset", "tiny", "--steps", "0"],
        "bench: --steps must be >= 1, got 0",
    ),
    "infinite learning rate": (
        lambda t: [*TINY, "--out", str(t / "run"), "--set", "train.lr=inf"],
        "train.lr=inf: must be a finite number",
    ),
    "infinite temperature": (
        lambda t: ["sample", "--checkpoint", str(_checkpoint(t)), "--temperature", "inf"],
        "sample: --temperature must be finite, got inf",
    ),
    "official run folder without its flags": (
        lambda t: ["import-official", str(_mkdir(t / "official")), "--out", str(t / "o.pt")],
        "args.pickle: no such file (the official run's flags: --args args.pickle|args.json)",
    ),
    "grid larger than Pillow opens": (
        lambda t: ["sample", "--checkpoint", str(_checkpoint(t)), "--seeds", "0-29999"],
        "sample: a grid of 30,000 images would be 786 x 367,502 pixels, more than Pillow opens",
    ),
    "no grid and no folder": (
        lambda t: ["sample", "--checkpoint", str(_checkpoint(t)), "--no-grid"],
        "sample: --no-grid without --each-dir would write nothing",
    ),
    "image folder to score that does not exist": (
        lambda t: ["evaluate", "--checkpoint", str(_checkpoint(t)), "--images", str(t / "mine")],
        "/mine: no such folder",
    ),
    "malformed list of k": (
        lambda t: ["evaluate", "--checkpoint", str(_checkpoint(t)), "--k", "1,x"],
        "evaluate: --k '1,x': expected a number of samples or a list such as 1,10,100",
    ),
    "weight average decay of 1": (
        lambda t: [*TINY, "--out", str(t / "run"), "--set", "train.ema_decay=1"],
        "train.ema_decay=1.0: must lie in [0, 1) (0 = off)",
    ),
    "weight average with running BatchNorm statistics": (
        lambda t: [
            *TINY,
            "--out",
            str(t / "run"),
            "--set",
            "train.ema_decay=0.999",
            "--set",
            "train.bn_recalibrate=0",
        ],
        "train.ema_decay=0.999 needs train.bn_recalibrate > 0",
    ),
    "malformed list of temperatures": (
        lambda t: ["sample", "--checkpoint", str(_checkpoint(t)), "--temperature", "0.5,hot"],
        "sample: --temperature '0.5,hot': expected a number or a list such as 0.5,0.7,1",
    ),
    "negative validation set": (
        lambda t: [*TINY, "--out", str(t / "run"), "--set", "data.validation=-1"],
        "data.validation=-1: must be >= 0",
    ),
    "validation set of every training image": (
        lambda t: [*TINY, "--out", str(t / "run"), "--set", "data.validation=64"],
        "fashion_mnist: data.validation=64 must leave training images: between 1 and 63 of the "
        "64 read",
    ),
    "validation split of a run without one": (
        lambda t: ["evaluate", "--checkpoint", str(_checkpoint(t)), "--split", "validation"],
        "split 'validation': the run held no training images out (data.validation=0)",
    ),
    "test-set index for a run without a test set": (
        lambda t: [
            "interpolate",
            "--checkpoint",
            str(_plain_folder_run(t)),
            "--a",
            "0",
            "--b",
            "1",
        ],
        "so it has no test set; its held-out images: --split validation",
    ),
    "index beyond the held-out images": (
        lambda t: [
            "interpolate",
            "--checkpoint",
            str(_plain_folder_run(t)),
            "--split",
            "validation",
            "--a",
            "0",
            "--b",
            "8",
        ],
        "interpolate: --b 8: out of range: the run has 8 validation images",
    ),
    "resume from weights alone": (
        lambda t: ["train", "--resume", str(_checkpoint(t)), "--out", str(t / "run")],
        "weights without the optimizer's state (final.pt, best.pt, an export), not a training "
        "checkpoint: --resume the run folder or a checkpoints/step_*.pt",
    ),
    "resume into another run's folder": (
        lambda t: [
            "train",
            "--resume",
            str(_tiny_run(t / "a") / "checkpoints" / "step_0000004.pt"),
            "--out",
            str(_tiny_run(t / "b")),
        ],
        "which holds another run (final.pt, checkpoints, metrics.jsonl): continue it in its own "
        "folder",
    ),
    "preset that does not fit the resumed run": (
        lambda t: ["train", "--preset", "demo", "--resume", str(_tiny_run(t / "a"))],
        "--resume: model.block_conf was (2, 1) in the checkpoint, now (3, 2)",
    ),
    "resume on other training images": (
        lambda t: [
            "train",
            "--resume",
            str(_tiny_run(t / "a", "--data-dir", str(_image_folder(t / "one", 0)))),
            "--data-dir",
            str(_image_folder(t / "two", 1)),
            "--set",
            "train.epochs=2",
        ],
        "data.json records (",
    ),
    "resume on another number of other training images": (
        lambda t: [
            "train",
            "--resume",
            str(_tiny_run(t / "a", "--data-dir", str(_image_folder(t / "one", 0)))),
            "--data-dir",
            str(_image_folder(t / "two", 1, count=48)),
            "--set",
            "train.epochs=2",
        ],
        "data.json records (",
    ),
    "colour test images for a grey model": (
        lambda t: [
            *TINY,
            "--out",
            str(t / "run"),
            "--data-dir",
            str(_image_folder(t / "mixed", 0, test_mode="RGB")),
            "--set",
            "data.dataset=folder",
        ],
        "mixed/test/00.png: a colour image (mode RGB), the model takes greyscale images (1 "
        "channel)",
    ),
    "bench report below a file": (
        lambda t: ["bench", "--preset", "tiny", "--json", str(_write(t / "taken", "x") / "r.json")],
        "taken is a file, not a folder",
    ),
    "device that computes no values": (
        lambda t: ["sample", "--checkpoint", str(_checkpoint(t)), "--device", "meta"],
        "device 'meta': this torch",
    ),
    "more seeds than one command samples": (
        lambda t: ["sample", "--checkpoint", str(_checkpoint(t)), "--seeds", "0-99999999999"],
        "--seeds '0-99999999999': 100,000,000,000 seeds, more than the 1,000,000 one command "
        "samples",
    ),
    "grid file not named .png": (
        lambda t: ["sample", "--checkpoint", str(_checkpoint(t)), "--out", str(t / "g.txt")],
        "g.txt: expected a .png file name",
    ),
    "strip file without an extension": (
        lambda t: ["interpolate", "--checkpoint", str(_checkpoint(t)), *AB, "--out", "strip"],
        "--out strip: expected a .png file name",
    ),
    "strip larger than Pillow opens": (
        lambda t: ["interpolate", "--checkpoint", str(_checkpoint(t)), *AB, "--scale", "400"],
        "interpolate: a strip of 8 images would be 102,418 x 12,804 pixels, more than Pillow opens",
    ),
    "image larger than Pillow opens": (
        lambda t: ["evaluate", "--checkpoint", str(_checkpoint(t)), "--images", str(_huge(t))],
        "huge/a.png: not a readable image (more than the 178,956,970 pixels Pillow opens)",
    ),
    "superscript digit as an index": (
        lambda t: ["interpolate", "--checkpoint", str(_checkpoint(t)), "--a", "\u00b2", *AB[2:]],
        "interpolate: --a \u00b2: no such image file",
    ),
    "Arabic-Indic digit as an index": (
        lambda t: ["interpolate", "--checkpoint", str(_checkpoint(t)), "--a", "\u0661", *AB[2:]],
        "interpolate: --a \u0661: no such image file",
    ),
    "checkpoint output that is a symbolic link": (
        lambda t: ["recalibrate", "--checkpoint", str(_checkpoint(t)), "--out", str(_link(t))],
        "link.pt: a symbolic link, not a regular file; writing a checkpoint would replace it",
    ),
    "checkpoint output that is a named pipe": (
        lambda t: [
            "import-official",
            str(_write(t / "c.pt", "not read before --out is checked")),
            "--args",
            str(_write(t / "a.json", "[1]")),
            "--out",
            str(_fifo(t / "pipe.pt")),
        ],
        "pipe.pt: a named pipe, not a regular file; writing a checkpoint would replace it",
    ),
    "report into a folder without write permission": (
        lambda t: ["evaluate", "--checkpoint", str(_checkpoint(t)), "--json", str(_locked(t))],
        "locked/r.json: cannot write (Permission denied)",
    ),
    "YAML section that is not a mapping": (
        lambda t: ["train", "--preset", str(_write(t / "list.yaml", "train: [1, 2]\n"))],
        "list.yaml: section 'train': expected a mapping of train.* keys, got list",
    ),
    "YAML config that is not UTF-8": (
        lambda t: ["train", "--preset", str(_write_bytes(t / "u16.yaml", b"\xff\xfetrain: {}"))],
        "u16.yaml: not UTF-8 text (invalid start byte at byte 0)",
    ),
    "unknown key in a YAML config": (
        lambda t: ["train", "--preset", str(_write(t / "key.yaml", "train: {lrr: 1}\n"))],
        "key.yaml: unknown key(s) train.lrr",
    ),
    "official flag of the wrong type": (
        lambda t: _import_with_flags(t, block_conf="abc"),
        "a.json: flag block_conf='abc': expected a list of integers",
    ),
    "official flags with an odd growth rate": (
        lambda t: _import_with_flags(t, growth_rate=3),
        "a.json: growth_rate=3: must be even and >= 0",
    ),
    "official flags without the architecture": (
        lambda t: _import_with_flags(t, block_conf=None),
        "a.json: missing the flags ['block_conf']",
    ),
    "folder without a model": (
        lambda t: ["sample", "--checkpoint", str(_mkdir(t / "nothing"))],
        "nothing: not a model: found no final.pt, config.json with model.safetensors, or "
        "checkpoints/step_*.pt in it",
    ),
    "folder of training checkpoints": (
        lambda t: ["evaluate", "--checkpoint", str(_fake_run(t) / "checkpoints")],
        "run/checkpoints: a folder of training checkpoints: give one of them, e.g. ",
    ),
    "empty checkpoint name": (
        lambda t: ["sample", "--checkpoint", ""],
        "'': no such checkpoint, model folder, run folder or published model",
    ),
    "image file given as the folder to score": (
        lambda t: [
            "evaluate",
            "--checkpoint",
            "fashion-mnist",
            "--images",
            str(_grey(t / "a.png")),
        ],
        "a.png: a file; give the folder of images to score",
    ),
    "folder to score holding only subfolders": (
        lambda t: [
            "evaluate",
            "--checkpoint",
            "fashion-mnist",
            "--images",
            str(_grey(t / "f" / "train" / "a.png").parent.parent),
        ],
        "f: no images, only subfolders, which are not read: train/",
    ),
    "colour image for a greyscale model": (
        lambda t: [
            "evaluate",
            "--checkpoint",
            "fashion-mnist",
            "--images",
            str(_colour(_grey(t / "mix" / "a.png").with_name("b.jpg")).parent),
        ],
        "mix/b.jpg: a colour image (mode RGB), the model takes greyscale images (1 channel)",
    ),
    "image folder given as a run's dataset folder": (
        lambda t: [
            "evaluate",
            "--checkpoint",
            "fashion-mnist",
            "--data-dir",
            str(_grey(t / "pngs" / "a.png").parent),
        ],
        "or score them as they are (denseflow evaluate --images ",
    ),
    "importance samples per pass without k": (
        lambda t: ["evaluate", "--checkpoint", "fashion-mnist", "--kbs", "4"],
        "evaluate: --kbs is for IWBO (--k); the ELBO draws one sample per image",
    ),
    "split together with images to score": (
        lambda t: ["evaluate", "--checkpoint", "x", "--images", str(t), "--split", "train"],
        "evaluate: --split chooses the run's images; --images scores a folder of its own",
    ),
    "data folder together with images to score": (
        lambda t: ["evaluate", "--checkpoint", "x", "--images", str(t), "--data-dir", str(t)],
        "evaluate: --data-dir chooses the run's images; --images scores a folder of its own",
    ),
    "ablation budget that is not a number": (
        lambda t: ["experiment", "ablation", "--quick", "--budget-minutes", "nan"],
        "--budget-minutes nan: expected a positive, finite number of minutes",
    ),
    "infinite ablation budget": (
        lambda t: ["experiment", "ablation", "--quick", "--budget-minutes", "inf"],
        "--budget-minutes inf: expected a positive, finite number of minutes",
    ),
    "bench measuring nothing": (
        lambda t: ["bench", "--preset", "tiny", "--what", ","],
        "bench: --what ',': names nothing (a comma-separated list)",
    ),
    "ablation of no variants": (
        lambda t: ["experiment", "ablation", "--quick", "--variants", ","],
        "experiment: --variants ',': names nothing (a comma-separated list)",
    ),
    "temperatures that share a file name": (
        lambda t: [
            "sample",
            "--checkpoint",
            "fashion-mnist",
            "--temperature",
            "0.1234567,0.1234568",
            "--each-dir",
            str(t / "each"),
        ],
        "sample: --temperature 0.1234567 and 0.1234568 would both write seed*_t0.123457.png in "
        "--each-dir: give temperatures that differ in their first 6 digits",
    ),
    "split for two image files": (
        lambda t: ["interpolate", "--checkpoint", str(_checkpoint(t)), *AB, "--split", "train"],
        "interpolate: --split train chooses what an index counts in; --a and --b are files",
    ),
    "link to nothing in a folder of images": (
        lambda t: [
            "evaluate",
            "--checkpoint",
            "fashion-mnist",
            "--images",
            str(_dangling(_grey(t / "pics" / "a.png").with_name("b.png")).parent),
        ],
        "pics: b.png is a link to nothing (1 such)",
    ),
    "experiment into a training run's folder": (
        lambda t: ["experiment", "ablation", "--quick", "--out", str(_tiny_run(t / "run"))],
        "/run: a training run's folder (final.pt, checkpoints, metrics.jsonl): choose another "
        "--out",
    ),
    "weights over a training checkpoint": (
        lambda t: [
            "recalibrate",
            "--checkpoint",
            str(_tiny_run(t / "run") / "checkpoints" / "step_0000004.pt"),
            "--out",
            str(t / "run" / "checkpoints" / "step_0000004.pt"),
        ],
        "step_0000004.pt: a training checkpoint; weights written over it would lose its "
        "optimizer state (a resume needs it): choose another name",
    ),
}

AB = ["--a", "a.png", "--b", "b.png"]  # files not read before --out and the strip are checked


def _write(path, text):
    path.write_text(text)
    return path


def _write_bytes(path, data):
    path.write_bytes(data)
    return path


def _grey(path):
    _mkdir(path.parent)
    Image.new("L", (28, 28), 100).save(path)
    return path


def _dangling(path):
    path.symlink_to(path.with_name("gone.png"))
    return path


def _colour(path):
    Image.new("RGB", (28, 28), (200, 30, 30)).save(path)
    return path


def _import_with_flags(tmp, **changes):
    flags = {
        "dataset": "cifar10",
        "block_conf": [1, 1],
        "layers_conf": [1, 1],
        "layer_mid_chnls": [4, 4],
        "growth_rate": 2,
    }
    flags = {k: v for k, v in (flags | changes).items() if v is not None}
    args = _write(tmp / "a.json", json.dumps(flags))
    checkpoint = _write(tmp / "c.pt", "not read before the flags")
    return ["import-official", str(checkpoint), "--args", str(args), "--out", str(tmp / "o.pt")]


def _mkdir(path):
    path.mkdir(parents=True, exist_ok=True)
    return path


def _save(path, value):
    torch.save(value, path)
    return path


def _truncate(path):
    path.write_bytes(path.read_bytes()[:500])
    return path


def _alter(path):
    payload = torch.load(path, weights_only=True)
    payload["model"]["base.loc"] += 1
    torch.save(payload, path)
    return path


def _fake_run(tmp):
    run = tmp / "run"
    ckpt.save(run / "checkpoints" / "step_0000001.pt", {"step": 1})
    return run


def _tiny_run(tmp):
    run = tmp / "tiny"
    assert main([*TINY, "--out", str(run), "--set", "train.epochs=1"]) == 0
    return run


def _tiny_run(run, *flags):
    """A finished one-epoch run of the tiny preset (4 steps, checkpoints at 3 and 4)."""
    dataset = ["--set", "data.dataset=folder"] if flags else []
    argv = [*TINY, "--out", str(run), "--set", "train.epochs=1", *flags, *dataset]
    assert main(argv) == 0
    return run


def _image_folder(root, seed, test_mode="L", count=64):
    """train/ (``count`` grey images) and test/ (8, of ``test_mode``) of random pixels."""
    rng = np.random.default_rng(seed)
    for split, images, mode in (("train", count, "L"), ("test", 8, test_mode)):
        (root / split).mkdir(parents=True)
        for i in range(images):
            pixels = rng.integers(0, 256, (28, 28) if mode == "L" else (28, 28, 3), np.uint8)
            Image.fromarray(pixels).save(root / split / f"{i:02d}.png")
    return root


def _plain_folder_run(tmp):
    folder = tmp / "mine"
    folder.mkdir()
    for i in range(24):
        Image.new("L", (28, 28), 10 * i).save(folder / f"{i:02d}.png")
    run = tmp / "plain"
    argv = [*TINY, "--data-dir", str(folder), "--out", str(run), "--set", "data.dataset=folder"]
    assert main([*argv, "--set", "data.validation=8", "--set", "train.epochs=1"]) == 0
    return run


def _run_with_a_malformed_log_line(tmp):
    run = tmp / "logged"
    assert main([*TINY, "--out", str(run), "--set", "train.epochs=1"]) == 0
    lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    lines[2] = '{"kind": "train", "step": 3, "bpd": nan oops}\n'
    (run / "metrics.jsonl").write_text("".join(lines))
    return run


def _huge(tmp):
    """A folder holding a PNG whose header says 20,000 x 20,000 pixels (Pillow refuses it by its
    header; the data would not even decode)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", 20_000, 20_000, 1, 0, 0, 0, 0))
    png = b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    (_mkdir(tmp / "huge") / "a.png").write_bytes(png)
    return tmp / "huge"


def _link(tmp):
    (tmp / "link.pt").symlink_to(_write(tmp / "target.pt", "not to be replaced"))
    return tmp / "link.pt"


def _fifo(path):
    os.mkfifo(path)
    return path


def _locked(tmp):
    """An output file in a folder that takes no new files (permissions do not bind root)."""
    if os.geteuid() == 0:
        pytest.skip("root writes into a read-only folder")
    _mkdir(tmp / "locked").chmod(0o500)
    return tmp / "locked" / "r.json"


def _evil_args(tmp):
    path = tmp / "args.pickle"
    marker = tmp / "ran"
    path.write_bytes(
        pickle.dumps(argparse.Namespace(dataset="cifar10", hook=_evil_pickle(tmp, marker)))
    )
    return path


@pytest.mark.parametrize("case", list(CASES))
def test_malformed_input(case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    build, expected = CASES[case]
    argv = build(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert expected in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "ran").exists()  # no payload ever runs
    assert sorted(tmp_path.rglob("*")) == before  # nothing written


def test_cuda_without_a_gpu_is_one_line_and_creates_no_run(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    run = tmp_path / "run"
    assert main([*TINY, "--out", str(run), "--set", "train.device=cuda"]) == 2
    err = capsys.readouterr().err
    assert "device 'cuda': this torch" in err and "sees no CUDA GPU" in err and err.count("\n") == 1
    assert not run.exists()


def test_the_documented_table_lists_every_case():
    from .conftest import REPO

    text = (REPO / "docs" / "reliability.md").read_text()
    rows = [
        line
        for line in text.splitlines()
        if line.startswith("| ") and "`test_malformed_input[" in line
    ]
    assert len(rows) == len(CASES) >= 25
    for case, (_, expected) in CASES.items():
        assert any(f"[{case}]" in row and expected.replace("|", "\\|") in row for row in rows), case


@needs_fixtures
def test_checkpoint_of_another_architecture(tmp_path, capsys):
    flags = json.loads((PARITY_DIRS[0] / "args.json").read_text())
    out = tmp_path / "o.pt"
    assert (
        main(
            [
                "import-official",
                str(PARITY_DIRS[0] / "checkpoint.pt"),
                "--args",
                str(_write(tmp_path / "a.json", json.dumps({**flags, "growth_rate": 6}))),
                "--out",
                str(out),
            ]
        )
        == 2
    )
    assert "has shape" in capsys.readouterr().err and not out.exists()


def test_images_of_the_wrong_size(tmp_path, capsys):
    rng = np.random.default_rng(0)
    folder = _mkdir(tmp_path / "imgs")
    Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).save(folder / "a.png")
    argv = [
        *TINY,
        "--set",
        "data.dataset=cifar10",
        "--set",
        "model.image_shape=[3,64,64]",
        "--data-dir",
        str(folder),
    ]
    assert main(argv) == 2
    assert capsys.readouterr().err.count("\n") == 1
