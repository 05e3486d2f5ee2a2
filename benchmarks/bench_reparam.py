"""The reparam family under pytest-benchmark: eager, torch.compile and each genkern backend, per op and size.

    pytest benchmarks/bench_reparam.py --benchmark-only
    GENKERN_BENCH_SIZES=1M,16M pytest benchmarks/ --benchmark-only --benchmark-group-by=group

Cases come from genkern.bench_cases.reparam (shared with `genkern bench`); sizes and implementations are
parametrized by conftest.py.
"""
import pytest

from genkern.bench_cases import reparam


@pytest.mark.parametrize("case", reparam.CASES, ids=lambda case: case.name)
def test_reparam(run_case, case, size, impl):
    run_case(case, size, impl)
