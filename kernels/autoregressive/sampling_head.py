"""The sampling_head group in Triton: filtered Gumbel-max draws (docs/math.md, section 6.2), no sort.

A program takes ROWS rows and walks each in chunks of BLOCK tokens (the filters as [ROWS] vectors). The
thresholds are found by bisection over a 64-bit key whose unsigned order is the scaled logits' order
(csrc/autoregressive/sampling_head_math.h, order_key), one pass over the row per key bit:
  top_k: the largest key v with count(key >= v) >= k, i.e. the k-th largest scaled logit;
  top_p: the largest key v with mass(top_k-kept, key > v) >= top_p * mass(top_k-kept); the threshold is
         the next key, the smallest whose mass strictly above is below top_p * mass.
Every sum is a tl.sum in a fixed order (no atomics). The draw is Gumbel-max over the kept tokens with the
genkern stream's noise at base + k (categorical::gumbel, the same float32 math), first maximum on ties.
"""

import os

import torch
import triton
import triton.language as tl

from ..core.launch import launch
from ..core.philox import KEY_ARGS, key_args, log_f32, log_uniform24, stream_block

SIGN = tl.constexpr(0x8000000000000000)
# ROWS * BLOCK. Rows never interact, so the tile changes the speed only: the interpreter, whose cost is per
# operation, gets wide tiles.
MAX_TILE = 1 << 16 if os.environ.get("TRITON_INTERPRET") == "1" else 4096


@triton.jit
def _order_key(z):
    bits = (z + 0.0).to(tl.uint64, bitcast=True)  # -0.0 + 0.0 is +0.0
    return tl.where((bits >> 63) != 0, ~bits, bits | SIGN)


@triton.jit
def _gumbel(seed_lo, seed_hi, off_lo, off_hi, element):
    """categorical::gumbel of stream element `element` (int64): -log(-log u), float32."""
    x0, x1, x2, x3 = stream_block(seed_lo, seed_hi, off_lo, off_hi, element >> 2)
    lane = element & 3
    bits = tl.where(lane == 0, x0, tl.where(lane == 1, x1, tl.where(lane == 2, x2, x3)))
    return -log_f32(-log_uniform24(bits >> 8))


@triton.jit
def _tile(logits_ptr, rows, cols, vocab, row_ok, tau):
    """The scaled logits of one chunk ([ROWS, BLOCK], float64), -inf outside the row, and its mask."""
    inside = row_ok[:, None] & (cols[None, :] < vocab)
    ptr = logits_ptr + rows[:, None] * vocab + cols[None, :]
    logit = tl.load(ptr, mask=inside, other=float("-inf")).to(tl.float64)
    return logit, logit / tau[:, None], inside


@triton.jit(do_not_specialize=KEY_ARGS)
def _sample_kernel(
    logits_ptr,
    base_ptr,
    out_ptr,
    tau_ptr,
    top_k_ptr,
    top_p_ptr,
    min_p_ptr,
    n_rows,
    vocab,
    seed_lo,
    seed_hi,
    off_lo,
    off_hi,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    row_ok = rows < n_rows
    temperature = tl.load(tau_ptr + rows, mask=row_ok, other=1.0)
    k = tl.load(top_k_ptr + rows, mask=row_ok, other=0)
    p = tl.load(top_p_ptr + rows, mask=row_ok, other=1.0)
    min_p = tl.load(min_p_ptr + rows, mask=row_ok, other=0.0)
    tau = tl.where(temperature == 0.0, 1.0, temperature)
    chunk = tl.arange(0, BLOCK).to(tl.int64)
    no_index = vocab + tl.zeros([ROWS, BLOCK], tl.int64)

    # Pass 1: the first NaN and the largest logit; pass 2: the first index at it (and at the largest z).
    first_nan = tl.full([ROWS], 0, tl.int64) + vocab
    l_max = tl.full([ROWS], float("-inf"), tl.float64)
    for start in range(0, vocab, BLOCK):
        cols = start + chunk
        logit, z, inside = _tile(logits_ptr, rows, cols, vocab, row_ok, tau)
        nan = logit != logit
        first_nan = tl.minimum(first_nan, tl.min(tl.where(nan & inside, cols[None, :], no_index), axis=1))
        l_max = tl.maximum(l_max, tl.max(tl.where(nan, float("-inf"), logit), axis=1))
    z_max = l_max / tau
    first_max = tl.full([ROWS], 0, tl.int64) + vocab
    first_z_max = tl.full([ROWS], 0, tl.int64) + vocab
    for start in range(0, vocab, BLOCK):
        cols = start + chunk
        logit, z, inside = _tile(logits_ptr, rows, cols, vocab, row_ok, tau)
        first_max = tl.minimum(
            first_max, tl.min(tl.where(inside & (logit == l_max[:, None]), cols[None, :], no_index), axis=1)
        )
        first_z_max = tl.minimum(
            first_z_max, tl.min(tl.where(inside & (z == z_max[:, None]), cols[None, :], no_index), axis=1)
        )
    argmax_row = (first_nan < vocab) | (temperature == 0.0) | (l_max == float("inf")) | (l_max == float("-inf"))
    overflow_row = (z_max == float("inf")) | (z_max == float("-inf"))
    drawn = argmax_row | overflow_row
    shift = tl.where(drawn, 0.0, z_max)  # the rows drawn above (and those past the end) sum nothing below

    # top_k: bisection for the k-th largest key (0, which every key passes, when off).
    k_on = (k > 0) & (k < vocab) & ~drawn
    top_k_key = tl.zeros([ROWS], tl.uint64)
    if tl.max(k_on.to(tl.int32), axis=0) > 0:
        step = tl.full([], SIGN, tl.uint64)
        for _ in range(64):
            candidate = top_k_key | step
            count = tl.zeros([ROWS], tl.int64)
            for start in range(0, vocab, BLOCK):
                cols = start + chunk
                logit, z, inside = _tile(logits_ptr, rows, cols, vocab, row_ok, tau)
                count += tl.sum((inside & (_order_key(z) >= candidate[:, None])).to(tl.int64), axis=1)
            top_k_key = tl.where(k_on & (count >= k), candidate, top_k_key)
            step = step >> 1

    # top_p: the mass of the top_k-kept tokens, then bisection for the largest key with mass above >= target.
    p_on = (p < 1.0) & ~drawn
    threshold = top_k_key
    if tl.max(p_on.to(tl.int32), axis=0) > 0:
        kept_mass = tl.zeros([ROWS], tl.float64)
        for start in range(0, vocab, BLOCK):
            cols = start + chunk
            logit, z, inside = _tile(logits_ptr, rows, cols, vocab, row_ok, tau)
            kept = inside & (_order_key(z) >= top_k_key[:, None])
            kept_mass += tl.sum(tl.where(kept, tl.exp(z - shift[:, None]), 0.0), axis=1)
        target = p * kept_mass
        below = tl.zeros([ROWS], tl.uint64)
        step = tl.full([], SIGN, tl.uint64)
        for _ in range(64):
            candidate = below | step
            above = tl.zeros([ROWS], tl.float64)
            for start in range(0, vocab, BLOCK):
                cols = start + chunk
                logit, z, inside = _tile(logits_ptr, rows, cols, vocab, row_ok, tau)
                key = _order_key(z)
                heavier = inside & (key >= top_k_key[:, None]) & (key > candidate[:, None])
                above += tl.sum(tl.where(heavier, tl.exp(z - shift[:, None]), 0.0), axis=1)
            below = tl.where(above >= target, candidate, below)
            step = step >> 1
        threshold = tl.where(p_on, tl.maximum(top_k_key, below + 1), top_k_key)

    # The draw: Gumbel-max over the kept tokens; the first maximum wins (an earlier chunk on ties).
    base = tl.load(base_ptr + rows, mask=row_ok, other=0)
    best = tl.full([ROWS], float("-inf"), tl.float64)
    best_index = tl.zeros([ROWS], tl.int64)
    for start in range(0, vocab, BLOCK):
        cols = start + chunk
        logit, z, inside = _tile(logits_ptr, rows, cols, vocab, row_ok, tau)
        kept = inside & (_order_key(z) >= threshold[:, None])
        kept = kept & ((min_p[:, None] <= 0.0) | (tl.exp(z - shift[:, None]) >= min_p[:, None]))
        noise = _gumbel(seed_lo, seed_hi, off_lo, off_hi, base[:, None] + cols[None, :])
        score = tl.where(kept, z + noise.to(tl.float64), float("-inf"))
        chunk_best = tl.max(score, axis=1)
        chunk_index = tl.min(tl.where(kept & (score == chunk_best[:, None]), cols[None, :], no_index), axis=1)
        better = chunk_best > best
        best_index = tl.where(better, chunk_index, best_index)
        best = tl.where(better, chunk_best, best)
    result = tl.where(argmax_row, tl.where(first_nan < vocab, first_nan, first_max), best_index)
    result = tl.where(~argmax_row & overflow_row, first_z_max, result)
    tl.store(out_ptr + rows, result, mask=row_ok)


def sample_logits(logits, base, out, temperature, top_k, top_p, min_p, seed, offset):
    """out[n] = the filtered draw of row n (csrc/autoregressive/sampling_head.h); the op checked the arguments."""
    rows, vocab = logits.shape
    if rows == 0:
        return out
    block = min(triton.next_power_of_2(vocab), 1024)
    row_tile = max(1, min(MAX_TILE // 64, MAX_TILE // block, triton.next_power_of_2(rows)))
    for name, t, dtype in (("base", base, torch.int64), ("top_k", top_k, torch.int64)):
        if t.dtype != dtype or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous {dtype} tensor")
    launch(
        _sample_kernel,
        (triton.cdiv(rows, row_tile),),
        logits,
        base,
        out,
        temperature,
        top_k,
        top_p,
        min_p,
        rows,
        vocab,
        *key_args(seed, offset),
        ROWS=row_tile,
        BLOCK=block,
    )
    return out
