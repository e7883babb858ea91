"""``denseflow`` command line: one thin subcommand per library verb, no logic of its own.

Bad input is reported as one line on stderr with exit code 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch
import yaml

from . import __version__, distributed
from . import checkpoint as ckpt
from .config import ConfigError, RunConfig, load_config, preset_names
from .errors import DenseFlowError
from .runlog import to_json

CHECKPOINT_HELP = (
    "a checkpoint (.pt), a run folder, a save_pretrained folder, a published model's name "
    "(fashion-mnist) or, with huggingface_hub, a Hub repository id"
)
NO_GRAPH_HELP = "on a GPU: run the model's calls eagerly instead of replaying CUDA graphs"
DEVICE_HELP = "auto (CUDA when available), cpu, cuda or cuda:N"
SCALE_HELP = "show each pixel as SCALE x SCALE (default: a 28 px image at 84 px or more)"
BESIDE_HELP = (
    "beside the checkpoint file; for a run folder, in it (beside its final.pt); for a published "
    "model or a save_pretrained folder, in the current folder"
)
QUIET_HELP = (
    "no progress bars and no notes (how many images were resized, a partial evaluation "
    "continued); warnings and errors still print"
)

EXAMPLES = {
    "train": """examples:
  denseflow train --preset demo --out runs/demo
  denseflow train --preset cifar10 --data-dir ~/data --out runs/cifar10
  denseflow train --preset tiny --set train.epochs=3 --set model.growth_rate=4 --dry-run
  denseflow train --resume runs/cifar10                       # continue where it stopped
  denseflow train --resume runs/cifar10 --set train.finetune_epochs=40
  torchrun --nproc_per_node=4 --max-restarts=3 -m denseflow train --preset cifar10 --resume auto""",
    "evaluate": """examples:
  denseflow evaluate --checkpoint runs/demo/final.pt                    # test ELBO bits/dim
  denseflow evaluate --checkpoint runs/cifar10/final.pt --data-dir ~/data --k 1000 --kbs 50
  denseflow evaluate --checkpoint published.pt --data-dir ~/data --double --json out.json
  denseflow evaluate --checkpoint runs/demo/final.pt --terms            # where the bits go
  denseflow evaluate --checkpoint runs/demo/final.pt --k 1,10,100 --kbs 10  # IWBO as k grows""",
    "sample": (
        "examples:\n"
        "  denseflow sample --checkpoint runs/demo/final.pt --out samples.png\n"
        "  denseflow sample --checkpoint published.pt --seeds 0-63 --temperature 0.8 --out grid.png"
        " --each-dir samples/\n"
        "  denseflow sample --checkpoint fashion-mnist --seeds 0-9 --temperature 0,0.5,0.7,0.9,1"
        "  # a row per temperature"
    ),
    "bench": (
        "examples:\n"
        "  denseflow bench --preset cifar10 --batch-size 32 --steps 10 --warmup 2"
        " --json bench.json\n"
        "  denseflow bench --preset cifar10 --batch-size 8 --what sample --steps 5\n"
        "  denseflow bench --preset demo --what train,iwbo --k 16 --kbs 8\n"
        "  denseflow bench --preset cifar10 --batch-size 32 --steps 3 --what train,convs"
        "   # step vs its kernel ceiling"
    ),
    "experiment": (
        "examples:\n"
        "  denseflow experiment ablation --out runs/ablation"
        "                       # full Fashion-MNIST, ~2 h on 2 cores\n"
        "  denseflow experiment ablation --quick --out /tmp/ablation"
        "               # the pipeline on a tiny subset\n"
        "  denseflow experiment ablation --budget-minutes 30 --seeds 1 --variants denseflow,glow"
    ),
    "interpolate": (
        "examples:\n"
        "  denseflow interpolate --checkpoint runs/demo/final.pt --a 0 --b 7 --steps 10\n"
        "  denseflow interpolate --checkpoint fashion-mnist --a shoe.png --b bag.png"
        " --out strip.png\n"
        "  denseflow interpolate --checkpoint runs/mine --split validation --a 0 --b 1"
        "   # a folder run's held-out images"
    ),
    "recalibrate": (
        "examples:\n"
        "  denseflow recalibrate --checkpoint runs/demo/checkpoints/step_0001200.pt"
        " --out recalibrated.pt\n"
        "  denseflow recalibrate --checkpoint published_cifar10.pt --data-dir ~/data --batches 200"
        " --out cifar10_recal.pt"
    ),
    "import-official": (
        "examples:\n"
        "  denseflow import-official ~/official/cifar10_run --out published.pt"
        "          # args.pickle read safely\n"
        "  denseflow import-official checkpoint.pt --args args.json --out published.pt"
    ),
}


class _Help(argparse.RawDescriptionHelpFormatter):
    """Examples kept as written; every option's default shown (unless it has none: None,
    False or an empty list; a default of 0 is shown)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        none = default is None or default is False or default in (argparse.SUPPRESS, [])
        if not none and "default" not in text:
            text += " (default: %(default)s)"
        return text


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="denseflow",
        description="DenseFlow: train, evaluate (bits/dim), sample, load published weights.",
    )
    debug = "show tracebacks instead of one-line errors"
    parser.add_argument("--debug", action="store_true", help=debug)
    parser.add_argument(
        "--version",
        action="version",
        version=f"denseflow {__version__} (torch {torch.__version__})",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name, help=help_, description=help_, epilog=EXAMPLES[name], formatter_class=_Help
        )
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug)
        return p

    p = command("train", "Train DenseFlow with a preset recipe or a YAML config.")
    p.add_argument("--preset", help=f"preset name ({', '.join(preset_names())}) or a YAML file")
    p.add_argument("--data-dir", help="folder holding the dataset (or its usual top folder)")
    p.add_argument("--out", help="run directory (default: runs/<preset>)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override, e.g. train.lr=2e-4",
    )
    p.add_argument(
        "--resume",
        help="run directory or checkpoint to continue from; 'auto': continue --out if it holds "
        "a checkpoint, else start it from --preset (for torchrun --max-restarts)",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="print the resolved configuration and exit"
    )
    p.add_argument("--quiet", action="store_true", help=QUIET_HELP)

    p = command(
        "evaluate",
        "Bits/dim of a model on the run's test set or a folder of images: ELBO, or IWBO-k "
        "with --k; the mean, and per image with --per-image.",
    )
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument("--data-dir", help="folder holding the dataset (default: as in the run)")
    _split_option(p, "the run's test images, its training images, or those it held out")
    p.add_argument(
        "--images",
        help="score this folder of PNG/JPEG images instead of a dataset (its subfolders are not "
        "read)",
    )
    p.add_argument(
        "--per-image", metavar="CSV", help="also write every image's bits/dim to this CSV"
    )
    p.add_argument(
        "--k",
        help="importance samples per image (IWBO-k; default: ELBO); a list such as 1,10,100 "
        "scores IWBO-j of the first j of max(k) draws for each j, in one run of max(k)",
    )
    p.add_argument(
        "--kbs",
        type=int,
        help="importance samples per pass, with --k (default: the smaller of max(k) and the "
        "config's eval.kbs)",
    )
    p.add_argument(
        "--batch-size", type=int, help="images per batch (default: the config's eval.batch_size)"
    )
    p.add_argument("--limit", type=int, help="evaluate the first N images only")
    p.add_argument(
        "--terms",
        action="store_true",
        help="also split the ELBO into its summands (dequantization, each block's steps and "
        "cross-unit noise, transitions, base): where the bits go",
    )
    p.add_argument("--double", action="store_true", help="evaluate in float64")
    p.add_argument(
        "--seed", type=int, default=0, help="the noise draws (dequantization, importance samples)"
    )
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument(
        "--json",
        help="where to write the result (default: a name that says split, bound, k, limit and "
        f"precision, {BESIDE_HELP})",
    )
    p.add_argument("--no-cuda-graph", action="store_true", help=NO_GRAPH_HELP)
    p.add_argument("--quiet", action="store_true", help=QUIET_HELP)

    p = command("sample", "Sample images to a PNG grid and/or one PNG per seed.")
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument(
        "--num", type=int, default=64, help="number of images (seeds 0..num-1) unless --seeds"
    )
    p.add_argument("--seeds", help="e.g. 0-63 or 1,5,9: image i depends only on seed i")
    p.add_argument(
        "--temperature",
        default="1.0",
        help="scale of the latent draws (official: 1.0); a list such as 0,0.5,0.7,1 samples "
        "the same seeds at each, one grid row per temperature",
    )
    p.add_argument("--out", help=f"the grid's .png file (default: samples.png {BESIDE_HELP})")
    p.add_argument("--each-dir", help="also write one PNG per seed into this folder")
    p.add_argument(
        "--no-grid", action="store_true", help="no grid, only --each-dir's PNGs (many images)"
    )
    p.add_argument(
        "--nrow",
        type=int,
        help="images per row of the grid (default 8; the seeds with a list of temperatures)",
    )
    p.add_argument("--scale", type=int, help=SCALE_HELP)
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--quiet", action="store_true", help=QUIET_HELP)
    p.add_argument("--no-cuda-graph", action="store_true", help=NO_GRAPH_HELP)

    p = command(
        "interpolate",
        "Encode two images exactly, interpolate their latents (spherically), decode: a strip.",
    )
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument("--a", required=True, help="first image: a PNG/JPEG file or an index (--split)")
    p.add_argument("--b", required=True, help="last image: a PNG/JPEG file or an index (--split)")
    _split_option(p, "what an index counts in: the run's test, training or held-out images")
    p.add_argument("--steps", type=int, default=8, help="images in the strip, ends included")
    p.add_argument("--out", default="interpolation.png", help="the strip's .png file")
    p.add_argument("--data-dir", help="folder holding the dataset (default: as in the run)")
    p.add_argument("--seed", type=int, default=0, help="the encoding's noise draw")
    p.add_argument("--scale", type=int, help=SCALE_HELP)
    p.add_argument("--device", default="auto", help=DEVICE_HELP)

    p = command(
        "bench",
        "Time the training step, sampling and IWBO; report medians, img/s, GFLOP/s, peak memory.",
    )
    p.add_argument(
        "--preset", required=True, help="preset name or YAML file (the model to measure)"
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override, e.g. model.attention=multihead",
    )
    p.add_argument("--batch-size", type=int, default=32, help="images per measured step")
    p.add_argument("--steps", type=int, default=10, help="timed repetitions")
    p.add_argument("--warmup", type=int, default=2, help="untimed repetitions first")
    p.add_argument(
        "--what",
        default="train,sample,iwbo",
        help="comma-separated: train, sample, iwbo, convs (its convolutions alone), ops (the "
        "operators of a forward and backward pass, a proxy for GPU kernel launches, by name "
        "and by the module or autograd node running them)",
    )
    p.add_argument("--k", type=int, default=16, help="importance samples for the iwbo measurement")
    p.add_argument(
        "--kbs", type=int, default=8, help="importance samples per pass for the iwbo measurement"
    )
    p.add_argument(
        "--no-loops",
        action="store_true",
        help="iwbo without its baselines (k plain elbo calls, with and without autograd)",
    )
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--threads", type=int, help="torch.set_num_threads")
    p.add_argument("--json", help="write the report here as JSON")
    p.add_argument(
        "--profile",
        help="profile one more call of each measurement; write the operator tables here",
    )
    p.add_argument("--quiet", action="store_true", help=QUIET_HELP)

    p = command(
        "experiment",
        "Reproducible experiments. 'ablation': what the paper's ideas buy at equal budget; "
        "'peers': DenseFlow against normflows' Glow at equal budget (pip install "
        "'denseflow[peers]').",
    )
    p.add_argument("name", choices=["ablation", "peers"])
    p.add_argument(
        "--data-dir",
        help="Fashion-MNIST folder (default: the Debian package's, else the bundled subset)",
    )
    p.add_argument(
        "--out", help="output folder (default runs/NAME; rerun to continue an interrupted one)"
    )
    p.add_argument("--seeds", type=int, help="seeds per variant (default 2)")
    p.add_argument("--steps", type=int, help="training steps of 64 images per run (default 800)")
    p.add_argument(
        "--budget-minutes",
        type=float,
        help="derive --steps from a calibration to fit this wall-clock",
    )
    p.add_argument("--variants", help="comma-separated subset of the variants (default: all)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="a tiny subset and 3 steps: checks the pipeline in about a minute",
    )
    p.add_argument("--quiet", action="store_true", help=QUIET_HELP)

    p = command(
        "import-official",
        "Convert a published official DenseFlow checkpoint into a denseflow checkpoint.",
    )
    p.add_argument(
        "source", help="official run directory (args.pickle, check/checkpoint.pt) or checkpoint.pt"
    )
    p.add_argument("--args", help="the official flags: args.pickle (read safely) or args.json")
    p.add_argument("--out", required=True, help="denseflow checkpoint to write")

    p = command(
        "recalibrate",
        "Recompute a checkpoint's BatchNorm statistics on training images (exact population "
        "statistics for its weights as they are); write them as a new inference checkpoint.",
    )
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument("--data-dir", help="folder holding the dataset (default: as in the run)")
    p.add_argument("--batches", type=int, default=100, help="training batches to pool")
    p.add_argument("--batch-size", type=int, help="images per batch (default: train.batch_size)")
    p.add_argument("--seed", type=int, default=0, help="which images and noises")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--out", required=True, help="the checkpoint to write")
    p.add_argument("--quiet", action="store_true", help=QUIET_HELP)
    return parser


def _cmd_train(a: argparse.Namespace) -> int:
    from .train import check_start, run_folder, train

    state, resume = None, a.resume
    if resume == "auto":  # what a restarted torchrun group runs: continue if there is something
        if not (a.out or a.preset):
            raise ConfigError("train: --resume auto needs --out RUN_DIR (or --preset NAME)")
        run_dir = Path(a.out or Path("runs") / Path(a.preset).stem)
        found = distributed.decide(lambda: any((run_dir / "checkpoints").glob("step_*.pt")))
        resume = run_dir if found else None
        if not found and not a.preset:
            raise ConfigError(f"train: {run_dir} holds no checkpoint; give --preset to start it")
    if resume:
        state = ckpt.load_on_every_rank(resume)  # read once: its config here, weights in train()
        config = ckpt.run_config(state, str(resume))
        run_dir = Path(a.out) if a.out else run_folder(resume)
        if a.preset:  # the run continues with its own configuration: the preset must fit it
            check_start(run_dir, load_config(a.preset).override(a.set), state)
    elif a.preset:
        config = load_config(a.preset)
        run_dir = Path(a.out or Path("runs") / Path(a.preset).stem)
    else:
        raise ConfigError("train: give --preset NAME (or a YAML file) or --resume RUN_DIR")
    config = config.override(a.set).with_data_dir(a.data_dir)
    _folder(run_dir, "--out")
    check_start(run_dir, config, state, resume)  # refuse what the run would refuse, before it
    if a.dry_run:  # then show what it would do
        from .runtime import resolve_device
        from .train import load_datasets

        resolve_device(config.train.device)
        load_datasets(config, first_only=True)
        where = config.data.data_dir or "(the dataset's default location)"
        print(f"# run directory: {run_dir}\n# data: {where}")
        print(yaml.safe_dump(config.to_dict(), sort_keys=False, default_flow_style=None), end="")
        return 0
    _cap_heap_growth(config)
    summary = train(config, run_dir, resume=state, progress=not a.quiet)
    if distributed.is_main():
        print(to_json(summary))
    return 0


def _cap_heap_growth(config: RunConfig) -> None:
    """Low-memory training on the CPU frees and reallocates large activation blocks every step;
    glibc keeps them resident unless its mmap threshold is fixed. That is a process-wide setting,
    so the command line makes it, not the library (:func:`denseflow.runtime.cap_heap_growth`)."""
    from .runtime import cap_heap_growth, resolve_device

    if config.train.low_memory and resolve_device(config.train.device).type == "cpu":
        cap_heap_growth()


def _ks(text: str) -> list[int]:
    """``evaluate --k``: one number or a comma-separated list, sorted, without repeats."""
    try:
        ks = sorted({int(part) for part in text.split(",")})
    except ValueError:
        raise ConfigError(
            f"evaluate: --k {text!r}: expected a number of samples or a list such as 1,10,100"
        ) from None
    if ks[0] < 1:
        raise ConfigError(f"evaluate: --k must be >= 1, got {ks[0]}")
    return ks


def _temperatures(text: str) -> list[float]:
    """``sample --temperature``: one number or a comma-separated list, in the order given, each
    finite and >= 0."""
    try:
        temperatures = [float(part) for part in text.split(",")]
    except ValueError:
        raise ConfigError(
            f"sample: --temperature {text!r}: expected a number or a list such as 0.5,0.7,1"
        ) from None
    for t in temperatures:
        if not t >= 0:
            raise ConfigError(f"sample: --temperature must be >= 0, got {t}")
        if t == float("inf"):
            raise ConfigError("sample: --temperature must be finite, got inf")
    return temperatures


def _names(command: str, option: str, text: str) -> list[str]:
    """A comma-separated list of names (``bench --what``, ``experiment --variants``): at least
    one."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise ConfigError(f"{command}: {option} {text!r}: names nothing (a comma-separated list)")
    return names


def _split_option(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument(
        "--split",
        choices=["test", "train", "validation"],
        help=f"{help} (data.validation); default test",
    )


def _positive(command: str, a: argparse.Namespace, *names: str) -> None:
    """One line for the first of ``names`` given as a number below 1."""
    for name in names:
        value = getattr(a, name)
        if value is not None and value < 1:
            raise ConfigError(f"{command}: --{name.replace('_', '-')} must be >= 1, got {value}")


def _folder(path: str | Path, option: str, given: Path | None = None) -> Path:
    """An output folder, checked before any work: it and every folder above it exist as folders
    or not at all (so that making it cannot fail after the work). ``option`` and ``given`` (the
    file it is the folder of, else itself) name it in the error."""
    path = Path(path)
    given = given or path
    for part in (path, *path.parents):
        if part.exists() and not part.is_dir():
            which = "" if part == given else f"{part} "
            raise ConfigError(f"{option} {given}: {which}is a file, not a folder")
    return path


def _output(
    path: str | Path, option: str = "--out", png: bool = False, checkpoint: bool = False
) -> Path:
    """An output file, checked before any work so that the work is never lost to it: its folder
    made, the file writable (:func:`_writable`); a grid or strip (``png``) has a .png name, and
    a ``checkpoint`` (renamed over what is there) is written where nothing or a regular file is
    and needs a folder that takes new files."""
    path = Path(path)
    if png and path.suffix.lower() != ".png":
        raise ConfigError(
            f"{option} {path}: expected a .png file name (grids and strips are PNG: exact "
            "pixels, their settings in text chunks)"
        )
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder, expected a file name")
    if checkpoint:
        ckpt.check_export_target(path)
    _folder(path.parent, option, path).mkdir(parents=True, exist_ok=True)
    _writable(path.parent if checkpoint else path, option, path)
    return path


def _writable(path: Path, option: str, given: Path | None = None) -> Path:
    """``path`` if the system lets us write there, checked before any work: an existing file is
    opened for writing (and left as it is), else a file is made and dropped at once in the
    nearest folder that exists. ``option`` and ``given`` (else ``path``) name it in the error."""
    with _writing(given or path, option):
        if path.exists() and not path.is_dir():
            os.close(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NONBLOCK))
        else:
            tempfile.TemporaryFile(dir=next(p for p in (path, *path.parents) if p.is_dir())).close()
    return path


@contextmanager
def _writing(path: Path, option: str) -> Iterator[None]:
    """Writing the output ``path`` (given as ``option``): what the system refuses there (no
    permission, a read-only file system, a full disk) is one line naming it, not a bug of ours
    (an OSError of ``write`` names no file)."""
    try:
        yield
    except OSError as err:
        raise ConfigError(f"{option} {path}: cannot write ({err.strerror or err})") from None


def _beside(checkpoint: str, name: str) -> Path:
    """Where a default output goes: beside a checkpoint file (a run folder's final.pt, else in
    the run folder), else (a published model, a save_pretrained folder) in the current folder."""
    from .pretrained import CONFIG

    source = Path(checkpoint)
    if source.is_dir() and not (source / CONFIG).is_file():  # a run folder
        if not (source / "final.pt").is_file():
            return source / name
        source = source / "final.pt"
    return source.with_name(f"{source.stem}.{name}") if source.is_file() else Path(name)


def _cmd_evaluate(a: argparse.Namespace) -> int:
    from .data import load_images
    from .evaluate import (
        curve_in_words,
        in_words,
        score_images,
        score_terms,
        summarize,
        terms_in_words,
        to_bits_per_dim,
        write_scores,
    )
    from .pretrained import open_model
    from .runtime import resolve_device
    from .train import run_images

    _positive("evaluate", a, "kbs", "batch_size", "limit")
    a.k = _ks(a.k) if a.k is not None else None
    if a.kbs and a.k is None:
        raise ConfigError("evaluate: --kbs is for IWBO (--k); the ELBO draws one sample per image")
    if a.images:
        given = [option for option in ("split", "data_dir") if getattr(a, option)]
        if given:
            raise ConfigError(
                f"evaluate: --{given[0].replace('_', '-')} chooses the run's images; --images "
                "scores a folder of its own"
            )
        folder = Path(a.images).expanduser()
        if folder.is_file():
            raise ConfigError(
                f"evaluate: --images {a.images}: a file; give the folder of images to score"
            )
        if not folder.is_dir():
            raise ConfigError(f"evaluate: --images {a.images}: no such folder")
    model, config, batchnorm = open_model(a.checkpoint, resolve_device(a.device))
    model = model.double() if a.double else model.to(memory_format=torch.channels_last)
    data, shape = config.data, config.model.image_shape
    if a.images:
        what = "images"
        images = load_images("folder", "all", a.images, shape[1:], limit=a.limit, channels=shape[0])
    else:
        what = a.split or "test"
        images = run_images(config, what, a.data_dir, a.limit)
    if images.images.shape[1:] != model.config.image_shape:
        raise ConfigError(
            f"{a.images or data.dataset}: images of shape {tuple(images.images.shape[1:])}, "
            f"the model takes {model.config.image_shape}"
        )
    bound = "elbo" if a.k is None else f"iwbo{a.k[-1]}"
    first = [f"first{a.limit}"] if a.limit and len(images.images) == a.limit else []
    name = ".".join([what, bound, *first, *(["float64"] * a.double)])
    out = _output(a.json or _beside(a.checkpoint, f"{name}.json"), "--json")
    per_image = _output(a.per_image, "--per-image") if a.per_image else None
    batch_size, kbs = (
        a.batch_size or config.eval.batch_size,
        a.kbs or min(a.k[-1] if a.k else 1, config.eval.kbs),
    )
    score = partial(
        score_images,
        model,
        images.images,
        batch_size,
        seed=a.seed,
        progress=not a.quiet,
        cuda_graph=not a.no_cuda_graph,
    )

    def kept(what: str) -> Path | None:  # an interrupted pass's scores: the same command continues
        if out.exists() and not out.is_file():  # e.g. --json /dev/stdout: none kept beside it
            return None
        return out.with_name(f".{out.name}.{what}.partial")

    nats = {"elbo": score(partial=kept("elbo"))}
    if a.k is not None:  # IWBO-j of the first j draws for each j (one bound: the usual IWBO-k)
        bounds = score(k=a.k, kbs=kbs, partial=kept(bound))
        nats |= dict(zip((f"iwbo{j}" for j in a.k), bounds, strict=True))
    terms = {}
    if a.terms:
        show = not a.quiet
        terms = score_terms(model, images.images, batch_size, a.seed, show, kept("terms"))
    result = summarize(model, nats, bound) | {
        "k": a.k[-1] if a.k else 1,
        "split": what,
        "dataset": "folder" if a.images else data.dataset,
        "source": images.source.get("path"),
        "checkpoint": str(a.checkpoint),
        "double": a.double,
        "batchnorm": batchnorm,
    }
    if a.k and len(a.k) > 1:  # the bound's tightening with k
        curve = {j: summarize(model, nats, f"iwbo{j}") for j in a.k}
        result["iwbo_bpd"] = {
            j: {key: c[key] for key in ("bpd", "bpd_sem")} for j, c in curve.items()
        }
    if terms:
        bpd = {name: to_bits_per_dim(model, value.mean()).item() for name, value in terms.items()}
        result["terms_bpd"] = bpd  # each summand's share of the ELBO's bits/dim
    if not distributed.is_main():
        return 0
    print(
        f"{what} {bound} bits/dim: {in_words(result, a.k is not None)}; "
        f"BatchNorm statistics: {batchnorm}) -> {out}"
    )
    if "iwbo_bpd" in result:
        print(curve_in_words(result["iwbo_bpd"]))
    if terms:
        print(terms_in_words(result["terms_bpd"], result["elbo_bpd"]))
    with _writing(out, "--json"):
        out.write_text(to_json(result, indent=1) + "\n")
    if per_image is not None:
        columns = {**nats, **{f"term.{name}": value for name, value in terms.items()}}
        bpd = {key: to_bits_per_dim(model, value) for key, value in columns.items()}
        with _writing(per_image, "--per-image"):
            write_scores(per_image, bpd, images.names)
        print(f"per-image bits/dim -> {per_image}")
    return 0


def _cmd_recalibrate(a: argparse.Namespace) -> int:
    from .pretrained import open_model
    from .recalibrate import describe, recalibrate_batchnorm
    from .runtime import resolve_device
    from .train import run_images

    _positive("recalibrate", a, "batches", "batch_size")
    out = _output(a.out, checkpoint=True)
    model, config, _ = open_model(a.checkpoint, resolve_device(a.device))
    model = model.to(memory_format=torch.channels_last)  # as training, evaluate and sample run
    images = run_images(config, "train", a.data_dir).images  # without those held out
    batch_size = a.batch_size or config.train.batch_size
    recalibrate_batchnorm(model, images, a.batches, batch_size, a.seed, progress=not a.quiet)
    statistics = describe(a.batches, batch_size, a.seed, images=len(images))
    if distributed.is_main():
        with _writing(out, "--out"):
            ckpt.export(out, model, config, batchnorm=statistics)
        print(f"BatchNorm statistics {statistics} -> {out}")
    return 0


def _cmd_sample(a: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .pretrained import open_model
    from .runtime import resolve_device
    from .sample import check_grid, check_seeds, parse_seeds, sample_seeds, save_grid, to_pil

    _positive("sample", a, "num", "nrow", "scale")
    temperatures = _temperatures(a.temperature)
    if a.no_grid and not a.each_dir:
        raise ConfigError("sample: --no-grid without --each-dir would write nothing")
    if a.no_grid and a.out:
        raise ConfigError("sample: --out names the grid, which --no-grid leaves out")
    if a.seeds is not None:
        seeds = parse_seeds(a.seeds)
    else:
        check_seeds(a.num, f"--num {a.num}")
        seeds = list(range(a.num))
    sweep = len(temperatures) > 1  # the same seeds at each temperature: a row each
    suffixes, first = {t: f"_t{t:g}" for t in temperatures}, {}  # of --each-dir's file names
    for t, suffix in suffixes.items():
        if a.each_dir and first.setdefault(suffix, t) != t:
            raise ConfigError(
                f"sample: --temperature {first[suffix]} and {t} would both write "
                f"seed*{suffix}.png in --each-dir: give temperatures that differ in their first "
                "6 digits"
            )
    nrow = a.nrow or (len(seeds) if sweep else 8)
    out = None if a.no_grid else _output(a.out or _beside(a.checkpoint, "samples.png"), png=True)
    each_dir = _writable(_folder(a.each_dir, "--each-dir"), "--each-dir") if a.each_dir else None
    model, config, _ = open_model(a.checkpoint, resolve_device(a.device))
    if out is not None:
        check_grid(len(seeds) * len(temperatures), *config.model.image_shape[1:], nrow, a.scale)
    model = model.to(memory_format=torch.channels_last)
    graph = not a.no_cuda_graph
    images = torch.cat(
        [
            sample_seeds(model, seeds, t, progress=not a.quiet, cuda_graph=graph)
            for t in temperatures
        ]
    )
    if not distributed.is_main():
        return 0
    shown = ",".join(map(str, temperatures))
    info = {"temperature": shown, "checkpoint": a.checkpoint, "seeds": a.seeds or a.num}
    if out is not None:
        bits = config.model.num_bits
        with _writing(out, "--out"):
            save_grid(images, out, nrow, num_bits=bits, scale=a.scale, metadata=info)
    if each_dir:
        names = [
            f"seed{seed:06d}" + (suffixes[t] if sweep else "") + ".png"
            for t in temperatures
            for seed in seeds
        ]
        pairs = zip(names, images, strict=True)
        with _writing(each_dir, "--each-dir"):
            each_dir.mkdir(parents=True, exist_ok=True)
            for name, image in tqdm(pairs, "write", len(names), disable=a.quiet, leave=False):
                to_pil(image, config.model.num_bits).save(each_dir / name)
    written = ([str(out)] if out else []) + ([f"{each_dir}/"] if each_dir else [])
    at = f"temperature {shown}" if not sweep else f"at temperatures {shown}"
    at += ", a row each" if sweep and out is not None and nrow == len(seeds) else ""
    print(f"{len(seeds)} samples ({at}) -> {', '.join(written)}")
    return 0


def _cmd_interpolate(a: argparse.Namespace) -> int:
    from .data.folder import read_image_files
    from .pretrained import open_model
    from .runtime import resolve_device
    from .sample import check_grid, interpolate, save_grid
    from .train import run_images

    if a.steps < 2:
        raise ConfigError(f"interpolate: --steps must be >= 2, got {a.steps}")
    _positive("interpolate", a, "scale")
    indices = {given: int(given) for given in (a.a, a.b) if re.fullmatch("[0-9]+", given)}
    if a.split and not indices:
        raise ConfigError(
            f"interpolate: --split {a.split} chooses what an index counts in; --a and --b are files"
        )
    out = _output(a.out, png=True)
    model, config, _ = open_model(a.checkpoint, resolve_device(a.device))
    shape, ends, split = config.model.image_shape, [], a.split or "test"
    advice = "fewer --steps or a smaller --scale"
    check_grid(a.steps, *shape[1:], a.steps, a.scale, what="interpolate: a strip", advice=advice)
    if indices:  # the images up to the larger index are read, no more
        images = run_images(config, split, a.data_dir, limit=max(indices.values()) + 1).images
    for flag, given in (("--a", a.a), ("--b", a.b)):
        if given in indices:  # ASCII digits only: anything else (², ١) names a file
            index = indices[given]
            if index >= len(images):
                raise ConfigError(
                    f"interpolate: {flag} {given}: out of range: the run has {len(images)} "
                    f"{split} images"
                )
            ends.append(images[index])
        else:
            image = Path(given)
            if not image.is_file():
                raise ConfigError(f"interpolate: {flag} {given}: no such image file")
            pixels, _, resized = read_image_files([image], shape[1:], channels=shape[0])
            if resized:  # the strip's end is then the image as the model sees it
                distributed.note(f"interpolate: {flag} {given}: resized to {shape[1]}x{shape[2]}")
            ends.append(pixels[0])
        if ends[-1].shape != shape:
            raise ConfigError(
                f"interpolate: {flag} {given}: a {tuple(ends[-1].shape)} image, "
                f"the model takes {shape}"
            )
    strip = interpolate(model, ends[0], ends[1], a.steps, a.seed)
    info = {"checkpoint": a.checkpoint, "a": a.a, "b": a.b, "split": split, "seed": a.seed}
    bits = config.model.num_bits
    with _writing(out, "--out"):
        save_grid(strip, out, nrow=a.steps, num_bits=bits, scale=a.scale, metadata=info)
    print(f"{a.steps} images from {a.a} to {a.b} -> {out}")
    return 0


def _cmd_import_official(a: argparse.Namespace) -> int:
    from .config import DataConfig
    from .official import config_from_official_args, convert_official, load_official_args

    source = Path(a.source)
    if not source.exists():
        raise ConfigError(f"import-official: {source}: no such file or folder")
    if source.is_file() and ckpt.is_denseflow_checkpoint(source):
        raise ConfigError(
            f"import-official: {source} is already a denseflow checkpoint: use it as it is "
            "(--checkpoint)"
        )
    args_path = a.args or (source / "args.pickle" if source.is_dir() else None)
    if args_path is None:
        raise ConfigError(
            f"import-official: {source} needs the official flags it was trained with: "
            "--args args.pickle|args.json"
        )
    out = _output(a.out, checkpoint=True)
    flags = load_official_args(args_path)
    config_from_official_args(flags, args_path)  # checked, naming their file, before the weights
    model = convert_official(source, flags)
    preset = {
        "cifar10": "cifar10",
        "imagenet32": "imagenet32",
        "imagenet64": "imagenet64",
        "celeba": "celeba64",
    }
    name = preset.get(flags["dataset"])
    base = load_config(name) if name else RunConfig(data=DataConfig(dataset=flags["dataset"]))
    config = RunConfig(model=model.config, data=base.data, train=base.train, eval=base.eval)
    with _writing(out, "--out"):
        ckpt.export(out, model, config)
    params = sum(p.numel() for p in model.parameters())
    print(f"imported {params:,} parameters ({flags['dataset']}) -> {out}")
    return 0


def _cmd_bench(a: argparse.Namespace) -> int:
    from .bench import bench, format_report
    from .runtime import resolve_device

    _positive("bench", a, "batch_size", "steps", "k", "kbs", "threads")
    if a.warmup < 0:
        raise ConfigError(f"bench: --warmup must be >= 0, got {a.warmup}")
    if a.threads:
        torch.set_num_threads(a.threads)
    config = load_config(a.preset).override(a.set)
    what = tuple(_names("bench", "--what", a.what))
    device = resolve_device(a.device)
    _cap_heap_growth(config.override([f"train.device={device}"]))
    out = _output(a.json, "--json") if a.json else None
    profile = _output(a.profile, "--profile") if a.profile else None
    report = bench(
        config,
        a.batch_size,
        a.steps,
        a.warmup,
        what,
        device,
        a.k,
        a.kbs,
        profile=profile,
        loops=not a.no_loops,
        progress=not a.quiet,
    )
    report["preset"] = a.preset
    print(format_report(report))
    if out:
        with _writing(out, "--json"):
            out.write_text(to_json(report, indent=1) + "\n")
    return 0


def _cmd_experiment(a: argparse.Namespace) -> int:
    from .experiment import run_ablation

    out = _folder(a.out or Path("runs") / a.name, "--out")
    if a.name == "peers":
        from .peers import run_peers

        given = [n for n in ("seeds", "steps", "budget_minutes", "variants") if getattr(a, n)]
        if given:
            raise ConfigError(f"experiment peers: --{given[0].replace('_', '-')} is for ablation")
        run_peers(out, a.data_dir, a.quick, progress=not a.quiet)
        print((out / "results.md").read_text(), end="")
        print(f"results: {out / 'results.json'}")
        return 0
    variants = _names("experiment", "--variants", a.variants) if a.variants is not None else None
    results = run_ablation(
        out,
        a.data_dir,
        a.seeds,
        a.steps,
        a.budget_minutes,
        a.quick,
        variants,
        progress=not a.quiet,
    )
    print((out / "results.md").read_text(), end="")
    print(f"results: {out / 'results.json'} ({len(results['runs'])} runs)")
    return 0


COMMANDS = {
    "train": _cmd_train,
    "evaluate": _cmd_evaluate,
    "sample": _cmd_sample,
    "import-official": _cmd_import_official,
    "recalibrate": _cmd_recalibrate,
    "interpolate": _cmd_interpolate,
    "bench": _cmd_bench,
    "experiment": _cmd_experiment,
}


def main(argv: list[str] | None = None) -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``); return the exit code."""
    args = _parser().parse_args(argv)
    command = COMMANDS[args.command]
    joined = finished = False
    try:
        joined = distributed.init_from_env()  # under torchrun: one process per rank
        with distributed.quiet(getattr(args, "quiet", False)):
            code = command(args)
        finished = True
        return code
    except KeyboardInterrupt:
        print("denseflow: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if args.debug:
            raise
        # bad input (a DenseFlowError) or a file the system refuses (an OSError naming it)
        if isinstance(err, DenseFlowError) or isinstance(err, OSError) and err.filename:
            print(f"denseflow {args.command}: error: {' '.join(str(err).split())}", file=sys.stderr)
            return 2
        traceback.print_exc()
        print(
            f"denseflow {args.command}: internal error, a bug in denseflow {__version__} and not "
            "in your input: please report it with the traceback above",
            file=sys.stderr,
        )
        return 1
    finally:
        if joined:
            distributed.leave(finished)


if __name__ == "__main__":
    sys.exit(main())
