"""The bridge to the compiled core: torch tensors (or numpy arrays) become `_C.Array` descriptions.

The core never sees a torch object: it gets (pointer, shape, strides, dtype, device) and, for CUDA,
the current stream, so it works with any torch version and with numpy.
"""

from __future__ import annotations

import functools
import threading

import numpy as np
import torch

try:
    from . import _C
except ImportError as exc:  # pragma: no cover - only when the extension was not built
    _C = None
    IMPORT_ERROR: Exception | None = exc
else:
    IMPORT_ERROR = None

_TORCH_DTYPES = {
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float32: "float32",
    torch.float64: "float64",
    torch.uint32: "uint32",
    torch.int64: "int64",
}
_NUMPY_DTYPES = {np.dtype(np.float32): "float32", np.dtype(np.float64): "float64", np.dtype(np.uint32): "uint32"}


def available() -> bool:
    return _C is not None


def with_cuda() -> bool:
    return _C is not None and bool(_C.with_cuda)


def array(x):
    """Describe a tensor or ndarray for the core (None stays None)."""
    if x is None:
        return None
    if isinstance(x, np.ndarray):
        if x.dtype not in _NUMPY_DTYPES:
            raise TypeError(f"unsupported numpy dtype {x.dtype}")
        strides = [s // x.itemsize for s in x.strides]
        return _C.Array(
            x.ctypes.data, list(x.shape), strides, getattr(_C.DType, _NUMPY_DTYPES[x.dtype]), _C.Device.cpu, 0
        )
    dtype = _dtype_enums().get(x.dtype)
    if dtype is None:
        raise TypeError(f"unsupported dtype {x.dtype}")
    # The cheapest accessors: this runs for every tensor of every call, so it is most of a small call's cost.
    if x.is_cuda:
        return _C.Array(x.data_ptr(), x.shape, x.stride(), dtype, _C.Device.cuda, x.get_device())
    return _C.Array(x.data_ptr(), x.shape, x.stride(), dtype, _C.Device.cpu, 0)


@functools.cache
def _dtype_enums() -> dict:
    return {t: getattr(_C.DType, name) for t, name in _TORCH_DTYPES.items()}


def call(fn, *args):
    """Run a compiled kernel (a function of `_C.<group>`) on tensors (converted to descriptions) and plain
    values, on the current stream of the tensors' device."""
    device = next(a.device for a in args if isinstance(a, torch.Tensor))
    launch(fn, device, [array(a) if isinstance(a, (torch.Tensor, np.ndarray)) or a is None else a for a in args])


def launch(fn, device: torch.device, described: list) -> None:
    """Run a compiled kernel on arguments already described (`array`), for tensors of `device`: what `call`
    does after converting, for a caller that keeps the descriptions of tensors it passes again and again."""
    if device.type == "cuda":
        with torch.cuda.device(device):
            fn(*described, stream=torch.cuda.current_stream(device).cuda_stream)
    else:
        _sync_threads()
        fn(*described)


_thread_state = threading.local()


def _sync_threads() -> None:
    """Give the compiled kernels torch's thread count for this thread (torch.set_num_threads, OMP_NUM_THREADS):
    several processes on one machine (torchrun ranks, data loader workers) that limit torch limit genkern too.
    One cheap query per call; the core is told only when it changes."""
    n = torch.get_num_threads()
    if getattr(_thread_state, "threads", None) != n:
        _C.set_num_threads(n)
        _thread_state.threads = n


class Kernels:
    """One kernel group of the compiled core (`_C.reparam`, `_C.nade`, ...) called on tensors:
    `Kernels(_C.reparam).sample(mu, logvar, ...)` runs `_C.reparam.sample` through `call`."""

    def __init__(self, group):
        self._group = group

    def __getattr__(self, name: str):
        return functools.partial(call, getattr(self._group, name))
