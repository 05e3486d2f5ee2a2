"""Cached PixelCNN sampling under pytest-benchmark: the eager naive baseline (a fraction of its pixel loop:
multiply by extra_info['extrapolated_by'] for the whole image) and the cached sampler: 28x28 grey at batch 1 to 256, and 32x32 RGB at batch 256.

    pytest benchmarks/bench_pixelcnn_sampling.py --benchmark-only

Cases come from genkern.bench_cases.pixelcnn_sampling (shared with `genkern bench`, which does the
extrapolation and reports images/s); they ignore the size.
"""
import pytest

from genkern.bench_cases import pixelcnn_sampling


@pytest.mark.parametrize("case", pixelcnn_sampling.CASES, ids=lambda case: case.name)
def test_pixelcnn_sampling(run_case, case, size, impl):
    run_case(case, size, impl)
