"""Where an op's kernels come from, by backend: the compiled core for cpu and cuda, Triton modules."""
from __future__ import annotations

import functools
import importlib

import torch

from .. import _native
from .._checks import UINT64_MAX



@functools.lru_cache(maxsize=None)
def kernels(family: str, backend: str):
    """The kernel functions of `family` for `backend` (cpu, cuda or triton), all with the same signatures."""
    if backend in ("cpu", "cuda"):
        return _native.Family(family)
    if backend == "triton":
        return _OnTensorsDevice(importlib.import_module(f"genkern.kernels.triton.{family}"))
    raise ValueError(f"no {family} kernels for backend {backend!r}")


class _OnTensorsDevice:
    """Triton launches on the current CUDA device: make that the device of the call's tensors."""

    def __init__(self, module):
        self._module = module

    def __getattr__(self, name: str):
        fn = getattr(self._module, name)

        def launch(*args):
            device = next(a.device for a in args if isinstance(a, torch.Tensor))
            if device.type != "cuda":
                return fn(*args)
            with torch.cuda.device(device):
                return fn(*args)

        return launch


def to_signed(x: int) -> int:
    """A uint64 (seed, offset) as the int64 that op schemas carry."""
    return x - (1 << 64) if x >= 1 << 63 else x


def to_unsigned(x: int) -> int:
    return x & UINT64_MAX
