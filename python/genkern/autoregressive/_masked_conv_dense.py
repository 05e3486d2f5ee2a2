"""The dense path of masked_conv2d on the CPU: torch's own convolution (oneDNN for float32, im2col + BLAS for
float64) on the weight with its masked entries zeroed, which is what the spec says (`F.conv2d(x, weight *
mask)`) and what a PyTorch user runs. The `cpu` backend takes it for the forward and grad_input where it
beats genkern's direct kernels (`use_dense`, fitted to benchmarks/masked_conv_shapes.py), grad_weight too for
some 1 x 1 layers, and the compiled kernels everywhere else.

The NaN rule holds: the dense sums differ from the reference's only by the products the reference skips
(masked taps, the zero padding), and while every product is finite those are exact zeros. So a dense result
that is all finite is the reference's sum; one that is not (an inf or NaN met a zero, or a sum overflowed)
is thrown away and the compiled kernels, which follow the rule exactly, compute it. Masked weight entries
are replaced by zeros (torch.where, never multiplied), so garbage there is never read.

Bits: repeated calls give the same bits, and at the shapes the rule sends here (checked at 8 x 8, 32 channels)
oneDNN's forward and data gradient give the same bits on 1 and 2 threads.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from . import reference as ref

# The rule, fitted to interleaved 1-thread measurements on the 2-core CI CPU (AMD EPYC, AVX-512; under load;
# benchmarks/masked_conv_shapes.py --ops). torch's convolution wins the forward and
# grad_input of the hidden, head and output layers on small images at training batches (8 x 8, 32 channels,
# batch 64: 1.1-2x): there the direct kernels' rows are a fraction of their 32-column register tile. On
# 28 x 28 and 32 x 32 images, on first layers (few input channels) and on single images the direct kernels win
# (up to 5x).
_DENSE_MAX_PIXELS = 100  # H * W: about 10 x 10 (dense measured ahead at 8 x 8, behind at 28 x 28)
_DENSE_MIN_BATCH_PIXELS = 2048  # B * H * W: batch 32 at 8 x 8 (behind at batch 1, ahead at 64)
_DENSE_MIN_IN_CHANNELS = 8  # fewer: a first layer on pixels, where the direct kernels win
# 1 x 1 layers, measured the same way on the 2-core Intel Xeon (2 threads, quiet): on the logits layers, which
# widen the channels (64 -> 256, 96 -> 768, C_out >= 2 C_in), oneDNN's weight gradient (a plain matrix product)
# wins from one 28 x 28 image on (1.1x, 2.2-2.5x from batch 16) and its data gradient too (1.3-2.2x); on the
# 8 x 8 models at training batches its weight gradient wins 1.1-1.2x. The head layers (C_out = C_in) at 28 x 28
# keep the kernels (dense 0.75-0.8x), as do 3 x 3 and larger layers. The dense weight gradient's bits depend on
# the thread count (oneDNN splits the sum over threads; the kernels' do not).
_DENSE_WIDENING_MIN_BATCH_PIXELS = 784  # B * H * W: one 28 x 28 image
# float32 only: torch's float64 convolution (im2col + BLAS) was 3-4x behind the kernels at 8 x 8.


def use_dense(op: str, shape: tuple[int, int, int, int, int, int], dtype: torch.dtype) -> bool:
    """Whether `op` ("forward", "grad_input" or "grad_weight") of a (B, C_in, C_out, k, H, W) convolution in
    `dtype` runs on torch's convolution rather than genkern's direct kernels."""
    b, c_in, c_out, k, h, w = shape
    if dtype != torch.float32 or c_in < _DENSE_MIN_IN_CHANNELS:
        return False
    small_images = h * w <= _DENSE_MAX_PIXELS and b * h * w >= _DENSE_MIN_BATCH_PIXELS
    widening = k == 1 and c_out >= 2 * c_in and b * h * w >= _DENSE_WIDENING_MIN_BATCH_PIXELS
    if op == "grad_weight":
        return widening or (k == 1 and small_images)
    if op == "grad_input":
        return small_images or widening
    return op == "forward" and small_images


@functools.lru_cache(maxsize=64)
def _keep(k: int, mask_type: str, c_in: int, c_out: int, groups: int, device: torch.device) -> Tensor:
    """The mask as booleans, made once per layer shape (a few KB each)."""
    return ref.mask(k, mask_type, c_in, c_out, groups, dtype=torch.bool, device=device)


def _masked(weight: Tensor, mask_type: str, groups: int) -> Tensor:
    c_out, c_in, k, _ = weight.shape
    return torch.where(_keep(k, mask_type, c_in, c_out, groups, weight.device), weight, 0)


def _finite(*tensors: Tensor) -> bool:
    """Whether every element is finite, conservatively: a sum that overflows says no too (the kernels then
    compute the same values). A sum needs no temporary, and fresh memory costs page faults (isfinite's
    boolean copy of an output cost more than the convolution)."""
    return all(bool(torch.isfinite(t.sum())) for t in tensors)


def _conv_args(kernel_size: int, dilation: int):
    """convolution_backward's (stride, padding, dilation, transposed, output_padding, groups)."""
    pad = ref.padding(kernel_size, dilation)
    return [1, 1], [pad, pad], [dilation, dilation], False, [0, 0], 1


def forward(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], mask_type: str, groups: int, dilation: int
) -> Optional[Tensor]:
    """y, or None where the NaN rule needs the compiled kernels."""
    k = weight.shape[-1]
    y = torch.conv2d(x, _masked(weight, mask_type, groups), bias, 1, ref.padding(k, dilation), dilation)
    return y.contiguous() if _finite(y) else None


def grad_input(grad_y: Tensor, weight: Tensor, mask_type: str, groups: int, dilation: int) -> Optional[Tensor]:
    """d/dx, or None where the NaN rule needs the compiled kernels."""
    b, _, h, w = grad_y.shape
    shape = (b, weight.shape[1], h, w)
    # Only the input's shape matters for the data gradient: an uninitialised tensor stands in for it.
    input_like = grad_y.new_empty(shape)
    grad_x, _, _ = torch.ops.aten.convolution_backward(
        grad_y,
        input_like,
        _masked(weight, mask_type, groups),
        None,
        *_conv_args(weight.shape[-1], dilation),
        [True, False, False],
    )
    return grad_x.contiguous() if _finite(grad_x) else None


def grad_weight(
    grad_y: Tensor, x: Tensor, kernel_size: int, mask_type: str, groups: int, dilation: int
) -> Optional[tuple[Tensor, Tensor]]:
    """(d/dweight, d/dbias), d/dweight zero at the masked taps; or None where the NaN rule needs the compiled
    kernels. oneDNN splits this sum over threads: its bits depend on the thread count (the kernels' do not)."""
    c_out, c_in = grad_y.shape[1], x.shape[1]
    # Only the weight's shape matters for the weight gradient: an uninitialised tensor stands in for it.
    weight_like = x.new_empty(c_out, c_in, kernel_size, kernel_size)
    _, gw, gb = torch.ops.aten.convolution_backward(
        grad_y, x, weight_like, [c_out], *_conv_args(kernel_size, dilation), [False, True, True]
    )
    gw = torch.where(_keep(kernel_size, mask_type, c_in, c_out, groups, x.device), gw, 0)
    return (gw.contiguous(), gb.contiguous()) if _finite(gw, gb) else None
