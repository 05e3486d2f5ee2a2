"""The masked_conv family as torch ops: `genkern::masked_conv2d` and its two backward ops, fake
implementations, autograd.

Each op takes an explicit backend name, resolved by genkern.masked_conv2d. Kernel backends get contiguous
inputs and preallocated outputs. The backward is split as aten's is (grad_input, grad_weight + grad_bias),
so a first layer on data skips the transposed convolution it does not need.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..reference import masked_conv as ref
from ._backends import kernels


def _require(ok: bool, message: str) -> None:
    """The ops are public too (torch.ops.genkern.*): check what the kernels rely on, for every backend."""
    if not ok:
        raise ValueError(message)


def _check(x_shape, weight: Tensor, mask_type: str, color_groups: int, dilation: int, *tensors: Tensor) -> None:
    _require(len(x_shape) == 4 and weight.dim() == 4, "x and weight must be 4-d: (B, C_in, H, W), (C_out, C_in, k, k)")
    c_out, c_in, kh, kw = weight.shape
    _require(kh == kw and kh % 2 == 1, f"weight must be a square kernel of odd size, got {kh} x {kw}")
    _require(x_shape[1] == c_in and c_in >= 1 and c_out >= 1, f"weight {tuple(weight.shape)} does not fit x {tuple(x_shape)}")
    _require(mask_type in ref.MASK_TYPES, f"mask_type must be 'A' or 'B', got {mask_type!r}")
    _require(color_groups >= 1 and c_in % color_groups == 0 and c_out % color_groups == 0,
             f"color_groups={color_groups} must divide C_in={c_in} and C_out={c_out}")
    _require(dilation >= 1, f"dilation must be >= 1, got {dilation}")
    for t in tensors:
        _require(t.dtype == weight.dtype and t.device == weight.device, "all tensors must share weight's dtype and device")


def _out_shape(x_shape, c_out: int) -> list[int]:
    return [x_shape[0], c_out, x_shape[2], x_shape[3]]


def _empty(shape, like: Tensor) -> Tensor:
    return torch.empty(list(shape), dtype=like.dtype, device=like.device)


# ---------------------------------------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------------------------------------
@torch.library.custom_op("genkern::masked_conv2d", mutates_args=())
def masked_conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor], mask_type: str, color_groups: int,
                  dilation: int, backend: str) -> Tensor:
    _check(x.shape, weight, mask_type, color_groups, dilation, x, *([bias] if bias is not None else []))
    _require(bias is None or tuple(bias.shape) == (weight.shape[0],), "bias must have shape (C_out,)")
    if backend == "reference":
        return ref.masked_conv2d(x, weight, bias, mask_type, color_groups, dilation).contiguous()
    y = _empty(_out_shape(x.shape, weight.shape[0]), x)
    kernels("masked_conv", backend).forward(x.contiguous(), weight.contiguous(),
                                            None if bias is None else bias.contiguous(), y,
                                            mask_type == "B", color_groups, dilation)
    return y


@masked_conv2d.register_fake
def _(x, weight, bias, mask_type, color_groups, dilation, backend):
    return _empty(_out_shape(x.shape, weight.shape[0]), x)


# ---------------------------------------------------------------------------------------------------------
# backward: d/dx
# ---------------------------------------------------------------------------------------------------------
def _grad_input_shape(grad_y: Tensor, weight: Tensor) -> list[int]:
    return [grad_y.shape[0], weight.shape[1], grad_y.shape[2], grad_y.shape[3]]


@torch.library.custom_op("genkern::masked_conv2d_grad_input", mutates_args=())
def masked_conv2d_grad_input(grad_y: Tensor, weight: Tensor, mask_type: str, color_groups: int, dilation: int,
                             backend: str) -> Tensor:
    _require(grad_y.dim() == 4 and grad_y.shape[1] == weight.shape[0], "grad_y must have shape (B, C_out, H, W)")
    shape = _grad_input_shape(grad_y, weight)
    _check(shape, weight, mask_type, color_groups, dilation, grad_y)
    if backend == "reference":
        return ref.masked_conv2d_grad_input(grad_y, weight, shape, mask_type, color_groups, dilation).contiguous()
    grad_x = _empty(shape, grad_y)
    kernels("masked_conv", backend).grad_input(grad_y.contiguous(), weight.contiguous(), grad_x,
                                               mask_type == "B", color_groups, dilation)
    return grad_x


@masked_conv2d_grad_input.register_fake
def _(grad_y, weight, mask_type, color_groups, dilation, backend):
    return _empty(_grad_input_shape(grad_y, weight), grad_y)


# ---------------------------------------------------------------------------------------------------------
# backward: d/dweight (zero at masked taps) and d/dbias
# ---------------------------------------------------------------------------------------------------------
def _weight_shape(grad_y: Tensor, x: Tensor, kernel_size: int) -> list[int]:
    return [grad_y.shape[1], x.shape[1], kernel_size, kernel_size]


@torch.library.custom_op("genkern::masked_conv2d_grad_weight", mutates_args=())
def masked_conv2d_grad_weight(grad_y: Tensor, x: Tensor, kernel_size: int, mask_type: str, color_groups: int,
                              dilation: int, backend: str) -> tuple[Tensor, Tensor]:
    _require(x.dim() == 4 and grad_y.dim() == 4 and grad_y.shape[0] == x.shape[0] and grad_y.shape[2:] == x.shape[2:],
             "grad_y must have shape (B, C_out, H, W) with x's B, H and W")
    shape = _weight_shape(grad_y, x, kernel_size)
    _check(x.shape, torch.empty(shape, dtype=x.dtype, device="meta"), mask_type, color_groups, dilation)
    _require(grad_y.dtype == x.dtype and grad_y.device == x.device, "grad_y differs from x in dtype or device")
    if backend == "reference":
        gw, gb = ref.masked_conv2d_grad_weight(grad_y, x, shape, mask_type, color_groups, dilation)
        return gw.contiguous(), gb.contiguous()
    grad_weight, grad_bias = _empty(shape, x), _empty([shape[0]], x)
    kernels("masked_conv", backend).grad_weight(grad_y.contiguous(), x.contiguous(), grad_weight, grad_bias,
                                                mask_type == "B", color_groups, dilation)
    return grad_weight, grad_bias


@masked_conv2d_grad_weight.register_fake
def _(grad_y, x, kernel_size, mask_type, color_groups, dilation, backend):
    shape = _weight_shape(grad_y, x, kernel_size)
    return _empty(shape, x), _empty([shape[0]], x)


def _setup(ctx, inputs, output):
    x, weight, bias, mask_type, color_groups, dilation, backend = inputs
    ctx.save_for_backward(x, weight)
    ctx.args = (mask_type, color_groups, dilation, backend)


def _grad(ctx, grad_y):
    x, weight = ctx.saved_tensors
    grad_x = grad_weight = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = masked_conv2d_grad_input(grad_y, weight, *ctx.args)
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
        grad_weight, grad_bias = masked_conv2d_grad_weight(grad_y, x, weight.shape[-1], *ctx.args)
    return grad_x, grad_weight, grad_bias if ctx.needs_input_grad[2] else None, None, None, None, None


masked_conv2d.register_autograd(_grad, setup_context=_setup)
