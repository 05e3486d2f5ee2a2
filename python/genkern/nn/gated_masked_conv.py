"""genkern.nn.GatedMaskedConv2d: the Gated PixelCNN block (van den Oord et al. 2016, docs/math.md §4)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _checks
from ..autoregressive import gated_activation, masked_conv2d


def _centre_sees(out_channels: int, in_channels: int, groups: int, mask_type: str, out_group_size: int) -> Tensor:
    """(out, in) 0/1: which input channels an output channel sees at the current pixel (colour groups)."""
    g_out = (torch.arange(out_channels) % (out_group_size * groups)) // out_group_size
    g_in = torch.arange(in_channels) // (in_channels // groups)
    sees = g_in[None, :] < g_out[:, None] if mask_type == "A" else g_in[None, :] <= g_out[:, None]
    return sees.float()


class GatedMaskedConv2d(nn.Module):
    """One Gated PixelCNN layer: forward(v, h, cond=None) -> (v, h, skip).

    v, the vertical stack, holds at row i what the rows above i say (it is stored shifted down a row, so
    the horizontal stack reads it at its own position); h, the horizontal stack, sees the current row to the
    left and, after a mask-'A' first layer, the pixel itself (earlier colours only, by colour group). No blind
    spot remains:
        v_pre = conv_{(k//2+1) x k}(v) [+ cond_v]           (the first layer reads rows strictly above)
        h_pre = conv_{1 x (k//2+1)}(h) + link_1x1(v_pre) [+ cond_h]
        v' = tanh . sigmoid (v_pre);  g = tanh . sigmoid (h_pre)   (genkern.gated_activation)
        skip = skip_1x1(g);  h' = h + res_1x1(g)  (residual when in_channels == out_channels)
    The first layer takes the image as both v and h, with mask_type='A'. Output channels split into
    color_groups groups; each gate half keeps the same grouping, so a group's gate reads its own group."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        mask_type: str = "B",
        color_groups: int = 1,
        cond_channels: int = 0,
        residual: bool | None = None,
    ):
        super().__init__()
        self.in_channels = _checks.integer("in_channels", in_channels, low=1)
        self.out_channels = _checks.integer("out_channels", out_channels, low=1)
        self.kernel_size = _checks.integer("kernel_size", kernel_size, low=1)
        if self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        if mask_type not in ("A", "B"):
            raise ValueError(f"mask_type must be 'A' or 'B', got {mask_type!r}")
        self.mask_type = mask_type
        self.color_groups = _checks.integer("color_groups", color_groups, low=1)
        if self.in_channels % self.color_groups or self.out_channels % self.color_groups:
            raise ValueError(f"color_groups={color_groups} must divide in_channels and out_channels")
        self.cond_channels = _checks.integer("cond_channels", cond_channels, low=0)
        if residual is None:
            residual = self.in_channels == self.out_channels
        if residual and self.in_channels != self.out_channels:
            raise ValueError("a residual layer needs in_channels == out_channels")
        self.residual = residual
        n, r, c_in = self.out_channels, self.kernel_size // 2, self.in_channels
        self.v_conv = nn.Conv2d(c_in, 2 * n, (r + 1, self.kernel_size))
        self.h_conv = nn.Conv2d(c_in, 2 * n, (1, r + 1))
        self.link = nn.Conv2d(2 * n, 2 * n, 1)
        # 1x1 masked (B) convolutions, so that colour groups stay causal.
        self.res = nn.Conv2d(n, n, 1)
        self.skip = nn.Conv2d(n, n, 1)
        self.cond_v = nn.Linear(self.cond_channels, 2 * n, bias=False) if self.cond_channels else None
        self.cond_h = nn.Linear(self.cond_channels, 2 * n, bias=False) if self.cond_channels else None
        h_mask = torch.ones(2 * n, c_in, 1, r + 1)
        h_mask[:, :, 0, r] = _centre_sees(2 * n, c_in, self.color_groups, mask_type, n // self.color_groups)
        self.register_buffer("h_mask", h_mask, persistent=False)

    def vertical(self, v: Tensor) -> Tensor:
        """conv over rows i-r..i of the stack (the first layer: rows i-r-1..i-1 of the image)."""
        r = self.kernel_size // 2
        if self.mask_type == "A":
            return self.v_conv(F.pad(v, (r, r, r + 1, 0))[:, :, :-1])
        return self.v_conv(F.pad(v, (r, r, r, 0)))

    def forward(self, v: Tensor, h: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        r = self.kernel_size // 2
        v_pre = self.vertical(v)
        h_pre = F.conv2d(F.pad(h, (r, 0, 0, 0)), self.h_conv.weight * self.h_mask, self.h_conv.bias)
        if cond is not None:
            if self.cond_v is None:
                raise ValueError("cond given to a layer built without cond_channels")
            v_pre = v_pre + self.cond_v(cond)[:, :, None, None]
        elif self.cond_v is not None:
            raise ValueError(f"cond of shape (B, {self.cond_channels}) is required")
        h_pre = h_pre + self.link(v_pre)
        if cond is not None:
            h_pre = h_pre + self.cond_h(cond)[:, :, None, None]
        gated = gated_activation(h_pre)
        groups = self.color_groups
        skip = masked_conv2d(gated, self.skip.weight, self.skip.bias, mask_type="B", color_groups=groups)
        out = masked_conv2d(gated, self.res.weight, self.res.bias, mask_type="B", color_groups=groups)
        return gated_activation(v_pre), (h + out if self.residual else out), skip

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"mask_type={self.mask_type!r}, color_groups={self.color_groups}, cond_channels={self.cond_channels}, "
            f"residual={self.residual}"
        )
