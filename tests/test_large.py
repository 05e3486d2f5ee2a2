"""More than 2^31 elements on the CPU: 64-bit indexing in an elementwise kernel (the stream's normals) and in
a reduction (a log-density summed over one row of 2^31 + 12 elements). About 11 GB of memory and 40 s on 2 cores."""

from __future__ import annotations

import math

import pytest
import torch

import genkern
from genkern.autoregressive.reference import stream_bits_at
from genkern.random.reference import uniform

N = 2**31 + 12  # past int32 indexing, and not a multiple of the kernels' blocks
SEED = 3


def _normals_at(index: torch.Tensor) -> torch.Tensor:
    """The stream's normals at these element indices (docs/math.md, section 1), in float64."""
    pair = (index >> 1) << 1  # Box-Muller on lanes (0, 1) and (2, 3) of a block
    u_a, u_b = uniform(stream_bits_at(pair, SEED, 0)), uniform(stream_bits_at(pair + 1, SEED, 0))
    radius, angle = torch.sqrt(-2.0 * torch.log(u_a)), 2.0 * math.pi * u_b
    return torch.where(index % 2 == 0, radius * torch.cos(angle), radius * torch.sin(angle))


@pytest.fixture(scope="module")
def big_normals():
    return genkern.randn(N, seed=SEED, backend="cpu")


@pytest.mark.slow
def test_elementwise_kernel_indexes_past_2_31(big_normals):
    z = big_normals
    index = torch.tensor([0, 1, 5, 2**31 - 3, 2**31 - 1, 2**31, 2**31 + 1, 2**31 + 6, N - 2, N - 1])
    torch.testing.assert_close(z[index].double(), _normals_at(index), atol=2e-6, rtol=2e-6)
    # An index wrapped to 32 bits would repeat the head of the stream here.
    assert not torch.equal(z[2**31 : 2**31 + 12], z[:12])


@pytest.mark.slow
def test_reduction_over_a_row_past_2_31(big_normals):
    z = big_normals.view(1, N)
    got = genkern.gaussian_log_prob(z, dim=-1, backend="cpu")
    square_sum = sum(chunk.double().square().sum() for chunk in z[0].split(2**27))
    expected = -0.5 * (N * math.log(2 * math.pi) + square_sum)
    # float32 partial sums over 2^31 terms: 1e-4 relative bounds their rounding, an indexing error is O(1).
    torch.testing.assert_close(got.double(), expected.reshape(1), rtol=1e-4, atol=0)
