"""genkern.nn.MaskedConv2d: a module around genkern.masked_conv2d, initialised as nn.Conv2d is."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .. import _checks
from ..autoregressive import masked_conv2d


class MaskedConv2d(nn.Module):
    """A PixelCNN masked convolution: stride 1, 'same' output size, mask 'A' (first layer) or 'B'.

    The full (C_out, C_in, k, k) weight is a parameter, initialised like nn.Conv2d's; its masked taps are
    never used and get zero gradient, so an optimizer without weight decay leaves them untouched."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        mask_type: str,
        color_groups: int = 1,
        dilation: int = 1,
        bias: bool = True,
        *,
        device=None,
        dtype=None,
    ):
        super().__init__()
        in_channels = _checks.integer("in_channels", in_channels, low=1)
        out_channels = _checks.integer("out_channels", out_channels, low=1)
        kernel_size = _checks.integer("kernel_size", kernel_size, low=1)
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        if mask_type not in ("A", "B"):
            raise ValueError(f"mask_type must be 'A' or 'B', got {mask_type!r}")
        color_groups = _checks.integer("color_groups", color_groups, low=1)
        if in_channels % color_groups or out_channels % color_groups:
            raise ValueError(f"color_groups={color_groups} must divide in_channels and out_channels")
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.mask_type, self.color_groups = mask_type, color_groups
        self.dilation = _checks.integer("dilation", dilation, low=1)
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size, **factory))
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Conv2d's initialisation, over the full fan-in (as a masked nn.Conv2d in PixelCNN code has).
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.in_channels * self.kernel_size * self.kernel_size
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        return masked_conv2d(
            x, self.weight, self.bias, mask_type=self.mask_type, color_groups=self.color_groups, dilation=self.dilation
        )

    def extra_repr(self) -> str:
        s = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"mask_type={self.mask_type!r}, color_groups={self.color_groups}"
        )
        if self.dilation != 1:
            s += f", dilation={self.dilation}"
        return s + f", bias={self.bias is not None}"
