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
import dataclasses
import functools
import importlib
import os
import threading

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


@dataclasses.dataclass(frozen=True)
class Choice:
    """A scoped choice: `name` (None: automatic), and whether it is `strict` (an op whose family lacks the
    backend is an error, as for an explicit `backend=` argument) or not (that op runs automatically, as for
    `set_backend`)."""

    name: str | None
    strict: bool


_process_backend: str | None = None
_process_owner: object = None  # the set_backend call that made the process-wide choice
_process_lock = threading.Lock()
# Per thread and per asyncio task: a scoped choice never leaks into another thread's ops.
_scoped_backend: contextvars.ContextVar[Choice | None] = contextvars.ContextVar("genkern_backend", default=None)


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
    """Choose the backend for the whole process: `genkern.set_backend("triton")` (None restores the automatic
    choice). Used as a context manager, `with genkern.set_backend("reference"): ...`, the choice holds for
    this thread (or asyncio task) only, inside the block, and the process-wide choice is left as it was.

    A backend this process cannot run (CUDA without a GPU, say) is refused here, not at the first op."""

    def __init__(self, name: str | None):
        if name is not None:
            _check_name(name)
            if not is_available(name):
                raise ValueError(f"backend {name!r} is not available in this process (available: {backends()})")
        global _process_backend, _process_owner
        with _process_lock:
            self._previous = (_process_backend, _process_owner)
            _process_backend, _process_owner = name, self
        self._name = name
        self._token = None

    def __enter__(self):
        global _process_backend, _process_owner
        with _process_lock:  # a scope, not a process-wide change: undo ours unless another call replaced it
            if _process_owner is self:
                _process_backend, _process_owner = self._previous
        self._token = _scoped_backend.set(Choice(self._name, strict=False))
        return self

    def __exit__(self, *exc):
        _scoped_backend.reset(self._token)
        return False


def get_backend() -> str | None:
    """The backend chosen for this thread: its scoped choice if any, else the process-wide one (None:
    automatic)."""
    choice = _scoped_backend.get()
    return choice.name if choice is not None else _process_backend


def scoped_choice() -> Choice | None:
    """The choice scoped to this thread or context (by `scoped` or `with set_backend(...)`), if any: what
    an op's backward passes back to `scoped` so that it runs where the forward did."""
    return _scoped_backend.get()


@contextlib.contextmanager
def scoped(choice: str | Choice | None):
    """Run this thread's (context's) genkern ops on a backend inside the block: a name (strict: an op that
    cannot honour it raises a ValueError before any kernel runs), a `Choice` from `scoped_choice`, or None
    (no scoped choice: the process-wide one, else automatic)."""
    if isinstance(choice, str):
        _check_name(choice)
        choice = Choice(choice, strict=True)
    token = _scoped_backend.set(choice)
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
    return resolve(None, device, dtype, family)


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
    """The backend an op (of `family`) runs on: `backend` when given, else this thread's scoped choice, else
    the process-wide one, else automatic. An explicit or strictly scoped choice that cannot run the op is a
    ValueError (unknown, no kernels for the family, unavailable, or unable to run this device and dtype); a
    `set_backend` choice whose family lacks the backend falls back to the automatic one."""
    if backend is not None:
        choice = Choice(backend, strict=True)
    else:
        choice = _scoped_backend.get() or Choice(_process_backend, strict=False)
    name = choice.name
    if name is not None and not choice.strict and not has_family(name, family):
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
