"""The pixelcnn_sampling family: Gumbel-max draws on the genkern stream and the cached sampler's program
runner, compiled (cpu, cuda) against the reference."""

import pytest
import torch
from conftest import device_for, dtypes_for

import genkern
from genkern import backend as gk_backend
from genkern.autoregressive import Program, draw_base, gumbel_argmax
from genkern.autoregressive import reference as ref

SAMPLER_BACKENDS = genkern.backends("pixelcnn_sampling")
KERNELS = [b for b in SAMPLER_BACKENDS if b != "reference"]


@pytest.mark.parametrize("backend, dtype", [(b, d) for b in KERNELS for d in dtypes_for(b)])
@pytest.mark.parametrize("levels", [1, 2, 3, 7, 256])
def test_gumbel_argmax_matches_the_reference(backend, dtype, levels):
    g = torch.Generator().manual_seed(levels)
    logits = (torch.randn(300, levels, generator=g, dtype=torch.float64) * 3).to(dtype)
    base = torch.randint(0, 1 << 40, (300,), generator=g)
    logits, base = logits.to(device_for(backend)), base.to(device_for(backend))
    got = gumbel_argmax(logits, base, seed=11, offset=5, backend=backend)
    want = ref.gumbel_argmax(logits, base, 11, 5)
    # The kernel adds noise in float32 with a few-ulp log: a draw may differ only at a near-tie.
    differ = got != want
    assert differ.float().mean() <= 0.01
    noise = ref.gumbel(base[:, None] + torch.arange(levels, device=base.device), 11, 5)
    scores = logits.double() + noise
    rows = differ.nonzero().flatten()
    gap = (scores[rows, want[rows]] - scores[rows, got[rows]]).abs()
    assert bool((gap < 1e-4).all())


@pytest.mark.parametrize("backend", KERNELS)
def test_gumbel_argmax_scores_float64_logits_at_their_precision(backend):
    # [1e8, 1e8 + 4]: level 1 wins unless the Gumbel gap exceeds 4 (about 2 % of draws); a float32 score rounds
    # both logits to 1e8 and drew level 0 about half the time (the cpu kernel: always 0).
    logits = torch.tensor([[1e8, 1e8 + 4]], dtype=torch.float64).expand(1000, 2).contiguous()
    base = torch.arange(1000, dtype=torch.int64) * 2
    got = gumbel_argmax(logits.to(device_for(backend)), base.to(device_for(backend)), seed=3, backend=backend)
    assert got.cpu().tolist() == ref.gumbel_argmax(logits, base, 3, 0).tolist()
    assert got.float().mean() > 0.9


@pytest.mark.parametrize("backend, dtype", [(b, d) for b in KERNELS for d in dtypes_for(b)])
def test_gumbel_argmax_nan_rule_is_the_references(backend, dtype):
    # torch.argmax's rule, written in the reference: NaN is the maximum and the first NaN is drawn; a row of
    # -inf draws level 0; +inf beats every finite score, the first +inf among several.
    nan, inf = float("nan"), float("inf")
    rows = [[0.0, nan, 5.0, nan], [nan, 1.0, 2.0, 3.0], [-inf] * 4, [inf, 1.0, inf, 2.0], [1.0, 2.0, 3.0, nan]]
    logits = torch.tensor(rows, dtype=torch.float64).repeat(8, 1).to(dtype)
    base = torch.arange(logits.shape[0], dtype=torch.int64) * 4
    got = gumbel_argmax(logits.to(device_for(backend)), base.to(device_for(backend)), seed=7, backend=backend)
    assert got.cpu().tolist() == [1, 0, 0, 0, 3] * 8
    assert ref.gumbel_argmax(logits, base, 7, 0).tolist() == [1, 0, 0, 0, 3] * 8


@pytest.mark.skipif("cpu" not in KERNELS, reason="the compiled entry's own checks")
@pytest.mark.parametrize("bad", [-1, 2**63 - 4, -(2**63)])
def test_the_compiled_gumbel_entry_refuses_a_base_that_wraps(bad):
    # Below the op's check: the C++ entry itself refuses a row whose stream indices base .. base + levels - 1
    # leave [0, 2^63) (a wrapped row made the warp-wide CUDA draw return a level past the end).
    from genkern import _native

    logits, out = torch.randn(3, 5), torch.empty(3, dtype=torch.int64)
    with pytest.raises(ValueError, match="base"):
        _native.call(_native._C.pixelcnn_sampling.gumbel_argmax, logits, torch.tensor([0, bad, 7]), out, 1, 0)
    _native.call(_native._C.pixelcnn_sampling.gumbel_argmax, logits, torch.tensor([0, 2**63 - 5, 7]), out, 1, 0)
    assert out.tolist() == ref.gumbel_argmax(logits, torch.tensor([0, 2**63 - 5, 7]), 1, 0).tolist()


def test_gumbel_argmax_empty_and_single_level():
    assert gumbel_argmax(torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), seed=1).shape == (0,)
    assert gumbel_argmax(torch.zeros(5, 1), torch.arange(5), seed=1).tolist() == [0] * 5


@pytest.mark.parametrize("backend", SAMPLER_BACKENDS)
def test_gumbel_argmax_draws_follow_the_softmax(backend):
    """Chi-square goodness of fit of 40000 draws from 5 levels (rows at disjoint stream elements). The
    threshold is the 0.999999 quantile of chi2 with 4 degrees of freedom: a false failure once in 10^6."""
    logits = torch.tensor([0.0, 1.0, -1.0, 2.0, 0.5])
    n = 40000
    device = device_for(backend)
    draws = gumbel_argmax(
        logits.expand(n, 5).contiguous().to(device), torch.arange(n, device=device) * 5, seed=3, backend=backend
    ).cpu()
    counts = torch.bincount(draws, minlength=5).double()
    expected = torch.softmax(logits.double(), 0) * n
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 33.4


def test_gumbel_argmax_depends_on_seed_offset_and_base():
    logits = torch.zeros(2000, 8)
    base = torch.arange(2000) * 8
    a = gumbel_argmax(logits, base, seed=1)
    assert torch.equal(a, gumbel_argmax(logits, base, seed=1))
    assert not torch.equal(a, gumbel_argmax(logits, base, seed=2))
    assert not torch.equal(a, gumbel_argmax(logits, base, seed=1, offset=1))
    assert not torch.equal(a, gumbel_argmax(logits, base + 8, seed=1))
    # a row's draw depends on its own base only
    assert torch.equal(a[100:200], gumbel_argmax(logits[100:200], base[100:200], seed=1))


def test_gumbel_argmax_is_an_op():
    logits, base = torch.randn(7, 5), torch.arange(7) * 5
    for backend in SAMPLER_BACKENDS:
        device = device_for(backend)
        with gk_backend.scoped(backend):
            torch.library.opcheck(torch.ops.genkern.gumbel_argmax.default, (logits.to(device), base.to(device), 3, 0))


@pytest.mark.parametrize(
    "logits, base, kwargs, error, match",
    [
        (torch.zeros(3), torch.zeros(3, dtype=torch.int64), {}, ValueError, "logits must have shape"),
        (torch.zeros(3, 0), torch.zeros(3, dtype=torch.int64), {}, ValueError, "logits must have shape"),
        (torch.zeros(3, 2, dtype=torch.int64), torch.zeros(3, dtype=torch.int64), {}, TypeError, "logits"),
        (torch.zeros(3, 2), torch.zeros(3), {}, TypeError, "base must be an int64"),
        (torch.zeros(3, 2), torch.zeros(4, dtype=torch.int64), {}, ValueError, "base must have shape"),
        (torch.zeros(3, 2), -torch.ones(3, dtype=torch.int64), {}, ValueError, "base must be non-negative"),
        (torch.zeros(3, 2), torch.zeros(3, dtype=torch.int64), {"seed": -1}, ValueError, "seed"),
        (torch.zeros(3, 2), torch.zeros(3, dtype=torch.int64), {"backend": "cuda"}, ValueError, "backend"),
    ],
)
def test_gumbel_argmax_bad_arguments(logits, base, kwargs, error, match):
    with pytest.raises(error, match=match):
        gumbel_argmax(logits, base, **{"seed": 0, **kwargs})


def test_draw_base_keys_sample_position_and_level():
    base = draw_base(5, 3, dims=10, position=4, levels=7, device="cpu")
    assert base.tolist() == [(s * 10 + 4) * 7 for s in (5, 6, 7)]


# -------------------------------------------------------------------------------------------------------
# The program runner: a hand-written program against the reference, and the contract checks.
# -------------------------------------------------------------------------------------------------------
def small_program(batch, colors=2, levels=3, hidden=6, seed=0):
    """Row node (vertical conv + gate) feeding pixel nodes (masked conv, link, gate, residual), head."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g) * 0.5  # noqa: E731
    p = Program(colors)
    v_pre, v = p.cache(2 * hidden), p.cache(hidden)
    p.conv(0, v_pre, rnd(2 * hidden, colors, 2, 3), anchor=(2, 1), bias=rnd(2 * hidden), row_level=True)
    p.gate(v_pre, v, row_level=True)
    h = p.cache(2 * hidden)
    keep = torch.ones(2 * hidden, colors, 2, 3)
    keep[:, :, 1, 1:] = 0  # the current pixel and the right of it: never seen
    p.conv(0, h, rnd(2 * hidden, colors, 2, 3), keep, anchor=(1, 1), bias=rnd(2 * hidden), cond=rnd(batch, 2 * hidden))
    p.conv(v, h, rnd(2 * hidden, hidden, 1, 1), accumulate=True)
    gated = p.cache(hidden)
    p.gate(h, gated)
    res = p.cache(hidden)
    p.conv(gated, res, rnd(hidden, hidden, 1, 1), residual=gated, relu_input=True)
    p.logits = p.cache(colors * levels)
    p.conv(res, p.logits, rnd(colors * levels, hidden, 1, 1) * 4, bias=rnd(colors * levels))
    return p


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("batch", [1, 5, 9])
def test_program_runner_matches_the_reference(backend, batch):
    levels = 3
    p = small_program(batch, levels=levels)
    kwargs = dict(levels=levels, scale=0.7, shift=-0.3, seed=4, offset=2, first_sample=3)
    got = p.run(
        torch.zeros(batch, 2, 4, 5, dtype=torch.int64, device=device_for(backend)), backend=backend, **kwargs
    ).cpu()
    want = p.run(torch.zeros(batch, 2, 4, 5, dtype=torch.int64), backend="reference", **kwargs)
    assert torch.equal(got, want)
    assert got.unique().numel() == levels  # the test is not trivial


@pytest.mark.parametrize("backend", KERNELS)
def test_program_runner_empty_batch(backend):
    p = small_program(0)
    out = p.run(
        torch.zeros(0, 2, 4, 5, dtype=torch.int64, device=device_for(backend)),
        levels=3,
        scale=1.0,
        shift=0.0,
        seed=0,
        offset=0,
        first_sample=0,
        backend=backend,
    )
    assert out.shape == (0, 2, 4, 5)


def whole_segments(nodes, caches):
    """Every output channel of each pixel node at step 0, from all its rows (nodes refused by the entry get
    a placeholder: the node is checked first)."""
    channels = [c.shape[-1] for c in caches]
    return [
        []
        if n[1]
        else [
            (
                0,
                0,
                channels[n[3]] if n[3] < len(channels) else 1,
                0 if n[0] == ref.GATE else n[9].shape[0] * n[9].shape[1],
            )
        ]
        for n in nodes
    ]


def run_raw(nodes, caches=None, out=None, logits=2, levels=2, segments=None):
    out = torch.zeros(2, 1, 3, 3, dtype=torch.int64) if out is None else out
    caches = caches or [torch.zeros(2, 3, 3, 1), torch.zeros(2, 3, 3, 4), torch.zeros(2, 3, 3, 2)]
    segments = whole_segments(nodes, caches) if segments is None else segments
    genkern._native._C.pixelcnn_sampling.sample(
        [genkern._native.array(c) for c in caches],
        [tuple(genkern._native.array(v) if isinstance(v, torch.Tensor) else v for v in n) for n in nodes],
        segments,
        genkern._native.array(out),
        logits,
        levels,
        1.0,
        0.0,
        0,
        0,
        0,
    )


def conv_node(src, dst, c_in, c_out, dy=(-1,), dx=(0,), row=False, accumulate=False, residual=-1):
    return (
        0,
        row,
        src,
        dst,
        residual,
        False,
        accumulate,
        list(dy),
        list(dx),
        torch.zeros(len(dy), c_in, c_out),
        None,
        None,
    )


@pytest.mark.skipif("cpu" not in KERNELS, reason="the compiled runner's own checks")
@pytest.mark.parametrize(
    "nodes, match",
    [
        ([conv_node(0, 1, 1, 4), conv_node(1, 2, 4, 2, dy=(0,), dx=(1,))], "not computed yet"),
        ([conv_node(0, 1, 1, 4, dy=(0,), dx=(0,), row=True)], "not computed yet"),
        ([conv_node(1, 2, 4, 2)], "reads a cache no earlier node writes"),
        ([conv_node(0, 1, 1, 4, accumulate=True)], "cannot accumulate"),
        ([conv_node(0, 1, 1, 3)], "weight must have shape"),
        ([conv_node(0, 5, 1, 4)], "cache index out of range"),
        ([conv_node(0, 0, 1, 1)], "cache index out of range"),
        ([conv_node(0, 1, 1, 4, dy=(), dx=())], "same taps"),
        ([(1, False, 1, 2, -1, False, False, [], [], None, None, None)], "reads a cache no earlier node writes"),
        ([conv_node(0, 1, 1, 4), (1, False, 1, 2, -1, False, False, [], [], None, None, None)], None),
        ([conv_node(0, 1, 1, 4), conv_node(1, 2, 4, 2, row=True), conv_node(1, 2, 4, 2)], "both row and pixel"),
    ],
)
def test_program_contract_is_checked(nodes, match):
    if match is None:  # a valid program: a gate halving 4 channels into the 2 logits
        run_raw(nodes)
        return
    with pytest.raises(ValueError, match=match):
        run_raw(nodes)


@pytest.mark.skipif("cpu" not in KERNELS, reason="the compiled runner's own checks")
def test_program_arrays_are_checked():
    nodes = [conv_node(0, 1, 1, 4), conv_node(1, 2, 4, 2)]
    with pytest.raises(ValueError, match=r"caches\[1\] must have shape"):
        run_raw(nodes, caches=[torch.zeros(2, 3, 3, 1), torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 3, 2)])
    with pytest.raises(ValueError, match="input, must have"):
        run_raw(nodes, out=torch.zeros(2, 2, 3, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="logits must name"):
        run_raw(nodes, levels=3)
    with pytest.raises(TypeError, match="out"):
        run_raw(nodes, out=torch.zeros(2, 1, 3, 3))
    # Arrays on another device than out's: refused before anything reads them (the description alone).
    w = torch.zeros(1, 1, 4)
    elsewhere = genkern._native._C.Array(
        w.data_ptr(), [1, 1, 4], [4, 4, 1], genkern._native._C.DType.float32, genkern._native._C.Device.cuda, 0
    )
    with pytest.raises(ValueError, match="weight and out are on different devices"):
        run_raw([(0, False, 0, 1, -1, False, False, [-1], [0], elsewhere, None, None), conv_node(1, 2, 4, 2)])
