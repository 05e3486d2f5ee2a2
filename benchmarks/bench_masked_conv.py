"""The masked_conv family under pytest-benchmark: eager, torch.compile and each genkern backend, forward +
backward of PixelCNN layers, per size.

    pytest benchmarks/bench_masked_conv.py --benchmark-only

Cases come from genkern.bench_cases.masked_conv (shared with `genkern bench`); sizes and implementations are
parametrized by conftest.py.
"""
import pytest

from genkern.bench_cases import masked_conv


@pytest.mark.parametrize("case", masked_conv.CASES, ids=lambda case: case.name)
def test_masked_conv(run_case, case, size, impl):
    run_case(case, size, impl)
