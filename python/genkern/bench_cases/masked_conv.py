"""Benchmark cases of the masked_conv family, forward + backward: PixelCNN layers on 28 x 28 images.

    masked_conv2d              a hidden layer: 64 -> 64 channels, 3 x 3, mask B (gradients for x, weight, bias)
    masked_conv2d_first_layer  the first layer on pixels: 1 -> 64 channels, 7 x 7, mask A (x is data: no grad_x)

A size N is the element count of the hidden activations: ceil(N / (64 * 28 * 28)) images (1M: 21; 1.5M: 32,
PixelCNN's batch). Both cases time one training step's worth of the layer, the forward pass and the backward
for a given grad_y, which is most of what a PixelCNN spends its time on. The eager baseline is what a PyTorch
user writes: F.conv2d on the weight times its mask (a buffer made once), then torch.autograd.grad; compile is
torch.compile of that function. (On a GPU eager F.conv2d computes float32 in TF32 by default; genkern's
kernels compute in float32.)
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import genkern
from genkern.reference import masked_conv as ref

from ..bench import BenchCase

FAMILY = "masked_conv"
CHANNELS, SIDE = 64, 28


def _batch(size: int) -> int:
    return max(1, math.ceil(size / (CHANNELS * SIDE * SIDE)))


def _layer(c_in: int, k: int, mask_type: str):
    """(make_inputs, eager, genkern, shape, bytes_moved) of a c_in -> 64 layer with a k x k mask."""

    def shape(size):
        return _batch(size), c_in, SIDE, SIDE

    def make_inputs(size, device, dtype):
        b = _batch(size)
        x = torch.randn(b, c_in, SIDE, SIDE, device=device, dtype=dtype).requires_grad_(c_in > 1)
        weight = (torch.randn(CHANNELS, c_in, k, k, device=device, dtype=dtype) / math.sqrt(c_in * k * k))
        bias = torch.randn(CHANNELS, device=device, dtype=dtype)
        grad_y = torch.randn(b, CHANNELS, SIDE, SIDE, device=device, dtype=dtype)
        mask = ref.mask(k, mask_type, c_in, CHANNELS, dtype=dtype, device=device)
        return x, weight.requires_grad_(), bias.requires_grad_(), grad_y, mask

    def eager(x, weight, bias, grad_y, mask):
        y = F.conv2d(x, weight * mask, bias, padding=k // 2)
        return torch.autograd.grad(y, [t for t in (x, weight, bias) if t.requires_grad], grad_y)

    def ours(x, weight, bias, grad_y, mask, backend=None):
        y = genkern.masked_conv2d(x, weight, bias, mask_type=mask_type, backend=backend)
        return torch.autograd.grad(y, [t for t in (x, weight, bias) if t.requires_grad], grad_y)

    def bytes_moved(size, dtype):
        b = _batch(size)
        pixels = b * SIDE * SIDE
        # read x, weight, bias and grad_y; write grad_x (hidden layer only), grad_weight and grad_bias
        elements = pixels * c_in * (2 if c_in > 1 else 1) + pixels * CHANNELS + 2 * (CHANNELS * c_in * k * k + CHANNELS)
        return elements * torch.empty((), dtype=dtype).element_size()

    return make_inputs, eager, ours, shape, bytes_moved


def _case(name: str, c_in: int, k: int, mask_type: str) -> BenchCase:
    make_inputs, eager, ours, shape, bytes_moved = _layer(c_in, k, mask_type)
    return BenchCase(name=name, family=FAMILY, make_inputs=make_inputs, genkern=ours, eager=eager, shape=shape,
                     bytes_moved=bytes_moved, timed="forward+backward")


CASES = (
    _case("masked_conv2d", CHANNELS, 3, "B"),
    _case("masked_conv2d_first_layer", 1, 7, "A"),
)
