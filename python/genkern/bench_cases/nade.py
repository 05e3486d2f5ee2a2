"""Benchmark case of the NADE family: a training step's log-likelihood, forward and backward (unlike the other
families' cases, which time the forward pass), of a binarised MNIST-sized model (D = 784 pixels, H = 500
hidden units) at batch 512, whatever the size: the eager baseline's memory grows as B * H * D, and at the
engine's larger sizes it would need tens of GB. Slow (the eager call takes seconds), so plain `genkern bench`
leaves it out: `genkern bench --ops nade` runs it.

The eager baseline is the reference: the pre-activations of all D steps from one cumulative sum, a (B, H, D)
tensor (800 MB at batch 512 in float32, and autograd keeps several), then autograd; torch.compile gets that
same function. genkern runs the fused kernels, which hold H pre-activations per example, never (B, H, D).
"""
from __future__ import annotations

import torch

import genkern
from genkern.reference import nade as ref

from ..bench import BenchCase

FAMILY = "nade"
DIMS, HIDDEN = 784, 500
BATCH = 512


def _shape(size: int) -> tuple[int, int]:
    return BATCH, DIMS


def _inputs(size, device, dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(_shape(size), generator=g) < 0.13).to(device=device, dtype=dtype)  # MNIST's ink density
    w = torch.randn(HIDDEN, DIMS, generator=g) / DIMS**0.5
    c = torch.zeros(HIDDEN)
    v = torch.randn(DIMS, HIDDEN, generator=g) / HIDDEN**0.5
    b = torch.zeros(DIMS)
    return (x, *(t.to(device=device, dtype=dtype).requires_grad_(True) for t in (w, c, v, b)))


def _step(log_prob, x, w, c, v, b):
    """(log p(x), and the gradients of its sum w.r.t. W, c, V, b)."""
    lp = log_prob(x, w, c, v, b)
    return (lp.detach(), *torch.autograd.grad(lp.sum(), (w, c, v, b)))


def eager_nade_log_prob(x, w, c, v, b):
    return _step(ref.log_prob, x, w, c, v, b)


def genkern_nade_log_prob(x, w, c, v, b, backend=None):
    return _step(lambda *args: genkern.nade_log_prob(*args, backend=backend), x, w, c, v, b)


def _bytes(size, dtype):
    batch, dims = _shape(size)
    params = 2 * dims * HIDDEN + dims + HIDDEN
    # x read once, the parameters read and their gradients written once, one log-likelihood per example
    return (batch * dims + 2 * params + batch) * torch.empty((), dtype=dtype).element_size()


CASES = (
    BenchCase(
        name="nade_log_prob", family=FAMILY,
        make_inputs=_inputs, genkern=genkern_nade_log_prob, eager=eager_nade_log_prob,
        shape=_shape, bytes_moved=_bytes, timed="forward+backward", default=False, max_repeats=3, sized=False,
    ),
)
