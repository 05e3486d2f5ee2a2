"""The causal_conv1d family (docs/math.md, section 4) in Triton: the causal convolution and its
gradients, the generation step, and the gated activation.

The wrappers mirror the kernel entries of csrc/autoregressive/causal_conv1d.h (whose comments define each op), under the
names the ops call: forward, backward, update, gated, gated_backward. Every tensor is contiguous, outputs
are preallocated by the caller, and all floating tensors of a call share one dtype. `activation` is the
kernels' code: 0 none, 1 silu, 2 tanh. The per-element terms are those of csrc/autoregressive/causal_conv1d_math.h in
the same operation order: sigmoid(z) = 1 / (1 + gk::exp(-z)), tanh from gk::exp(-2|z|) (float64 too, where
the C++ calls libm's tanh: equal to within an ulp of 1), divisions correctly rounded.

Compute type: float64 for float64 tensors, float32 otherwise; backward keeps dL/dz = grad_y * act'(z) (z
recomputed) in the compute type.

Work per program:
* the convolution (forward, and grad_x as the transposed convolution) computes a [BLOCK_Q rows,
  BLOCK_L positions] tile: any consecutive (b, c) rows depthwise, channels of one sample otherwise (they
  share the input rows); each sum starts from the bias and adds (input channel, tap) terms in ascending
  order, as the CPU kernels do, skipping taps that reach only the zero padding;
* weight and bias gradients are sums over the B * L positions. These are cut into segments that depend on
  the shapes only; a program per (channel block or weight tile, segment) writes partial sums, and a second
  kernel adds the segments in order. No atomics: the same inputs give the same bits on every run;
* the update computes BLOCK outputs (b, o), adding the past taps' products BLOCK_K at a time; a second
  kernel shifts the state rows;
* the gate runs over [BLOCK_R, BLOCK_J] tiles of x viewed as (outer, 2, inner).
All indices are int64.
"""

from collections import namedtuple

import torch
import triton
import triton.language as tl

from ..core.launch import check, compute_type, launch
from ..core.philox import exp_t, to_dtype

NONE = tl.constexpr(0)  # gk::causal_conv1d::kNone
SILU = tl.constexpr(1)  # kSilu
TANH = tl.constexpr(2)  # kTanh
ACTIVATIONS = (0, 1, 2)

Sizes = namedtuple("Sizes", "tile block_l reduce_l reduce_c weight_l gate")
# tile: elements per convolution tile; block_l: positions per convolution tile, at most; reduce_l and
# weight_l: positions per step of the per-channel and of the full weight-gradient sums; reduce_c: channels
# per program of the per-channel sums, at most; gate: elements per tile of the gate. On CPU tensors (the
# interpreter, where every operation costs far more than its elements) the tiles are larger.
GPU_SIZES = Sizes(tile=2048, block_l=512, reduce_l=256, reduce_c=1, weight_l=16, gate=1024)
INTERPRETER_SIZES = Sizes(tile=8192, block_l=1024, reduce_l=1024, reduce_c=64, weight_l=256, gate=8192)
FULL_BLOCK_Q = 32  # output channels per full-convolution tile, at most
WEIGHT_TILE = 16  # (o, pair) tile of the full weight gradient
TAPS_BLOCK = 16  # taps per program of the per-channel gradient sums, at most
# Segmentation of the B * L sums: about TARGET_PROGRAMS (tile, segment) programs, segments of at least
# SEGMENT_MIN positions. Constants, not device properties: the order of the sums must not depend on the GPU.
TARGET_PROGRAMS = 1024
SEGMENT_MIN = 1024
UPDATE_BLOCK = 128
UPDATE_TAPS = 16  # past taps per step of the update, at most
SHIFT_TILE = 1024
SUM_BLOCK = 1024  # outputs per program of the segment sums

ConvShape = namedtuple("ConvShape", "batch c_in c_out length taps dilation depthwise")


# --------------------------------------------------------------------------------------------------
# Per-element terms (csrc/autoregressive/causal_conv1d_math.h); z is in the compute type.


# Divisions are correctly rounded: tl.div_rn for float32 (Triton's `/` is approximate there on GPUs). They
# are written out in each helper rather than in a helper of their own: under the interpreter every nested
# jit call costs milliseconds.


@triton.jit
def _sigmoid(z):
    one = tl.zeros_like(z) + 1.0
    if z.dtype == tl.float64:
        s = one / (one + exp_t(-z))
    else:
        s = tl.div_rn(one, one + exp_t(-z))
    return s


@triton.jit
def _tanh(z):
    e = exp_t(-2.0 * tl.abs(z))  # in (0, 1]: no overflow
    if z.dtype == tl.float64:
        t = (1.0 - e) / (1.0 + e)
    else:
        t = tl.div_rn(1.0 - e, 1.0 + e)
    return tl.where(z < 0.0, -t, t)


@triton.jit
def _activate(z, ACT: tl.constexpr):
    if ACT == SILU:
        y = z * _sigmoid(z)
    elif ACT == TANH:
        y = _tanh(z)
    else:
        y = z
    return y


@triton.jit
def _activate_grad(z, ACT: tl.constexpr):
    """d activate / dz at the pre-activation z."""
    if ACT == SILU:
        s = _sigmoid(z)
        d = s * (1.0 + z * (1.0 - s))
    elif ACT == TANH:
        t = _tanh(z)
        d = 1.0 - t * t
    else:
        d = tl.zeros_like(z) + 1.0
    return d


# --------------------------------------------------------------------------------------------------
# Argument checks (the ops check too; these guard direct calls)


def _conv_shape(x, weight, dilation, step=False):
    if x.dim() != (2 if step else 3):
        raise ValueError("x must have shape (B, C)" if step else "x must have shape (B, C, L)")
    batch, c_in = x.shape[0], x.shape[1]
    length = 1 if step else x.shape[2]
    if weight.dim() == 2:
        if weight.shape[0] != c_in:
            raise ValueError("depthwise weight must have shape (C, K) with C the channels of x")
        c_out, depthwise = c_in, True
    elif weight.dim() == 3:
        if weight.shape[1] != c_in:
            raise ValueError("weight must have shape (C_out, C_in, K) with C_in the channels of x")
        c_out, depthwise = weight.shape[0], False
    else:
        raise ValueError("weight must have shape (C, K) or (C_out, C_in, K)")
    taps = weight.shape[-1]
    if taps < 1:
        raise ValueError("weight must have at least one tap (K >= 1)")
    dilation = int(dilation)
    if dilation < 1:
        raise ValueError("dilation must be >= 1")
    if (taps - 1) * dilation >= 2**62:
        raise ValueError("dilation * K is too large")
    return ConvShape(batch, c_in, c_out, length, taps, dilation, depthwise)


def _check_numel(name, t, numel):
    if t.numel() != numel:
        raise ValueError(f"{name} has {t.numel()} elements, expected {numel}")


def _check_activation(activation):
    activation = int(activation)
    if activation not in ACTIVATIONS:
        raise ValueError("activation must be 0 (none), 1 (silu) or 2 (tanh)")
    return activation


def _compute_dtype(t):
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _sizes(t):
    return INTERPRETER_SIZES if t.device.type == "cpu" else GPU_SIZES


# --------------------------------------------------------------------------------------------------
# The convolution: out[b, q, l] = epilogue(init[q] + sum_{r, k} w(q, r, k) in[b, r, l -+ shift_k]).
# Forward: q = o, r = i, src = l - shift (zero left of 0). Transposed (grad_x): q = i, r = o, in = dL/dz,
# src = l + shift (zero from L on). w(q, r, k) = w[q * w_q + r * w_r + k]; depthwise, r = q.
# MODE 0: out = act(sum); 1: out = g * act'(sum) (dL/dz, compute type); 2: out = sum.


@triton.jit
def _conv_kernel(
    in_ptr,
    w_ptr,
    bias_ptr,
    g_ptr,
    out_ptr,
    n_rows,
    n_red,
    n_out,
    length,
    taps,
    dilation,
    w_q,
    w_r,
    q_blocks,
    l_blocks,
    DEPTHWISE: tl.constexpr,
    TRANSPOSED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr,
    MODE: tl.constexpr,
    CT: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    """A [BLOCK_Q rows, BLOCK_L positions] tile. Depthwise, the rows are any BLOCK_Q consecutive (b, c) rows
    (each reads its own input row) of the n_rows = B * C; otherwise BLOCK_Q channels of one sample b, which
    share the input rows."""
    pid = tl.program_id(0).to(tl.int64)
    lb = pid % l_blocks
    rest = pid // l_blocks
    if DEPTHWISE:
        b = 0  # unused: rows carry the sample
        rows = rest * BLOCK_Q + tl.arange(0, BLOCK_Q).to(tl.int64)
        qmask = rows < n_rows
        q = rows % n_out
    else:
        b = rest // q_blocks
        q = (rest % q_blocks) * BLOCK_Q + tl.arange(0, BLOCK_Q).to(tl.int64)
        qmask = q < n_out
        rows = b * n_out + q
    l = lb * BLOCK_L + tl.arange(0, BLOCK_L).to(tl.int64)
    lmask = l < length
    acc = tl.zeros([BLOCK_Q, BLOCK_L], CT)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + q, mask=qmask, other=0.0).to(CT)[:, None]
    # Taps reaching L or more positions away touch only the zero padding: start after them. The shift of
    # tap k is (K - 1 - k) d; src walks by d per tap (towards l for the forward, away from it transposed).
    first = tl.maximum(taps - 1 - (length - 1) // dilation, 0)
    span = tl.cast(taps - 1 - first, tl.int64) * dilation
    if TRANSPOSED:
        src = l + span
        step = -dilation
    else:
        src = l - span
        step = dilation
    if DEPTHWISE:
        x_ptrs = in_ptr + (rows * length)[:, None] + src[None, :]
        w_ptrs = w_ptr + q * taps + first
        row_mask = qmask[:, None]
        for _ in range(first, taps):
            if TRANSPOSED:
                ok = src < length
            else:
                ok = lmask & (src >= 0)
            xv = tl.load(x_ptrs, mask=row_mask & ok[None, :], other=0.0)
            wk = tl.load(w_ptrs, mask=qmask, other=0.0)
            acc += wk.to(CT)[:, None] * xv.to(CT)
            src += step
            x_ptrs += step
            w_ptrs += 1
    else:
        for r in range(n_red):
            src_r = src
            x_ptrs = in_ptr + (b * n_red + r) * length + src_r
            w_ptrs = w_ptr + q * w_q + tl.cast(r, tl.int64) * w_r + first
            for _ in range(first, taps):
                if TRANSPOSED:
                    ok = src_r < length
                else:
                    ok = lmask & (src_r >= 0)
                xv = tl.load(x_ptrs, mask=ok, other=0.0).to(CT)
                wv = tl.load(w_ptrs, mask=qmask, other=0.0).to(CT)
                acc += wv[:, None] * xv[None, :]
                src_r += step
                x_ptrs += step
                w_ptrs += 1
    offs = rows[:, None] * length + l[None, :]
    mask = qmask[:, None] & lmask[None, :]
    if MODE == 0:
        tl.store(out_ptr + offs, to_dtype(_activate(acc, ACT), out_ptr.dtype.element_ty), mask=mask)
    elif MODE == 1:
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(CT)
        tl.store(out_ptr + offs, g * _activate_grad(acc, ACT), mask=mask)
    else:
        tl.store(out_ptr + offs, to_dtype(acc, out_ptr.dtype.element_ty), mask=mask)


def _launch_conv(s, inp, weight, bias, g, out, activation, mode, transposed, ct):
    n_out, n_red = (s.c_in, s.c_out) if transposed else (s.c_out, s.c_in)
    w_q, w_r = (s.taps, s.c_in * s.taps) if transposed else (s.c_in * s.taps, s.taps)
    sizes = _sizes(out)
    block_l = min(triton.next_power_of_2(s.length), sizes.block_l)
    l_blocks = triton.cdiv(s.length, block_l)
    if s.depthwise:
        block_q = min(triton.next_power_of_2(s.batch * n_out), max(1, sizes.tile // block_l))
        q_blocks = triton.cdiv(s.batch * n_out, block_q)
        programs = q_blocks * l_blocks
    else:
        block_q = min(triton.next_power_of_2(n_out), max(1, sizes.tile // block_l), FULL_BLOCK_Q)
        q_blocks = triton.cdiv(n_out, block_q)
        programs = s.batch * q_blocks * l_blocks
    launch(
        _conv_kernel,
        (programs,),
        inp,
        weight,
        bias if bias is not None else weight,
        g if g is not None else out,
        out,
        s.batch * n_out,
        n_red,
        n_out,
        s.length,
        s.taps,
        s.dilation,
        w_q,
        w_r,
        q_blocks,
        l_blocks,
        DEPTHWISE=s.depthwise,
        TRANSPOSED=transposed,
        HAS_BIAS=bias is not None,
        ACT=activation,
        MODE=mode,
        CT=ct,
        BLOCK_Q=block_q,
        BLOCK_L=block_l,
    )


def forward(x, weight, bias, y, dilation, activation):
    """y = act(bias + causal dilated convolution of x): ConvArgs of csrc/autoregressive/causal_conv1d.h."""
    check(x.dtype, x=x, weight=weight, bias=bias, y=y)
    s = _conv_shape(x, weight, dilation)
    activation = _check_activation(activation)
    if bias is not None:
        _check_numel("bias", bias, s.c_out)
    _check_numel("y", y, s.batch * s.c_out * s.length)
    if y.numel() == 0:
        return y
    _launch_conv(s, x, weight, bias, None, y, activation, 0, False, compute_type(x))
    return y


# --------------------------------------------------------------------------------------------------
# Weight and bias gradients: segment sums, then the segments added in order.


def _segments(n, tiles):
    """(count, length) of the segments of n > 0 positions, for `tiles` programs per segment."""
    count = min(max(1, triton.cdiv(TARGET_PROGRAMS, max(tiles, 1))), max(1, triton.cdiv(n, SEGMENT_MIN)))
    length = triton.cdiv(n, count)
    return triton.cdiv(n, length), length


@triton.jit
def _channel_grad_kernel(
    gz_ptr,
    x_ptr,
    pw_ptr,
    pb_ptr,
    channels,
    length,
    taps,
    dilation,
    n,
    seg_len,
    segs,
    k_blocks,
    HAS_TAPS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    CT: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    """Program (channel block, segment, tap block): pw[seg, c, k] = sum over the segment's flat positions
    b * L + l of gz[b, c, l] x[b, c, l - shift_k]; pb[seg, c] = sum of gz[b, c, l] (tap block 0 writes it).
    Tiles are [BLOCK_C channels, BLOCK_K taps, BLOCK_L positions]."""
    pid = tl.program_id(0).to(tl.int64)
    kb = pid % k_blocks
    rest = pid // k_blocks
    seg = rest % segs
    c = (rest // segs) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    cmask = c < channels
    start = seg * seg_len
    end = tl.minimum(start + seg_len, n)
    k = kb * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)
    kmask = k < taps
    shift = (taps - 1 - k) * dilation
    acc = tl.zeros([BLOCK_C, BLOCK_K, BLOCK_L], CT)
    acc_b = tl.zeros([BLOCK_C, BLOCK_L], CT)
    for q0 in range(start, end, BLOCK_L):
        q = q0 + tl.arange(0, BLOCK_L).to(tl.int64)
        qmask = q < end
        b = q // length
        l = q - b * length
        rows = (b[None, :] * channels + c[:, None]) * length  # [BLOCK_C, BLOCK_L]
        gmask = cmask[:, None] & qmask[None, :]
        g = tl.load(gz_ptr + rows + l[None, :], mask=gmask, other=0.0).to(CT)
        if HAS_BIAS:
            acc_b += g
        if HAS_TAPS:
            src = l[None, :] - shift[:, None]  # [BLOCK_K, BLOCK_L]
            m = gmask[:, None, :] & (kmask[:, None] & (src >= 0))[None, :, :]
            xv = tl.load(x_ptr + rows[:, None, :] + src[None, :, :], mask=m, other=0.0).to(CT)
            acc += g[:, None, :] * xv
    if HAS_TAPS:
        tl.store(
            pw_ptr + ((seg * channels + c) * taps)[:, None] + k[None, :],
            tl.sum(acc, axis=2),
            mask=cmask[:, None] & kmask[None, :],
        )
    if HAS_BIAS:
        tl.store(pb_ptr + seg * channels + c, tl.sum(acc_b, axis=1), mask=cmask & ((c * 0 + kb) == 0))


@triton.jit
def _full_grad_weight_kernel(
    gz_ptr,
    x_ptr,
    pw_ptr,
    c_out,
    c_in,
    length,
    taps,
    dilation,
    n,
    seg_len,
    segs,
    p_blocks,
    CT: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    """Program (o tile, segment, pair tile): pw[seg, o, p] = sum over the segment's flat positions b * L + l
    of gz[b, o, l] x[b, i, l - shift_k], p = i * K + k."""
    pid = tl.program_id(0).to(tl.int64)
    pb = pid % p_blocks
    rest = pid // p_blocks
    seg = rest % segs
    o = (rest // segs) * BLOCK_O + tl.arange(0, BLOCK_O).to(tl.int64)
    p = pb * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
    pairs = c_in * taps
    omask = o < c_out
    pmask = p < pairs
    i = p // taps
    shift = (taps - 1 - (p - i * taps)) * dilation
    start = seg * seg_len
    end = tl.minimum(start + seg_len, n)
    acc = tl.zeros([BLOCK_O, BLOCK_P], CT)
    for q0 in range(start, end, BLOCK_L):
        q = q0 + tl.arange(0, BLOCK_L).to(tl.int64)
        qmask = q < end
        b = q // length
        l = q - b * length
        g = tl.load(
            gz_ptr + (b[None, :] * c_out + o[:, None]) * length + l[None, :],
            mask=omask[:, None] & qmask[None, :],
            other=0.0,
        ).to(CT)
        src = l[None, :] - shift[:, None]
        xv = tl.load(
            x_ptr + (b[None, :] * c_in + i[:, None]) * length + src,
            mask=pmask[:, None] & qmask[None, :] & (src >= 0),
            other=0.0,
        ).to(CT)
        acc += tl.sum(g[:, None, :] * xv[None, :, :], axis=2)
    tl.store(pw_ptr + (seg * c_out + o[:, None]) * pairs + p[None, :], acc, mask=omask[:, None] & pmask[None, :])


@triton.jit
def _sum_segments_kernel(partial_ptr, out_ptr, count, segs, BLOCK: tl.constexpr):
    """out[j] = sum_s partial[s, j], s ascending."""
    j = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = j < count
    acc = tl.zeros([BLOCK], partial_ptr.dtype.element_ty)
    offs = j
    for _ in range(segs):
        acc += tl.load(partial_ptr + offs, mask=mask, other=0.0)
        offs += count
    tl.store(out_ptr + j, to_dtype(acc, out_ptr.dtype.element_ty), mask=mask)


def _sum_segments(partial, segs, out):
    count = out.numel()
    launch(_sum_segments_kernel, (triton.cdiv(count, SUM_BLOCK),), partial, out, count, segs, BLOCK=SUM_BLOCK)


def _weight_grads(s, gz, x, grad_w, grad_b, ct):
    n = s.batch * s.length
    if n == 0:  # no positions: the sums are empty
        grad_w.zero_()
        if grad_b is not None:
            grad_b.zero_()
        return
    if s.c_out == 0:
        return
    dtype = _compute_dtype(x)
    sizes = _sizes(x)
    if s.depthwise or grad_b is not None:
        # Per-channel sums: all depthwise taps (and the bias), or the bias alone of a full convolution.
        taps = s.taps if s.depthwise else 0
        segs, seg_len = _segments(n, s.c_out)
        block_k = min(triton.next_power_of_2(max(taps, 1)), TAPS_BLOCK)
        k_blocks = triton.cdiv(max(taps, 1), block_k)
        block_l = min(triton.next_power_of_2(seg_len), sizes.reduce_l)
        block_c = min(triton.next_power_of_2(s.c_out), sizes.reduce_c)
        pw = torch.empty((segs, s.c_out, taps), dtype=dtype, device=x.device) if taps else None
        pb = torch.empty((segs, s.c_out), dtype=dtype, device=x.device) if grad_b is not None else None
        launch(
            _channel_grad_kernel,
            (triton.cdiv(s.c_out, block_c) * segs * k_blocks,),
            gz,
            x,
            pw if pw is not None else pb,
            pb if pb is not None else pw,
            s.c_out,
            s.length,
            max(taps, 1),
            s.dilation,
            n,
            seg_len,
            segs,
            k_blocks,
            HAS_TAPS=taps > 0,
            HAS_BIAS=grad_b is not None,
            CT=ct,
            BLOCK_C=block_c,
            BLOCK_K=block_k,
            BLOCK_L=block_l,
        )
        if pw is not None:
            _sum_segments(pw, segs, grad_w)
        if pb is not None:
            _sum_segments(pb, segs, grad_b)
    if not s.depthwise and grad_w.numel() > 0:
        pairs = s.c_in * s.taps
        o_blocks, p_blocks = triton.cdiv(s.c_out, WEIGHT_TILE), triton.cdiv(pairs, WEIGHT_TILE)
        segs, seg_len = _segments(n, o_blocks * p_blocks)
        pw = torch.empty((segs, s.c_out, pairs), dtype=dtype, device=x.device)
        launch(
            _full_grad_weight_kernel,
            (o_blocks * segs * p_blocks,),
            gz,
            x,
            pw,
            s.c_out,
            s.c_in,
            s.length,
            s.taps,
            s.dilation,
            n,
            seg_len,
            segs,
            p_blocks,
            CT=ct,
            BLOCK_O=WEIGHT_TILE,
            BLOCK_P=WEIGHT_TILE,
            BLOCK_L=min(triton.next_power_of_2(seg_len), sizes.weight_l),
        )
        _sum_segments(pw, segs, grad_w)


def backward(grad_y, x, weight, bias, grad_x, grad_weight, grad_bias, dilation, activation):
    """(grad_x, grad_weight, grad_bias) of forward: ConvBackwardArgs of csrc/autoregressive/causal_conv1d.h.
    grad_bias is
    None without a bias (or when not wanted); the pre-activation is recomputed."""
    check(
        x.dtype,
        grad_y=grad_y,
        x=x,
        weight=weight,
        bias=bias,
        grad_x=grad_x,
        grad_weight=grad_weight,
        grad_bias=grad_bias,
    )
    s = _conv_shape(x, weight, dilation)
    activation = _check_activation(activation)
    for name, t, numel in (
        ("bias", bias, s.c_out),
        ("grad_bias", grad_bias, s.c_out),
        ("grad_y", grad_y, s.batch * s.c_out * s.length),
        ("grad_x", grad_x, x.numel()),
        ("grad_weight", grad_weight, weight.numel()),
    ):
        if t is not None:
            _check_numel(name, t, numel)
    ct = compute_type(x)
    gz = grad_y
    if activation != 0 and grad_y.numel() > 0:
        gz = torch.empty(grad_y.shape, dtype=_compute_dtype(x), device=x.device)
        _launch_conv(s, x, weight, bias, grad_y, gz, activation, 1, False, ct)
    if grad_x.numel() > 0:
        _launch_conv(s, gz, weight, None, None, grad_x, 0, 2, True, ct)
    _weight_grads(s, gz, x, grad_weight, grad_bias, ct)
    return grad_x, grad_weight, grad_bias


# --------------------------------------------------------------------------------------------------
# The generation step


@triton.jit
def _update_kernel(
    x_ptr,
    state_ptr,
    w_ptr,
    bias_ptr,
    y_ptr,
    rows,
    c_in,
    c_out,
    taps,
    dilation,
    width,
    DEPTHWISE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr,
    CT: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """y[b, o] = act(bias[o] + sum_j (sum_{k < K-1} w[o, j, k] state[b, i, W - shift_k] + w[o, j, K-1] x[b, i]))
    with i = o depthwise, else j: BLOCK outputs, the past taps BLOCK_K at a time."""
    row = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = row < rows
    b = row // c_out
    o = row - b * c_out
    kk = tl.arange(0, BLOCK_K).to(tl.int64)
    acc = tl.zeros([BLOCK], CT)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + o, mask=mask, other=0.0).to(CT)
    if DEPTHWISE:
        inputs = 1
    else:
        inputs = c_in
    for j in range(inputs):
        if DEPTHWISE:
            in_row = b * c_in + o
            w_row = o * taps
        else:
            in_row = b * c_in + j
            w_row = (o * c_in + j) * taps
        past = in_row * width + width
        for k0 in range(0, taps - 1, BLOCK_K):
            k = k0 + kk
            m = mask[:, None] & (k < taps - 1)[None, :]
            wv = tl.load(w_ptr + w_row[:, None] + k[None, :], mask=m, other=0.0).to(CT)
            pv = tl.load(state_ptr + past[:, None] - ((taps - 1 - k) * dilation)[None, :], mask=m, other=0.0)
            acc += tl.sum(wv * pv.to(CT), axis=1)
        w_last = tl.load(w_ptr + w_row + taps - 1, mask=mask, other=0.0).to(CT)
        acc += w_last * tl.load(x_ptr + in_row, mask=mask, other=0.0).to(CT)
    tl.store(y_ptr + row, to_dtype(_activate(acc, ACT), y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _shift_state_kernel(state_ptr, x_ptr, rows, width, BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr):
    """state[r] becomes state[r, 1:] followed by x[r]. A program owns whole rows and walks them in column
    stages: the stage is loaded, the program synchronises, then it is stored, so no element is overwritten
    before every thread has read it; a later stage reads only columns no earlier stage wrote."""
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    rmask = r < rows
    xv = tl.load(x_ptr + r, mask=rmask, other=0.0)
    for t0 in range(0, width, BLOCK_W):
        t = t0 + tl.arange(0, BLOCK_W).to(tl.int64)
        from_state = (t + 1) < width
        mask = rmask[:, None] & (t < width)[None, :]
        offs = r[:, None] * width + t[None, :]
        v = tl.load(state_ptr + offs + 1, mask=mask & from_state[None, :], other=0.0)
        v = tl.where(from_state[None, :], v, xv[:, None])
        tl.debug_barrier()
        tl.store(state_ptr + offs, v, mask=mask)


def update(x, state, weight, bias, y, dilation, activation):
    """One step: UpdateArgs of csrc/autoregressive/causal_conv1d.h. y (B, C_out) is the output at x's position; state
    (B, C_in, W >= (K - 1) * dilation) then shifts left by one and takes x as its newest entry."""
    check(x.dtype, x=x, state=state, weight=weight, bias=bias, y=y)
    s = _conv_shape(x, weight, dilation, step=True)
    activation = _check_activation(activation)
    if state.dim() != 3 or state.shape[0] != s.batch or state.shape[1] != s.c_in:
        raise ValueError("state must have shape (B, C, W) with B and C those of x")
    width = state.shape[2]
    if width < (s.taps - 1) * s.dilation:
        raise ValueError("state must hold at least (K - 1) * dilation past inputs")
    if bias is not None:
        _check_numel("bias", bias, s.c_out)
    _check_numel("y", y, s.batch * s.c_out)
    if s.batch == 0:
        return y
    rows = s.batch * s.c_out
    if rows > 0:
        # Every output reads the old state before any of it shifts: two kernels, in launch order.
        launch(
            _update_kernel,
            (triton.cdiv(rows, UPDATE_BLOCK),),
            x,
            state,
            weight,
            bias if bias is not None else weight,
            y,
            rows,
            s.c_in,
            s.c_out,
            s.taps,
            s.dilation,
            width,
            DEPTHWISE=s.depthwise,
            HAS_BIAS=bias is not None,
            ACT=activation,
            CT=compute_type(x),
            BLOCK=UPDATE_BLOCK,
            BLOCK_K=min(triton.next_power_of_2(max(s.taps - 1, 1)), UPDATE_TAPS),
        )
    rows = s.batch * s.c_in
    if rows > 0 and width > 0:
        block_w = min(triton.next_power_of_2(width), SHIFT_TILE)
        block_r = max(1, SHIFT_TILE // block_w)
        launch(
            _shift_state_kernel, (triton.cdiv(rows, block_r),), state, x, rows, width, BLOCK_R=block_r, BLOCK_W=block_w
        )
    return y


# --------------------------------------------------------------------------------------------------
# The gate: y[o, j] = tanh(x[o, 0, j]) sigmoid(x[o, 1, j]) over x viewed as (outer, 2, inner)


def _gate_config(outer, inner, x):
    tile = _sizes(x).gate
    block_j = min(triton.next_power_of_2(inner), tile)
    block_r = min(triton.next_power_of_2(outer), max(1, tile // block_j))
    j_blocks = triton.cdiv(inner, block_j)
    return (triton.cdiv(outer, block_r) * j_blocks,), block_r, block_j, j_blocks


@triton.jit
def _gate_tile(outer, inner, j_blocks, BLOCK_R: tl.constexpr, BLOCK_J: tl.constexpr):
    """Offsets of this program's tile in y and in the first half of x, and its mask."""
    pid = tl.program_id(0).to(tl.int64)
    o = (pid // j_blocks) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    j = (pid % j_blocks) * BLOCK_J + tl.arange(0, BLOCK_J).to(tl.int64)
    mask = (o < outer)[:, None] & (j < inner)[None, :]
    return (o * inner)[:, None] + j[None, :], (o * 2 * inner)[:, None] + j[None, :], mask


@triton.jit
def _gated_kernel(x_ptr, y_ptr, outer, inner, j_blocks, CT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_J: tl.constexpr):
    y_offs, a_offs, mask = _gate_tile(outer, inner, j_blocks, BLOCK_R, BLOCK_J)
    a = tl.load(x_ptr + a_offs, mask=mask, other=0.0).to(CT)
    b = tl.load(x_ptr + a_offs + inner, mask=mask, other=0.0).to(CT)
    tl.store(y_ptr + y_offs, to_dtype(_tanh(a) * _sigmoid(b), y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gated_backward_kernel(
    g_ptr, x_ptr, gx_ptr, outer, inner, j_blocks, CT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_J: tl.constexpr
):
    """d/da = (1 - tanh^2 a) sigmoid b, d/db = tanh a sigmoid b (1 - sigmoid b), times grad_y."""
    y_offs, a_offs, mask = _gate_tile(outer, inner, j_blocks, BLOCK_R, BLOCK_J)
    a = tl.load(x_ptr + a_offs, mask=mask, other=0.0).to(CT)
    b = tl.load(x_ptr + a_offs + inner, mask=mask, other=0.0).to(CT)
    g = tl.load(g_ptr + y_offs, mask=mask, other=0.0).to(CT)
    t = _tanh(a)
    s = _sigmoid(b)
    out_ty = gx_ptr.dtype.element_ty
    tl.store(gx_ptr + a_offs, to_dtype(g * ((1.0 - t * t) * s), out_ty), mask=mask)
    tl.store(gx_ptr + a_offs + inner, to_dtype(g * (t * s * (1.0 - s)), out_ty), mask=mask)


def _check_gate(outer, inner):
    outer, inner = int(outer), int(inner)
    if outer < 0 or inner < 0:
        raise ValueError("gated shape must be non-negative")
    return outer, inner


def gated(x, y, outer, inner):
    """y = tanh(a) sigmoid(b): GatedArgs of csrc/autoregressive/causal_conv1d.h."""
    check(x.dtype, x=x, y=y)
    outer, inner = _check_gate(outer, inner)
    _check_numel("x", x, outer * 2 * inner)
    _check_numel("y", y, outer * inner)
    if y.numel() == 0:
        return y
    grid, block_r, block_j, j_blocks = _gate_config(outer, inner, x)
    launch(_gated_kernel, grid, x, y, outer, inner, j_blocks, CT=compute_type(x), BLOCK_R=block_r, BLOCK_J=block_j)
    return y


def gated_backward(grad_y, x, grad_x, outer, inner):
    """grad_x of gated: GatedBackwardArgs of csrc/autoregressive/causal_conv1d.h."""
    check(x.dtype, grad_y=grad_y, x=x, grad_x=grad_x)
    outer, inner = _check_gate(outer, inner)
    _check_numel("x", x, outer * 2 * inner)
    _check_numel("grad_x", grad_x, outer * 2 * inner)
    _check_numel("grad_y", grad_y, outer * inner)
    if x.numel() == 0:
        return grad_x
    grid, block_r, block_j, j_blocks = _gate_config(outer, inner, x)
    launch(
        _gated_backward_kernel,
        grid,
        grad_y,
        x,
        grad_x,
        outer,
        inner,
        j_blocks,
        CT=compute_type(x),
        BLOCK_R=block_r,
        BLOCK_J=block_j,
    )
    return grad_x
