"""pytest-benchmark suites for genkern: `pytest benchmarks/ --benchmark-only`.

bench_ops.py parametrizes every case of genkern.bench.all_cases(); this file adds
the sizes and implementations, so a suite is a few lines and describes no op twice. Settings:

    GENKERN_BENCH_SIZES=1M,16M   element counts (default 1M)
    GENKERN_BENCH_DEVICE=cuda    device (default cuda when available)

The plain test run never sees these: pytest's testpaths is tests/, and bench_*.py files are only
collected from here.
"""

from __future__ import annotations

import os

import pytest
import torch

from genkern import bench

DEVICE = bench.pick_device(os.environ.get("GENKERN_BENCH_DEVICE"))
DTYPE = torch.float32
SIZES = [bench.parse_size(s) for s in os.environ.get("GENKERN_BENCH_SIZES", "1M").split(",") if s.strip()]
BACKENDS = bench.genkern_backends(DEVICE, DTYPE)
IMPLS = ["eager", "compile", *(f"genkern:{b}" for b in BACKENDS)]


def pytest_collect_file(file_path, parent):
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_generate_tests(metafunc):
    if "size" in metafunc.fixturenames:
        metafunc.parametrize("size", SIZES, ids=bench.format_size)
    if "impl" in metafunc.fixturenames:
        metafunc.parametrize("impl", IMPLS)


def _implementation(case: bench.BenchCase, impl: str):
    impls = dict(bench.implementations(case, BACKENDS, use_compile=True))
    if impl not in impls:
        pytest.skip(f"{case.name} has no {impl} implementation (case.compile is False)")
    return impls[impl]


@pytest.fixture
def run_case(benchmark):
    """run_case(case, size, impl): benchmark one implementation of a case on fresh inputs."""

    def run(case: bench.BenchCase, size: int, impl: str) -> None:
        args = case.make_inputs(size, DEVICE, DTYPE)
        fn = _implementation(case, impl)
        try:
            fn(*args)  # outside the timing: torch.compile compiles here, every impl pays its first-call costs
        except Exception as exc:  # noqa: BLE001 - e.g. torch.compile without a C++ compiler
            if impl != "compile":
                raise
            pytest.skip(f"torch.compile failed: {type(exc).__name__}: {exc}")

        def call():
            fn(*args)
            if DEVICE.type == "cuda":  # pytest-benchmark times wall clock: wait for the kernels
                torch.cuda.synchronize(DEVICE)

        benchmark.group = f"{case.name} {bench.format_size(size)} {DEVICE.type}"
        nbytes = case.bytes_moved(size, DTYPE)
        benchmark.extra_info.update(
            {"shape": list(case.shape(size)), "bytes": nbytes, "impl": impl, "pass": case.timed}
        )
        if case.items is not None:
            benchmark.extra_info.update({"items": case.items(size), "item_unit": case.item_unit})
        if impl == "eager" and case.eager_scale is not None:
            # the eager baseline ran a fraction of its loop: its full time is this many times the measured one
            benchmark.extra_info["extrapolated_by"] = case.eager_scale(size)
        benchmark(call)
        if benchmark.stats and nbytes:  # no stats under --benchmark-disable (one untimed call)
            benchmark.extra_info["gbps"] = bench.gbps(nbytes, benchmark.stats.stats.median * 1e3)

    return run
