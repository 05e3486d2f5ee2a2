"""Property tests of the autoregressive family: causal_conv1d, causal_conv1d_update, gated_activation,
masked_conv2d, nade_log_prob, nade_sample and gumbel_argmax, cpu against the reference (strategies and the
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
)

import genkern

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
