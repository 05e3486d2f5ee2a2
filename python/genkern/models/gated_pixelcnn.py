"""Gated PixelCNN (van den Oord et al. 2016): vertical and horizontal stacks of gated layers, no blind spot,
skip connections into a 1x1 head, optional conditioning vector."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import _checks
from ..autoregressive import Program
from ..autoregressive.reference import mask
from ..nn import GatedMaskedConv2d, MaskedConv2d
from ._autoregressive import AutoregressiveImageModel
from .pixelcnn import _masked


class GatedPixelCNN(AutoregressiveImageModel):
    """Gated PixelCNN over images of integer levels in [0, levels); the interface of PixelCNN.

    A `kernel_size` mask-A gated layer on the image, `n_layers - 1` residual gated layers with
    `hidden_kernel_size`, their skip outputs summed into relu -> 1x1 mask B -> relu -> 1x1 mask B logits.
    `cond_channels` > 0 adds a conditioning vector cond (B, cond_channels) to every gate (forward, log_prob
    and sample take it)."""

    def __init__(
        self,
        in_channels: int,
        levels: int,
        image_size,
        hidden_channels: int = 64,
        n_layers: int = 8,
        kernel_size: int = 7,
        *,
        hidden_kernel_size: int = 3,
        cond_channels: int = 0,
    ):
        super().__init__(in_channels, levels, image_size, cond_channels)
        hidden = _checks.integer("hidden_channels", hidden_channels, low=1)
        n_layers = _checks.integer("n_layers", n_layers, low=1)
        groups = self.in_channels
        if hidden % groups:
            raise ValueError(f"hidden_channels={hidden} must be divisible by in_channels={groups} (colour groups)")
        self.layers = nn.ModuleList(
            [GatedMaskedConv2d(self.in_channels, hidden, kernel_size, "A", groups, self.cond_channels)]
            + [
                GatedMaskedConv2d(hidden, hidden, hidden_kernel_size, "B", groups, self.cond_channels)
                for _ in range(n_layers - 1)
            ]
        )
        self.head = MaskedConv2d(hidden, hidden, 1, "B", groups)
        self.output = MaskedConv2d(hidden, self.in_channels * self.levels, 1, "B", groups)

    def logits(self, x: Tensor, cond: Tensor | None) -> Tensor:
        v, h, skip = x, x, None
        for layer in self.layers:
            v, h, s = layer(v, h, cond)
            skip = s if skip is None else skip + s
        return self.output(torch.relu(self.head(torch.relu(skip))))

    def program(self, n: int, cond: Tensor | None) -> Program:
        p = Program(self.in_channels)
        v = h = 0
        skip = None
        for layer in self.layers:
            v, h, skip = _gated(p, layer, v, h, skip, cond)
        head = p.cache(self.head.out_channels)
        _masked(p, self.head, skip, head, relu_input=True)
        p.logits = p.cache(self.output.out_channels)
        _masked(p, self.output, head, p.logits, relu_input=True)
        return p


def _gated(p: Program, layer: GatedMaskedConv2d, v: int, h: int, skip: int | None, cond: Tensor | None):
    """One gated layer as nodes: the vertical stack as row nodes, the rest as pixel nodes."""
    n, r = layer.out_channels, layer.kernel_size // 2
    first = layer.mask_type == "A"
    cond_v = None if cond is None else layer.cond_v(cond)
    cond_h = None if cond is None else layer.cond_h(cond)
    v_pre, v_out = p.cache(2 * n), p.cache(n)
    p.conv(
        v,
        v_pre,
        layer.v_conv.weight,
        anchor=(r + 1 if first else r, r),
        bias=layer.v_conv.bias,
        cond=cond_v,
        row_level=True,
    )
    p.gate(v_pre, v_out, row_level=True)
    h_pre, gated = p.cache(2 * n), p.cache(n)
    p.conv(h, h_pre, layer.h_conv.weight, layer.h_mask, anchor=(0, r), bias=layer.h_conv.bias)
    p.conv(v_pre, h_pre, layer.link.weight, bias=layer.link.bias, cond=cond_h, accumulate=True)
    p.gate(h_pre, gated)
    skip_new = skip if skip is not None else p.cache(n)
    _one_by_one(p, layer, layer.skip, gated, skip_new, accumulate=skip is not None)
    h_out = p.cache(n)
    _one_by_one(p, layer, layer.res, gated, h_out, residual=h if layer.residual else -1)
    return v_out, h_out, skip_new


def _one_by_one(p: Program, layer: GatedMaskedConv2d, conv: nn.Conv2d, src: int, dst: int, **kwargs) -> None:
    n = layer.out_channels
    keep = mask(1, "B", n, n, layer.color_groups).to(conv.weight.device)
    p.conv(src, dst, conv.weight, keep, bias=conv.bias, **kwargs)
