"""Masked (PixelCNN) convolutions: the public function.

    y = genkern.masked_conv2d(x, weight, bias, mask_type="A", color_groups=3)

The weight's masked taps are ignored (they need not be zero) and get zero gradient. The function checks
its arguments, picks a backend (see genkern.backend: cpu, cuda, triton or the reference) and calls the
`genkern::masked_conv2d` op, so it works under autograd and torch.compile.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import backend as _backend
from .ops import masked_conv as _ops  # noqa: F401 - registers the genkern:: ops
from .reference.masked_conv import check_masked_conv2d_args


def masked_conv2d(x: Tensor, weight: Tensor, bias: Tensor | None = None, *, mask_type: str = "A",
                  color_groups: int = 1, dilation: int = 1, backend: str | None = None) -> Tensor:
    """A stride-1 convolution with 'same' output size (padding dilation * (k // 2)) whose k x k weight is
    masked for raster-order autoregression (shared/math.md, section 4).

    x: (B, C_in, H, W); weight: (C_out, C_in, k, k), k odd; bias: (C_out,) or None. Mask A hides the centre
    pixel (first layer), mask B shows it (later layers); with `color_groups` G the channels split into G
    contiguous groups and, at the centre, output group g sees input groups h < g (A) or h <= g (B)."""
    color_groups, dilation = check_masked_conv2d_args(x, weight, bias, mask_type, color_groups, dilation)
    name = _backend.resolve(backend, x.device, x.dtype, family="masked_conv")
    return torch.ops.genkern.masked_conv2d(x, weight, bias, mask_type, color_groups, dilation, name)
