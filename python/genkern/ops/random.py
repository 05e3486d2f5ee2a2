"""The genkern stream as ops: `genkern::randn` (normals) and raw uint32 bits."""
from __future__ import annotations

import torch

from ..reference import random as ref
from ._backends import kernels, to_signed, to_unsigned


@torch.library.custom_op("genkern::randn", mutates_args=())
def randn_op(shape: list[int], seed: int, offset: int, dtype: torch.dtype, device: torch.device, backend: str) -> torch.Tensor:
    seed, offset = to_unsigned(seed), to_unsigned(offset)
    if backend == "reference":
        return ref.randn(shape, seed, offset, dtype=dtype, device=device)
    out = torch.empty(shape, dtype=dtype, device=device)
    if out.numel():
        kernels("random", backend).normal(out, seed, offset)
    return out


@randn_op.register_fake
def _(shape, seed, offset, dtype, device, backend):
    return torch.empty(shape, dtype=dtype, device=device)


def bits(n: int, seed: int, offset: int, device, backend: str) -> torch.Tensor:
    """Stream elements 0..n-1 as a torch.uint32 tensor."""
    device = torch.device(device)
    if backend == "reference":
        return ref.bits(n, seed, offset, device).to(torch.uint32)
    out = torch.empty(n, dtype=torch.uint32, device=device)
    if n:
        if backend == "triton":
            kernels("random", backend).bits(out.view(torch.int32), seed, offset)
        else:
            kernels("random", backend).bits(out, seed, offset)
    return out
