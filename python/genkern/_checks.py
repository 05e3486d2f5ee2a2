"""Argument checks shared by every family: clear errors naming the argument, before any kernel runs."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

UINT64_MAX = (1 << 64) - 1


def tensor(name: str, x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def float_tensor(name: str, x) -> torch.Tensor:
    tensor(name, x)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a float16, bfloat16, float32 or float64 tensor, got dtype {x.dtype}")
    return x


def like(name: str, x, ref_name: str, ref: torch.Tensor, *, shape: Sequence[int] | None = None) -> torch.Tensor:
    """x is a float tensor with ref's dtype and device, and the given shape (ref's shape by default)."""
    float_tensor(name, x)
    same_place(name, x, ref_name, ref)
    expected = tuple(ref.shape) if shape is None else tuple(shape)
    if tuple(x.shape) != expected:
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {expected}")
    return x


def same_place(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if x.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {x.dtype} but {ref_name} has dtype {ref.dtype}")
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}")


def integer(name: str, x, *, low: int | None = None, high: int | None = None) -> int:
    if isinstance(x, bool):
        raise TypeError(f"{name} must be an int, got bool")
    if not isinstance(x, int):
        if isinstance(x, torch.Tensor) or not hasattr(x, "__index__"):
            raise TypeError(f"{name} must be an int, got {type(x).__name__}")
        x = x.__index__()
    if (low is not None and x < low) or (high is not None and x > high):
        raise ValueError(f"{name} must be in [{low}, {high}], got {x}")
    return x


def reduced_dims(name: str, dim, ndim: int) -> tuple[int, ...]:
    """Normalise `dim` (an int, a sequence of ints, or None for all) to sorted, distinct, non-negative dims."""
    if dim is None:
        return tuple(range(ndim))
    if isinstance(dim, (list, tuple)):
        dims = list(dim)
    elif hasattr(dim, "__index__") and not isinstance(dim, (bool, torch.Tensor)):
        dims = [dim]
    else:
        raise TypeError(f"{name} must be an int, a sequence of ints or None, got {type(dim).__name__}")
    out = []
    for d in dims:
        d = integer(name, d)
        if not -max(ndim, 1) <= d < max(ndim, 1):
            raise ValueError(f"{name}={d} is out of range for a tensor of {ndim} dims")
        out.append(d % max(ndim, 1))
    if len(set(out)) != len(out):
        raise ValueError(f"{name} repeats a dimension: {dim}")
    return tuple(sorted(out))


def reduce_shape(shape: Sequence[int], start: int, end: int) -> tuple[int, int, int]:
    """(outer, dim, inner) sizes of a reduction over the contiguous dims [start, end)."""
    return math.prod(shape[:start]), math.prod(shape[start:end]), math.prod(shape[end:])
