"""Benchmark cases of the causal_conv1d family, forward pass: the depthwise short convolution of Mamba-style
blocks (K = 4, SiLU) on (8, 256, L) activations, L from the size.

The eager baseline is what a PyTorch user writes: F.conv1d with left padding and groups = channels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import genkern

from ..bench import BenchCase

FAMILY = "causal_conv1d"
BATCH, CHANNELS, TAPS = 8, 256, 4


def _shape(size: int) -> tuple[int, int, int]:
    return BATCH, CHANNELS, max(1, size // (BATCH * CHANNELS))


def _inputs(size, device, dtype):
    x = torch.randn(_shape(size), device=device, dtype=dtype)
    weight = torch.randn(CHANNELS, TAPS, device=device, dtype=dtype) / TAPS**0.5
    bias = torch.randn(CHANNELS, device=device, dtype=dtype)
    return x, weight, bias


def eager_causal_conv1d(x, weight, bias):
    return F.silu(F.conv1d(F.pad(x, (TAPS - 1, 0)), weight.unsqueeze(1), bias, groups=weight.shape[0]))


def genkern_causal_conv1d(x, weight, bias, backend=None):
    return genkern.causal_conv1d(x, weight, bias, activation="silu", backend=backend)


def _bytes(size, dtype):
    b, c, length = _shape(size)
    # x read once, y written once; the weights and bias are negligible but counted
    return (2 * b * c * length + c * (TAPS + 1)) * torch.empty((), dtype=dtype).element_size()


CASES = (
    BenchCase(
        name="causal_conv1d", family=FAMILY,
        make_inputs=_inputs, genkern=genkern_causal_conv1d, eager=eager_causal_conv1d,
        shape=_shape, bytes_moved=_bytes,
    ),
)
