"""Property tests of the autoregressive family: causal_conv1d and causal_conv1d_update (with causal-conv1d's
states, packing and state pool), causal_conv1d_varlen_states, gated_activation, masked_conv2d, nade_log_prob,
nade_sample, gumbel_argmax, sample_logits and the logistic-mixture head, cpu against the reference (strategies and the
comparison rule in test_properties.py)."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given
from test_properties import (
    DTYPES,
    ELEMENTWISE,
    REDUCTION,
    both,
    check,
    dims,
    examples,
    magnitude,
    seed_or_offset,
    tensor,
    values,
)

import genkern
from genkern.autoregressive.reference import mixture_param_channels

pytestmark = pytest.mark.skipif("cpu" not in genkern.backends(), reason="needs the compiled cpu backend")

ACTIVATIONS = (None, "silu", "tanh")


def _magnitudes(fn, inputs, weights):
    """fn's output and gradients on the reference at the inputs' magnitudes, for weights' magnitudes: the sizes
    of the terms a sum of products (a convolution) adds, bounds for its rounding error."""
    ins = [None if x is None else magnitude(x).requires_grad_(True) for x in inputs]
    out = fn(*ins)
    leaves = [x for x in ins if x is not None]
    if weights is None:
        return out.detach(), None
    grads = torch.autograd.grad((out * magnitude(weights)).sum(), leaves, allow_unused=True)
    return out.detach(), [None if g is None else g.detach() for g in grads]


@examples(200)
@given(data=st.data(), extreme=st.booleans())
def test_causal_conv1d(data, extreme):
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    B, L = dims(data, 2, high=9, label="B, L")
    c_in, c_out = dims(data, 2, high=5, label="channels")
    K = data.draw(st.integers(1, 4), label="K")
    dilation = data.draw(st.sampled_from((1, 2, 3, 7)), label="dilation")
    depthwise = data.draw(st.booleans(), label="depthwise")
    w_shape = (c_in, K) if depthwise else (c_out, c_in, K)
    x = tensor(data, (B, c_in, L), dtype, label="x", extreme=extreme)
    weight = tensor(data, w_shape, dtype, label="weight", extreme=extreme, scale=0.5)
    bias = tensor(data, (w_shape[0],), dtype, label="bias", extreme=extreme) if data.draw(st.booleans()) else None
    activation = data.draw(st.sampled_from(ACTIVATIONS), label="activation")
    for t in (x, weight, bias):
        if t is not None:
            t.requires_grad_(True)
    (cpu, cpu_g, w), (ref, ref_g, _) = both(
        lambda b, xx, ww, bb: genkern.causal_conv1d(xx, ww, bb, dilation=dilation, activation=activation, backend=b),
        [x, weight, bias],
        grad_seed=data.draw(st.integers(0, 2**31 - 1), label="grad seed"),
    )
    out_mag, grad_mags = _magnitudes(
        lambda xx, ww, bb: genkern.causal_conv1d(xx, ww, bb, dilation=dilation, backend="reference"),
        [x, weight, bias],
        w[0],
    )
    check(cpu[0], ref[0], REDUCTION, out_mag, what="y")
    for name, a, e, m in zip(("x", "weight", "bias"), cpu_g, ref_g, grad_mags):
        check(a, e, REDUCTION, m, what=f"grad {name}")


@examples(150)
@given(data=st.data(), extreme=st.booleans())
def test_causal_conv1d_update(data, extreme):
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    B = dims(data, 1, label="B")[0]
    c_in, c_out = dims(data, 2, high=5, label="channels")
    K = data.draw(st.integers(1, 4), label="K")
    dilation = data.draw(st.sampled_from((1, 2, 3)), label="dilation")
    W = (K - 1) * dilation + data.draw(st.integers(0, 2), label="extra state")
    depthwise = data.draw(st.booleans(), label="depthwise")
    w_shape = (c_in, K) if depthwise else (c_out, c_in, K)
    x = tensor(data, (B, c_in), dtype, label="x", extreme=extreme)
    state = values_state = tensor(data, (B, c_in, W), dtype, label="state", extreme=extreme, allow_expand=False)
    weight = tensor(data, w_shape, dtype, label="weight", extreme=extreme, scale=0.5)
    bias = tensor(data, (w_shape[0],), dtype, label="bias", extreme=extreme) if data.draw(st.booleans()) else None
    activation = data.draw(st.sampled_from(ACTIVATIONS), label="activation")
    states = {}

    def run(b, xx, ww, bb):
        s = values_state.clone()  # updated in place: each backend gets its own copy (contiguous, as required)
        states[b] = s
        return genkern.causal_conv1d_update(xx, s, ww, bb, dilation=dilation, activation=activation, backend=b)

    (cpu, _, _), (ref, _, _) = both(run, [x, weight, bias])
    out_mag = genkern.causal_conv1d_update(
        magnitude(x), magnitude(state), magnitude(weight), None if bias is None else magnitude(bias),
        dilation=dilation, backend="reference",
    )  # fmt: skip
    check(cpu[0], ref[0], REDUCTION, out_mag, what="y")
    check(states["cpu"], states["reference"], 0, what="state")  # a shift: exact


@examples(150)
@given(data=st.data(), extreme=st.booleans())
def test_gated_activation(data, extreme):
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    shape = list(dims(data, data.draw(st.integers(1, 4), label="ndim"), label="shape"))
    dim = data.draw(st.integers(-len(shape), len(shape) - 1), label="dim")
    shape[dim] *= 2
    x = tensor(data, tuple(shape), dtype, label="x", extreme=extreme, scale=2.0).requires_grad_(True)
    (cpu, cpu_g, _), (ref, ref_g, _) = both(
        lambda b, xx: genkern.gated_activation(xx, dim, backend=b),
        [x],
        grad_seed=data.draw(st.integers(0, 2**31 - 1), label="grad seed"),
    )
    check(cpu[0], ref[0], ELEMENTWISE, torch.ones(()), what="y")  # |y| < 1: relative to 1
    check(cpu_g[0], ref_g[0], ELEMENTWISE, torch.ones(()), what="grad x")


@examples(200)
@given(data=st.data(), extreme=st.booleans())
def test_masked_conv2d(data, extreme):
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    groups = data.draw(st.sampled_from((1, 1, 3)), label="color_groups")
    B, H, W = dims(data, 3, high=6, label="B, H, W")
    c_in = groups * data.draw(st.integers(1, 2), label="in per group")
    c_out = groups * data.draw(st.integers(1, 2), label="out per group")
    k = data.draw(st.sampled_from((1, 3, 5)), label="k")
    dilation = data.draw(st.sampled_from((1, 2)), label="dilation")
    mask_type = data.draw(st.sampled_from(("A", "B")), label="mask_type")
    x = tensor(data, (B, c_in, H, W), dtype, label="x", extreme=extreme)
    weight = tensor(data, (c_out, c_in, k, k), dtype, label="weight", extreme=extreme, scale=0.5)
    bias = tensor(data, (c_out,), dtype, label="bias", extreme=extreme) if data.draw(st.booleans()) else None
    for t in (x, weight, bias):
        if t is not None:
            t.requires_grad_(True)
    kwargs = dict(mask_type=mask_type, color_groups=groups, dilation=dilation)
    (cpu, cpu_g, w), (ref, ref_g, _) = both(
        lambda b, xx, ww, bb: genkern.masked_conv2d(xx, ww, bb, backend=b, **kwargs),
        [x, weight, bias],
        grad_seed=data.draw(st.integers(0, 2**31 - 1), label="grad seed"),
    )
    out_mag, grad_mags = _magnitudes(
        lambda xx, ww, bb: genkern.masked_conv2d(xx, ww, bb, backend="reference", **kwargs), [x, weight, bias], w[0]
    )
    check(cpu[0], ref[0], REDUCTION, out_mag, what="y")
    for name, a, e, m in zip(("x", "weight", "bias"), cpu_g, ref_g, grad_mags):
        check(a, e, REDUCTION, m, what=f"grad {name}")


def _nade_params(data, extreme, dtype, D, H, finite_logits=False, plain_weight=False):
    return [
        tensor(
            data,
            shape,
            dtype,
            label=name,
            scale=scale,
            extreme=extreme and not (plain_weight and name == "weight"),
            finite=finite_logits and name in "vb",
        )  # fmt: skip
        for name, shape, scale in (("weight", (H, D), 0.5), ("c", (H,), 0.5), ("v", (D, H), 0.5), ("b", (D,), 1.0))
    ]


@examples(150)
@given(data=st.data(), extreme=st.booleans())
def test_nade_log_prob(data, extreme):
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    B, D, H = dims(data, 3, high=8, label="B, D, H")
    params = _nade_params(data, extreme, dtype, D, H)
    bits = data.draw(st.lists(st.booleans(), min_size=B * D, max_size=B * D), label="x")
    x = torch.tensor(bits, dtype=dtype).reshape(B, D)
    for p in params:
        p.requires_grad_(True)
    (cpu, cpu_g, w), (ref, ref_g, _) = both(
        lambda b, *ps: genkern.nade_log_prob(x, *ps, backend=b),
        params,
        grad_seed=data.draw(st.integers(0, 2**31 - 1), label="grad seed"),
    )
    # log p sums D terms x l - softplus(l), l = b + V h (|h| < 1): bounded by sum_i (|b_i| + sum_h |V_ih|) + D.
    wm, _, vm, bm = (magnitude(p) for p in params)
    l_mag = bm + vm.sum(1) + 1.0  # (D,)
    row = l_mag.sum().expand(B) * 2
    check(cpu[0], ref[0], REDUCTION, row, what="log_prob")
    g = magnitude(w[0]).sum() if B else torch.zeros(())
    # Each gradient sums B * D products of a weight in (-1, 1) with |g|, times |V| for W and c.
    scale = g * (1.0 + vm.abs().sum() + wm.abs().sum()) * max(D, 1)
    for name, a, e in zip(("weight", "c", "v", "b"), cpu_g, ref_g):
        check(a, e, REDUCTION, scale, what=f"grad {name}")


@examples(120)
@given(data=st.data(), extreme=st.booleans())
def test_nade_sample(data, extreme):
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    D, H = dims(data, 2, high=8, label="D, H")
    n = data.draw(st.sampled_from((0, 1, 2, 5)), label="num_samples")
    params = _nade_params(data, extreme, dtype, D, H)
    seed, offset = seed_or_offset(data), seed_or_offset(data, "offset")
    first = data.draw(st.one_of(st.sampled_from((0, 1)), st.integers(0, 2**40)), label="first")
    got = genkern.nade_sample(*params, n, seed=seed, offset=offset, first=first, backend="cpu")
    expected = genkern.nade_sample(*params, n, seed=seed, offset=offset, first=first, backend="reference")
    # u < p is decided exactly on both sides; p itself is rounded (float32: a draw within 1e-7 of p may
    # differ, about one draw in 10^6 -- none in this fixed set of examples).
    check(got, expected, 0, what="samples")


@examples(200)
@given(data=st.data(), extreme=st.booleans())
def test_gumbel_argmax(data, extreme):
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    N, levels = dims(data, 2, high=9, label="N, levels")
    levels = max(levels, 1)
    logits = tensor(data, (N, levels), dtype, label="logits", extreme=extreme, scale=3.0)
    if dtype == torch.float64 and data.draw(st.booleans(), label="near float64 ties"):
        # Logits a few units apart at 1e8, where float32 has no resolution (ulp 8): only float64 scores tell them
        # apart, as the reference's do.
        logits = logits + 1e8
    seed, offset = seed_or_offset(data), seed_or_offset(data, "offset")
    base_kind = data.draw(st.sampled_from(("model", "random")), label="base")
    if base_kind == "model":
        first = data.draw(st.integers(0, 2**20), label="first")
        base = ((first + torch.arange(N)) * 7 + 3) * levels
    else:
        base = torch.tensor(
            data.draw(st.lists(st.integers(0, 2**62), min_size=N, max_size=N), label="bases"), dtype=torch.int64
        )
    got = genkern.gumbel_argmax(logits, base, seed=seed, offset=offset, backend="cpu")
    expected = genkern.gumbel_argmax(logits, base, seed=seed, offset=offset, backend="reference")
    check(got, expected, what="draw")


# ------------------------------------------------------------------ causal-conv1d's API: states, packing


def _depthwise(data, extreme, dtype, *, high_l=9):
    B, L = dims(data, 2, high=high_l, label="B, L")
    C = dims(data, 1, high=5, label="C")[0]
    K = data.draw(st.integers(1, 4), label="K")
    dilation = data.draw(st.sampled_from((1, 2, 3)), label="dilation")
    if data.draw(st.booleans(), label="channel-last"):  # causal-conv1d's (B, L, C) storage seen as (B, C, L)
        x = values(data, (B, L, C), dtype, label="x", extreme=extreme).transpose(1, 2)
    else:
        x = tensor(data, (B, C, L), dtype, label="x", extreme=extreme)
    weight = tensor(data, (C, K), dtype, label="weight", extreme=extreme, scale=0.5)
    bias = tensor(data, (C,), dtype, label="bias", extreme=extreme) if data.draw(st.booleans()) else None
    return B, C, L, K, dilation, x, weight, bias


def _seq_idx(data, B, L):
    """(B, L) int32 packed-sequence ids: non-decreasing per row, with some positions marked -1 (padding)."""
    rows = []
    for _ in range(B):
        steps = data.draw(st.lists(st.integers(0, 1), min_size=L, max_size=L), label="seq_idx steps")
        ids = torch.tensor(steps, dtype=torch.int64).cumsum(0) if L else torch.zeros(0, dtype=torch.int64)
        pad = data.draw(st.lists(st.booleans(), min_size=L, max_size=L), label="seq_idx padding")
        rows.append(torch.where(torch.tensor(pad, dtype=torch.bool), -1, ids) if L else ids)
    return torch.stack(rows).to(torch.int32) if B else torch.zeros(0, L, dtype=torch.int32)


def _weighted_magnitudes(fn, inputs, weights):
    """Like _magnitudes for an fn of several outputs: gradients of sum_k |out_k| |weights_k|."""
    ins = [None if x is None else magnitude(x).requires_grad_(True) for x in inputs]
    outs = fn(*ins)
    total = sum((o * magnitude(w)).sum() for o, w in zip(outs, weights) if w is not None)
    leaves = [x for x in ins if x is not None]
    grads = torch.autograd.grad(total, leaves, allow_unused=True)
    return [o.detach() for o in outs], [None if g is None else g.detach() for g in grads]


@examples(150)
@given(data=st.data(), extreme=st.booleans())
def test_causal_conv1d_with_states(data, extreme):
    """initial_states in, final_states out (with their gradients), seq_idx packing, channel-last x."""
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    B, C, L, K, dilation, x, weight, bias = _depthwise(data, extreme, dtype)
    P = (K - 1) * dilation
    init = tensor(data, (B, C, P), dtype, label="initial_states", extreme=extreme)
    init = init if data.draw(st.booleans(), label="initial_states given") else None
    seq_idx = _seq_idx(data, B, L) if data.draw(st.booleans(), label="seq_idx given") else None
    activation = data.draw(st.sampled_from(ACTIVATIONS), label="activation")
    for t in (x, weight, bias, init):
        if t is not None:
            t.requires_grad_(True)

    def conv(b, xx, ww, bb, ii, act=activation):
        return genkern.causal_conv1d(
            xx, ww, bb, dilation=dilation, activation=act, initial_states=ii, return_final_states=True,
            seq_idx=seq_idx, backend=b,
        )  # fmt: skip

    (cpu, cpu_g, w), (ref, ref_g, _) = both(
        conv, [x, weight, bias, init], grad_seed=data.draw(st.integers(0, 2**31 - 1), label="grad seed")
    )
    (out_mag, _), grad_mags = _weighted_magnitudes(
        lambda xx, ww, bb, ii: conv("reference", xx, ww, bb, ii, act=None), [x, weight, bias, init], w
    )
    check(cpu[0], ref[0], REDUCTION, out_mag, what="y")
    check(cpu[1], ref[1], 0, what="final_states")  # a copy of inputs: exact
    for name, a, e, m in zip(("x", "weight", "bias", "initial_states"), cpu_g, ref_g, grad_mags):
        check(a, e, REDUCTION, m, what=f"grad {name}")


@examples(150)
@given(data=st.data(), extreme=st.booleans())
def test_causal_conv1d_update_with_states(data, extreme):
    """Several new positions at once, the state as a circular buffer (cache_seqlens), a state pool
    (conv_state_indices, -1 a padding slot), channel-last x."""
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    B, C, L, K, dilation, x, weight, bias = _depthwise(data, extreme, dtype, high_l=4)
    if data.draw(st.booleans(), label="one position (B, C)"):
        x = x[:, :, 0] if L else x[:, :, :0].sum(-1)
    W = (K - 1) * dilation + data.draw(st.integers(0, 2), label="extra state")
    W = max(W, 1)
    pool = B + data.draw(st.integers(0, 3), label="spare state rows")
    indices = None
    if data.draw(st.booleans(), label="conv_state_indices given"):
        rows = data.draw(st.permutations(range(pool)), label="rows")[:B]
        pad = data.draw(st.lists(st.booleans(), min_size=B, max_size=B), label="padding slots")
        indices = torch.tensor([-1 if p else r for r, p in zip(rows, pad)], dtype=torch.int32)
    else:
        pool = B
    seqlens = None
    if data.draw(st.booleans(), label="cache_seqlens given"):
        lens = data.draw(st.lists(st.integers(0, 2**31 - 1), min_size=B, max_size=B), label="cache_seqlens")
        seqlens = torch.tensor(lens, dtype=torch.int32)
    state0 = values(data, (pool, C, W), dtype, label="state", extreme=extreme)
    activation = data.draw(st.sampled_from(ACTIVATIONS), label="activation")
    states = {}

    def run(b, xx, ww, bb):
        states[b] = s = state0.clone()
        return genkern.causal_conv1d_update(
            xx, s, ww, bb, dilation=dilation, activation=activation, cache_seqlens=seqlens,
            conv_state_indices=indices, backend=b,
        )  # fmt: skip

    (cpu, _, _), (ref, _, _) = both(run, [x, weight, bias])
    out_mag = genkern.causal_conv1d_update(
        magnitude(x), magnitude(state0), magnitude(weight), None if bias is None else magnitude(bias),
        dilation=dilation, cache_seqlens=seqlens, conv_state_indices=indices, backend="reference",
    )  # fmt: skip
    check(cpu[0], ref[0], REDUCTION, out_mag, what="y")
    check(states["cpu"], states["reference"], 0, what="state")  # writes of inputs: exact


@examples(100)
@given(data=st.data(), extreme=st.booleans())
def test_causal_conv1d_varlen_states(data, extreme):
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    lengths = data.draw(st.lists(st.integers(0, 6), max_size=5), label="lengths")
    C = dims(data, 1, high=5, label="C")[0]
    total = sum(lengths) + data.draw(st.integers(0, 2), label="trailing tokens")
    x = tensor(data, (total, C), dtype, label="x", extreme=extreme)
    cu = torch.tensor([0, *lengths], dtype=torch.int64).cumsum(0).to(torch.int32)
    state_len = data.draw(st.integers(0, 5), label="state_len")
    got = genkern.causal_conv1d_varlen_states(x, cu, state_len, backend="cpu")
    expected = genkern.causal_conv1d_varlen_states(x, cu, state_len, backend="reference")
    check(got, expected, 0, what="states")
    assert got.stride() == expected.stride() or got.numel() == 0, "states: channel-last storage on both"


# ------------------------------------------------------------------ the sampling head, the mixture head


@examples(200)
@given(data=st.data(), extreme=st.booleans())
def test_sample_logits(data, extreme):
    """The filtered draw is exact on both sides (the filters' thresholds are compared, not rounded sums),
    except where a row's kept mass sits within rounding of top_p or a logit within rounding of min_p's
    cut: such rows are not drawn here (random normals never land there in float64; in float32 the
    examples are fixed and none does)."""
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    N, V = dims(data, 2, high=12, label="rows, vocab")
    V = max(V, 1)
    logits = tensor(data, (N, V), dtype, label="logits", extreme=extreme, finite=True, scale=3.0)

    def per_row(label, scalar, row):
        kind = data.draw(st.sampled_from(("default", "scalar", "per-row")), label=f"{label} kind")
        if kind == "default":
            return {}
        if kind == "scalar":
            return {label: data.draw(scalar, label=label)}
        dtype = torch.int64 if label == "top_k" else torch.float32
        return {label: torch.tensor(data.draw(st.lists(row, min_size=N, max_size=N), label=label), dtype=dtype)}

    kwargs = {}
    kwargs |= per_row("temperature", st.sampled_from((0.0, 0.5, 1.0, 2.0)), st.sampled_from((0.0, 0.7, 1.0, 1.5)))
    kwargs |= per_row("top_k", st.integers(0, V + 1), st.integers(0, V + 1))
    kwargs |= per_row("top_p", st.sampled_from((0.1, 0.5, 0.9, 1.0)), st.sampled_from((0.05, 0.3, 0.8, 1.0)))
    kwargs |= per_row("min_p", st.sampled_from((0.0, 0.05, 0.3)), st.sampled_from((0.0, 0.1, 0.5)))
    seed, offset = seed_or_offset(data), seed_or_offset(data, "offset")
    got = genkern.sample_logits(logits, seed=seed, offset=offset, backend="cpu", **kwargs)
    expected = genkern.sample_logits(logits, seed=seed, offset=offset, backend="reference", **kwargs)
    check(got, expected, what="tokens")


def _mixture_setup(data, extreme, dtype):
    B, H, W = dims(data, 3, high=4, label="B, H, W")
    channels = data.draw(st.sampled_from((1, 3)), label="channels")
    K = data.draw(st.integers(1, 4), label="num_mixtures")
    coupling = channels == 3 and data.draw(st.booleans(), label="rgb_coupling")
    levels = data.draw(st.sampled_from((2, 16, 256)), label="levels")
    params = tensor(
        data,
        (B, mixture_param_channels(channels, K, coupling), H, W),
        dtype,
        label="params",
        extreme=extreme,
        finite=True,
        scale=2.0,
    )
    return B, H, W, channels, K, coupling, levels, params


@examples(150)
@given(data=st.data(), extreme=st.booleans())
def test_discretized_logistic_mixture_nll(data, extreme):
    """Against the float64 reference, the flash-attention rule: a bin's probability is a difference of two
    sigmoids that cancels (by up to the paper's 1e-5 cut to its low-probability branch), so float32 results
    of two correct programs differ by far more than float32's epsilon; the cpu's error may be at most twice
    the float32 reference's largest, plus rounding relative to the terms."""
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    B, H, W, channels, K, coupling, levels, params = _mixture_setup(data, extreme, dtype)
    seed = data.draw(st.integers(0, 2**31 - 1), label="x seed")
    x = torch.randint(0, levels, (B, channels, H, W), generator=torch.Generator().manual_seed(seed))
    reduction = data.draw(st.sampled_from(("none", "sum", "mean")), label="reduction")
    kwargs = dict(levels=levels, num_mixtures=K, rgb_coupling=coupling, reduction=reduction)
    exact = params.detach().double().requires_grad_(True)
    params.requires_grad_(True)

    def nll(b, p):
        return genkern.discretized_logistic_mixture_nll(p, x, backend=b, **kwargs)

    grad_seed = data.draw(st.integers(0, 2**31 - 1), label="grad seed")
    (cpu, cpu_g, w), (ref, ref_g, _) = both(nll, [params], grad_seed=grad_seed)
    (ref64, ref64_g, _), _ = both(nll, [exact], grad_seed=grad_seed)
    # Per pixel a log-sum-exp over K components of terms bounded by the |params| that enter them.
    pix = magnitude(params).sum(1) + 10.0  # (B, H, W)
    per_image = pix.sum((1, 2)) if B else pix.new_zeros(0)
    mag = {"none": per_image, "sum": pix.sum(), "mean": pix.mean() if pix.numel() else pix.sum()}[reduction]

    def against_exact(a, e, e64, m, what):
        err = (e.double() - e64.double()).abs().nan_to_num(0.0, 0.0, 0.0)
        check(a, e64.to(dtype), REDUCTION, m, extra=2 * err.max() if err.numel() else None, what=what)

    against_exact(cpu[0], ref[0], ref64[0], mag, "nll")
    wm = magnitude(w[0]).reshape(-1, 1, 1, 1) if w[0].dim() else magnitude(w[0])
    gmag = wm * torch.ones(params.shape, dtype=torch.float64)
    if reduction == "mean" and params.numel():
        gmag = gmag / max(1, B * H * W * channels)
    against_exact(cpu_g[0], ref_g[0], ref64_g[0], gmag, "grad params")


@examples(120)
@given(data=st.data(), extreme=st.booleans())
def test_discretized_logistic_mixture_sample(data, extreme):
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    B, H, W, channels, K, coupling, levels, params = _mixture_setup(data, extreme, dtype)
    seed, offset = seed_or_offset(data), seed_or_offset(data, "offset")
    first = data.draw(st.one_of(st.sampled_from((0, 1)), st.integers(0, 2**30)), label="first")
    kwargs = dict(
        seed=seed, offset=offset, levels=levels, channels=channels, num_mixtures=K, rgb_coupling=coupling, first=first
    )
    got = genkern.discretized_logistic_mixture_sample(params, backend="cpu", **kwargs)
    expected = genkern.discretized_logistic_mixture_sample(params, backend="reference", **kwargs)
    # A draw rounds a clamped logistic to a level: it can differ only where the value sits within rounding
    # of a bin's edge (about one pixel in 10^6 in float32; none in these fixed examples).
    check(got, expected, what="levels")
