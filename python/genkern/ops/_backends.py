"""Where an op's kernels come from, by backend: the compiled core for cpu and cuda, Triton modules."""
from __future__ import annotations

import functools
import importlib

from .. import _native

U64 = (1 << 64) - 1


@functools.lru_cache(maxsize=None)
def kernels(family: str, backend: str):
    """The kernel functions of `family` for `backend` (cpu, cuda or triton), all with the same signatures."""
    if backend in ("cpu", "cuda"):
        return _native.Family(family)
    if backend == "triton":
        return importlib.import_module(f"genkern.kernels.triton.{family}")
    raise ValueError(f"no {family} kernels for backend {backend!r}")


def to_signed(x: int) -> int:
    """A uint64 (seed, offset) as the int64 that op schemas carry."""
    return x - (1 << 64) if x >= 1 << 63 else x


def to_unsigned(x: int) -> int:
    return x & U64
