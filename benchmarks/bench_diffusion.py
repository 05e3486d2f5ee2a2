"""The diffusion family under pytest-benchmark: eager, torch.compile and each genkern backend, per op and size.

    pytest benchmarks/bench_diffusion.py --benchmark-only

Cases come from genkern.bench_cases.diffusion (shared with `genkern bench`); sizes and implementations are
parametrized by conftest.py.
"""
import pytest

from genkern.bench_cases import diffusion


@pytest.mark.parametrize("case", diffusion.CASES, ids=lambda case: case.name)
def test_diffusion(run_case, case, size, impl):
    run_case(case, size, impl)
