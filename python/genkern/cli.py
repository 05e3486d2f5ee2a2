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

This module imports torch (through genkern.bench) only when a command runs, so that `--help` and mistakes
on the command line are answered at once.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from ._checkpoints import MODEL_NAMES

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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="genkern", description="genkern: compiled kernels for generative models")
    parser.add_argument("--version", action="version", version=f"genkern {__version__}")
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
    b.set_defaults(run=_bench, parser=b)

    i = commands.add_parser("info", help="version, backends and device of this installation")
    i.set_defaults(run=_info, parser=i)

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
    s.set_defaults(run=_sample, parser=s)

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
    t.set_defaults(run=_train, parser=t)
    return parser


def _bench_config(args: argparse.Namespace, command: Sequence[str]):
    """The run asked for on the command line (a genkern.bench.Config), with the device's defaults;
    ValueError on bad values."""
    import torch

    from . import bench

    device = bench.pick_device(args.device)
    dtype = getattr(torch, args.dtype)
    repeats = args.repeats if args.repeats is not None else DEFAULT_REPEATS[device.type]
    sizes = [bench.parse_size(s) for s in _split(args.sizes or DEFAULT_SIZES[device.type])]
    cases = bench.all_cases()
    if not args.all:
        cases = bench.select_cases(cases, _split(args.ops), device.type)
    for case in cases:  # fail before any timing, not halfway through the run
        for size in sizes:
            case.shape(size)
    return bench.Config(
        device=device,
        cases=cases,
        sizes=sizes,
        dtype=dtype,
        backends=bench.genkern_backends(device, dtype, _split(args.backends)),
        repeats=repeats,
        use_compile=args.use_compile,
        command=command,
    )


def _bench(args: argparse.Namespace, command: Sequence[str]) -> int:
    from . import bench

    if args.list:
        print(bench.format_case_list(bench.all_cases()))
        return 0
    try:
        config = _bench_config(args, command)
        if args.output is not None:  # a bad path fails now, not after the run
            if args.output.is_dir():
                raise ValueError(f"--output {args.output} is a directory; give a file path")
            args.output.parent.mkdir(parents=True, exist_ok=True)
    except (ValueError, OSError) as exc:
        args.parser.error(str(exc))  # exits with status 2 and the usage of `genkern bench`
    progress = None if args.quiet else (lambda message: print(message, file=sys.stderr, flush=True))
    report = bench.run(config, progress)
    print(bench.format_table(report))

    path = bench.write_report(report, args.output or bench.default_output_path(report["device_slug"]))
    print(f"\nwrote {path}")
    # torch.compile may legitimately fail on some setups (no C++ compiler); eager or genkern failing may not.
    # A skipped baseline (an optional library not installed) is not a failure.
    failed = [r for r in report["rows"] if r.get("error") and r["impl"] != "compile"]
    return 1 if failed else 0


def _info(args: argparse.Namespace, command: Sequence[str]) -> int:
    from . import _native, bench
    from . import backend as _backend

    device = bench.pick_device(None)
    described = bench.describe_device(device)
    core = "built" if _native.available() else f"not built ({_native.IMPORT_ERROR})"
    versions = ", ".join(f"{k} {v}" for k, v in bench.versions().items() if k != "genkern")
    print(f"genkern {__version__}")
    print(f"versions: {versions}")
    print(f"compiled core: {core}; built with CUDA: {'yes' if _native.with_cuda() else 'no'}")
    print(f"backends available: {', '.join(_backend.backends())}")
    print(f"device: {device.type} ({described.name}), torch threads: {described.threads}")
    return 0


def _fail(args: argparse.Namespace, message: str) -> int:
    """One line on stderr, status 2 (as argparse's own errors)."""
    print(f"genkern {args.command}: error: {message}", file=sys.stderr)
    return 2


def _sample(args: argparse.Namespace, command: Sequence[str]) -> int:
    import os

    import torch

    from . import _sampling

    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    try:
        device = _sampling._device(args.device)
    except _sampling.SampleError as exc:
        return _fail(args, str(exc))
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and world > 1 and device.index is None:
        device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        try:
            device = _sampling._device(device)
        except _sampling.SampleError as exc:
            return _fail(args, str(exc))
        torch.cuda.set_device(device)
    distributed = world > 1
    if distributed:
        import torch.distributed as dist

        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None
        )
    try:
        manifest = _sampling.sample(
            args.checkpoint if args.checkpoint is not None else args.model,
            args.n,
            seed=args.seed,
            batch_size=args.batch_size,
            first_sample=args.first_sample,
            out_dir=args.out,
            device=device,
            steps=args.steps,
            resume=args.resume,
            force=args.force,
            progress=not args.quiet,
            model_name=args.model,
        )
    except _sampling.SampleError as exc:
        return _fail(args, str(exc))
    finally:
        if distributed:
            dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        rate = manifest["samples_per_s"]
        rate_text = f"{rate:.1f} samples/s" if rate else "nothing to draw"
        print(
            f"{manifest['n']} samples ({manifest['drawn']} drawn, {manifest['reused']} kept) in "
            f"{manifest['seconds']:.2f} s: {rate_text} on {manifest['device']}; wrote {args.out}"
        )
    return 0


def _train(args: argparse.Namespace, command: Sequence[str]) -> int:
    from . import _training

    try:
        if args.device is not None:
            from . import _sampling

            _sampling._device(args.device)
        data = _training.load_data(args.data or _training.MODEL_DATA[args.model])
        _training.build(args.model, data)  # the data fits the model, before any training
        out = args.out or Path(f"{args.model}.safetensors")
        if out.is_dir():
            raise _training.TrainError("--out", f"{out} is a directory; give a file path")
    except ValueError as exc:
        return _fail(args, str(exc))
    config = _training.train(
        args.model,
        data=args.data,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        out=out,
        device=args.device,
        progress=not args.quiet,
    )
    metrics = config["metrics"]
    shown = {k: v for k, v in metrics.items() if isinstance(v, float) and k != "final_loss"}
    print(", ".join(f"{k} {v:.4f}" for k, v in shown.items()) + f"; wrote {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args([str(a) for a in argv])  # str: paths may come as pathlib.Path
    return args.run(args, ["genkern", *map(str, argv)])
