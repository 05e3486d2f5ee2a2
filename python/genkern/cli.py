"""The `genkern` command.

    genkern bench [--device cpu|cuda] [--ops OP,... | --all] [--list] [--sizes 1M,16M] [--backends cpu,...]
                  [--dtype float32] [--repeats N] [--output PATH] [--no-compile] [--quiet]
    genkern info

`bench` times each op against eager PyTorch and torch.compile (see genkern.bench), prints a table and
writes the measurements as JSON. `info` says what this installation can run.

This module imports torch (through genkern.bench) only when a command runs, so that `--help` and mistakes
on the command line are answered at once.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from . import __version__

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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="genkern", description="genkern: compiled kernels for generative models")
    parser.add_argument("--version", action="version", version=f"genkern {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{bench,info}")

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


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args([str(a) for a in argv])  # str: paths may come as pathlib.Path
    return args.run(args, ["genkern", *map(str, argv)])
