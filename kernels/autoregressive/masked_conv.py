"""The masked_conv family (docs/math.md, section 4) in Triton: the PixelCNN masked convolution, forward,
grad_input and grad_weight (+ grad_bias), each an implicit GEMM over the kept taps.

The wrappers mirror the Args structs of csrc/autoregressive/masked_conv.h (whose comments define each op):
every tensor is contiguous, outputs are preallocated by the caller, all floating tensors of a call share one dtype; x is
(B, C_in, H, W), weight (C_out, C_in, k, k), y (B, C_out, H, W); stride 1, 'same' size, padding
dilation * (k // 2). The mask is that of csrc/autoregressive/masked_conv_math.h (`_in_channel_end` below is its
in_channel_end): a masked weight is never loaded (its load is masked off), whatever it holds.

Taps: every tap a mask keeps is one of the first c * k + c + 1 in raster order (rows above the centre, then
the centre row up to the centre), tap t being (t // k, t % k); the kernels walk those `taps` only (the
centre only where mask B or colour groups can keep it).

forward / grad_input: one kernel. A program owns BLOCK_P pixels of one image times BLOCK_O output channels
and sums over (tap, block of BLOCK_Q inputs) with tl.dot; grad_input is the transposed convolution (taps
mirrored: (i, j) + dilation * (c - ky, c - kx), weights read as (input, output)). With fewer than 16 inputs a
dot would be mostly padding (a first layer on pixels has 1 or 3): the kernels then multiply a [pixels, inputs,
outputs] broadcast and sum it over the inputs instead.
grad_weight: grad_weight[o, i, t] = sum over pixels p of grad_y[o, p] * x[i, p shifted by tap t]. A program
owns (BLOCK_O outputs, BLOCK_Q inputs, one tap) over one chunk of the pixels, (image, row, column) flattened;
the chunks depend on the shape only, and a second kernel adds their partial sums in chunk order, so the
result has the same bits on every run (no atomics). The bias gradient is the row sums of the grad_y tiles,
taken by the programs of tap 0 and the first block of inputs.

Compute type: float64 for float64 tensors, float32 otherwise; tl.dot with input_precision="ieee" (no TF32:
the results must meet the float32 tolerances of the reference).
"""

import torch
import triton
import triton.language as tl

from ..core.launch import check, compute_type, launch
from ..core.philox import to_dtype

DOT_MIN = 16  # tl.dot needs every block dimension >= 16: fewer inputs multiply and sum a broadcast instead
BROADCAST_TILE = 8192  # elements of that [pixels, inputs, outputs] product, at most
TARGET_PROGRAMS = 1024  # grad_weight: (chunk, tile) programs to aim for
MIN_CHUNK = 512  # grad_weight: pixels per chunk, at least
FINISH_BLOCK = 256


@triton.jit
def _in_channel_end(ky, kx, oc, K, MASK_B: tl.constexpr, c_in, c_out, groups):
    """gk::masked_conv::in_channel_end: output channel oc at tap (ky, kx) reads input channels [0, end)."""
    c = K // 2
    centre = (ky == c) & (kx == c)
    centre_end = (oc // (c_out // groups) + MASK_B) * (c_in // groups)
    kept = (ky < c) | ((ky == c) & (kx < c))
    return tl.where(centre, centre_end, tl.where(kept, c_in, 0))


def _taps(kernel_size, mask_b, groups):
    c = kernel_size // 2
    return c * kernel_size + c + (1 if mask_b or groups > 1 else 0)


# --------------------------------------------------------------------------------------------------
# forward and grad_input: out[b, o, p] = bias[o] + sum over kept (tap, q) of W(o, q, tap) * in[b, q, p shifted]


@triton.jit
def _direct_kernel(
    in_ptr,
    w_ptr,
    bias_ptr,
    out_ptr,
    inputs,
    outputs,
    height,
    width,
    c_in,
    c_out,
    groups,
    K,
    dilation,
    taps,
    p_blocks,
    TRANSPOSED: tl.constexpr,
    MASK_B: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    USE_DOT: tl.constexpr,
    EXACT: tl.constexpr,
    CT: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_Q: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // p_blocks).to(tl.int64)
    hw = height * width
    pix = (pid % p_blocks) * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = pix < hw
    i = pix // width
    j = pix % width
    o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    omask = o < outputs
    o64 = o.to(tl.int64)
    in_base = in_ptr + b * inputs * hw
    c = K // 2
    acc = tl.zeros([BLOCK_P, BLOCK_O], CT)
    for t in range(0, taps):
        ky = t // K
        kx = t % K
        if TRANSPOSED:
            ii = i + dilation * (c - ky)
            jj = j + dilation * (c - kx)
        else:
            ii = i + dilation * (ky - c)
            jj = j + dilation * (kx - c)
        inside = pmask & (ii >= 0) & (ii < height) & (jj >= 0) & (jj < width)
        at = ii * width + jj
        if not TRANSPOSED:
            end_o = _in_channel_end(ky, kx, o, K, MASK_B, c_in, c_out, groups)  # forward: o is the output channel
        for q0 in range(0, inputs, BLOCK_Q):
            q = q0 + tl.arange(0, BLOCK_Q)
            qmask = q < inputs
            q64 = q.to(tl.int64)
            x = tl.load(in_base + q64[None, :] * hw + at[:, None], mask=inside[:, None] & qmask[None, :], other=0.0)
            if TRANSPOSED:  # W(o = input channel, q = output channel) = weight[q, o]
                kept = o[None, :] < _in_channel_end(ky, kx, q, K, MASK_B, c_in, c_out, groups)[:, None]
                w_at = (q64[:, None] * c_in + o64[None, :]) * (K * K) + (ky * K + kx)
            else:
                kept = q[:, None] < end_o[None, :]
                w_at = (o64[None, :] * c_in + q64[:, None]) * (K * K) + (ky * K + kx)
            w_mask = kept & qmask[:, None] & omask[None, :]
            w = tl.load(w_ptr + w_at, mask=w_mask, other=0.0)
            if USE_DOT:
                acc = tl.dot(x, w, acc, input_precision="ieee", out_dtype=CT)
            elif EXACT:  # masked taps and padding add nothing (no 0 * inf)
                read = (inside[:, None] & qmask[None, :])[:, :, None] & w_mask[None, :, :]
                acc += tl.sum(tl.where(read, x.to(CT)[:, :, None] * w.to(CT)[None, :, :], 0.0), axis=1)
            else:
                acc += tl.sum(x.to(CT)[:, :, None] * w.to(CT)[None, :, :], axis=1)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + o, mask=omask, other=0.0).to(CT)[None, :]
    out = out_ptr + (b * outputs + o64[None, :]) * hw + pix[:, None]
    tl.store(out, to_dtype(acc, out_ptr.dtype.element_ty), mask=pmask[:, None] & omask[None, :])


def _all_finite(*tensors):
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def _direct(inp, weight, bias, out, inputs, outputs, mask_b, groups, dilation, transposed):
    batch, _, height, width = inp.shape
    c_out, c_in, k, _ = weight.shape
    hw = height * width
    if batch * hw == 0:
        return out
    # The NaN rule (the reference's): masked taps and the zero padding are not read. The fast kernels multiply
    # zeros in there, which changes nothing unless a zero meets an inf or NaN; such a call takes the exact,
    # broadcast kernel that leaves those products out.
    exact = not _all_finite(inp, weight)
    use_dot = inputs >= DOT_MIN and not exact
    if use_dot:
        block_p = min(64, max(16, triton.next_power_of_2(hw)))
        block_o = min(64, max(16, triton.next_power_of_2(outputs)))
        block_q = min(32, triton.next_power_of_2(inputs))
    else:
        block_o = min(32, triton.next_power_of_2(outputs))
        block_q = triton.next_power_of_2(inputs)
        block_p = min(triton.next_power_of_2(hw), max(16, BROADCAST_TILE // (block_q * block_o)))
    p_blocks = triton.cdiv(hw, block_p)
    grid = (batch * p_blocks, triton.cdiv(outputs, block_o))
    launch(
        _direct_kernel,
        grid,
        inp,
        weight,
        bias if bias is not None else weight,
        out,
        inputs,
        outputs,
        height,
        width,
        c_in,
        c_out,
        groups,
        k,
        dilation,
        _taps(k, mask_b, groups),
        p_blocks,
        TRANSPOSED=transposed,
        MASK_B=int(mask_b),
        HAS_BIAS=bias is not None,
        USE_DOT=use_dot,
        EXACT=exact,
        CT=compute_type(inp),
        BLOCK_P=block_p,
        BLOCK_O=block_o,
        BLOCK_Q=block_q,
    )
    return out


def _check_shapes(x, weight, y, groups, dilation, name_y):
    if x.dim() != 4 or weight.dim() != 4 or y.dim() != 4:
        raise ValueError("x, weight and the output must be 4-d")
    c_out, c_in, k, k2 = weight.shape
    if k != k2 or k % 2 == 0:
        raise ValueError("weight must be a square kernel of odd size k x k")
    if x.shape[1] != c_in or tuple(y.shape) != (x.shape[0], c_out, x.shape[2], x.shape[3]):
        raise ValueError(f"{name_y} has the wrong shape")
    if groups < 1 or c_in % groups or c_out % groups:
        raise ValueError("color_groups must be >= 1 and divide both channel counts")
    if dilation < 1:
        raise ValueError("dilation must be >= 1")


def forward(x, weight, bias, y, mask_b, groups, dilation):
    """y = bias + the masked convolution of x (see the module docstring)."""
    check(x.dtype, x=x, weight=weight, bias=bias, y=y)
    _check_shapes(x, weight, y, groups, dilation, "y")
    if bias is not None and bias.numel() != weight.shape[0]:
        raise ValueError("bias must have C_out elements")
    return _direct(x, weight, bias, y, x.shape[1], weight.shape[0], mask_b, groups, dilation, transposed=False)


def grad_input(grad_y, weight, grad_x, mask_b, groups, dilation):
    """grad_x: the transposed masked convolution of grad_y."""
    check(grad_y.dtype, grad_y=grad_y, weight=weight, grad_x=grad_x)
    _check_shapes(grad_x, weight, grad_y, groups, dilation, "grad_y")
    return _direct(
        grad_y, weight, None, grad_x, weight.shape[0], weight.shape[1], mask_b, groups, dilation, transposed=True
    )


# --------------------------------------------------------------------------------------------------
# grad_weight: partial[chunk, o, i, t] = sum over the chunk's pixels of grad_y[o, p] * x[i, p shifted by t]


@triton.jit
def _weight_grad_kernel(
    gy_ptr,
    x_ptr,
    part_ptr,
    bias_part_ptr,
    c_in,
    c_out,
    height,
    width,
    K,
    dilation,
    taps,
    pixels,
    chunk,
    o_blocks,
    q_blocks,
    HAS_BIAS: tl.constexpr,
    USE_DOT: tl.constexpr,
    EXACT: tl.constexpr,
    CT: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_Q: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.program_id(1)
    qb = pid % q_blocks
    ob = pid // q_blocks % o_blocks
    s = (pid // (q_blocks * o_blocks)).to(tl.int64)
    c = K // 2
    dy = dilation * (t // K - c)
    dx = dilation * (t % K - c)
    hw = height * width
    o = ob * BLOCK_O + tl.arange(0, BLOCK_O)
    omask = o < c_out
    o64 = o.to(tl.int64)
    q = qb * BLOCK_Q + tl.arange(0, BLOCK_Q)
    # No input is valid in the one program of a layer with no tap at all (k = 1, mask A, one group).
    qmask = q < tl.where(t < taps, c_in, 0)
    q64 = q.to(tl.int64)
    acc = tl.zeros([BLOCK_O, BLOCK_Q], CT)
    bias_acc = tl.zeros([BLOCK_O], CT)
    p_begin = s * chunk
    p_end = tl.minimum(p_begin + chunk, pixels)
    for p0 in range(p_begin, p_end, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P).to(tl.int64)
        pmask = p < p_end
        b = p // hw
        pix = p % hw
        i = pix // width
        j = pix % width
        gy = tl.load(
            gy_ptr + (b[None, :] * c_out + o64[:, None]) * hw + pix[None, :],
            mask=omask[:, None] & pmask[None, :],
            other=0.0,
        )
        ii = i + dy
        jj = j + dx
        inside = pmask & (ii >= 0) & (ii < height) & (jj >= 0) & (jj < width)
        at = ii * width + jj
        x = tl.load(
            x_ptr + (b[:, None] * c_in + q64[None, :]) * hw + at[:, None],
            mask=inside[:, None] & qmask[None, :],
            other=0.0,
        )
        if USE_DOT:
            acc = tl.dot(gy, x, acc, input_precision="ieee", out_dtype=CT)
        elif EXACT:  # taps reading the padding add nothing (no 0 * inf)
            read = (omask[:, None] & pmask[None, :])[:, :, None] & (inside[:, None] & qmask[None, :])[None, :, :]
            acc += tl.sum(tl.where(read, gy.to(CT)[:, :, None] * x.to(CT)[None, :, :], 0.0), axis=1)
        else:
            acc += tl.sum(gy.to(CT)[:, :, None] * x.to(CT)[None, :, :], axis=1)
        if HAS_BIAS:
            if (t == 0) & (qb == 0):
                bias_acc += tl.sum(gy.to(CT), axis=1)
    part = part_ptr + ((s * c_out + o64[:, None]) * c_in + q64[None, :]) * taps + t
    tl.store(part, acc, mask=omask[:, None] & qmask[None, :])
    if HAS_BIAS:
        if (t == 0) & (qb == 0):
            tl.store(bias_part_ptr + s * c_out + o64, bias_acc, mask=omask)


@triton.jit
def _weight_grad_finish_kernel(
    part_ptr, gw_ptr, c_in, c_out, groups, K, taps, chunks, MASK_B: tl.constexpr, CT: tl.constexpr, BLOCK: tl.constexpr
):
    """grad_weight[o, i, ky, kx] = the chunks' partials added in chunk order where kept, zero elsewhere."""
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    kk = K * K
    total = c_out * c_in * kk
    mask = e < total
    kx = (e % K).to(tl.int32)
    ky = (e // K % K).to(tl.int32)
    i = e // kk % c_in
    o = e // (kk * c_in)
    kept = mask & (i < _in_channel_end(ky, kx, o, K, MASK_B, c_in, c_out, groups))
    at = (o * c_in + i) * taps + ky * K + kx
    total_acc = tl.zeros([BLOCK], CT)
    for s in range(0, chunks):
        total_acc += tl.load(part_ptr + s * (c_out * c_in * taps) + at, mask=kept, other=0.0)
    tl.store(gw_ptr + e, to_dtype(total_acc, gw_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sum_chunks_kernel(part_ptr, out_ptr, n, chunks, CT: tl.constexpr, BLOCK: tl.constexpr):
    """out[e] = sum over chunks s, in order, of part[s, e]."""
    e = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = e < n
    acc = tl.zeros([BLOCK], CT)
    for s in range(0, chunks):
        acc += tl.load(part_ptr + s * n + e, mask=mask, other=0.0)
    tl.store(out_ptr + e, to_dtype(acc, out_ptr.dtype.element_ty), mask=mask)


def grad_weight(grad_y, x, grad_weight, grad_bias, mask_b, groups, dilation):
    """grad_weight (zero at masked entries) and grad_bias (when not None), each summed in a fixed order."""
    check(x.dtype, grad_y=grad_y, x=x, grad_weight=grad_weight, grad_bias=grad_bias)
    _check_shapes(x, grad_weight, grad_y, groups, dilation, "grad_y")
    c_out, c_in, k, _ = grad_weight.shape
    if grad_bias is not None and grad_bias.numel() != c_out:
        raise ValueError("grad_bias must have C_out elements")
    batch, _, height, width = x.shape
    pixels = batch * height * width
    taps = _taps(k, mask_b, groups)
    if pixels == 0:
        grad_weight.zero_()
        if grad_bias is not None:
            grad_bias.zero_()
        return grad_weight, grad_bias
    exact = not _all_finite(grad_y, x)  # as in _direct
    use_dot = c_in >= DOT_MIN and not exact
    block_o = min(64, max(16, triton.next_power_of_2(c_out)))
    if use_dot:
        block_p, block_q = 64, min(32, triton.next_power_of_2(c_in))
    else:
        block_q = triton.next_power_of_2(c_in)
        block_p = min(128, max(16, BROADCAST_TILE // (block_q * block_o)))
    o_blocks, q_blocks = triton.cdiv(c_out, block_o), triton.cdiv(c_in, block_q)
    # Chunks from the shape alone, so that the sums (and their bits) never depend on the device.
    tiles = o_blocks * q_blocks * max(taps, 1)
    chunks = max(1, min(triton.cdiv(TARGET_PROGRAMS, tiles), triton.cdiv(pixels, MIN_CHUNK)))
    chunk = triton.cdiv(triton.cdiv(pixels, chunks), block_p) * block_p
    chunks = triton.cdiv(pixels, chunk)
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    partial = torch.empty(chunks * c_out * c_in * taps, dtype=ct, device=x.device)
    bias_partial = torch.empty(chunks * c_out, dtype=ct, device=x.device) if grad_bias is not None else partial
    launch(
        _weight_grad_kernel,
        (chunks * o_blocks * q_blocks, max(taps, 1)),
        grad_y,
        x,
        partial,
        bias_partial,
        c_in,
        c_out,
        height,
        width,
        k,
        dilation,
        taps,
        pixels,
        chunk,
        o_blocks,
        q_blocks,
        HAS_BIAS=grad_bias is not None,
        USE_DOT=use_dot,
        EXACT=exact,
        CT=compute_type(x),
        BLOCK_P=block_p,
        BLOCK_O=block_o,
        BLOCK_Q=block_q,
    )
    launch(
        _weight_grad_finish_kernel,
        (triton.cdiv(grad_weight.numel(), FINISH_BLOCK),),
        partial,
        grad_weight,
        c_in,
        c_out,
        groups,
        k,
        taps,
        chunks,
        MASK_B=int(mask_b),
        CT=compute_type(x),
        BLOCK=FINISH_BLOCK,
    )
    if grad_bias is not None:
        launch(
            _sum_chunks_kernel,
            (triton.cdiv(c_out, FINISH_BLOCK),),
            bias_partial,
            grad_bias,
            c_out,
            chunks,
            CT=compute_type(x),
            BLOCK=FINISH_BLOCK,
        )
    return grad_weight, grad_bias
