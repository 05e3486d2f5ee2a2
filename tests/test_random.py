"""The genkern stream: Philox known answers, bit-exact agreement across backends, and statistics.

Statistical tests state their false-failure rate: each KS test fails a correct generator with probability
1e-6 (p-value threshold); each moment or correlation check uses a 5.5-sigma CLT bound (two-sided false
failure about 4e-8). Seeds are fixed, so a pass is repeatable.
"""

import math

import numpy as np
import pytest
import torch
from conftest import KERNEL_BACKENDS, device_for, interpreted

import genkern
from genkern.random import reference as ref

# Random123's published known-answer vectors for Philox4x32-10: (counter, key, result).
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]

SEEDS_OFFSETS = [(0, 0), (1234, 7), (2**64 - 1, 2**64 - 1), (2**40 + 3, 2**33)]

KS_P_THRESHOLD = 1e-6
SIGMAS = 5.5


def test_philox_known_answers():
    counter = np.array([c for c, _, _ in KAT], dtype=np.uint32)
    key = np.array([k for _, k, _ in KAT], dtype=np.uint32)
    expected = np.array([r for _, _, r in KAT], dtype=np.uint32)
    np.testing.assert_array_equal(genkern.random.philox4x32_10(counter, key), expected)


def test_reference_philox_known_answers():
    for counter, key, expected in KAT:
        words = ref.philox4x32_10(*(torch.tensor([c]) for c in counter), *key)
        assert [int(w) for w in words] == list(expected)


def test_core_philox_matches_reference_on_random_counters():
    rng = np.random.default_rng(0)
    counter = rng.integers(0, 2**32, size=(1000, 4), dtype=np.uint32)
    key = rng.integers(0, 2**32, size=(1000, 2), dtype=np.uint32)
    out = genkern.random.philox4x32_10(counter, key)
    for i in range(0, 1000, 97):
        words = ref.philox4x32_10(*(torch.tensor([int(c)]) for c in counter[i]), int(key[i, 0]), int(key[i, 1]))
        assert [int(w) for w in words] == out[i].tolist()


def test_philox_rejects_bad_shapes():
    with pytest.raises(ValueError, match="counter"):
        genkern.random.philox4x32_10(np.zeros((2, 3)), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="key"):
        genkern.random.philox4x32_10(np.zeros((2, 4)), np.zeros((3, 2)))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("seed,offset", SEEDS_OFFSETS)
@pytest.mark.parametrize("n", [1, 7, 1001])
def test_bits_bit_exact_across_backends(backend, seed, offset, n):
    device = device_for(backend)
    got = genkern.random.bits(n, seed=seed, offset=offset, device=device, backend=backend)
    expected = ref.bits(n, seed, offset)
    assert got.dtype == torch.uint32
    assert torch.equal(got.cpu().to(torch.int64), expected)


def _ulps(actual: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    spacing = np.spacing(np.abs(expected.numpy()).astype(np.float32)).astype(np.float64)
    return (actual.double() - expected).abs() / torch.from_numpy(np.maximum(spacing, 2.0**-40))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("seed,offset", SEEDS_OFFSETS)
def test_normals_agree_with_exact_box_muller_to_a_few_ulp(backend, seed, offset):
    n = 4099 if interpreted(backend) else 1 << 18
    got = genkern.randn(n, seed=seed, offset=offset, device=device_for(backend), backend=backend).cpu()
    # The exact Box-Muller value in float64, before the final rounding to float32.
    x = ref.bits(4 * ((n + 3) // 4), seed, offset).reshape(-1, 2, 2)
    radius = torch.sqrt(-2.0 * torch.log(ref.uniform(x[..., 0])))
    angle = 2.0 * math.pi * ref.uniform(x[..., 1])
    exact = torch.stack((radius * torch.cos(angle), radius * torch.sin(angle)), -1).reshape(-1)[:n]
    assert _ulps(got, exact).max() <= 4.0


@pytest.mark.parametrize(
    "backend",
    [b for b in KERNEL_BACKENDS if b != "cpu"]
    or [pytest.param("none", marks=pytest.mark.skip(reason="no kernel backend besides cpu here"))],
)
def test_normals_identical_on_every_backend(backend):
    n = 2053
    cpu = genkern.randn(n, seed=99, offset=5, backend="cpu")
    other = genkern.randn(n, seed=99, offset=5, device=device_for(backend), backend=backend).cpu()
    # Same shared math: bit-identical, except Triton, which may round an fma differently (a few ulp).
    if backend == "triton":
        assert _ulps(other, cpu.double()).max() <= 4.0
    else:
        assert torch.equal(other, cpu)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_element_depends_only_on_its_index(backend):
    device = device_for(backend)
    long = genkern.randn(5000, seed=3, offset=1, device=device, backend=backend)
    for n in (1, 3, 4, 5, 1023, 1025, 4097):
        assert torch.equal(genkern.randn(n, seed=3, offset=1, device=device, backend=backend), long[:n])
    # Shape is only a view of the flat stream.
    assert torch.equal(genkern.randn((50, 100), seed=3, offset=1, device=device, backend=backend).reshape(-1), long)


def test_float64_normals_are_the_float32_values():
    a = genkern.randn(1000, seed=8, dtype=torch.float64)
    b = genkern.randn(1000, seed=8, dtype=torch.float32)
    assert torch.equal(a, b.double())


def _ks_pvalue(samples: np.ndarray) -> float:
    """Kolmogorov-Smirnov test against N(0, 1), with the asymptotic Kolmogorov distribution."""
    x = np.sort(samples.astype(np.float64))
    n = x.size
    cdf = 0.5 * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0))) if n < 5000 else _normal_cdf(x)
    d = max(np.max(np.arange(1, n + 1) / n - cdf), np.max(cdf - np.arange(0, n) / n))
    lam = (math.sqrt(n) + 0.12 + 0.11 / math.sqrt(n)) * d
    p = 2.0 * sum((-1) ** (k - 1) * math.exp(-2.0 * k * k * lam * lam) for k in range(1, 101))
    return min(max(p, 0.0), 1.0)


def _normal_cdf(x: np.ndarray) -> np.ndarray:
    return torch.special.ndtr(torch.from_numpy(x)).numpy()


def test_ks_test_can_fail():
    rng = np.random.default_rng(0)
    n = 1 << 20
    assert _ks_pvalue(rng.standard_normal(n) * 1.03) < KS_P_THRESHOLD  # 3 % too wide
    assert _ks_pvalue(rng.standard_normal(n) + 0.01) < KS_P_THRESHOLD  # shifted by 1 % of sigma
    assert _ks_pvalue(rng.standard_normal(n)) > KS_P_THRESHOLD


@pytest.mark.parametrize("seed,offset", SEEDS_OFFSETS)
def test_normals_pass_ks(seed, offset):
    z = genkern.randn(1 << 20, seed=seed, offset=offset).numpy()
    assert _ks_pvalue(z) > KS_P_THRESHOLD
    # Each Box-Muller lane on its own, so a lane-specific bias cannot hide in the mix.
    for lane in range(4):
        assert _ks_pvalue(z[lane::4]) > KS_P_THRESHOLD


def test_normal_moments_within_clt_bounds():
    n = 1 << 22
    z = genkern.randn(n, seed=2024).double()
    # Standard errors of the sample mean, variance, skewness and excess kurtosis of N(0, 1).
    checks = {
        "mean": (z.mean(), 0.0, math.sqrt(1 / n)),
        "variance": (z.var(), 1.0, math.sqrt(2 / n)),
        "skewness": ((z**3).mean(), 0.0, math.sqrt(15 / n)),
        "kurtosis": ((z**4).mean(), 3.0, math.sqrt(96 / n)),
    }
    for name, (value, expected, se) in checks.items():
        assert abs(float(value) - expected) < SIGMAS * se, name


@pytest.mark.parametrize("other", [dict(seed=11, offset=0), dict(seed=10, offset=1), dict(seed=10, offset=2**32)])
def test_streams_of_nearby_seeds_and_offsets_are_independent(other):
    n = 1 << 20
    a = genkern.randn(n, seed=10, offset=0).double()
    b = genkern.randn(n, **other).double()
    assert abs(float((a * b).mean())) < SIGMAS / math.sqrt(n)
    # If independent, (a + b) / sqrt 2 is N(0, 1) too; and the squares are uncorrelated.
    assert _ks_pvalue(((a + b) / math.sqrt(2)).numpy()) > KS_P_THRESHOLD
    assert abs(float(((a * a - 1) * (b * b - 1)).mean())) < SIGMAS * math.sqrt(4 / n)


def test_seed_none_follows_torch_manual_seed():
    torch.manual_seed(5)
    a = genkern.randn(100)
    torch.manual_seed(5)
    b = genkern.randn(100)
    c = genkern.randn(100)
    assert torch.equal(a, b)
    assert not torch.equal(b, c)


@pytest.mark.parametrize(
    "kwargs,error,word",
    [
        (dict(seed=-1), ValueError, "seed"),
        (dict(seed=2**64), ValueError, "seed"),
        (dict(seed=1.5), TypeError, "seed"),
        (dict(seed=1, offset=-2), ValueError, "offset"),
        (dict(seed=1, backend="gpu"), ValueError, "backend"),
        (dict(seed=1, dtype=torch.int32), TypeError, "dtype"),
        (dict(seed=1, device="gpu"), ValueError, "device"),
    ],
)
def test_randn_rejects_bad_arguments(kwargs, error, word):
    with pytest.raises(error, match=word):
        genkern.randn(10, **kwargs)


def test_randn_accepts_numpy_integers():
    assert genkern.randn(np.int64(5), seed=1).shape == (5,)
    assert genkern.randn((np.int64(2), 3), seed=1).shape == (2, 3)


def test_randn_empty():
    assert genkern.randn((0, 3), seed=1).shape == (0, 3)
