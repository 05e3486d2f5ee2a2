"""Benchmark cases of the causal_conv1d family: the depthwise short convolution of Mamba-style blocks
(K = 4, SiLU) on (8, 256, L) activations, L from the size, and its generation step on a (B, 256, K - 1)
rolling state, B from the size.

The eager baselines are what a PyTorch user writes: F.conv1d with left padding and groups = channels for
the convolution; for the step, the window cat([state, x]) contracted with the taps by einsum, and the state
rolled in place from that window (genkern's step updates the state in place too).

`causal_conv1d_train` times forward and backward together (gradients for x, weight and bias from a given
grad_y); plain `genkern bench` leaves it out, `--ops causal_conv1d` and benchmarks/ include it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import genkern

from ..bench import BenchCase

FAMILY = "causal_conv1d"
BATCH, CHANNELS, TAPS = 8, 256, 4
STATE = TAPS - 1  # the minimal state: the receptive field at dilation 1


def _shape(size: int) -> tuple[int, int, int]:
    return BATCH, CHANNELS, max(1, size // (BATCH * CHANNELS))


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _params(device, dtype):
    weight = torch.randn(CHANNELS, TAPS, device=device, dtype=dtype) / TAPS**0.5
    bias = torch.randn(CHANNELS, device=device, dtype=dtype)
    return weight, bias


def _inputs(size, device, dtype):
    return (torch.randn(_shape(size), device=device, dtype=dtype), *_params(device, dtype))


def eager_causal_conv1d(x, weight, bias):
    return F.silu(F.conv1d(F.pad(x, (TAPS - 1, 0)), weight.unsqueeze(1), bias, groups=weight.shape[0]))


def genkern_causal_conv1d(x, weight, bias, backend=None):
    return genkern.causal_conv1d(x, weight, bias, activation="silu", backend=backend)


def _bytes(size, dtype):
    b, c, length = _shape(size)
    # x read once, y written once; the weights and bias are negligible but counted
    return (2 * b * c * length + c * (TAPS + 1)) * _itemsize(dtype)


# ---------------------------------------------------------------------------------------------------------
# The generation step


def _update_shape(size: int) -> tuple[int, int, int]:
    """The state's shape (the main tensor)."""
    return max(1, size // (CHANNELS * STATE)), CHANNELS, STATE


def _update_inputs(size, device, dtype):
    batch = _update_shape(size)[0]
    x = torch.randn(batch, CHANNELS, device=device, dtype=dtype)
    state = torch.randn(_update_shape(size), device=device, dtype=dtype)
    return (x, state, *_params(device, dtype))


def eager_causal_conv1d_update(x, state, weight, bias):
    window = torch.cat([state, x.unsqueeze(-1)], dim=-1)  # (B, C, K): the K inputs output t sees
    y = F.silu(torch.einsum("bck,ck->bc", window, weight) + bias)
    state.copy_(window[..., 1:])
    return y


def genkern_causal_conv1d_update(x, state, weight, bias, backend=None):
    return genkern.causal_conv1d_update(x, state, weight, bias, activation="silu", backend=backend)


def _update_bytes(size, dtype):
    b, c, w = _update_shape(size)
    # x read, y written, the state read and written; the weights and bias counted too
    return (2 * b * c + 2 * b * c * w + c * (TAPS + 1)) * _itemsize(dtype)


# ---------------------------------------------------------------------------------------------------------
# Forward and backward


def _train_inputs(size, device, dtype):
    x, weight, bias = (t.requires_grad_(True) for t in _inputs(size, device, dtype))
    return x, weight, bias, torch.randn(_shape(size), device=device, dtype=dtype)


def eager_causal_conv1d_train(x, weight, bias, grad_y):
    return torch.autograd.grad(eager_causal_conv1d(x, weight, bias), (x, weight, bias), grad_y)


def genkern_causal_conv1d_train(x, weight, bias, grad_y, backend=None):
    return torch.autograd.grad(genkern_causal_conv1d(x, weight, bias, backend), (x, weight, bias), grad_y)


def _train_bytes(size, dtype):
    b, c, length = _shape(size)
    # x and grad_y read, grad_x written (genkern's backward recomputes the pre-activation instead of keeping
    # y); the weights, the bias and their gradients counted too
    return (3 * b * c * length + 2 * c * (TAPS + 1)) * _itemsize(dtype)


CASES = (
    BenchCase(
        name="causal_conv1d", family=FAMILY,
        make_inputs=_inputs, genkern=genkern_causal_conv1d, eager=eager_causal_conv1d,
        shape=_shape, bytes_moved=_bytes,
    ),
    BenchCase(
        name="causal_conv1d_update", family=FAMILY,
        make_inputs=_update_inputs, genkern=genkern_causal_conv1d_update, eager=eager_causal_conv1d_update,
        shape=_update_shape, bytes_moved=_update_bytes,
    ),
    BenchCase(
        name="causal_conv1d_train", family=FAMILY,
        make_inputs=_train_inputs, genkern=genkern_causal_conv1d_train, eager=eager_causal_conv1d_train,
        shape=_shape, bytes_moved=_train_bytes, timed="forward+backward", default=False,
    ),
)
