"""What every genkern Triton module shares: supported dtypes, argument checks and the launch settings."""

import torch
import triton.language as tl

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
NUM_WARPS = 4


def compute_type(t):
    """float64 for float64 tensors, float32 otherwise (half types widen for the math)."""
    return tl.float64 if t.dtype == torch.float64 else tl.float32


def check(dtype, **tensors):
    """All given tensors contiguous and of one floating dtype (None entries are skipped)."""
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"unsupported dtype {dtype}")
    for name, t in tensors.items():
        if t is None:
            continue
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
        if t.dtype != dtype:
            raise TypeError(f"{name} has dtype {t.dtype}, expected {dtype}")


def launch(kernel, grid, *args, **meta):
    # No FP contraction: the C++ and CUDA kernels compile without it, and the backends should agree to the bit.
    kernel[grid](*args, **meta, num_warps=NUM_WARPS, enable_fp_fusion=False)
