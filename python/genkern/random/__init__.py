"""The genkern random stream: Philox4x32-10, counter-based, identical on every backend.

Element i of any random output depends only on (seed, offset, i) (docs/math.md, section 1): not on the
batch, the block size, the thread count or the device. Ops that draw noise take `seed` (None: drawn from
torch's default generator, so `torch.manual_seed` makes genkern reproducible) and `offset`, which selects
an independent stream for the same seed.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .. import _checks, _native
from .. import backend as _backend
from .._kernels import to_signed
from . import _ops


def philox4x32_10(counter, key) -> np.ndarray:
    """The Philox4x32-10 block function from the C++ core: uint32 arrays (n, 4) and (n, 2) -> (n, 4)."""
    counter = np.ascontiguousarray(counter, dtype=np.uint32)
    key = np.ascontiguousarray(key, dtype=np.uint32)
    if counter.ndim != 2 or counter.shape[1] != 4:
        raise ValueError(f"counter must have shape (n, 4), got {counter.shape}")
    if key.shape != (counter.shape[0], 2):
        raise ValueError(f"key must have shape ({counter.shape[0]}, 2), got {key.shape}")
    out = np.empty_like(counter)
    _native._C.random.philox4x32_10(_native.array(counter), _native.array(key), _native.array(out))
    return out


def resolve_seed(seed) -> int:
    """A seed in [0, 2^64): the given one, or a draw from torch's default generator when None."""
    if seed is None:
        # Two 32-bit draws: torch's random_() on int64 stops short of 2^63.
        hi, lo = torch.randint(0, 1 << 32, (2,), dtype=torch.int64).tolist()
        return (hi << 32) | lo
    return _checks.integer("seed", seed, low=0, high=_checks.UINT64_MAX)


def check_offset(offset) -> int:
    return _checks.integer("offset", offset, low=0, high=_checks.UINT64_MAX)


def _shape(shape) -> tuple[int, ...]:
    if hasattr(shape, "__index__") and not isinstance(shape, torch.Tensor):
        shape = (shape,)
    try:
        shape = tuple(shape)
    except TypeError:
        raise TypeError(f"shape must be an int or a sequence of ints, got {type(shape).__name__}") from None
    return tuple(_checks.int64("shape", s, low=0) for s in shape)


def _device(device) -> torch.device:
    try:
        return torch.device(device) if device is not None else torch.device("cpu")
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device: {exc}") from None


def randn(shape, *, seed=None, offset=0, device=None, dtype=torch.float32, backend=None) -> torch.Tensor:
    """Standard normals of the stream for (seed, offset), element i from stream element i. (Under
    torch.compile(fullgraph=True), pass an explicit seed.)"""
    shape = _shape(shape)
    if dtype not in _checks.FLOAT_DTYPES:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype}")
    device = _device(device)
    seed, offset = resolve_seed(seed), check_offset(offset)
    return _backend.call(
        backend, torch.ops.genkern.randn, list(shape), to_signed(seed), to_signed(offset), dtype, device
    )


def bits(shape, *, seed=None, offset=0, device=None, backend=None) -> torch.Tensor:
    """The raw uint32 stream for (seed, offset), as a torch.uint32 tensor."""
    shape = _shape(shape)
    device = _device(device)
    seed, offset = resolve_seed(seed), check_offset(offset)
    return _backend.call(backend, _ops.bits, math.prod(shape), seed, offset, device).reshape(shape)
