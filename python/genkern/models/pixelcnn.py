"""PixelCNN (van den Oord et al. 2016): a mask-A convolution, residual mask-B layers, a 1x1 head."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import _checks
from ..autoregressive import Program, discretized_logistic_mixture_nll, discretized_logistic_mixture_sample
from ..autoregressive.reference import mask, mixture_param_channels
from ..nn import MaskedConv2d
from ._autoregressive import AutoregressiveImageModel


class PixelCNN(AutoregressiveImageModel):
    """PixelCNN over images of integer levels in [0, levels).

    Layers: a `kernel_size` mask-A convolution, then `n_layers - 1` residual blocks h + conv_B(relu(h))
    with `hidden_kernel_size` kernels, then relu -> 1x1 mask B -> relu -> 1x1 mask B to C * levels logits.
    With in_channels > 1 every layer uses in_channels colour groups (R -> G -> B), so hidden_channels must
    be divisible by in_channels. forward(x) gives logits (B, levels, C, H, W); see log_prob, bits_per_dim,
    sample (cached by default).

    head="logistic_mixture" replaces the categorical output by PixelCNN++'s discretised logistic mixture of
    `num_mixtures` components (Salimans et al. 2017; genkern.discretized_logistic_mixture_nll): forward(x)
    gives its params (B, 10K, H, W) for RGB (coupled), (B, (1 + 2C)K, H, W) otherwise. Its params at a pixel
    must not see the pixel itself (the coupling conditions G on R and B on R, G), so the layers use one
    colour group (the first layer's mask A hides the whole centre). Sampling it runs the uncached path
    (method="naive"): the cached sampler draws categorical levels only."""

    HEADS = ("categorical", "logistic_mixture")

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
        head: str = "categorical",
        num_mixtures: int = 10,
    ):
        super().__init__(in_channels, levels, image_size)
        hidden = _checks.integer("hidden_channels", hidden_channels, low=1)
        n_layers = _checks.integer("n_layers", n_layers, low=1)
        if head not in self.HEADS:
            raise ValueError(f"head must be one of {self.HEADS}, got {head!r}")
        self.head_type = head
        self.num_mixtures = _checks.integer("num_mixtures", num_mixtures, low=1)
        self.rgb_coupling = self.in_channels == 3
        mixture = head == "logistic_mixture"
        groups = 1 if mixture else self.in_channels
        if hidden % groups:
            raise ValueError(f"hidden_channels={hidden} must be divisible by in_channels={groups} (colour groups)")
        self.input = MaskedConv2d(self.in_channels, hidden, kernel_size, "A", groups)
        self.layers = nn.ModuleList(
            MaskedConv2d(hidden, hidden, hidden_kernel_size, "B", groups) for _ in range(n_layers - 1)
        )
        self.head = MaskedConv2d(hidden, hidden, 1, "B", groups)
        outputs = (
            mixture_param_channels(self.in_channels, self.num_mixtures, self.rgb_coupling)
            if mixture
            else self.in_channels * self.levels
        )
        self.output = MaskedConv2d(hidden, outputs, 1, "B", groups)

    def logits(self, x: Tensor, cond: Tensor | None) -> Tensor:
        h = self.input(x)
        for layer in self.layers:
            h = h + layer(torch.relu(h))
        return self.output(torch.relu(self.head(torch.relu(h))))

    # -------------------------------------------------------------------------------------------------
    # the logistic-mixture head
    # -------------------------------------------------------------------------------------------------
    @property
    def mixture(self) -> bool:
        return self.head_type == "logistic_mixture"

    def forward(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        """Categorical head: logits (B, levels, C, H, W). Mixture head: its params (B, P, H, W)."""
        if not self.mixture:
            return super().forward(x, cond)
        x = self.check_levels(x)
        cond = self.check_cond(cond, x.shape[0], x.device)
        return self.logits(self.scaled(x), cond)

    def _mixture_args(self) -> dict:
        return {"levels": self.levels, "num_mixtures": self.num_mixtures, "rgb_coupling": self.rgb_coupling}

    def log_prob(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        """Exact log-likelihood of each image in nats: (B,)."""
        if not self.mixture:
            return super().log_prob(x, cond)
        return -discretized_logistic_mixture_nll(self(x, cond), x, **self._mixture_args())

    def sample(self, n: int, *, method: str = "cached", **kwargs) -> Tensor:
        if self.mixture and method == "cached":
            raise ValueError(
                "cached sampling has no logistic-mixture head yet (its compiled sampler draws categorical "
                "levels): pass method='naive'"
            )
        return super().sample(n, method=method, **kwargs)

    sample.__doc__ = AutoregressiveImageModel.sample.__doc__

    def _sample_naive(self, out, cond, seed, offset, first_sample, backend):
        if not self.mixture:
            return super()._sample_naive(out, cond, seed, offset, first_sample, backend)
        # A pixel at a time, all its colours in one draw (G and B coupled to the drawn R, G). The draw at
        # (i, j) is keyed by (sample, pixel, draw) in the whole image: the op draws every pixel of the params
        # and this keeps pixel (i, j), whose params see only the pixels already drawn.
        n, colors, height, width = out.shape
        for i in range(height):
            for j in range(width):
                params = self(out, cond)
                drawn = discretized_logistic_mixture_sample(
                    params,
                    seed=seed,
                    offset=offset,
                    channels=colors,
                    first=first_sample,
                    backend=backend,
                    **self._mixture_args(),
                )
                out[:, :, i, j] = drawn[:, :, i, j]
        return out

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
