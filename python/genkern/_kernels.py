"""Where an op's kernels come from, by backend: a kernel group of the compiled core for cpu and cuda, its
Triton module for triton. Every family's _ops.py declares its groups once, e.g.

    KERNELS = KernelGroup("reparam", native=lambda: _native._C.reparam, triton=_triton_reparam)

and registers each op's kernel for cpu and cuda tensors with `@KERNELS.register(op)`: the kernel gets the
functions of the selected backend (the same names on every backend) and runs them; when the reference is
selected (a dtype without kernels, or chosen) the op's own body, the reference, runs instead.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from types import ModuleType

import torch

from . import _native
from . import backend as _backend
from ._checks import UINT64_MAX


class KernelGroup:
    """The kernels of one group on every backend; `native` and `triton` return the module lazily (importing
    Triton costs seconds, and the compiled core may be absent)."""

    def __init__(self, family: str, native: Callable[[], object], triton: Callable[[], ModuleType] | None = None):
        self.family = family
        self._native = native
        self._triton = triton

    def register(self, op, check=None):
        """Decorator: `kernel(kernels, *op_args)` becomes `op`'s implementation for cpu and cuda tensors.

        `check(*op_args)`, the op's argument validation, runs first: bad input fails naming the argument
        before a backend is picked or a kernel asked for. Which backend runs is decided per call (see
        genkern.backend.selected); with the reference selected the op's body runs, so an op is written as its
        reference (which calls the same check, for the devices without kernels) plus one kernel function."""
        reference = op._init_fn  # the function custom_op decorated: torch keeps it as the default implementation

        def decorate(kernel):
            def run(*args):
                if check is not None:
                    check(*args)
                device, dtype = _placement(args)
                name = _backend.selected(device, dtype, self.family)
                if name == "reference":
                    return reference(*args)
                return kernel(self.on(name), *args)

            op.register_kernel(("cpu", "cuda"), run)
            return kernel

        return decorate

    def native(self):
        """The compiled core's module of this group (`_C.<group>`)."""
        return self._native()

    @functools.cache  # noqa: B019 - a few groups, alive for the whole process
    def on(self, backend: str):
        """The kernel functions for `backend` (cpu, cuda or triton), all with the same signatures."""
        if backend in ("cpu", "cuda"):
            return _native.Kernels(self._native())
        if backend == "triton" and self._triton is not None:
            return _OnTensorsDevice(self._triton())
        raise ValueError(f"no kernels for backend {backend!r}")


def _placement(args) -> tuple[torch.device, torch.dtype]:
    """The device and dtype an op call runs on: its first floating tensor's (else its first tensor's), or for
    a factory op its device and dtype arguments."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    tensors += [t for a in args if isinstance(a, (list, tuple)) for t in a if isinstance(t, torch.Tensor)]
    if tensors:
        first = next((t for t in tensors if t.is_floating_point()), tensors[0])
        dtype = first.dtype if first.is_floating_point() else torch.float32
        return first.device, dtype
    device = next((a for a in args if isinstance(a, torch.device)), torch.device("cpu"))
    dtype = next((a for a in args if isinstance(a, torch.dtype)), torch.float32)
    return device, dtype


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
