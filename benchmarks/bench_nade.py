"""The NADE family under pytest-benchmark: eager, torch.compile and each genkern backend, forward + backward.

    pytest benchmarks/bench_nade.py --benchmark-only
    GENKERN_BENCH_SIZES=256K,1M pytest benchmarks/bench_nade.py --benchmark-only

Cases come from genkern.bench_cases.nade (shared with `genkern bench`); sizes and implementations are
parametrized by conftest.py. A size N is N / 2048 examples of the D = 784, H = 500 model.
"""
import pytest

from genkern.bench_cases import nade


@pytest.mark.parametrize("case", nade.CASES, ids=lambda case: case.name)
def test_nade(run_case, case, size, impl):
    run_case(case, size, impl)
