"""The `genkern` command.

    genkern bench [--device cpu|cuda] [--ops OP,... | --all] [--list] [--sizes 1M,16M] [--backends cpu,...]
                  [--dtype float32] [--repeats N] [--output PATH] [--no-compile] [--quiet]
    genkern info
    genkern sample MODEL [--checkpoint CKPT] --n N [--batch-size B] [--seed S] [--first-sample I] [--out DIR]
                   [--device cpu|cuda] [--steps K] [--resume] [--force] [--quiet]
    genkern train MODEL [--data digits|digits-binary|PATH.npz] [--steps N] [--batch-size B] [--lr LR]
                  [--out CKPT] [--seed S] [--device cpu|cuda] [--quiet]

`bench` times each op against eager PyTorch and torch.compile (see genkern.bench), prints a table and
writes the measurements as JSON. `info` says what this installation can run. `sample` draws images from a
trained model into shard files (genkern.sample; under torchrun every rank writes its share); `train` trains
one on scikit-learn's digits or a .npz of images and writes a safetensors checkpoint.

The console script starts here, outside the `genkern` package: importing anything inside it runs
genkern/__init__.py, which registers the ops and so imports torch (about 10 s on a cold machine). This
module parses the command line with the standard library alone, so `--help` and mistakes on the command
line are answered at once; only a command that runs imports genkern (genkern.cli holds the commands).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

# The models `genkern sample` and `genkern train` know; genkern._checkpoints takes the list from here.
MODEL_NAMES = ("pixelcnn", "gated_pixelcnn", "nade", "vae", "dcgan", "unet")

DTYPES = ("bfloat16", "float16", "float32", "float64")  # names of torch dtypes
DEFAULT_SIZES = {"cpu": "1M,16M", "cuda": "16M,64M"}
DEFAULT_REPEATS = {"cpu": 10, "cuda": 50}


def _split(text: str | None) -> list[str] | None:
    return None if text is None else [part.strip() for part in text.split(",") if part.strip()]


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def _version() -> str:
    try:
        return version("genkern")
    except PackageNotFoundError:  # a source tree on sys.path, not installed
        return "unknown"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="genkern", description="genkern: compiled kernels for generative models")
    parser.add_argument("--version", action="version", version=f"genkern {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{bench,info,sample,train}")

    b = commands.add_parser(
        "bench",
        help="time the ops against eager PyTorch and torch.compile",
        description="Time each op against eager PyTorch and torch.compile. Without --ops "
        "or --all, a headline selection of one or two cases per family (see "
        "--list).",
    )
    b.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    which = b.add_mutually_exclusive_group()
    which.add_argument("--ops", help="comma-separated op or group names (default: the headline selection)")
    which.add_argument("--all", action="store_true", help="every case, not only the headline selection")
    b.add_argument(
        "--list",
        action="store_true",
        help="list the cases (group, what a timed call does, whether in the default selection) and exit",
    )
    b.add_argument(
        "--sizes",
        help="comma-separated element counts such as 1M,16M "
        f"(default: {DEFAULT_SIZES['cpu']} on cpu, {DEFAULT_SIZES['cuda']} on cuda)",
    )
    b.add_argument("--backends", help="comma-separated genkern backends (default: all that run on the device)")
    b.add_argument("--dtype", choices=DTYPES, default="float32")
    b.add_argument(
        "--repeats",
        type=_positive_int,
        help="timed runs per measurement, the median is reported (default: "
        f"{DEFAULT_REPEATS['cpu']} on cpu, {DEFAULT_REPEATS['cuda']} on cuda)",
    )
    b.add_argument(
        "--output",
        type=Path,
        help="JSON path, replaced if it exists (default: a new ./genkern-bench-<device>-<UTC time>.json)",
    )
    b.add_argument("--no-compile", dest="use_compile", action="store_false", help="skip torch.compile")
    b.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    b.set_defaults(parser=b)

    i = commands.add_parser("info", help="version, backends and device of this installation")
    i.set_defaults(parser=i)

    s = commands.add_parser(
        "sample",
        help="draw images from a trained model into .npz shards, a grid.png and a manifest.json",
        description="Draw samples first .. first + N - 1 of a model for a seed as uint8 images: sample i "
        "depends only on (seed, i), whatever the batch size, resume point or process count. Run under "
        "`torchrun --nproc-per-node P` (or `python -m torch.distributed.run`) to split the shards over P "
        "processes (NCCL on GPUs, gloo on CPUs); over several nodes, torchrun's own rendezvous options "
        "(--nnodes, --rdzv-backend c10d, --rdzv-endpoint HOST:PORT) and a --out every node can write.",
    )
    s.add_argument("model", choices=MODEL_NAMES)
    s.add_argument("--checkpoint", type=Path, help="a checkpoint of `genkern train` (default: the shipped one)")
    s.add_argument(
        "--n",
        "--num-samples",
        dest="n",
        type=_positive_int,
        required=True,
        help="number of samples (under torchrun write --num-samples: torchrun reads --n as one of its own options)",
    )
    s.add_argument("--batch-size", type=_positive_int, default=256, help="samples per model call and shard")
    s.add_argument("--seed", type=_non_negative_int, default=0)
    s.add_argument("--first-sample", type=_non_negative_int, default=0, help="index of the first sample")
    s.add_argument("--out", type=Path, default=Path("samples"), help="output directory (default: ./samples)")
    s.add_argument("--device", help="cpu or cuda (default: cuda when available; cuda:LOCAL_RANK under torchrun)")
    s.add_argument("--steps", type=_positive_int, help="sampler steps of the diffusion model (unet)")
    s.add_argument("--resume", action="store_true", help="keep the shards of this run already complete")
    s.add_argument("--force", action="store_true", help="replace another run's output in --out")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(parser=s)

    t = commands.add_parser(
        "train",
        help="train a model on scikit-learn's digits or a .npz of images; write a safetensors checkpoint",
        description="Train a model and write CKPT (safetensors weights with a JSON config, and CKPT's .json "
        "beside it), with the held-out test NLL in bits/dim (a stated proxy for dcgan and unet).",
    )
    t.add_argument("model", choices=MODEL_NAMES)
    t.add_argument("--data", help="digits, digits-binary or PATH.npz (default: what the model needs)")
    t.add_argument("--steps", type=_positive_int, help="optimiser steps (default: per model)")
    t.add_argument("--batch-size", type=_positive_int, default=64)
    t.add_argument("--lr", type=float, help="Adam's learning rate (default: per model)")
    t.add_argument("--out", type=Path, help="checkpoint path (default: ./MODEL.safetensors)")
    t.add_argument("--seed", type=_non_negative_int, default=0)
    t.add_argument("--device", help="cpu or cuda (default: cpu)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(parser=t)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args([str(a) for a in argv])  # str: paths may come as pathlib.Path
    from genkern import cli  # the engine: torch, the compiled core, the ops

    return cli.run(args, ["genkern", *map(str, argv)])
