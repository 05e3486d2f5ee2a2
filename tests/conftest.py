"""Shared test set-up: every available backend against the reference, with a per-dtype tolerance table.

Without a GPU the Triton kernels run on CPU tensors under TRITON_INTERPRET=1, set here before anything
imports triton. With a GPU, the cuda and triton backends are tested on it automatically.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import genkern  # noqa: E402
from genkern import backend as gk_backend  # noqa: E402

# (atol, rtol) per dtype for element-wise results computed in the dtype's compute precision.
TOLERANCE = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-6, 2e-6),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (2e-2, 2e-2),
}

KERNEL_BACKENDS = [b for b in genkern.backends() if b != "reference"]


def device_for(backend: str) -> torch.device:
    if backend == "cpu":
        return torch.device("cpu")
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def dtypes_for(backend: str):
    device = device_for(backend)
    return [d for d in TOLERANCE if gk_backend.runs_on(backend, device, d)]


def backend_dtype_params(backends=None):
    """(backend, dtype) pairs to parametrise over: every available kernel backend and the dtypes it runs."""
    return [
        pytest.param(b, d, id=f"{b}-{str(d).split('.')[-1]}")
        for b in (backends or KERNEL_BACKENDS)
        for d in dtypes_for(b)
    ]


def interpreted(backend: str) -> bool:
    return backend == "triton" and device_for(backend).type == "cpu"


def assert_close(actual, expected, dtype, scale=1.0):
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol * scale, rtol=rtol * scale)


@pytest.fixture(params=KERNEL_BACKENDS)
def kernel_backend(request):
    return request.param
