"""The NADE family (docs/math.md, section 4) in Triton.

The wrappers mirror the Args structs of csrc/autoregressive/nade.h (whose comments define each op): every tensor is
contiguous, outputs are preallocated by the caller, and all floating tensors of a call share one dtype.
The per-element terms are those of csrc/autoregressive/nade_math.h, written in the same operation order (gk::exp, the
Cephes log core, the exact u < p comparison of the draw).

A program runs the recurrence of one example (one sample; backward: a group of examples) with all H hidden
units in one [BLOCK_H] tensor, stepping through the D dimensions in a loop; W is read through a transposed
copy (D, H) so that each step's column is a contiguous row. Compute type: float64 for float64 tensors,
float32 otherwise.

Backward: a fixed number of groups (a function of the sizes only) each sums its run of examples into its own
accumulators in fp32/fp64, and torch adds the groups (a fixed-order reduction): the gradients are
deterministic, with no atomics.
"""

import math

import torch
import triton
import triton.language as tl

from ..core.launch import check, compute_type, launch
from ..core.philox import KEY_ARGS, exp_t, key_args, log_core, log_reduce, stream_block, to_dtype

# Backward's groups (as in the CUDA kernels): at least MIN_PER_GROUP examples each, at most MAX_GROUPS, and
# within GROUP_BUDGET_BYTES of accumulators.
MIN_PER_GROUP = 2
MAX_GROUPS = 256
GROUP_BUDGET_BYTES = 256 << 20

# Never specialised: a size of 1 would become a constexpr, which has no .to(tl.int64) for 64-bit offsets.
SIZE_ARGS = ["D", "H"]


# --------------------------------------------------------------------------------------------------
# Per-element terms (csrc/autoregressive/nade_math.h)


@triton.jit
def _sigmoid(z):
    return 1.0 / (1.0 + exp_t(-z))


@triton.jit
def _log1p_unit(e):
    """log(1 + e) for e in [0, 1] (gk::nade::log1p_unit): float32 takes e itself as the Cephes core's reduced
    argument below sqrt(2) - 1; float64 uses log(u) e / (u - 1), u = 1 + e (Goldberg), accurate for tiny e."""
    if e.dtype == tl.float64:
        u = 1.0 + e
        y = tl.where(u == 1.0, e, tl.log(u) * (e / (u - 1.0)))
    else:
        small = e <= 0.41421356
        f_big, e_big = log_reduce(1.0 + e)
        y = log_core(tl.where(small, e, f_big), tl.where(small, 0.0, e_big))
    return y


@triton.jit
def _log_bernoulli(x, l):
    """x l - softplus(l), softplus(l) = max(l, 0) + log(1 + e^-|l|), without x l where x = 0 (gk::nade::
    log_bernoulli: l = +inf there gives -inf, not NaN)."""
    softplus = tl.where(l != l, l, tl.maximum(l, 0.0) + _log1p_unit(exp_t(-tl.abs(l))))
    return tl.where(x != 0.0, x * l - softplus, -softplus)


@triton.jit
def _add_column(a, xi, wt_ptr, i, H64, j, mask, CT: tl.constexpr):
    """a + W[:, i] x_i, and a itself where x_i = 0 (an inf in W[:, i] never meets it)."""
    w = tl.load(wt_ptr + i * H64 + j, mask=mask, other=0.0).to(CT)
    return tl.where(xi != 0.0, a + xi * w, a)


# --------------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _logit(v_ptr, b_ptr, i, h, j, mask, H64, CT: tl.constexpr):
    """l_i = b_i + V_i . h (a scalar)."""
    v = tl.load(v_ptr + i * H64 + j, mask=mask, other=0.0).to(CT)
    return tl.load(b_ptr + i).to(CT) + tl.sum(v * h, axis=0)


@triton.jit(do_not_specialize=SIZE_ARGS)
def _log_prob_kernel(x_ptr, wt_ptr, c_ptr, v_ptr, b_ptr, out_ptr, D, H, CT: tl.constexpr, BLOCK_H: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    H64 = H.to(tl.int64)  # offsets i * H + j in 64 bits
    j = tl.arange(0, BLOCK_H)
    mask = j < H
    a = tl.load(c_ptr + j, mask=mask, other=0.0).to(CT)
    logp = tl.sum(tl.zeros([BLOCK_H], CT), axis=0)
    for i in range(D):
        h = _sigmoid(a)
        xi = tl.load(x_ptr + n * D + i).to(CT)
        logp += _log_bernoulli(xi, _logit(v_ptr, b_ptr, i, h, j, mask, H64, CT))
        a = _add_column(a, xi, wt_ptr, i, H64, j, mask, CT)
    tl.store(out_ptr + n, to_dtype(logp, out_ptr.dtype.element_ty))


@triton.jit(do_not_specialize=KEY_ARGS + SIZE_ARGS + ["first"])
def _sample_kernel(
    wt_ptr,
    c_ptr,
    v_ptr,
    b_ptr,
    out_ptr,
    D,
    H,
    seed_lo,
    seed_hi,
    off_lo,
    off_hi,
    first,
    CT: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    H64 = H.to(tl.int64)
    j = tl.arange(0, BLOCK_H)
    mask = j < H
    a = tl.load(c_ptr + j, mask=mask, other=0.0).to(CT)
    row = (first + n) * D  # stream index of dimension 0 of this sample
    for i in range(D):
        p = _sigmoid(_logit(v_ptr, b_ptr, i, _sigmoid(a), j, mask, H64, CT))
        index = row + i + tl.zeros([1], tl.int64)
        x0, x1, x2, x3 = stream_block(seed_lo, seed_hi, off_lo, off_hi, index >> 2)
        lane = index & 3
        bits = tl.where(lane == 0, x0, tl.where(lane == 1, x1, tl.where(lane == 2, x2, x3)))
        # u < p  <=>  2k + 1 < p 2^25, both sides exact in float64 (gk::nade::bernoulli)
        draw = (2 * (bits >> 8) + 1).to(tl.float64) < p.to(tl.float64) * 33554432.0
        xi = tl.sum(draw.to(CT), axis=0)
        tl.store(out_ptr + n * D + i, to_dtype(xi, out_ptr.dtype.element_ty))
        a = _add_column(a, xi, wt_ptr, i, H64, j, mask, CT)


@triton.jit(do_not_specialize=SIZE_ARGS)
def _backward_kernel(
    g_ptr,
    x_ptr,
    wt_ptr,
    c_ptr,
    v_ptr,
    b_ptr,
    part_ptr,
    tape_ptr,
    B,
    D,
    H,
    groups,
    steps,
    chunks,
    CT: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    group = tl.program_id(0).to(tl.int64)
    D64, H64 = D.to(tl.int64), H.to(tl.int64)
    j = tl.arange(0, BLOCK_H)
    mask = j < H
    # This group's accumulators (zeroed by the wrapper): gv (D, H), gwt (D, H), gb (D), gc (H).
    gv_ptr = part_ptr + group * (2 * D64 * H64 + D64 + H64)
    gw_ptr = gv_ptr + D64 * H64
    gb_ptr = gw_ptr + D64 * H64
    gc_ptr = gb_ptr + D
    # This group's tape (gk::nade::tape_size): `chunks` checkpoints a_{q steps}, then `steps` slots of a_i.
    ck_ptr = tape_ptr + group * (chunks + steps) * H64
    slot_ptr = ck_ptr + chunks * H64
    for n in range(group * B // groups, (group + 1) * B // groups):
        # a_{D+1}, in the forward's order, keeping the checkpoints.
        a = tl.load(c_ptr + j, mask=mask, other=0.0).to(CT)
        for i in range(D):
            if i % steps == 0:
                tl.store(ck_ptr + (i // steps) * H64 + j, a, mask=mask)
            a = _add_column(a, tl.load(x_ptr + n * D + i).to(CT), wt_ptr, i, H64, j, mask, CT)
        s = tl.zeros([BLOCK_H], CT)  # sum over steps k > i of dL/da_k
        g = tl.load(g_ptr + n).to(CT)
        for back in range(chunks):
            q = chunks - 1 - back
            i0 = q * steps
            i1 = tl.minimum(D, i0 + steps)
            # The chunk's a_i recomputed from its checkpoint (the forward's bits; the cancelling a_{i+1} -
            # W[:, i] x_i is never formed); a ends on a_{i1}, the value it held.
            a = tl.load(ck_ptr + q * H64 + j, mask=mask, other=0.0)
            for i in range(i0, i1):
                tl.store(slot_ptr + (i - i0) * H64 + j, a, mask=mask)
                a = _add_column(a, tl.load(x_ptr + n * D + i).to(CT), wt_ptr, i, H64, j, mask, CT)
            for step in range(i1 - i0):
                i = i1 - 1 - step
                xi = tl.load(x_ptr + n * D + i).to(CT)
                a = tl.load(slot_ptr + (i - i0) * H64 + j, mask=mask, other=0.0)  # a_i
                h = _sigmoid(a)
                v = tl.load(v_ptr + i * H64 + j, mask=mask, other=0.0).to(CT)
                l = tl.load(b_ptr + i).to(CT) + tl.sum(v * h, axis=0)
                delta = g * (xi - _sigmoid(l))
                tl.store(gb_ptr + i, tl.load(gb_ptr + i) + delta)
                row = i * H64 + j
                tl.store(gv_ptr + row, tl.load(gv_ptr + row, mask=mask) + delta * h, mask=mask)
                tl.store(gw_ptr + row, tl.load(gw_ptr + row, mask=mask) + tl.where(xi != 0.0, xi * s, 0.0), mask=mask)
                s += delta * v * (h * (1.0 - h))
        tl.store(gc_ptr + j, tl.load(gc_ptr + j, mask=mask) + s, mask=mask)


# --------------------------------------------------------------------------------------------------
# Wrappers (the signatures of genkern._C's nade_* entry points)


def _block_h(hidden):
    return max(16, triton.next_power_of_2(hidden))


def _check_shapes(w, c, v, b, x=None):
    hidden, dims = w.shape
    if tuple(c.shape) != (hidden,) or tuple(v.shape) != (dims, hidden) or tuple(b.shape) != (dims,):
        raise ValueError("c, v, b must have shapes (H,), (D, H), (D,) for weight (H, D)")
    if x is not None and (x.dim() != 2 or x.shape[1] != dims):
        raise ValueError(f"x must have shape (B, {dims})")
    return dims, hidden


def log_prob(x, w, c, v, b, out):
    """out[n] = log p(x[n]) in nats."""
    check(w.dtype, x=x, weight=w, c=c, v=v, b=b, out=out)
    dims, hidden = _check_shapes(w, c, v, b, x)
    if x.shape[0] == 0:
        return out
    wt = w.t().contiguous()
    launch(
        _log_prob_kernel, (x.shape[0],), x, wt, c, v, b, out, dims, hidden, CT=compute_type(w), BLOCK_H=_block_h(hidden)
    )
    return out


def sample(w, c, v, b, out, seed, offset, first):
    """out (n, D): samples first .. first + n - 1, dimension i of sample s drawn at stream element s D + i."""
    check(w.dtype, weight=w, c=c, v=v, b=b, out=out)
    dims, hidden = _check_shapes(w, c, v, b)
    if out.numel() == 0:
        return out
    wt = w.t().contiguous()
    launch(
        _sample_kernel,
        (out.shape[0],),
        wt,
        c,
        v,
        b,
        out,
        dims,
        hidden,
        *key_args(seed, offset),
        int(first),
        CT=compute_type(w),
        BLOCK_H=_block_h(hidden),
    )
    return out


def group_count(batch, dims, hidden, value_size):
    """Backward's number of groups: a function of the sizes only, so the gradients' bits never vary."""
    per_group = (2 * dims * hidden + dims + hidden) * value_size
    by_memory = max(1, GROUP_BUDGET_BYTES // max(per_group, 1))
    return min(MAX_GROUPS, triton.cdiv(batch, MIN_PER_GROUP), by_memory)


def log_prob_backward(grad_out, x, w, c, v, b, grad_w, grad_c, grad_v, grad_b):
    """Gradients of sum_n grad_out[n] log p(x[n]) w.r.t. W, c, V, b (x gets none)."""
    check(
        w.dtype,
        grad_out=grad_out,
        x=x,
        weight=w,
        c=c,
        v=v,
        b=b,
        grad_weight=grad_w,
        grad_c=grad_c,
        grad_v=grad_v,
        grad_b=grad_b,
    )
    dims, hidden = _check_shapes(w, c, v, b, x)
    acc = torch.float64 if w.dtype == torch.float64 else torch.float32
    groups = group_count(x.shape[0], dims, hidden, torch.empty((), dtype=acc).element_size())
    size = 2 * dims * hidden + dims + hidden
    partials = torch.zeros(groups, size, dtype=acc, device=w.device)
    steps = math.isqrt(dims - 1) + 1 if dims > 0 else 1  # gk::nade::checkpoint_steps: ceil(sqrt(D))
    chunks = triton.cdiv(dims, steps)
    tape = torch.empty(groups * (chunks + steps) * hidden, dtype=acc, device=w.device)
    if groups > 0 and dims > 0:
        launch(
            _backward_kernel,
            (groups,),
            grad_out,
            x,
            w.t().contiguous(),
            c,
            v,
            b,
            partials,
            tape,
            x.shape[0],
            dims,
            hidden,
            groups,
            steps,
            chunks,
            CT=compute_type(w),
            BLOCK_H=_block_h(hidden),
        )
    total = partials.sum(0)  # zero with no groups
    dh = dims * hidden
    grad_v.copy_(total[:dh].view(dims, hidden))
    grad_w.copy_(total[dh : 2 * dh].view(dims, hidden).t())
    grad_b.copy_(total[2 * dh : 2 * dh + dims])
    grad_c.copy_(total[2 * dh + dims :])
    return grad_w, grad_c, grad_v, grad_b
