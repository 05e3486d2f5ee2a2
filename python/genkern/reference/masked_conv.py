"""Reference of the masked_conv family (shared/math.md, section 4): the PixelCNN masked convolution.

`masked_conv2d` is F.conv2d on the weight times its 0/1 mask: stride 1, 'same' output size. The kernels
follow it without ever reading the masked weights, so garbage there changes nothing.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _checks

MASK_TYPES = ("A", "B")


def mask(kernel_size: int, mask_type: str, in_channels: int, out_channels: int, color_groups: int = 1,
         *, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """The (out_channels, in_channels, k, k) 0/1 mask: rows above the centre, the centre row left of the
    centre, and at the centre tap output group g sees input group h iff h < g (A) or h <= g (B)."""
    k, c = kernel_size, kernel_size // 2
    m = torch.zeros(out_channels, in_channels, k, k, dtype=dtype, device=device)
    m[:, :, :c, :] = 1
    m[:, :, c, :c] = 1
    g_out = torch.arange(out_channels, device=device) // (out_channels // color_groups)
    g_in = torch.arange(in_channels, device=device) // (in_channels // color_groups)
    sees = g_in[None, :] < g_out[:, None] if mask_type == "A" else g_in[None, :] <= g_out[:, None]
    m[:, :, c, c] = sees.to(dtype)
    return m


def padding(kernel_size: int, dilation: int) -> int:
    return dilation * (kernel_size // 2)


def _masked_weight(weight, mask_type, color_groups):
    c_out, c_in, k, _ = weight.shape
    m = mask(k, mask_type, c_in, c_out, color_groups, dtype=weight.dtype, device=weight.device)
    # where, not a product: garbage (inf, nan) in masked taps must not leak as 0 * inf = nan.
    return torch.where(m.bool(), weight, torch.zeros((), dtype=weight.dtype, device=weight.device))


def masked_conv2d(x, weight, bias=None, mask_type="A", color_groups=1, dilation=1):
    """F.conv2d(x, weight * mask, bias) with 'same' padding; half types compute in float32."""
    dtype = x.dtype
    if dtype in (torch.float16, torch.bfloat16) and x.device.type == "cpu":
        x, weight = x.float(), weight.float()
        bias = None if bias is None else bias.float()
    k = weight.shape[-1]
    y = F.conv2d(x, _masked_weight(weight, mask_type, color_groups), bias,
                 padding=padding(k, dilation), dilation=dilation)
    return y.to(dtype)


def masked_conv2d_grad_input(grad_y, weight, input_shape, mask_type="A", color_groups=1, dilation=1):
    """d/dx: the transposed convolution of grad_y with the masked weight."""
    k = weight.shape[-1]
    return torch.nn.grad.conv2d_input(list(input_shape), _masked_weight(weight, mask_type, color_groups), grad_y,
                                      padding=padding(k, dilation), dilation=dilation)


def masked_conv2d_grad_weight(grad_y, x, weight_shape, mask_type="A", color_groups=1, dilation=1):
    """(d/dweight, d/dbias): the weight gradient is zero at masked taps, the bias gradient sums grad_y."""
    c_out, c_in, k, _ = weight_shape
    gw = torch.nn.grad.conv2d_weight(x, list(weight_shape), grad_y, padding=padding(k, dilation), dilation=dilation)
    m = mask(k, mask_type, c_in, c_out, color_groups, dtype=gw.dtype, device=gw.device)
    return gw * m, grad_y.sum((0, 2, 3))


def check_masked_conv2d_args(x, weight, bias, mask_type, color_groups, dilation) -> tuple[int, int]:
    """Validate the public arguments (ValueError / TypeError naming the argument); returns
    (color_groups, dilation) as ints."""
    _checks.float_tensor("x", x)
    _checks.float_tensor("weight", weight)
    _checks.same_place("weight", weight, "x", x)
    if x.dim() != 4:
        raise ValueError(f"x must have shape (B, C_in, H, W), got {tuple(x.shape)}")
    if weight.dim() != 4:
        raise ValueError(f"weight must have shape (C_out, C_in, k, k), got {tuple(weight.shape)}")
    c_out, c_in, kh, kw = weight.shape
    if kh != kw or kh % 2 == 0:
        raise ValueError(f"weight must be a square kernel of odd size k x k, got {kh} x {kw}")
    if c_in != x.shape[1]:
        raise ValueError(f"weight has {c_in} input channels but x has {x.shape[1]}")
    if c_in < 1 or c_out < 1:
        raise ValueError(f"weight needs at least one input and one output channel, got shape {tuple(weight.shape)}")
    if bias is not None:
        _checks.like("bias", bias, "x", x, shape=(c_out,))
    if not isinstance(mask_type, str) or mask_type not in MASK_TYPES:
        raise ValueError(f"mask_type must be 'A' or 'B', got {mask_type!r}")
    color_groups = _checks.integer("color_groups", color_groups, low=1)
    if c_in % color_groups or c_out % color_groups:
        raise ValueError(f"color_groups={color_groups} must divide both C_in={c_in} and C_out={c_out}")
    dilation = _checks.integer("dilation", dilation, low=1)
    return color_groups, dilation
