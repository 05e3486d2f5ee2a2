"""Argument checks shared by every family: clear errors naming the argument, before any kernel runs."""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence

import torch
from torch._subclasses.fake_tensor import FakeTensor

UINT64_MAX = (1 << 64) - 1
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1


def tensor(name: str, x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def boolean(name: str, x) -> bool:
    if not isinstance(x, bool):
        raise TypeError(f"{name} must be a bool, got {type(x).__name__}")
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
        if shape is None:
            raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {ref_name}'s shape {expected}")
        raise ValueError(
            f"{name} has shape {tuple(x.shape)}, expected {expected} (for {ref_name} of shape {tuple(ref.shape)})"
        )
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
        if high is None:
            raise ValueError(f"{name} must be >= {low}, got {x}")
        if low is None:
            raise ValueError(f"{name} must be <= {high}, got {x}")
        raise ValueError(f"{name} must be in [{low}, {high}], got {x}")
    return x


def int64(name: str, x, *, low: int | None = None) -> int:
    """An int argument as an op's schema carries it (int64), at least `low` when given."""
    x = integer(name, x, low=low)
    if not INT64_MIN <= x <= INT64_MAX:
        raise ValueError(f"{name}={x} is outside the int64 range [-2^63, 2^63)")
    return x


@functools.cache
def _memory_of(device: torch.device) -> int | None:
    if device.type == "cpu":
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):  # not a POSIX system
            return None
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(device).total_memory
    return None  # meta tensors have no memory; other devices: unknown


def device_memory(device: torch.device) -> int | None:
    """The memory of `device` in bytes (the host's physical memory for the CPU), None when unknown or unbounded
    (a meta tensor's device)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else device
    return _memory_of(device)


def _bytes(n: int) -> str:
    for unit, size in (("EiB", 2**60), ("PiB", 2**50), ("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} bytes"


def allocation(name: str, shape: Sequence[int] | int, itemsize: int, device, what: str = "the output") -> None:
    """Refuse, naming the argument `name` that sized it, a buffer of `shape` (or a count of elements) whose
    element count passes int64 or whose bytes pass the device's whole memory: it could never be allocated,
    and its index arithmetic would overflow. Checked before anything is allocated or launched."""
    numel = math.prod(shape) if isinstance(shape, Sequence) else shape
    if not isinstance(numel, int):  # symbolic while torch.compile traces: the call itself is checked
        return
    if numel > INT64_MAX // max(itemsize, 1):
        raise ValueError(f"{name} is too large: {what} would have {numel} elements, past the int64 range")
    memory = device_memory(device)
    if memory is not None and numel * itemsize > memory:
        raise ValueError(
            f"{name} is too large: {what} would take {_bytes(numel * itemsize)}, more than the "
            f"{_bytes(memory)} of {torch.device(device).type} memory"
        )


def has_values(x: torch.Tensor) -> bool:
    """Whether x's values can be read for a data-dependent check: not for a meta or fake tensor, nor while
    torch.compile traces (the check then skips, as the kernels never read out of bounds on such values)."""
    return x.device.type != "meta" and not isinstance(x, FakeTensor) and not torch.compiler.is_compiling()


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
