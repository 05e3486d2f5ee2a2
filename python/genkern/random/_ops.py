"""The genkern stream as ops: `genkern::randn` (normals) and raw uint32 bits."""

from __future__ import annotations

import warnings

import torch

from .. import _checks, _native
from .. import backend as _backend
from .._kernels import KernelGroup, to_unsigned
from . import reference as ref


def _triton_random():
    from ..kernels.random import random

    return random


KERNELS = KernelGroup("random", native=lambda: _native._C.random, triton=_triton_random)


def _check_randn(shape, seed, offset, dtype, device) -> None:
    """Sizes >= 0 whose output fits the device (and int64); a floating dtype. seed and offset are uint64
    carried as int64 (any value)."""
    for s in shape:
        _checks.integer("shape", s, low=0)
    if dtype not in _checks.FLOAT_DTYPES:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype}")
    _checks.allocation("shape", shape, dtype.itemsize, device)


def _check_bits(n: int, seed: int, offset: int, device) -> None:
    _checks.integer("shape", n, low=0)
    _checks.integer("seed", seed, low=0, high=_checks.UINT64_MAX)
    _checks.integer("offset", offset, low=0, high=_checks.UINT64_MAX)
    _checks.allocation("shape", n, 4, device)


@torch.library.custom_op("genkern::randn", mutates_args=())
def randn_op(shape: list[int], seed: int, offset: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Standard normals of the stream (seed, offset), element i from stream element i. The body is the
    reference; cpu and cuda tensors get the kernel below unless the reference is selected."""
    _check_randn(shape, seed, offset, dtype, device)
    return ref.randn(shape, to_unsigned(seed), to_unsigned(offset), dtype=dtype, device=device)


@KERNELS.register(randn_op, check=_check_randn)
def _(kernels, shape, seed, offset, dtype, device):
    out = torch.empty(shape, dtype=dtype, device=device)
    if out.numel():
        kernels.normal(out, to_unsigned(seed), to_unsigned(offset))
    return out


def _randn_meta(shape, seed, offset, dtype, device):
    _check_randn(shape, seed, offset, dtype, device)
    return torch.empty(shape, dtype=dtype, device=device)


# A factory op dispatches on its device argument, and a device without a registered kernel is a RuntimeError:
# meta gets the shape-only kernel. (Registering a second device re-registers torch's BackendSelect switch,
# which warns about the override: expected here, as torch itself silences it for its own re-registrations.)
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="Warning only once for all operators")
    randn_op.register_kernel("meta", _randn_meta)


@randn_op.register_fake
def _(shape, seed, offset, dtype, device):
    _check_randn(shape, seed, offset, dtype, device)
    return torch.empty(shape, dtype=dtype, device=device)


def bits(n: int, seed: int, offset: int, device: torch.device) -> torch.Tensor:
    """Stream elements 0..n-1 as a torch.uint32 tensor, on the selected backend (not an op: raw bits have no
    gradient and no use inside a graph)."""
    _check_bits(n, seed, offset, device)
    backend = _backend.selected(device, torch.float32, KERNELS.family)
    if backend == "reference":
        return ref.bits(n, seed, offset, device).to(torch.uint32)
    out = torch.empty(n, dtype=torch.uint32, device=device)
    if n:
        # Triton has no uint32 pointers: the same bits through an int32 view.
        KERNELS.on(backend).bits(out.view(torch.int32) if backend == "triton" else out, seed, offset)
    return out
