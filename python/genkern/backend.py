"""Backends and dispatch: which implementation runs an op.

`cpu` (C++), `cuda` (CUDA C++), `triton` and `reference` (eager PyTorch, the spec). torch's dispatcher picks
the device (each op registers one kernel for cpu and cuda tensors, its reference for every other device);
that kernel then picks the backend for the tensors' device and dtype: the scoped choice of this thread or
context (`scoped`, which the public functions' `backend=` argument uses), else the process-wide one
(`set_backend`), else the fastest available. See docs/backends.md.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import os

import torch

from . import _native

BACKENDS = ("cpu", "cuda", "triton", "reference")

_FLOAT_DTYPES = {
    "cpu": (torch.float32, torch.float64),
    "cuda": (torch.float16, torch.bfloat16, torch.float32, torch.float64),
    "triton": (torch.float16, torch.bfloat16, torch.float32, torch.float64),
    "reference": (torch.float16, torch.bfloat16, torch.float32, torch.float64),
}

# Families whose kernels cover only some backends (every other family has all of them). A backend a family
# lacks is never picked automatically for it; a process-wide choice of one falls back to the automatic pick
# for that family, and an explicit `backend=` argument naming one is an error.
_FAMILY_BACKENDS = {
    "pixelcnn_sampling": ("cpu", "cuda", "reference"),
}

_process_backend: str | None = None
# Per thread and per asyncio task: a scoped choice never leaks into another thread's ops.
_scoped_backend: contextvars.ContextVar[str | None] = contextvars.ContextVar("genkern_backend", default=None)


def triton_interpreted() -> bool:
    """Triton kernels run on CPU tensors under TRITON_INTERPRET=1 (how CI tests them without a GPU)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _triton_importable() -> bool:
    try:
        importlib.import_module("triton")
        importlib.import_module("genkern.kernels.random.random")
    except Exception:  # noqa: BLE001 - any failure means the backend is unusable
        return False
    return True


def is_available(name: str) -> bool:
    if name == "reference":
        return True
    if name == "cpu":
        return _native.available()
    if name == "cuda":
        return _native.with_cuda() and torch.cuda.is_available()
    if name == "triton":
        return _triton_importable() and (torch.cuda.is_available() or triton_interpreted())
    return False


def has_family(name: str, family: str | None) -> bool:
    """Whether backend `name` has kernels for `family` (None: any family)."""
    return family is None or name in _FAMILY_BACKENDS.get(family, BACKENDS)


def backends(family: str | None = None) -> list[str]:
    """The backends usable in this process (for `family`'s ops, when given)."""
    return [b for b in BACKENDS if is_available(b) and has_family(b, family)]


def _check_name(name: str) -> None:
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {name!r}")


class set_backend:
    """Choose the backend for the whole process: `genkern.set_backend("triton")`, or scoped:
    `with genkern.set_backend("reference"): ...` (the previous choice comes back on exit). None restores auto."""

    def __init__(self, name: str | None):
        if name is not None:
            _check_name(name)
            if not is_available(name):
                # Refused here, not at the first op far from the cause.
                raise ValueError(f"backend {name!r} is not available in this process (available: {backends()})")
        global _process_backend
        self._previous = _process_backend
        _process_backend = name

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        global _process_backend
        _process_backend = self._previous
        return False


def get_backend() -> str | None:
    return _process_backend


def scoped_choice() -> str | None:
    """The backend chosen for this thread or context by `scoped`, if any."""
    return _scoped_backend.get()


@contextlib.contextmanager
def scoped(name: str | None):
    """Run this thread's (context's) genkern ops on backend `name` inside the block; None: no scoped choice.
    A choice the ops cannot honour (unknown, unavailable, or unable to run their tensors) is a ValueError
    from the op, before any kernel runs."""
    if name is not None:
        _check_name(name)
    token = _scoped_backend.set(name)
    try:
        yield
    finally:
        _scoped_backend.reset(token)


def call(backend: str | None, op, *args):
    """op(*args) on `backend` when one is given: the public functions' `backend=` argument."""
    if backend is None:
        return op(*args)
    with scoped(backend):
        return op(*args)


def selected(device: torch.device, dtype: torch.dtype, family: str | None = None) -> str:
    """The backend an op of `family` runs on for tensors of this device and dtype, right now."""
    return resolve(_scoped_backend.get(), device, dtype, family)


def runs_on(name: str, device: torch.device, dtype: torch.dtype, family: str | None = None) -> bool:
    """Whether backend `name` can run an op (of `family`) on tensors of this device and dtype."""
    if dtype not in _FLOAT_DTYPES[name] or not is_available(name) or not has_family(name, family):
        return False
    if name == "cpu":
        return device.type == "cpu"
    if name == "cuda":
        return device.type == "cuda"
    if name == "triton":
        if device.type == "cpu":
            return triton_interpreted() and dtype != torch.bfloat16  # numpy has no bfloat16
        return device.type == "cuda"
    return True


def auto(device: torch.device, dtype: torch.dtype, family: str | None = None) -> str:
    """The fastest backend for this device and dtype (among those with `family`'s kernels)."""
    order = ("cuda", "triton", "reference") if device.type == "cuda" else ("cpu", "reference")
    for name in order:
        if runs_on(name, device, dtype, family):
            return name
    raise ValueError(f"no genkern backend runs on {device.type} tensors of dtype {dtype}")


def resolve(backend: str | None, device: torch.device, dtype: torch.dtype, family: str | None = None) -> str:
    """The backend an op (of `family`) runs on: the argument, else the process choice, else automatic.
    Raises ValueError when the chosen backend is unknown, has no kernels for the family, or cannot run on
    this device and dtype."""
    name = backend if backend is not None else _process_backend
    if backend is None and name is not None and not has_family(name, family):
        name = None
    if name is None:
        return auto(device, dtype, family)
    _check_name(name)
    if not has_family(name, family):
        raise ValueError(f"backend {name!r} has no {family} kernels (available for {family}: {backends(family)})")
    if not is_available(name):
        raise ValueError(f"backend {name!r} is not available here (available: {backends()})")
    if not runs_on(name, device, dtype):
        raise ValueError(f"backend {name!r} cannot run on {device.type} tensors of dtype {dtype}")
    return name
