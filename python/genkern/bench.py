"""The benchmark engine behind `genkern bench`: each op against eager PyTorch and torch.compile.

An op enters the benchmark as a `BenchCase` (each family's bench_cases.py holds them, see all_cases); the
engine knows nothing about particular ops. For every case and size it times

    eager            the plain PyTorch code a user would write (the case's `eager` function)
    compile          torch.compile of that same function, compiled and warmed up outside the timing
    genkern:<name>   each genkern backend that runs on the device

and reports the median time, the speedups, and the achieved bandwidth next to the device's copy bandwidth,
measured in the same run. For a memory-bound op "% of copy" says how close it gets to the limit of the
hardware it ran on; a low figure means compute (drawing noise, say) is the bottleneck instead. Only the
forward pass is timed.

A case made by `under_load(case)` (named <op>_busy) is timed again with every core kept busy by other
processes: the cost of small calls on a loaded machine (torchrun workers, data loaders, a service's other
workers), next to the same calls on an idle one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import importlib
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import backend as _backend

WARMUP = 3  # calls before timing: first calls pay for lazy imports, allocator growth and thread start-up
PASS = "forward"


@dataclass(frozen=True)
class BenchCase:
    """One benchmarked op. A family adds cases in genkern/<family>/bench_cases.py; the engine is untouched.

    make_inputs(size, device, dtype) -> the positional args of both calls, `size` elements in the op's
        main tensor (see `matrix_shape`).
    genkern(*args, backend=name) runs the genkern op on one backend.
    eager(*args) is the baseline: the PyTorch code a user writes, and what torch.compile is given.
    shape(size) is the main tensor's shape, for the report.
    bytes_moved(size, dtype) is the least memory traffic any implementation needs: every input read once
        and every output written once. Achieved GB/s is computed from it.
    default: whether a plain `genkern bench` (no --ops, no --all) includes the case, the headline selection:
        one or two cases per family, so that the default run takes minutes; a device type ("cuda") includes
        it on that device only (a target shape too slow to time on a CPU).
    compile: whether torch.compile of `eager` is timed too (not for baselines that are whole Python loops
        over another library's objects, which it does not capture).
    items(size) -> how many things one call produces (images for a sampler), for a throughput column;
        item_unit names them ("img").
    eager_scale(size): the eager baseline is a long loop of identical steps (naive autoregressive sampling
        runs the network once per dimension) of which `eager` runs only a fraction; its time is multiplied
        by this factor (whole work / measured work) and the row is marked extrapolated.
    max_repeats caps the timed runs (and cuts warmup to one call) for cases that take seconds per call.
    timed says what one call does when it is not just the op's forward pass ("forward+backward").
    sized: False for a case whose shape does not follow the size: it runs at the first size only.
    requires: the optional libraries the eager baseline imports (diffusers, say). Where one is missing the
        eager and compile rows are skipped with a note, and the genkern rows still run.
    busy: every implementation is timed inside `busy_cores()`; made by `under_load`.
    peak_memory: also measure the peak memory one call allocates beyond what existed before it (see
        peak_memory_bytes): the row's peak_memory_bytes, and peak_memory_vs_eager its fraction of eager's.
    A case with bytes_moved 0 is not memory-bound: it gets no bandwidth figures.
    """

    name: str
    family: str
    make_inputs: Callable[[int, torch.device, torch.dtype], tuple]
    genkern: Callable[..., Any]
    eager: Callable[..., Any]
    shape: Callable[[int], tuple[int, ...]]
    bytes_moved: Callable[[int, torch.dtype], int]
    default: bool | str = True
    compile: bool = True
    items: Callable[[int], int] | None = None
    item_unit: str = ""
    eager_scale: Callable[[int], float] | None = None
    max_repeats: int | None = None
    timed: str = PASS
    sized: bool = True
    requires: tuple[str, ...] = ()
    busy: bool = False
    peak_memory: bool = False


def under_load(case: BenchCase) -> BenchCase:
    """`case` again as <name>_busy, timed while another process spins on every core (see busy_cores)."""
    return dataclasses.replace(case, name=f"{case.name}_busy", busy=True, default=False)


# A spinner stops when its parent dies (it is then re-parented), so a killed run leaves no busy core behind.
_SPINNER = "import os\np = os.getppid()\nwhile os.getppid() == p:\n    for _ in range(100000): pass\n"


def busy_core_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextlib.contextmanager
def busy_cores(count: int | None = None, settle_s: float = 0.3):
    """Keep `count` cores (all of this process's by default) busy with spinning Python processes for the
    duration of the block; yields the processes. They are killed and reaped on the way out, whatever
    happens in the block."""
    count = busy_core_count() if count is None else count
    spinners = [subprocess.Popen([sys.executable, "-c", _SPINNER]) for _ in range(count)]
    try:
        time.sleep(settle_s)  # the interpreters have started and are spinning
        yield spinners
    finally:
        for p in spinners:
            p.kill()
        for p in spinners:
            p.wait()


# ---------------------------------------------------------------------------------------------------------
# Sizes and shapes
# ---------------------------------------------------------------------------------------------------------
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def all_cases() -> tuple[BenchCase, ...]:
    """Every family's cases, in the order `genkern bench` runs them. Imported on demand: the case modules
    import every family's ops and models, which only a benchmark run needs."""
    from .autoregressive.bench_cases import CASES as autoregressive
    from .diffusion.bench_cases import CASES as diffusion
    from .models.bench_cases import CASES as sampling
    from .reparam.bench_cases import CASES as reparam

    cases = (*reparam, *diffusion, *autoregressive, *sampling)
    names = [c.name for c in cases]
    if len(set(names)) != len(names):  # --ops selects by name, so a repeated name would be ambiguous
        raise RuntimeError(f"benchmark case names must be unique: {sorted(n for n in names if names.count(n) > 1)}")
    return cases


def parse_size(text: str) -> int:
    """An element count: 65536, 64K, 1M, 16M (binary units, so 1M = 1024 x 1024)."""
    match = re.fullmatch(r"(\d+)([KMG]?)", text.strip().upper())
    if not match or int(match[1]) == 0:
        raise ValueError(f"bad size {text!r}: expected a positive count such as 65536, 64K, 1M or 16M")
    return int(match[1]) * _UNITS[match[2]]


def format_size(size: int) -> str:
    for unit in ("G", "M", "K"):
        if size % _UNITS[unit] == 0:
            return f"{size // _UNITS[unit]}{unit}"
    return str(size)


def matrix_shape(size: int) -> tuple[int, int]:
    """(rows, cols) holding `size` elements; ops reduce over cols. Rows are 1024 long, 4096 from 16M on,
    so large sizes are not dominated by many short reductions."""
    cols = 4096 if size >= 16 * _UNITS["M"] else 1024
    if size % cols:
        raise ValueError(f"size {format_size(size)} is not a multiple of the row length {cols}")
    return size // cols, cols


# ---------------------------------------------------------------------------------------------------------
# Device and implementations
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DeviceInfo:
    device: torch.device
    name: str  # CPU model and core count, or the GPU's name
    threads: int  # torch's intra-op threads (what CPU kernels get)
    slug: str  # for file names: cpu-intel-xeon-processor-2-50ghz-2threads, cuda-nvidia-h100-80gb-hbm3


def pick_device(requested: str | None) -> torch.device:
    """The requested device, else cuda when there is one, else cpu."""
    if requested is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, got {requested!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but torch sees no CUDA device")
    return device


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:  # not Linux
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _slug(text: str) -> str:
    text = re.sub(r"\((r|tm)\)", "", text.lower())
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")


def describe_device(device: torch.device) -> DeviceInfo:
    threads = torch.get_num_threads()
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return DeviceInfo(device, name, threads, f"cuda-{_slug(name)}")
    model = _cpu_model()
    # Thread count is in the slug: CPU results from the same model with other thread counts are not comparable.
    return DeviceInfo(device, f"{model} ({os.cpu_count()} cores)", threads, f"cpu-{_slug(model)}-{threads}threads")


def genkern_backends(device: torch.device, dtype: torch.dtype, requested: Sequence[str] | None = None) -> list[str]:
    """The genkern backends to time. By default every one that runs on this device and dtype, except
    `reference` (the eager baseline already is the reference) and `triton` on CPU (its interpreter is for
    testing, not speed). A backend asked for by name that cannot run here is an error, not a silent skip."""
    if requested is None:
        candidates = [b for b in _backend.backends() if b != "reference"]
        return [b for b in candidates if _runs_fast(b, device, dtype)]
    for name in requested:
        if name not in _backend.BACKENDS:
            raise ValueError(f"unknown backend {name!r}; genkern has {', '.join(_backend.BACKENDS)}")
        if not _runs_fast(name, device, dtype):
            raise ValueError(
                f"backend {name!r} cannot be benchmarked on {device.type} with {dtype} here "
                f"(available: {', '.join(_backend.backends())})"
            )
    return list(requested)


def _runs_fast(name: str, device: torch.device, dtype: torch.dtype) -> bool:
    if name == "triton" and device.type == "cpu":
        return False
    return _backend.runs_on(name, device, dtype)


def select_cases(cases: Sequence[BenchCase], names: Iterable[str] | None, device_type: str = "cpu") -> list[BenchCase]:
    """Cases by op or family name, in registry order; the default cases (for this device type) when `names`
    is None."""
    if names is None:
        return [c for c in cases if c.default is True or c.default == device_type]
    names = list(names)
    known = {c.name for c in cases} | {c.family for c in cases}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(
            f"unknown op {', '.join(unknown)}; known ops: {', '.join(c.name for c in cases)} "
            f"(or a family: {', '.join(sorted({c.family for c in cases}))})"
        )
    return [c for c in cases if c.name in names or c.family in names]


def compiled(case: BenchCase) -> Callable[..., Any]:
    """torch.compile of the case's eager function, one per eager function for the whole run (an op's
    _busy case reuses its graphs). dynamic=False gives each size its own specialised graph, as a
    fixed-shape training loop gets; by default the second size would be recompiled with dynamic shapes,
    and a generic kernel timed instead."""
    return _compiled(case.eager)


@functools.cache
def _compiled(eager: Callable[..., Any]) -> Callable[..., Any]:
    return torch.compile(eager, dynamic=False)


def implementations(case: BenchCase, backends: Sequence[str], use_compile: bool) -> list[tuple[str, Callable]]:
    """(label, function of the case's args) for each implementation timed, eager first."""
    impls = [("eager", case.eager)]
    if use_compile and case.compile:
        impls.append(("compile", compiled(case)))
    # A family without kernels on some backend (see genkern.backend) is timed on the others.
    impls += [
        (f"genkern:{b}", functools.partial(case.genkern, backend=b))
        for b in backends
        if _backend.has_family(b, case.family)
    ]
    return impls


# ---------------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _times_ms(fn: Callable[[], Any], device: torch.device, repeats: int) -> list[float]:
    """Per-call times of `repeats` calls: CUDA events on the GPU (kernel time on the stream, launches
    included), wall clock on the CPU, where calls are synchronous."""
    times = []
    if device.type == "cuda":
        with torch.cuda.device(device):
            for _ in range(repeats):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
        return times
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def median_ms(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = WARMUP) -> float:
    """Median time of one call after `warmup` untimed calls; the median shrugs off runs hit by other load."""
    for _ in range(warmup):
        fn()
    _sync(device)
    return statistics.median(_times_ms(fn, device, repeats))


def peak_memory_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    """The most memory torch's allocator holds during one call of fn, less what it held before (the inputs),
    outputs included. CUDA: torch.cuda.max_memory_allocated. CPU (whose allocator keeps no statistics): the
    allocation records of torch.profiler(profile_memory=True), each op's own allocations at its start and each
    free at its time, summed in time order; an op's temporaries freed inside it are not seen, nor is memory a
    compiled kernel allocates outside torch (genkern's kernels' small per-thread scratch)."""
    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            fn()
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    changes = sorted(
        (e.time_range.start, e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage)
        for e in prof.events()
    )
    held = peak = 0
    for _, change in changes:
        held += change
        peak = max(peak, held)
    return peak


def copy_bandwidth_gbps(size: int, device: torch.device, repeats: int) -> float:
    """What a plain copy of `size` float32 elements achieves: one read and one write of every byte. The
    ceiling a memory-bound op can hope for on this device, with this thread count, in this run."""
    src = torch.randn(size, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device, repeats)
    return gbps(2 * src.nbytes, ms)


def gbps(nbytes: int, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


# ---------------------------------------------------------------------------------------------------------
# A run
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Config:
    device: torch.device
    cases: Sequence[BenchCase]
    sizes: Sequence[int]
    dtype: torch.dtype
    backends: Sequence[str]
    repeats: int
    use_compile: bool = True
    command: Sequence[str] = ()


def _measure(
    case: BenchCase, size: int, label: str, fn: Callable, args: tuple, device: torch.device, repeats: int
) -> dict:
    """{time_ms} of one implementation, plus compile_s for torch.compile (its first call, compilation
    included), or {error} when it fails: one broken implementation must not end the whole run."""
    result: dict[str, Any] = {}
    warmup = WARMUP
    if case.max_repeats is not None:
        repeats, warmup = min(repeats, case.max_repeats), 1
    try:
        if label == "compile":
            start = time.perf_counter()
            fn(*args)
            _sync(device)
            result["compile_s"] = round(time.perf_counter() - start, 3)
        result["time_ms"] = median_ms(lambda: fn(*args), device, repeats, warmup)
        if case.peak_memory:
            result["peak_memory_bytes"] = peak_memory_bytes(lambda: fn(*args), device)
        if label == "eager" and case.eager_scale is not None:
            scale = case.eager_scale(size)
            result["measured_ms"], result["extrapolated_by"] = result["time_ms"], scale
            result["time_ms"] *= scale
    except Exception as exc:  # noqa: BLE001 - reported in the table and the JSON, the run goes on
        result = {"error": f"{type(exc).__name__}: {exc}".strip()}
    return result


def _row(case: BenchCase, size: int, dtype: torch.dtype, label: str, measured: dict) -> dict:
    row = {
        "op": case.name,
        "family": case.family,
        "size": size,
        "shape": list(case.shape(size)),
        "dtype": str(dtype).removeprefix("torch."),
        "impl": label,
        "pass": case.timed,
        "bytes": case.bytes_moved(size, dtype),
        "time_ms": measured.get("time_ms"),
        **{k: v for k, v in measured.items() if k != "time_ms"},
    }
    if case.items is not None:
        row["items"], row["item_unit"] = case.items(size), case.item_unit
        ms = measured.get("time_ms")
        row["items_per_s"] = row["items"] / (ms * 1e-3) if ms else None
    return row


def _add_ratios(rows: list[dict], copy_gbps: float) -> None:
    """Speedups against the eager and compile rows of the same op and size, and bandwidth figures."""
    for row in rows:
        same = {r["impl"]: r.get("time_ms") for r in rows if (r["op"], r["size"]) == (row["op"], row["size"])}
        ms = row["time_ms"]
        row["speedup_vs_eager"] = _ratio(same.get("eager"), ms)
        row["speedup_vs_compile"] = _ratio(same.get("compile"), ms)
        if "peak_memory_bytes" in row:
            eager = next((r for r in rows if (r["op"], r["size"], r["impl"]) == (row["op"], row["size"], "eager")), {})
            row["peak_memory_vs_eager"] = _ratio(row["peak_memory_bytes"], eager.get("peak_memory_bytes"))
        bandwidth = ms and row["bytes"]
        row["gbps"] = gbps(row["bytes"], ms) if bandwidth else None
        row["pct_copy_bandwidth"] = 100.0 * row["gbps"] / copy_gbps if bandwidth else None


def _ratio(baseline_ms: float | None, ms: float | None) -> float | None:
    return baseline_ms / ms if baseline_ms and ms else None


def missing_modules(case: BenchCase) -> list[str]:
    """The libraries of case.requires that cannot be imported here."""
    missing = []
    for name in case.requires:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


class _Eta:
    """How long the rest of a run will take, from what it has timed so far. A step is predicted from the
    same case and implementation at an earlier size, scaled by the size and by how far such predictions
    have been off in this run (a larger size falls out of the caches); else from the seconds per element of
    all the steps so far. torch.compile's compilation, about the same for every shape, is predicted apart:
    the mean compilation time so far, for each compile step left."""

    def __init__(self) -> None:
        self.seen: dict[tuple[str, str], tuple[float, int]] = {}  # (op, impl) -> (seconds, size) last timed
        self.seconds = self.elements = 0.0
        self.compiles: list[float] = []
        self.scaled = [0.0, 0.0]  # steps predicted from another size: [predicted, actual] seconds

    def record(self, case: BenchCase, size: int, label: str, seconds: float, compile_s: float | None) -> None:
        if compile_s is not None:
            self.compiles.append(compile_s)
            seconds -= compile_s
        if (case.name, label) in self.seen:
            earlier, earlier_size = self.seen[(case.name, label)]
            self.scaled[0] += earlier * size / earlier_size
            self.scaled[1] += seconds
        self.seen[(case.name, label)] = (seconds, size)
        self.seconds += seconds
        self.elements += size

    def left(self, steps: Iterable[tuple[BenchCase, int, str]]) -> float | None:
        """Predicted seconds for `steps`, or None before anything was timed."""
        if not self.elements:
            return None
        off = self.scaled[1] / self.scaled[0] if self.scaled[0] else 1.0
        total = 0.0
        for case, size, label in steps:
            if (case.name, label) in self.seen:
                seconds, timed_size = self.seen[(case.name, label)]
                total += off * seconds * size / timed_size
            else:
                total += self.seconds * size / self.elements
            if label == "compile" and self.compiles:
                total += statistics.mean(self.compiles)
        return total


def format_duration(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def run(config: Config, progress: Callable[[str], None] | None = None) -> dict:
    """Time every case x size x implementation of `config`. Returns the report that `genkern bench`
    writes as JSON: run-level facts (device, copy bandwidth, versions, ...) and one row per measurement.
    Progress lines (with the time so far and an estimate of the time left) go to `progress`."""
    say = progress or (lambda message: None)
    started = time.perf_counter()
    info = describe_device(config.device)
    say(f"[copy] {format_size(max(config.sizes))} float32 copy bandwidth on {info.name}")
    copy_gbps = copy_bandwidth_gbps(max(config.sizes), config.device, config.repeats)

    runs = [(size, case) for size in config.sizes for case in config.cases if case.sized or size == config.sizes[0]]
    steps = [
        (case, size, label)
        for size, case in runs
        for label, _ in implementations(case, config.backends, config.use_compile)
    ]
    first_case = len(implementations(runs[0][1], config.backends, config.use_compile)) if runs else 0
    eta, rows = _Eta(), []
    for size, case in runs:
        step_started = time.perf_counter()  # a case's first step is charged with making its inputs
        missing = missing_modules(case)
        args = case.make_inputs(size, config.device, config.dtype)
        with busy_cores() if case.busy else contextlib.nullcontext(()) as spinners:
            for label, fn in implementations(case, config.backends, config.use_compile):
                step = len(rows)
                left = eta.left(steps[step:]) if step >= first_case else None  # the first case pays for start-up
                timing = f"{format_duration(time.perf_counter() - started)} so far" + (
                    f", about {format_duration(left)} left" if left is not None else ""
                )
                say(f"[{step + 1}/{len(steps)}] {case.name} {format_size(size)} {label}  ({timing})")
                if missing and label in ("eager", "compile"):  # the baseline needs a library not installed here
                    measured = {"skipped": f"needs {', '.join(missing)} (not installed)"}
                else:
                    measured = _measure(case, size, label, fn, args, config.device, config.repeats)
                if "skipped" not in measured:
                    eta.record(case, size, label, time.perf_counter() - step_started, measured.get("compile_s"))
                if spinners:
                    measured["busy_processes"] = len(spinners)
                rows.append(_row(case, size, config.dtype, label, measured))
                step_started = time.perf_counter()
        del args  # free the inputs before the next case allocates its own
    _add_ratios(rows, copy_gbps)
    return _report(config, info, copy_gbps, rows, elapsed_s=time.perf_counter() - started)


def versions() -> dict[str, str]:
    import numpy

    from . import __version__

    found = {
        "genkern": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "numpy": numpy.__version__,
    }
    try:
        import triton

        found["triton"] = triton.__version__
    except Exception:  # noqa: BLE001 - triton is optional
        pass
    return found


def _report(config: Config, info: DeviceInfo, copy_gbps: float, rows: list[dict], elapsed_s: float) -> dict:
    return {
        "device": info.name,
        "device_kind": config.device.type,
        "device_slug": info.slug,
        "threads": info.threads,
        "copy_bandwidth_gbps": copy_gbps,
        "pass": PASS,
        "timing": f"median of {config.repeats} runs after {WARMUP} warmup runs",
        "repeats": config.repeats,
        "versions": versions(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": list(config.command),
        "elapsed_s": round(elapsed_s, 1),  # the whole run, compilation included
        "rows": rows,
    }


# ---------------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------------
def default_output_path(slug: str, directory: Path | str = ".") -> Path:
    """A fresh file in `directory` (the current one): genkern-bench-<device slug>-<UTC time>.json, with a
    counter added if that name is taken, so no earlier result (a committed one, say) is overwritten."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = Path(directory) / f"genkern-bench-{slug}-{stamp}.json"
    counter = 1
    while path.exists():
        counter += 1
        path = path.with_name(f"genkern-bench-{slug}-{stamp}-{counter}.json")
    return path


def write_report(report: dict, path: Path | str) -> Path:
    """Write the report as JSON, atomically: a temporary file in the same directory, then os.replace, so an
    interrupted run leaves no half-written file behind (and an existing file is either kept or replaced)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


TABLE_HEADER = ["op", "size", "impl", "time (ms)", "vs eager", "vs compile", "GB/s", "% copy", "rate"]
_TEXT_COLUMNS = 3  # op, size, impl: left-aligned; the numbers are right-aligned


def _cells(row: dict) -> list[str]:
    """The row's cells; for a failed or skipped row, the text columns only (see format_table)."""
    size = format_size(row["size"])
    if row.get("error") or row.get("skipped"):
        return [row["op"], size, row["impl"]]

    def x(v):
        return f"{v:.2f}x" if v is not None else "-"

    def maybe(v, fmt):
        return format(v, fmt) if v is not None else "-"

    time_ms = f"{row['time_ms']:.3f}" + ("*" if row.get("extrapolated_by") else "")
    rate = f"{row['items_per_s']:.3g} {row['item_unit']}/s" if row.get("items_per_s") else "-"
    return [
        row["op"],
        size,
        row["impl"],
        time_ms,
        x(row["speedup_vs_eager"]),
        x(row["speedup_vs_compile"]),
        maybe(row["gbps"], ".2f"),
        maybe(row["pct_copy_bandwidth"], ".0f") + ("%" if row["gbps"] else ""),
        rate,
    ]


def _short(text: str, limit: int) -> str:
    first = text.splitlines()[0] if text else ""
    return first if len(first) <= limit else first[: max(limit - 3, 0)] + "..."


def format_table(report: dict) -> str:
    """The report as a text table. The measured rows set the column widths; a failed or skipped row says so
    in the space of its number columns, cut to fit (failures are listed in full below the table)."""
    body = [_cells(r) for r in report["rows"]]
    widths = [max(len(cells[i]) for cells in [TABLE_HEADER, *body] if i < len(cells)) for i in range(len(TABLE_HEADER))]

    def fmt(cells):
        padded = (c.ljust(w) if i < _TEXT_COLUMNS else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
        return "  ".join(padded).rstrip()

    room = sum(widths[_TEXT_COLUMNS:]) + 2 * (len(widths) - _TEXT_COLUMNS - 1)  # the number columns' span
    failures = []
    dtypes = sorted({r["dtype"] for r in report["rows"]})
    lines = [
        f"genkern bench: {_passes(report['rows'])}, {', '.join(dtypes)}, {report['timing']}",
        f"device: {report['device']} [{report['device_kind']}], torch threads: {report['threads']}",
        f"copy bandwidth: {report['copy_bandwidth_gbps']:.2f} GB/s (dst.copy_(src), read + write)",
        "",
        fmt(TABLE_HEADER),
        fmt(["-" * w for w in widths]),
    ]
    previous = None
    for row, cells in zip(report["rows"], body):
        if previous is not None and (row["op"], row["size"]) != previous:
            lines.append("")
        previous = (row["op"], row["size"])
        if row.get("error"):
            failures.append(
                f"  [{len(failures) + 1}] {row['op']} {format_size(row['size'])} {row['impl']}: {row['error']}"
            )
            note = f"failed [{len(failures)}]: {row['error']}"
        elif row.get("skipped"):
            note = f"skipped: {row['skipped']}"
        else:
            lines.append(fmt(cells))
            continue
        text = "  ".join(c.ljust(w) for c, w in zip(cells, widths))
        lines.append(f"{text}  {_short(note, room)}".rstrip())
    notes = []
    if any(r.get("extrapolated_by") for r in report["rows"]):
        notes = [
            "",
            "* extrapolated: a fraction of a long loop of identical steps was timed and scaled "
            "(see the row's measured_ms and extrapolated_by in the JSON)",
        ]
    busy = {r["busy_processes"] for r in report["rows"] if r.get("busy_processes")}
    if busy:
        notes += ["", f"_busy: timed while {'/'.join(map(str, sorted(busy)))} other processes kept every core busy"]
    peaks = [r for r in report["rows"] if r.get("peak_memory_bytes") is not None]
    if peaks:
        notes += ["", "peak memory of one call (torch's allocator; see peak_memory_bytes):"]
        for r in peaks:
            fraction = r.get("peak_memory_vs_eager")
            versus = f" ({fraction:.3f} of eager)" if fraction is not None and r["impl"] != "eager" else ""
            notes.append(
                f"  {r['op']} {format_size(r['size'])} {r['impl']}: {r['peak_memory_bytes'] / 2**20:.1f} MiB{versus}"
            )
    if failures:
        notes += ["", "failures:", *failures]
    return "\n".join(lines + notes + _compile_times(report["rows"]))


def format_case_list(cases: Sequence[BenchCase]) -> str:
    """`genkern bench --list`: each case, its family and group, what a timed call does, whether a plain
    `genkern bench` runs it."""

    def family(case):  # the package its cases module is in: genkern.<family>.bench_cases
        make = getattr(case.make_inputs, "func", case.make_inputs)  # a functools.partial: its function
        package = make.__module__.split(".")[1]
        return package if package == case.family else f"{package}/{case.family}"

    def default(case):
        return "yes" if case.default is True else f"on {case.default} only" if case.default else "no"

    def timed(case):
        what = (f"{PASS} pass" if case.timed == PASS else case.timed) + ("" if case.sized else ", one shape")
        return what + (f"; eager needs {', '.join(case.requires)}" if case.requires else "")

    header = ("op", "family/group", "a timed call", "in default")
    table = [header, *((c.name, family(c), timed(c), default(c)) for c in cases)]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(
        lines
        + ["", "genkern bench runs the default ones; --all runs every one, --ops OP,... (names or groups) a selection."]
    )


def _passes(rows: list[dict]) -> str:
    """What a timed call does: the forward pass, unless a case says otherwise."""
    other = {r["op"]: r["pass"] for r in rows if r.get("pass", PASS) != PASS}
    if not other:
        return f"{PASS} pass only"
    return f"{PASS} pass, except " + ", ".join(f"{op}: {what}" for op, what in other.items())


def _compile_times(rows: list[dict]) -> list[str]:
    """One line per op: how long torch.compile's first call took at each size (left out of the timings)."""
    per_op: dict[str, list[str]] = {}
    for r in rows:
        if r.get("compile_s") is not None:
            per_op.setdefault(r["op"], []).append(f"{format_size(r['size'])} {r['compile_s']:.1f}s")
    if not per_op:
        return []
    width = max(map(len, per_op))
    return [
        "",
        "torch.compile time (first call per shape, not in the timings):",
        *(f"  {op.ljust(width)}  {', '.join(times)}" for op, times in per_op.items()),
    ]
