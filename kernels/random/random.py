"""The random family in Triton: the raw stream bits and its standard normals (docs/math.md, section 1),
from the stream functions of kernels/core/philox.py."""

import torch
import triton
import triton.language as tl

from ..core.philox import BLOCK, KEY_ARGS, NUM_WARPS, interleave4, key_args, stream_block, stream_normals_run, to_dtype


def _check_out(out, dtypes, name="out"):
    if not isinstance(out, torch.Tensor) or not out.is_contiguous():
        raise ValueError(f"{name} must be a contiguous tensor")
    if out.dtype not in dtypes:
        raise TypeError(f"{name} has dtype {out.dtype}, expected one of {dtypes}")


@triton.jit(do_not_specialize=KEY_ARGS)
def _bits_kernel(out_ptr, n, seed_lo, seed_hi, off_lo, off_hi, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    start = pid * BLOCK  # a multiple of 4: this program owns whole Philox blocks
    block = start // 4 + tl.arange(0, BLOCK // 4).to(tl.int64)
    x0, x1, x2, x3 = stream_block(seed_lo, seed_hi, off_lo, off_hi, block)
    v = interleave4(x0, x1, x2, x3)
    offs = start + tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, v.to(out_ptr.dtype.element_ty, bitcast=True), mask=offs < n)


def _fill(kernel, out, seed, offset):
    """Stream elements 0 .. n-1 into out, a program per BLOCK of them."""
    n = out.numel()
    if n == 0:
        return out
    kernel[(triton.cdiv(n, BLOCK),)](
        out, n, *key_args(seed, offset), BLOCK=BLOCK, num_warps=NUM_WARPS, enable_fp_fusion=False
    )
    return out


def bits(out, seed, offset):
    """Fill `out` (contiguous int32 or uint32) with stream elements 0 .. n-1: the raw Philox uint32 bits."""
    _check_out(out, (torch.int32, getattr(torch, "uint32", torch.int32)))
    return _fill(_bits_kernel, out, seed, offset)


@triton.jit(do_not_specialize=KEY_ARGS)
def _normal_kernel(out_ptr, n, seed_lo, seed_hi, off_lo, off_hi, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    start = pid * BLOCK
    z = stream_normals_run(seed_lo, seed_hi, off_lo, off_hi, start, BLOCK)
    offs = start + tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, to_dtype(z, out_ptr.dtype.element_ty), mask=offs < n)


def normal(out, seed, offset):
    """Fill `out` (contiguous float32/float16/bfloat16/float64) with standard normals 0 .. n-1 of the stream.

    The normals are computed in float32 and then cast (rounded to nearest) to out's dtype."""
    _check_out(out, (torch.float32, torch.float16, torch.bfloat16, torch.float64))
    return _fill(_normal_kernel, out, seed, offset)
