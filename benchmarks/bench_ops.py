"""Every `genkern bench` case under pytest-benchmark: eager, torch.compile and each genkern backend, per op
and size.

    pytest benchmarks/ --benchmark-only                       # every case
    pytest benchmarks/ --benchmark-only -k "reparam"          # one family or kernel group (ids: family-op)
    GENKERN_BENCH_SIZES=1M,16M pytest benchmarks/ --benchmark-only --benchmark-group-by=group

Cases come from each family's bench_cases.py (shared with `genkern bench`, see genkern.bench.all_cases);
sizes and implementations are parametrized by conftest.py.
"""

import pytest

from genkern import bench


@pytest.mark.parametrize("case", bench.all_cases(), ids=lambda case: f"{case.family}-{case.name}")
def test_case(run_case, case, size, impl):
    run_case(case, size, impl)
