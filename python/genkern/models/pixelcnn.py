"""PixelCNN (van den Oord et al. 2016): a mask-A convolution, residual mask-B layers, a 1x1 head."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import _checks
from ..autoregressive import Program
from ..autoregressive.reference import mask
from ..nn import MaskedConv2d
from ._autoregressive import AutoregressiveImageModel


class PixelCNN(AutoregressiveImageModel):
    """PixelCNN over images of integer levels in [0, levels).

    Layers: a `kernel_size` mask-A convolution, then `n_layers - 1` residual blocks h + conv_B(relu(h))
    with `hidden_kernel_size` kernels, then relu -> 1x1 mask B -> relu -> 1x1 mask B to C * levels logits.
    With in_channels > 1 every layer uses in_channels colour groups (R -> G -> B), so hidden_channels must
    be divisible by in_channels. forward(x) gives logits (B, levels, C, H, W); see log_prob, bits_per_dim,
    sample (cached by default)."""

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
    ):
        super().__init__(in_channels, levels, image_size)
        hidden = _checks.integer("hidden_channels", hidden_channels, low=1)
        n_layers = _checks.integer("n_layers", n_layers, low=1)
        groups = self.in_channels
        if hidden % groups:
            raise ValueError(f"hidden_channels={hidden} must be divisible by in_channels={groups} (colour groups)")
        self.input = MaskedConv2d(self.in_channels, hidden, kernel_size, "A", groups)
        self.layers = nn.ModuleList(
            MaskedConv2d(hidden, hidden, hidden_kernel_size, "B", groups) for _ in range(n_layers - 1)
        )
        self.head = MaskedConv2d(hidden, hidden, 1, "B", groups)
        self.output = MaskedConv2d(hidden, self.in_channels * self.levels, 1, "B", groups)

    def logits(self, x: Tensor, cond: Tensor | None) -> Tensor:
        h = self.input(x)
        for layer in self.layers:
            h = h + layer(torch.relu(h))
        return self.output(torch.relu(self.head(torch.relu(h))))

    def program(self, n: int, cond: Tensor | None) -> Program:
        p = Program(self.in_channels)
        h = p.cache(self.input.out_channels)
        _masked(p, self.input, 0, h)
        for layer in self.layers:
            nxt = p.cache(layer.out_channels)
            _masked(p, layer, h, nxt, residual=h, relu_input=True)
            h = nxt
        head = p.cache(self.head.out_channels)
        _masked(p, self.head, h, head, relu_input=True)
        p.logits = p.cache(self.output.out_channels)
        _masked(p, self.output, head, p.logits, relu_input=True)
        return p


def _masked(p: Program, conv: MaskedConv2d, src: int, dst: int, **kwargs) -> None:
    """A MaskedConv2d as a pixel node: its kept taps, centred on the pixel."""
    if conv.dilation != 1:
        raise ValueError("cached sampling supports dilation 1 only")
    k = conv.kernel_size
    keep = mask(k, conv.mask_type, conv.in_channels, conv.out_channels, conv.color_groups)
    p.conv(src, dst, conv.weight, keep.to(conv.weight.device), anchor=(k // 2, k // 2), bias=conv.bias, **kwargs)
