"""The commands of `genkern` (bench, info, sample, train), run on the arguments that _genkern_cli parsed.

`genkern --help` and command-line mistakes never reach this module: see _genkern_cli for why.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from _genkern_cli import DEFAULT_REPEATS, DEFAULT_SIZES, _split, main

from . import __version__

__all__ = ["main", "run"]


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


def run(args: argparse.Namespace, command: Sequence[str]) -> int:
    """Run the command that `args` (parsed by _genkern_cli) names; its exit status."""
    commands = {"bench": _bench, "info": _info, "sample": _sample, "train": _train}
    return commands[args.command](args, command)
