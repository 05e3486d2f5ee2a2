"""The causal_conv1d family under pytest-benchmark: the forward pass, forward + backward, and the generation
step; eager, torch.compile and each genkern backend, per size.

    pytest benchmarks/bench_causal_conv1d.py --benchmark-only

Cases come from genkern.bench_cases.causal_conv1d (shared with `genkern bench`); sizes
and implementations are parametrized by conftest.py.
"""
import pytest

from genkern.bench_cases import causal_conv1d


@pytest.mark.parametrize("case", causal_conv1d.CASES, ids=lambda case: case.name)
def test_causal_conv1d(run_case, case, size, impl):
    run_case(case, size, impl)

