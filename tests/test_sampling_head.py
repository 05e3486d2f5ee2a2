"""The sampling head: gumbel_argmax / sample_logits with temperature, top_k, top_p and min_p (docs/math.md,
section 6.2), every backend against the sort-based reference: the kept sets exactly (ties included), the
draws' distribution by chi-square, the unfiltered bits, the degenerate rows, and the op's contract."""

import math

import pytest
import torch
from conftest import device_for, dtypes_for, interpreted

import genkern
from genkern import backend as gk_backend
from genkern.autoregressive import gumbel_argmax, sample_logits
from genkern.autoregressive import reference as ref

BACKENDS = genkern.backends("sampling_head")
KERNELS = [b for b in BACKENDS if b != "reference"]
INF, NAN = float("inf"), float("nan")

# One filter at a time, and the combinations (applied in the order temperature, top_k, top_p, min_p).
FILTERS = {
    "temperature": dict(temperature=0.6),
    "top_k": dict(top_k=7),
    "top_p": dict(top_p=0.8),
    "min_p": dict(min_p=0.08),
    "top_k+top_p": dict(top_k=9, top_p=0.7),
    "temperature+top_p+min_p": dict(temperature=1.7, top_p=0.85, min_p=0.03),
    "all": dict(temperature=0.8, top_k=12, top_p=0.9, min_p=0.02),
}


def _filters(rows: int, device, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    """The reference's per-row tensors."""

    def full(v, dtype):
        return torch.full((rows,), v, dtype=dtype, device=device)

    return (
        full(temperature, torch.float64),
        full(top_k, torch.int64),
        full(top_p, torch.float64),
        full(min_p, torch.float64),
    )


def _keep(logits: torch.Tensor, **filters) -> torch.Tensor:
    return ref.sampling_filter_keep(logits, *_filters(logits.shape[0], logits.device, **filters))


def _chi2_limit(df: int, false_failure: float = 1e-6) -> float:
    """The (1 - false_failure) quantile of chi2(df) by Wilson-Hilferty, with z for a 10x smaller tail than
    asked (the approximation's error at small df is well inside that margin)."""
    z = {1e-6: 5.2}[false_failure]  # the 1e-7 upper normal quantile
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


# ---------------------------------------------------------------------------------------------------------
# Against the reference
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend, dtype", [(b, d) for b in KERNELS for d in dtypes_for(b)])
@pytest.mark.parametrize("vocab", [1, 2, 7, 50, 300])
@pytest.mark.parametrize("name", list(FILTERS))
def test_draws_match_the_reference(backend, dtype, vocab, name):
    g = torch.Generator().manual_seed(vocab)
    rows = 64 if interpreted(backend) else 300
    logits = (torch.randn(rows, vocab, generator=g, dtype=torch.float64) * 3).round(decimals=1).to(dtype)
    device = device_for(backend)
    logits = logits.to(device)
    got = sample_logits(logits, seed=11, offset=5, backend=backend, **FILTERS[name])
    want = ref.sample_logits(
        logits, torch.arange(rows, device=device) * vocab, 11, 5, *_filters(rows, device, **FILTERS[name])
    )
    # The kernels add the noise in float32 with a few-ulp log: a draw may differ only at a near-tie of two
    # kept tokens (rounded logits make many exact ties of the filters, which must agree).
    differ = (got != want).cpu()
    assert differ.float().mean() <= 0.02
    keep = _keep(logits, **FILTERS[name]).cpu()
    rows_idx = torch.arange(rows)
    assert bool(keep[rows_idx, got.cpu()].all()), "a dropped token was drawn"


@pytest.mark.parametrize("backend", KERNELS)
def test_float64_logits_keep_their_precision(backend):
    # 1e8 and 1e8 + 4 at temperature 1 with a min_p that keeps both: level 1 wins ~98 % (float32 scores tie).
    device = device_for(backend)
    logits = torch.tensor([[1e8, 1e8 + 4]], dtype=torch.float64).expand(500, 2).contiguous().to(device)
    got = sample_logits(logits, seed=3, min_p=1e-3, backend=backend)
    assert got.float().mean() > 0.9
    got_k = sample_logits(logits, seed=3, top_k=1, backend=backend)
    assert got_k.tolist() == [1] * 500


# ---------------------------------------------------------------------------------------------------------
# Unfiltered draws keep gumbel_argmax's bits
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_no_filter_is_the_unfiltered_op_bit_for_bit(backend):
    device = device_for(backend)
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(300, 33, generator=g) * 2).to(device)
    base = torch.randint(0, 1 << 40, (300,), generator=g).to(device)
    plain = torch.ops.genkern.gumbel_argmax(logits, base, 9, 2)  # its own backend (it has no triton kernel)
    if backend in genkern.backends("pixelcnn_sampling"):
        assert torch.equal(gumbel_argmax(logits, base, seed=9, offset=2, backend=backend), plain)
    # the filtered op with every filter off (temperature 1: z is the logit's own bits) draws the same
    off = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    assert torch.equal(gumbel_argmax(logits, base, seed=9, offset=2, backend=backend, **off), plain)
    rows = torch.arange(300, device=device) * 33
    want = torch.ops.genkern.gumbel_argmax(logits, rows, 9, 2)
    assert torch.equal(sample_logits(logits, seed=9, offset=2, backend=backend), want)


# ---------------------------------------------------------------------------------------------------------
# The exact distribution: chi-square against the reference's renormalised probabilities
# ---------------------------------------------------------------------------------------------------------
DISTRIBUTION_PARAMS = [
    pytest.param(b, name, marks=[pytest.mark.slow] if interpreted(b) else []) for b in BACKENDS for name in FILTERS
]


@pytest.mark.parametrize("backend, name", DISTRIBUTION_PARAMS)
def test_draws_follow_the_filtered_distribution(backend, name):
    """20000 draws of one 24-token row (rows with distinct row indices): dropped tokens are never drawn, and
    the kept ones pass a chi-square test against the reference's renormalised probabilities with a false
    failure rate below 1e-6 per test (28 tests: below 3e-5 in all)."""
    g = torch.Generator().manual_seed(7)
    vocab, n = 24, 20000
    row = torch.randn(vocab, generator=g, dtype=torch.float64) * 1.5
    filters = FILTERS[name]
    device = device_for(backend)
    draws = sample_logits(
        row.expand(n, vocab).contiguous().to(device), seed=21, offset=3, backend=backend, **filters
    ).cpu()
    tau = filters.get("temperature", 1.0)
    keep = _keep(row[None], **filters)[0]
    expected = torch.softmax(torch.where(keep, row / tau, -torch.inf), dim=0) * n
    counts = torch.bincount(draws, minlength=vocab).double()
    assert counts[~keep].sum() == 0, "a dropped token was drawn"
    assert 2 <= int(keep.sum()) < vocab or name == "temperature"
    kept = keep.nonzero().flatten()
    chi2 = ((counts[kept] - expected[kept]) ** 2 / expected[kept]).sum().item()
    assert chi2 < _chi2_limit(len(kept) - 1), (chi2, len(kept))


@pytest.mark.parametrize("backend", BACKENDS)
def test_draws_over_offsets_follow_the_distribution(backend):
    """The same row at 20 offsets in calls of 200 rows (4000 draws): top_k and top_p together, chi-square
    with a 1e-6 false failure rate."""
    vocab = 12
    row = torch.linspace(-2, 2, vocab, dtype=torch.float64)
    device = device_for(backend)
    logits = row.expand(200, vocab).contiguous().to(device)
    filters = dict(top_k=8, top_p=0.9)
    draws = torch.cat([sample_logits(logits, seed=5, offset=o, backend=backend, **filters).cpu() for o in range(20)])
    keep = _keep(row[None], **filters)[0]
    expected = torch.softmax(torch.where(keep, row, -torch.inf), dim=0) * draws.numel()
    counts = torch.bincount(draws, minlength=vocab).double()
    assert counts[~keep].sum() == 0
    kept = keep.nonzero().flatten()
    chi2 = ((counts[kept] - expected[kept]) ** 2 / expected[kept]).sum().item()
    assert chi2 < _chi2_limit(len(kept) - 1)


# ---------------------------------------------------------------------------------------------------------
# Which tokens are kept: adversarial rows with ties
# ---------------------------------------------------------------------------------------------------------
L1 = math.log(1.0)
# (row, filters, the kept tokens by the rule of docs/math.md 6.2)
KEPT_CASES = [
    ([2, 2, 2, 1, 1, 0], dict(top_k=2), {0, 1, 2}),  # ties at the k-th value are kept
    ([2, 2, 2, 1, 1, 0], dict(top_k=4), {0, 1, 2, 3, 4}),
    ([1, 0, 1, 0, 1, 0], dict(top_k=3), {0, 2, 4}),
    ([0, 0, 0, 0, -INF, -INF], dict(top_p=0.5), {0, 1, 2, 3}),  # the sum reaches 0.5 inside a tie: all kept
    ([1, 1, 0, 0], dict(top_p=0.5), {0, 1}),  # 0.366 < 0.5 <= 0.731
    ([1, 1, 0, 0], dict(top_p=0.74), {0, 1, 2, 3}),
    ([3, 3, 1, 0], dict(top_p=1e-9), {0, 1}),  # at least one token, ties at the top kept
    ([0, 5, 1, 5], dict(top_p=1e-9), {1, 3}),
    ([0, -math.log(2), -math.log(4)], dict(min_p=0.4), {0, 1}),
    ([1, 2, 2, 0], dict(min_p=1.0), {1, 2}),
    # top_p on the top_k-renormalised distribution: over the top 2, p = (0.525, 0.475), so 0.5 keeps one
    ([2, 1.9, 0, 0, 0, 0, 0, 0], dict(top_k=2, top_p=0.5), {0}),
    ([2, 1.9, 0, 0, 0, 0, 0, 0], dict(top_p=0.5), {0, 1}),
    ([4, 4, 3, 3, 3, 0, 0], dict(top_k=3, top_p=0.99, min_p=0.3), {0, 1, 2, 3, 4}),
    ([4, 4, 3, 3, 3, 0, 0], dict(top_k=3, min_p=0.5), {0, 1}),
    ([4, 4, 3, 3, 3, 0, 0], dict(temperature=4.0, top_k=3, min_p=0.5), {0, 1, 2, 3, 4}),
    ([0.0, -0.0, 0.0, -1], dict(top_k=2), {0, 1, 2}),  # -0.0 ties +0.0
]


@pytest.mark.parametrize("row, filters, kept", KEPT_CASES)
def test_the_reference_keeps_the_rule(row, filters, kept):
    logits = torch.tensor([row], dtype=torch.float64)
    assert set(_keep(logits, **filters)[0].nonzero().flatten().tolist()) == kept


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_drawn_tokens_are_the_kept_set(backend, dtype):
    """Each adversarial row drawn 3000 times (distinct row indices): the tokens drawn are exactly the kept
    set (every kept token here has probability >= 0.05, so one is missed with probability < 3000 * 0.95^3000)."""
    device = device_for(backend)
    for row, filters, kept in KEPT_CASES:
        n = 3000
        logits = torch.tensor(row, dtype=dtype).expand(n, len(row)).contiguous().to(device)
        drawn = sample_logits(logits, seed=1, offset=4, backend=backend, **filters)
        assert set(drawn.unique().tolist()) == kept, (row, filters)


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_rows_with_ties_keep_the_reference_set(backend):
    """Rows of 16 tokens from 4 values (many ties), each drawn 400 times: no token outside the reference's
    kept set is ever drawn, and every kept token with probability >= 0.05 is."""
    g = torch.Generator().manual_seed(3)
    device = device_for(backend)
    for trial in range(12):
        row = torch.randint(0, 4, (16,), generator=g).double() * 0.7
        filters = dict(top_k=int(torch.randint(1, 17, (1,), generator=g)), top_p=[0.3, 0.6, 0.95][trial % 3])
        keep = _keep(row[None], **filters)[0]
        probs = torch.softmax(torch.where(keep, row, -torch.inf), dim=0)
        drawn = sample_logits(row.expand(400, 16).contiguous().to(device), seed=trial, backend=backend, **filters)
        seen = torch.zeros(16, dtype=torch.bool)
        seen[drawn.cpu()] = True
        assert not bool((seen & ~keep).any()), (row, filters)
        assert bool(seen[probs >= 0.05].all()), (row, filters)


# ---------------------------------------------------------------------------------------------------------
# Degenerate rows, per-row filters, batch independence
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_degenerate_rows_follow_the_gumbel_argmax_rule(backend):
    rows = [
        ([0.0, NAN, 5.0, NAN], dict(top_k=1), 1),  # NaN: the first NaN, never skipped
        ([NAN, 1.0, 2.0], dict(top_p=0.5), 0),
        ([-INF] * 4, dict(top_k=2), 0),
        ([1.0, INF, 2.0, INF], dict(top_p=0.5), 1),  # +inf: the first +inf
        ([1.0, 3.0, 2.0, 3.0], dict(temperature=0.0, top_k=2), 1),  # temperature 0: the first argmax
        ([1e300, 1e300, -1e300], dict(temperature=1e-10, top_k=2), 0),  # z overflows to +inf: the first
    ]
    device = device_for(backend)
    for row, filters, want in rows:
        logits = torch.tensor(row, dtype=torch.float64).expand(16, len(row)).contiguous().to(device)
        assert sample_logits(logits, seed=2, backend=backend, **filters).tolist() == [want] * 16, (row, filters)
        ref_rows = ref.sample_logits(logits, torch.arange(16) * len(row), 2, 0, *_filters(16, device, **filters))
        assert ref_rows.tolist() == [want] * 16


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_row_filters_match_rows_drawn_alone(backend):
    device = device_for(backend)
    g = torch.Generator().manual_seed(5)
    rows, vocab = 40, 30
    logits = (torch.randn(rows, vocab, generator=g) * 2).to(device)
    base = (torch.arange(rows) * 1000 + 17).to(device)
    per_row = dict(
        temperature=torch.rand(rows, generator=g, dtype=torch.float64) * 1.5,
        top_k=torch.randint(0, vocab + 3, (rows,), generator=g),
        top_p=torch.rand(rows, generator=g, dtype=torch.float64) * 0.9 + 0.1,
        min_p=torch.rand(rows, generator=g, dtype=torch.float64) * 0.2,
    )
    per_row["temperature"][::7] = 0.0
    per_row["top_p"][::5] = 1.0
    together = gumbel_argmax(logits, base, seed=4, backend=backend, **{k: v.to(device) for k, v in per_row.items()})
    for n in range(rows):
        alone = gumbel_argmax(
            logits[n : n + 1], base[n : n + 1], seed=4, backend=backend, **{k: v[n].item() for k, v in per_row.items()}
        )
        assert alone.item() == together[n].item()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_draw_depends_on_seed_offset_and_row_only(backend):
    device = device_for(backend)
    logits = torch.zeros(600, 16, device=device)
    f = dict(top_k=10, top_p=0.9)
    a = sample_logits(logits, seed=1, backend=backend, **f)
    assert torch.equal(a, sample_logits(logits, seed=1, backend=backend, **f))
    assert not torch.equal(a, sample_logits(logits, seed=2, backend=backend, **f))
    assert not torch.equal(a, sample_logits(logits, seed=1, offset=1, backend=backend, **f))
    base = torch.arange(600, device=device) * 16
    assert torch.equal(a[100:200], gumbel_argmax(logits[100:200], base[100:200], seed=1, backend=backend, **f))


def test_empty_and_single_token():
    # half logits on the cpu: the automatic choice runs the reference; top_k 1 keeps the largest only
    assert sample_logits(torch.tensor([[0.0, 1.0, 0.5]] * 4, dtype=torch.float16), seed=1, top_k=1).tolist() == [1] * 4
    assert sample_logits(torch.zeros(0, 4), seed=1, top_k=2).shape == (0,)
    assert sample_logits(torch.zeros(5, 1), seed=1, top_p=0.3, min_p=0.5).tolist() == [0] * 5


@pytest.mark.parametrize("backend", BACKENDS)
def test_half_logits(backend):
    device = device_for(backend)
    for dtype in (torch.float16, torch.bfloat16):
        if not gk_backend.runs_on(backend, device, dtype):
            continue  # the cpu kernels take no half types (the automatic choice runs the reference)
        logits = (torch.randn(200, 20, generator=torch.Generator().manual_seed(2)) * 2).to(dtype).to(device)
        got = sample_logits(logits, seed=3, top_k=5, top_p=0.9, backend=backend)
        want = ref.sample_logits(logits, torch.arange(200) * 20, 3, 0, *_filters(200, device, top_k=5, top_p=0.9))
        assert (got != want.to(got.device)).float().mean() <= 0.02


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("vocab", [32000, 131072])
def test_large_vocab(backend, vocab):
    device = device_for(backend)
    g = torch.Generator().manual_seed(vocab)
    logits = (torch.randn(6, vocab, generator=g) * 3).to(device)
    per_row = dict(
        temperature=torch.tensor([0.7, 1.0, 1.3, 0.9, 1.0, 0.5], dtype=torch.float64),
        top_k=torch.tensor([50, 0, 1000, 0, 20000, 5]),
        top_p=torch.tensor([0.9, 0.95, 1.0, 0.5, 0.99, 0.2], dtype=torch.float64),
        min_p=torch.tensor([0.0, 0.0, 0.0, 0.05, 0.001, 0.0], dtype=torch.float64),
    )
    per_row = {k: v.to(device) for k, v in per_row.items()}
    keep = ref.sampling_filter_keep(logits, *per_row.values())
    base = torch.arange(6, device=device) * vocab
    for offset in range(1 if interpreted(backend) else 4):
        got = gumbel_argmax(logits, base, seed=8, offset=offset, backend=backend, **per_row)
        want = ref.sample_logits(logits, base, 8, offset, *per_row.values())
        assert bool(keep[torch.arange(6), got].all())
        assert (got != want).sum() <= 1


# ---------------------------------------------------------------------------------------------------------
# The op's contract: checks, opcheck, compile, meta
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"top_k": -1}, ValueError, "top_k must be >= 0"),
        ({"top_k": -(2**63) - 1}, ValueError, "top_k must be >= 0"),
        ({"top_k": 1.5}, TypeError, "top_k"),
        ({"top_p": 0.0}, ValueError, "top_p must be in"),
        ({"top_p": 1.5}, ValueError, "top_p must be in"),
        ({"top_p": NAN}, ValueError, "top_p must be in"),
        ({"min_p": -0.1}, ValueError, "min_p must be in"),
        ({"min_p": 1.01}, ValueError, "min_p must be in"),
        ({"temperature": -1.0}, ValueError, "temperature must be"),
        ({"temperature": INF}, ValueError, "temperature must be"),
        ({"temperature": "hot"}, TypeError, "temperature"),
        ({"top_k": torch.tensor([3, -2, 1])}, ValueError, "top_k must be >= 0, got -2 in row 1"),
        ({"top_p": torch.tensor([0.5, 0.5, 2.0])}, ValueError, "top_p must be in .* row 2"),
        ({"min_p": torch.tensor([0.5, NAN, 0.1])}, ValueError, "min_p"),
        ({"temperature": torch.tensor([1.0, -0.5, 1.0])}, ValueError, "temperature"),
        ({"top_k": torch.tensor([1.0, 2.0, 3.0])}, TypeError, "top_k must be a scalar or an integer tensor"),
        ({"temperature": torch.tensor([1, 2, 3])}, TypeError, "temperature must be a scalar or a floating"),
        ({"top_p": torch.tensor([True, True, True])}, TypeError, "top_p must be a scalar or a floating"),
        ({"top_k": torch.tensor([1, 2])}, ValueError, r"top_k must be a torch.int64 tensor of shape \(3,\)"),
        ({"min_p": torch.zeros(3, 1)}, ValueError, "min_p must be a torch.float64 tensor of shape"),
        ({"top_p": torch.ones(3, device="meta")}, ValueError, "top_p .* on logits' device"),
        ({"seed": -1}, ValueError, "seed"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        sample_logits(torch.zeros(3, 5), **{"seed": 0, **kwargs})


def test_a_top_k_past_int64_keeps_every_token():
    logits = torch.randn(6, 9)
    assert torch.equal(sample_logits(logits, seed=4, top_k=2**70), sample_logits(logits, seed=4, top_k=0))


def test_bad_logits_and_base():
    with pytest.raises(ValueError, match="logits must have shape"):
        sample_logits(torch.zeros(5), seed=0, top_k=2)
    with pytest.raises(ValueError, match="base must be non-negative"):
        gumbel_argmax(torch.zeros(3, 2), -torch.ones(3, dtype=torch.int64), seed=0, top_k=1)
    with pytest.raises(TypeError, match="logits"):
        sample_logits(torch.zeros(3, 2, dtype=torch.int64), seed=0, top_k=1)


def test_sample_logits_is_an_op():
    logits, base = torch.randn(7, 5), torch.arange(7) * 5
    filters = _filters(7, "cpu", temperature=0.5, top_k=3, top_p=0.9, min_p=0.01)
    for backend in BACKENDS:
        device = device_for(backend)
        with gk_backend.scoped(backend):
            torch.library.opcheck(
                torch.ops.genkern.sample_logits.default,
                (logits.to(device), base.to(device), 3, 0, *[f.to(device) for f in filters]),
            )


def test_meta_calls_check_shapes_only():
    m = torch.empty(4, 9, device="meta")
    assert sample_logits(m, seed=0, top_k=3, top_p=0.5).shape == (4,)
    with pytest.raises(ValueError, match="top_k"):
        sample_logits(m, seed=0, top_k=torch.zeros(3, dtype=torch.int64, device="meta"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiles_fullgraph(backend):
    device = device_for(backend)
    logits = torch.randn(16, 40).to(device)
    top_p = torch.linspace(0.3, 1.0, 16, dtype=torch.float64).to(device)

    def step(x, p):
        return genkern.sample_logits(x, seed=3, offset=2, temperature=0.8, top_k=10, top_p=p)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    with gk_backend.scoped(backend):  # outside the graph: the op picks its backend when it runs
        assert torch.equal(compiled(logits, top_p), step(logits, top_p))
