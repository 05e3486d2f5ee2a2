"""PixelCNN (van den Oord et al. 2016): a mask-A convolution, residual mask-B layers, a 1x1 head."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import _checks
from ..autoregressive import Program, discretized_logistic_mixture_nll, discretized_logistic_mixture_sample
from ..autoregressive._ops import check_mixture_draw_range
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
    gives its params (B, 10K, H, W) for RGB with rgb_coupling (the default for 3 channels: mu_G, mu_B depend
    on the drawn R, G), (B, (1 + 2C)K, H, W) otherwise. Its params at a pixel must not see the pixel itself,
    so the layers use one colour group (the first layer's mask A hides the whole centre). Sampling it, both
    methods draw each pixel whole by genkern.discretized_logistic_mixture_sample's draw (keyed by seed,
    sample index, pixel and draw): cached sampling (cpu, cuda, reference backends) gives naive sampling's
    images from the same params, for any batch and first_sample. The cached sampler's activations are
    float32, so a float64 model's draws are those of its params in float32."""

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
        rgb_coupling: bool | None = None,
    ):
        super().__init__(in_channels, levels, image_size)
        hidden = _checks.integer("hidden_channels", hidden_channels, low=1)
        n_layers = _checks.integer("n_layers", n_layers, low=1)
        if head not in self.HEADS:
            raise ValueError(f"head must be one of {self.HEADS}, got {head!r}")
        self.head_type = head
        self.num_mixtures = _checks.integer("num_mixtures", num_mixtures, low=1)
        if rgb_coupling is not None and not isinstance(rgb_coupling, bool):
            raise TypeError(f"rgb_coupling must be None or a bool, got {type(rgb_coupling).__name__}")
        if rgb_coupling is not None and head != "logistic_mixture":
            raise ValueError("rgb_coupling is an option of head='logistic_mixture'")
        self.rgb_coupling = self.in_channels == 3 if rgb_coupling is None else rgb_coupling
        if self.rgb_coupling and self.in_channels != 3:
            raise ValueError(f"rgb_coupling needs in_channels=3 (R -> G -> B), got in_channels={self.in_channels}")
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

    def _check_draw_range(self, n: int, first_sample: int) -> None:
        if not self.mixture:
            return super()._check_draw_range(n, first_sample)
        # Draw t of pixel p of sample s: stream element ((first_sample + s) H W + p)(K + C) + t (section 6.1).
        pixels = self.image_size[0] * self.image_size[1]
        check_mixture_draw_range(n, first_sample, pixels, self.num_mixtures + self.in_channels)

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
        if self.mixture:
            p.mixture = (self.num_mixtures, self.rgb_coupling)
        return p


def _masked(p: Program, conv: MaskedConv2d, src: int, dst: int, **kwargs) -> None:
    """A MaskedConv2d as a pixel node: its kept taps, centred on the pixel."""
    if conv.dilation != 1:
        raise ValueError("cached sampling supports dilation 1 only")
    k = conv.kernel_size
    keep = mask(k, conv.mask_type, conv.in_channels, conv.out_channels, conv.color_groups)
    p.conv(src, dst, conv.weight, keep.to(conv.weight.device), anchor=(k // 2, k // 2), bias=conv.bias, **kwargs)
