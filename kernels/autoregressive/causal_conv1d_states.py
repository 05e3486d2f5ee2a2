"""Causal conv1d with carried states (docs/math.md, section 6.3) in Triton: the kernels of
csrc/autoregressive/causal_conv1d_states.h (whose comments define each), under the names the ops call:
forward_states, backward_states, update_states, varlen_states.

Every (B, C, n) tensor of a call is in one layout, channel-first or channel-last (`channel_last`); index
tensors are int64. Compute type: float64 for float64 tensors, float32 otherwise. Work per program:
* forward and dL/dz: BLOCK elements of (B, C, L) in storage order, taps ascending from the bias;
* the input gradient: BLOCK elements of the extended input (B, C, P + L) (or (B, C, L) without initial
  states), taps ascending, plus grad_final_states;
* weight and bias gradients: BLOCK_C channels per program, over all B * L positions BLOCK_L at a time in a
  fixed order, then one sum: no atomics, the same bits on every run;
* the update: BLOCK_C channels of one batch row, positions in order, then its state writes in order (each
  state element is read and written by the lane that owns its channel);
* varlen states: BLOCK elements of the (B, S, C) states.
All indices are int64.
"""

import torch
import triton
import triton.language as tl

from ..core.launch import check, compute_type, launch
from ..core.philox import to_dtype
from .causal_conv1d import _activate, _activate_grad

BLOCK = 1024
GRAD_BLOCK_C = 16
GRAD_BLOCK_L = 64
UPDATE_BLOCK_C = 128


def _check_activation(activation):
    activation = int(activation)
    if activation not in (0, 1, 2):
        raise ValueError("activation must be 0 (none), 1 (silu) or 2 (tanh)")
    return activation


def _check_index(name, t, numel):
    if t is None:
        return
    if t.dtype != torch.int64 or not t.is_contiguous() or t.numel() != numel:
        raise ValueError(f"{name} must be a contiguous int64 tensor of {numel} elements")


def _shape(x, weight, dilation):
    if x.dim() != 3:
        raise ValueError("x must have shape (B, C, L)")
    if weight.dim() != 2 or weight.shape[0] != x.shape[1] or weight.shape[1] < 1:
        raise ValueError("weight must have shape (C, K) with C the channels of x and K >= 1")
    dilation = int(dilation)
    if dilation < 1:
        raise ValueError("dilation must be >= 1")
    return x.shape[0], x.shape[1], x.shape[2], weight.shape[1], dilation


def _check_layout(name, t, shape, channel_last, dtype):
    if t is None:
        return
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}")
    if t.dtype != dtype:
        raise TypeError(f"{name} has dtype {t.dtype}, expected {dtype}")
    storage = t.transpose(1, 2) if channel_last else t
    if not storage.is_contiguous():
        raise ValueError(f"{name} must be {'channel-last' if channel_last else 'contiguous'} like x")


@triton.jit
def _at(b, c, m, n, C, CL: tl.constexpr):
    """Offset of (b, c, m) in a (B, C, n) array of the call's layout."""
    if CL:
        off = (b * n + m) * C + c
    else:
        off = (b * C + c) * n + m
    return off


@triton.jit
def _split(idx, C, n, CL: tl.constexpr):
    """(b, c, m) of flat storage index idx of a (B, C, n) array."""
    if CL:
        c = idx % C
        m = (idx // C) % n
        b = idx // (C * n)
    else:
        m = idx % n
        c = (idx // n) % C
        b = idx // (C * n)
    return b, c, m


@triton.jit
def _pre_activation(
    x_ptr,
    w_ptr,
    bias_ptr,
    init_ptr,
    seq_ptr,
    b,
    c,
    l,
    mask,
    C,
    L,
    K,
    dilation,
    P,
    HAS_BIAS: tl.constexpr,
    HAS_INIT: tl.constexpr,
    HAS_SEQ: tl.constexpr,
    CL: tl.constexpr,
    CT: tl.constexpr,
):
    acc = tl.zeros(l.shape, CT)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + c, mask=mask, other=0.0).to(CT)
    if HAS_SEQ:
        s_l = tl.load(seq_ptr + b * L + l, mask=mask, other=0)
        s_0 = tl.load(seq_ptr + b * L, mask=mask, other=0)
    for k in range(K):
        m = l - tl.cast(K - 1 - k, tl.int64) * dilation
        ok = mask & ((m >= 0) | HAS_INIT)
        if HAS_SEQ:
            s_m = tl.load(seq_ptr + b * L + tl.maximum(m, 0), mask=ok, other=0)
            ok = ok & (tl.where(m >= 0, s_m, s_0) == s_l)
        xv = tl.load(x_ptr + _at(b, c, m, L, C, CL), mask=ok & (m >= 0), other=0.0).to(CT)
        if HAS_INIT:
            iv = tl.load(init_ptr + _at(b, c, P + m, P, C, CL), mask=ok & (m < 0), other=0.0).to(CT)
            xv = tl.where(m >= 0, xv, iv)
        wk = tl.load(w_ptr + c * K + k, mask=mask, other=0.0).to(CT)
        acc += tl.where(ok, wk * xv, 0.0)
    return acc


@triton.jit
def _forward_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    init_ptr,
    seq_ptr,
    g_ptr,
    out_ptr,
    total,
    C,
    L,
    K,
    dilation,
    P,
    HAS_BIAS: tl.constexpr,
    HAS_INIT: tl.constexpr,
    HAS_SEQ: tl.constexpr,
    CL: tl.constexpr,
    ACT: tl.constexpr,
    GRAD: tl.constexpr,
    CT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """GRAD false: out = act(z) (0 where seq_idx < 0); true: out = g * act'(z) (dL/dz, compute type)."""
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = idx < total
    b, c, l = _split(idx, C, L, CL)
    z = _pre_activation(
        x_ptr,
        w_ptr,
        bias_ptr,
        init_ptr,
        seq_ptr,
        b,
        c,
        l,
        mask,
        C,
        L,
        K,
        dilation,
        P,
        HAS_BIAS,
        HAS_INIT,
        HAS_SEQ,
        CL,
        CT,
    )
    if GRAD:
        v = tl.load(g_ptr + idx, mask=mask, other=0.0).to(CT) * _activate_grad(z, ACT)
    else:
        v = _activate(z, ACT)
    if HAS_SEQ:
        dead = tl.load(seq_ptr + b * L + l, mask=mask, other=0) < 0
        v = tl.where(dead, 0.0, v)
    tl.store(out_ptr + idx, to_dtype(v, out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _final_states_kernel(
    x_ptr, init_ptr, out_ptr, total, C, L, P, HAS_INIT: tl.constexpr, CL: tl.constexpr, BLOCK: tl.constexpr
):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = idx < total
    b, c, j = _split(idx, C, P, CL)
    m = L - P + j
    v = tl.load(x_ptr + _at(b, c, m, L, C, CL), mask=mask & (m >= 0), other=0.0)
    if HAS_INIT:
        iv = tl.load(init_ptr + _at(b, c, P + m, P, C, CL), mask=mask & (m < 0), other=0.0)
        v = tl.where(m >= 0, v, iv)
    tl.store(out_ptr + idx, v, mask=mask)


def _launch_pre_activation(x, weight, bias, init, seq, g, out, shape, activation, channel_last, grad):
    B, C, L, K, dilation = shape
    total = B * C * L
    launch(
        _forward_kernel,
        (triton.cdiv(total, BLOCK),),
        x,
        weight,
        bias if bias is not None else weight,
        init if init is not None else x,
        seq if seq is not None else weight,
        g if g is not None else out,
        out,
        total,
        C,
        L,
        K,
        dilation,
        (K - 1) * dilation,
        HAS_BIAS=bias is not None,
        HAS_INIT=init is not None,
        HAS_SEQ=seq is not None,
        CL=channel_last,
        ACT=activation,
        GRAD=grad,
        CT=compute_type(x),
        BLOCK=BLOCK,
    )


def _check_forward(x, weight, bias, initial_states, seq_idx, dilation, channel_last):
    B, C, L, K, dilation = shape = _shape(x, weight, dilation)
    P = (K - 1) * dilation
    _check_layout("x", x, (B, C, L), channel_last, x.dtype)
    check(x.dtype, weight=weight, bias=bias)
    _check_layout("initial_states", initial_states, (B, C, P), channel_last, x.dtype)
    _check_index("seq_idx", seq_idx, B * L)
    if bias is not None and bias.numel() != C:
        raise ValueError(f"bias must have {C} elements")
    return shape


def forward_states(x, weight, bias, initial_states, seq_idx, y, final_states, dilation, activation, channel_last):
    """y and final_states of StatesArgs (csrc/autoregressive/causal_conv1d_states.h)."""
    B, C, L, K, dilation = shape = _check_forward(x, weight, bias, initial_states, seq_idx, dilation, channel_last)
    P = (K - 1) * dilation
    activation = _check_activation(activation)
    _check_layout("y", y, (B, C, L), channel_last, x.dtype)
    _check_layout("final_states", final_states, (B, C, P), channel_last, x.dtype)
    if B * C * L > 0:
        _launch_pre_activation(
            x, weight, bias, initial_states, seq_idx, None, y, shape, activation, channel_last, False
        )
    if final_states is not None and B * C * P > 0:
        total = B * C * P
        launch(
            _final_states_kernel,
            (triton.cdiv(total, BLOCK),),
            x,
            initial_states if initial_states is not None else x,
            final_states,
            total,
            C,
            L,
            P,
            HAS_INIT=initial_states is not None,
            CL=channel_last,
            BLOCK=BLOCK,
        )
    return y, final_states


@triton.jit
def _grad_input_kernel(
    gz_ptr,
    gf_ptr,
    w_ptr,
    seq_ptr,
    gx_ptr,
    gi_ptr,
    total,
    C,
    L,
    K,
    dilation,
    P,
    first,
    HAS_FINAL: tl.constexpr,
    HAS_INIT: tl.constexpr,
    HAS_SEQ: tl.constexpr,
    CL: tl.constexpr,
    CT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Extended-input element (b, c, m), m in [first, L): sum_k w[c, k] gz[m + shift_k] over the outputs that
    read m, plus grad_final at m >= L - P; to grad_x (m >= 0) or grad_initial (m < 0)."""
    n = L - first
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = idx < total
    m = idx % n + first
    c = (idx // n) % C
    b = idx // (C * n)
    acc = tl.zeros([BLOCK], CT)
    if HAS_SEQ:
        s_src = tl.load(seq_ptr + b * L + tl.maximum(m, 0), mask=mask, other=0)
    for k in range(K):
        l = m + tl.cast(K - 1 - k, tl.int64) * dilation
        ok = mask & (l >= 0) & (l < L)
        if HAS_SEQ:
            s_l = tl.load(seq_ptr + b * L + l, mask=ok, other=0)
            ok = ok & (s_src == s_l)
        g = tl.load(gz_ptr + _at(b, c, l, L, C, CL), mask=ok, other=0.0).to(CT)
        wk = tl.load(w_ptr + c * K + k, mask=mask, other=0.0).to(CT)
        acc += tl.where(ok, wk * g, 0.0)
    if HAS_FINAL:
        j = m - (L - P)
        acc += tl.load(gf_ptr + _at(b, c, j, P, C, CL), mask=mask & (j >= 0), other=0.0).to(CT)
    tl.store(gx_ptr + _at(b, c, m, L, C, CL), to_dtype(acc, gx_ptr.dtype.element_ty), mask=mask & (m >= 0))
    if HAS_INIT:
        tl.store(gi_ptr + _at(b, c, P + m, P, C, CL), to_dtype(acc, gi_ptr.dtype.element_ty), mask=mask & (m < 0))


@triton.jit
def _grad_weight_kernel(
    gz_ptr,
    x_ptr,
    init_ptr,
    seq_ptr,
    gw_ptr,
    gb_ptr,
    B,
    C,
    L,
    K,
    dilation,
    P,
    HAS_BIAS: tl.constexpr,
    HAS_INIT: tl.constexpr,
    HAS_SEQ: tl.constexpr,
    CL: tl.constexpr,
    CT: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    """grad_w[c, k] = sum over the B * L positions of gz xe[l - shift_k] where the tap counts, and grad_bias[c]
    the sum of gz: positions BLOCK_L at a time, in order, then one sum per channel."""
    c = tl.program_id(0).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    cmask = c < C
    n = B * L
    if HAS_BIAS:
        acc_b = tl.zeros([BLOCK_C, BLOCK_L], CT)
        for q0 in range(0, n, BLOCK_L):
            q = q0 + tl.arange(0, BLOCK_L).to(tl.int64)
            mask = cmask[:, None] & (q < n)[None, :]
            b = (q // L)[None, :]
            l = (q % L)[None, :]
            acc_b += tl.load(gz_ptr + _at(b, c[:, None], l, L, C, CL), mask=mask, other=0.0).to(CT)
        tl.store(gb_ptr + c, to_dtype(tl.sum(acc_b, axis=1), gb_ptr.dtype.element_ty), mask=cmask)
    for k in range(K):
        shift = tl.cast(K - 1 - k, tl.int64) * dilation
        acc = tl.zeros([BLOCK_C, BLOCK_L], CT)
        for q0 in range(0, n, BLOCK_L):
            q = q0 + tl.arange(0, BLOCK_L).to(tl.int64)
            qmask = q < n
            b1 = q // L
            l1 = q % L
            m1 = l1 - shift
            ok1 = qmask & ((m1 >= 0) | HAS_INIT)
            if HAS_SEQ:
                s_l = tl.load(seq_ptr + b1 * L + l1, mask=ok1, other=0)
                s_m = tl.load(seq_ptr + b1 * L + tl.maximum(m1, 0), mask=ok1, other=0)
                s_0 = tl.load(seq_ptr + b1 * L, mask=ok1, other=0)
                ok1 = ok1 & (tl.where(m1 >= 0, s_m, s_0) == s_l)
            ok = cmask[:, None] & ok1[None, :]
            b = b1[None, :]
            l = l1[None, :]
            m = m1[None, :]
            g = tl.load(gz_ptr + _at(b, c[:, None], l, L, C, CL), mask=ok, other=0.0).to(CT)
            xv = tl.load(x_ptr + _at(b, c[:, None], m, L, C, CL), mask=ok & (m >= 0), other=0.0).to(CT)
            if HAS_INIT:
                iv = tl.load(init_ptr + _at(b, c[:, None], P + m, P, C, CL), mask=ok & (m < 0), other=0.0).to(CT)
                xv = tl.where(m >= 0, xv, iv)
            acc += tl.where(ok, g * xv, 0.0)
        tl.store(gw_ptr + c * K + k, to_dtype(tl.sum(acc, axis=1), gw_ptr.dtype.element_ty), mask=cmask)


def backward_states(
    grad_y,
    grad_final,
    x,
    weight,
    bias,
    initial_states,
    seq_idx,
    grad_x,
    grad_weight,
    grad_bias,
    grad_initial,
    dilation,
    activation,
    channel_last,
):
    """The gradients of StatesBackwardArgs (csrc/autoregressive/causal_conv1d_states.h)."""
    B, C, L, K, dilation = shape = _check_forward(x, weight, bias, initial_states, seq_idx, dilation, channel_last)
    P = (K - 1) * dilation
    activation = _check_activation(activation)
    _check_layout("grad_y", grad_y, (B, C, L), channel_last, x.dtype)
    _check_layout("grad_final_states", grad_final, (B, C, P), channel_last, x.dtype)
    _check_layout("grad_x", grad_x, (B, C, L), channel_last, x.dtype)
    _check_layout("grad_initial_states", grad_initial, (B, C, P), channel_last, x.dtype)
    if grad_initial is not None and initial_states is None:
        raise ValueError("grad_initial_states needs initial_states")
    check(x.dtype, grad_weight=grad_weight, grad_bias=grad_bias)
    ct = compute_type(x)
    gz = grad_y
    if (activation != 0 or seq_idx is not None) and B * C * L > 0:
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        gz = torch.empty_like(grad_y, dtype=dtype)  # grad_y's layout
        _launch_pre_activation(
            x, weight, bias, initial_states, seq_idx, grad_y, gz, shape, activation, channel_last, True
        )
    first = -P if grad_initial is not None else 0
    total = B * C * (L - first)
    if total > 0:
        launch(
            _grad_input_kernel,
            (triton.cdiv(total, BLOCK),),
            gz,
            grad_final if grad_final is not None else gz,
            weight,
            seq_idx if seq_idx is not None else weight,
            grad_x,
            grad_initial if grad_initial is not None else grad_x,
            total,
            C,
            L,
            K,
            dilation,
            P,
            first,
            HAS_FINAL=grad_final is not None,
            HAS_INIT=grad_initial is not None,
            HAS_SEQ=seq_idx is not None,
            CL=channel_last,
            CT=ct,
            BLOCK=BLOCK,
        )
    if C > 0:
        launch(
            _grad_weight_kernel,
            (triton.cdiv(C, GRAD_BLOCK_C),),
            gz,
            x,
            initial_states if initial_states is not None else x,
            seq_idx if seq_idx is not None else weight,
            grad_weight,
            grad_bias if grad_bias is not None else grad_weight,
            B,
            C,
            L,
            K,
            dilation,
            P,
            HAS_BIAS=grad_bias is not None,
            HAS_INIT=initial_states is not None,
            HAS_SEQ=seq_idx is not None,
            CL=channel_last,
            CT=ct,
            BLOCK_C=GRAD_BLOCK_C,
            BLOCK_L=GRAD_BLOCK_L,
        )
    return grad_x, grad_weight, grad_bias, grad_initial


@triton.jit
def _update_kernel(
    x_ptr,
    state_ptr,
    w_ptr,
    bias_ptr,
    lens_ptr,
    rows_ptr,
    y_ptr,
    C,
    L,
    K,
    dilation,
    P,
    S,
    HAS_BIAS: tl.constexpr,
    HAS_LENS: tl.constexpr,
    HAS_ROWS: tl.constexpr,
    CL: tl.constexpr,
    ACT: tl.constexpr,
    CT: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Batch row b, channels [BLOCK_C): its L outputs from the window of past entries and new inputs, then
    the new inputs into its state row."""
    b = tl.program_id(1).to(tl.int64)
    c = tl.program_id(0).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    cmask = c < C
    if HAS_ROWS:
        r = tl.load(rows_ptr + b)
    else:
        r = b
    live = cmask & ((c * 0 + r) >= 0)
    if HAS_LENS:
        n = tl.load(lens_ptr + b)
    else:
        n = S  # the window's past entries are the last P slots
    st = state_ptr + (r * C + c) * S
    for l in range(L):
        acc = tl.zeros([BLOCK_C], CT)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + c, mask=live, other=0.0).to(CT)
        for k in range(K):
            j = P + l - tl.cast(K - 1 - k, tl.int64) * dilation  # window index
            if j < P:
                slot = n - P + j
                if HAS_LENS:
                    slot = ((slot % S) + S) % S
                v = tl.load(st + slot, mask=live, other=0.0).to(CT)
            else:
                v = tl.load(x_ptr + _at(b, c, j - P, L, C, CL), mask=live, other=0.0).to(CT)
            acc += tl.load(w_ptr + c * K + k, mask=live, other=0.0).to(CT) * v
        out = tl.where(r >= 0, _activate(acc, ACT), 0.0)
        tl.store(y_ptr + _at(b, c, l, L, C, CL), to_dtype(out, y_ptr.dtype.element_ty), mask=cmask)
    if HAS_LENS:
        for l in range(L):
            v = tl.load(x_ptr + _at(b, c, l, L, C, CL), mask=live, other=0.0)
            tl.store(st + ((n + l) % S), v, mask=live)
    else:
        # The last S entries of [state, x]: entry j comes from index L + j, at or right of j, so ascending
        # stores never overwrite an entry a later one reads (each lane owns its channel's row).
        for j in range(S):
            if L + j < S:
                v = tl.load(st + L + j, mask=live, other=0.0)
            else:
                v = tl.load(x_ptr + _at(b, c, L + j - S, L, C, CL), mask=live, other=0.0)
            tl.store(st + j, v, mask=live)


def update_states(
    x, conv_state, weight, bias, cache_seqlens, conv_state_indices, y, dilation, activation, channel_last
):
    """StatesUpdateArgs (csrc/autoregressive/causal_conv1d_states.h): y, and conv_state updated in place."""
    B, C, L, K, dilation = _shape(x, weight, dilation)
    P = (K - 1) * dilation
    activation = _check_activation(activation)
    _check_layout("x", x, (B, C, L), channel_last, x.dtype)
    _check_layout("y", y, (B, C, L), channel_last, x.dtype)
    check(x.dtype, conv_state=conv_state, weight=weight, bias=bias)
    if conv_state.dim() != 3 or conv_state.shape[1] != C or conv_state.shape[2] < P:
        raise ValueError("conv_state must have shape (R, C, S) with S >= (K - 1) * dilation")
    if conv_state_indices is None and conv_state.shape[0] != B:
        raise ValueError("conv_state must have x's batch size without conv_state_indices")
    S = conv_state.shape[2]
    if cache_seqlens is not None and S == 0:
        raise ValueError("cache_seqlens needs a conv_state of length >= 1")
    _check_index("cache_seqlens", cache_seqlens, B)
    _check_index("conv_state_indices", conv_state_indices, B)
    if B * C == 0:
        return y
    launch(
        _update_kernel,
        (triton.cdiv(C, UPDATE_BLOCK_C), B),
        x,
        conv_state,
        weight,
        bias if bias is not None else weight,
        cache_seqlens if cache_seqlens is not None else weight,
        conv_state_indices if conv_state_indices is not None else weight,
        y,
        C,
        L,
        K,
        dilation,
        P,
        S,
        HAS_BIAS=bias is not None,
        HAS_LENS=cache_seqlens is not None,
        HAS_ROWS=conv_state_indices is not None,
        CL=channel_last,
        ACT=activation,
        CT=compute_type(x),
        BLOCK_C=UPDATE_BLOCK_C,
    )
    return y


@triton.jit
def _varlen_states_kernel(x_ptr, cu_ptr, out_ptr, total, C, S, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = idx < total
    c = idx % C
    j = (idx // C) % S
    b = idx // (C * S)
    start = tl.load(cu_ptr + b, mask=mask, other=0)
    end = tl.load(cu_ptr + b + 1, mask=mask, other=0)
    t = end - S + j
    v = tl.load(x_ptr + t * C + c, mask=mask & (t >= start), other=0.0)
    tl.store(out_ptr + idx, v, mask=mask)


def varlen_states(x, cu_seqlens, states):
    """VarlenStatesArgs (csrc/autoregressive/causal_conv1d_states.h): states (B, S, C) storage."""
    check(x.dtype, x=x, states=states)
    if x.dim() != 2:
        raise ValueError("x must have shape (total_tokens, C)")
    _check_index("cu_seqlens", cu_seqlens, cu_seqlens.numel())
    B, C = cu_seqlens.numel() - 1, x.shape[1]
    if states.dim() != 3 or states.shape[0] != B or states.shape[2] != C:
        raise ValueError("states must have shape (B, S, C)")
    total = states.numel()
    if total > 0:
        launch(
            _varlen_states_kernel,
            (triton.cdiv(total, BLOCK),),
            x,
            cu_seqlens,
            states,
            total,
            C,
            states.shape[1],
            BLOCK=BLOCK,
        )
    return states
