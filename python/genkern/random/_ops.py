"""The genkern stream as ops: `genkern::randn` (normals) and raw uint32 bits."""

from __future__ import annotations

import torch

from .. import _native
from .. import backend as _backend
from .._kernels import KernelGroup, to_unsigned
from . import reference as ref


def _triton_random():
    from ..kernels.random import random

    return random


KERNELS = KernelGroup("random", native=lambda: _native._C.random, triton=_triton_random)


@torch.library.custom_op("genkern::randn", mutates_args=())
def randn_op(shape: list[int], seed: int, offset: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Standard normals of the stream (seed, offset), element i from stream element i. The body is the
    reference; cpu and cuda tensors get the kernel below unless the reference is selected."""
    return ref.randn(shape, to_unsigned(seed), to_unsigned(offset), dtype=dtype, device=device)


@KERNELS.register(randn_op)
def _(kernels, shape, seed, offset, dtype, device):
    out = torch.empty(shape, dtype=dtype, device=device)
    if out.numel():
        kernels.normal(out, to_unsigned(seed), to_unsigned(offset))
    return out


@randn_op.register_fake
def _(shape, seed, offset, dtype, device):
    return torch.empty(shape, dtype=dtype, device=device)


def bits(n: int, seed: int, offset: int, device: torch.device) -> torch.Tensor:
    """Stream elements 0..n-1 as a torch.uint32 tensor, on the selected backend (not an op: raw bits have no
    gradient and no use inside a graph)."""
    backend = _backend.selected(device, torch.float32, KERNELS.family)
    if backend == "reference":
        return ref.bits(n, seed, offset, device).to(torch.uint32)
    out = torch.empty(n, dtype=torch.uint32, device=device)
    if n:
        # Triton has no uint32 pointers: the same bits through an int32 view.
        KERNELS.on(backend).bits(out.view(torch.int32) if backend == "triton" else out, seed, offset)
    return out
