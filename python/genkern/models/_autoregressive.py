"""What PixelCNN and GatedPixelCNN share: level checks, input scaling, exact likelihood, and sampling
(naive: the whole network per pixel and colour; cached: the model's Program, see genkern.autoregressive)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .. import _checks
from ..autoregressive import draw_base, gumbel_argmax
from ..autoregressive._ops import check_draw_range
from ..random import check_offset, resolve_seed

METHODS = ("cached", "naive")


def _image_size(value) -> tuple[int, int]:
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"image_size must be an int or (H, W), got {value!r}")
        return (_checks.integer("image_size", value[0], low=1), _checks.integer("image_size", value[1], low=1))
    size = _checks.integer("image_size", value, low=1)
    return (size, size)


class AutoregressiveImageModel(nn.Module):
    """Images of `in_channels` colours, each an integer level in [0, levels), in raster order with the
    colours of a pixel in turn (R -> G -> B). Subclasses define `logits(x_scaled, cond)` and `program`."""

    def __init__(self, in_channels: int, levels: int, image_size, cond_channels: int = 0):
        super().__init__()
        self.in_channels = _checks.integer("in_channels", in_channels, low=1)
        self.levels = _checks.integer("levels", levels, low=2)
        self.image_size = _image_size(image_size)
        self.cond_channels = _checks.integer("cond_channels", cond_channels, low=0)
        # The network sees levels mapped linearly onto [-1, 1].
        self.input_scale, self.input_shift = 2.0 / (self.levels - 1), -1.0

    @property
    def dims(self) -> int:
        return self.in_channels * self.image_size[0] * self.image_size[1]

    def check_levels(self, x: Tensor) -> Tensor:
        x = _checks.tensor("x", x)
        shape = (self.in_channels, *self.image_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != shape:
            raise ValueError(f"x must have shape (B, {shape[0]}, {shape[1]}, {shape[2]}), got {tuple(x.shape)}")
        if x.dtype == torch.bool or x.is_complex():
            raise TypeError(f"x must hold integer levels in a real numeric dtype, got {x.dtype}")
        if x.numel() and _checks.has_values(x):
            bad = (x < 0) | (x > self.levels - 1)
            if x.is_floating_point():
                bad = bad | (x != torch.floor(x)) | torch.isnan(x)
            if bool(bad.any()):
                raise ValueError(f"x must hold integer levels in [0, {self.levels}); found values outside")
        return x

    def check_cond(self, cond, batch: int, device) -> Tensor | None:
        if self.cond_channels == 0:
            if cond is not None:
                raise ValueError("cond given to a model built without cond_channels")
            return None
        if cond is None:
            raise ValueError(f"cond of shape (B, {self.cond_channels}) is required")
        cond = _checks.float_tensor("cond", cond)
        if tuple(cond.shape) != (batch, self.cond_channels):
            raise ValueError(f"cond must have shape ({batch}, {self.cond_channels}), got {tuple(cond.shape)}")
        return cond.to(device)

    def scaled(self, x: Tensor) -> Tensor:
        dtype = next(self.parameters()).dtype
        return x.to(dtype) * self.input_scale + self.input_shift

    def forward(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        """Logits (B, levels, C, H, W) of every level at every dimension given the dimensions before it."""
        x = self.check_levels(x)
        cond = self.check_cond(cond, x.shape[0], x.device)
        out = self.logits(self.scaled(x), cond)  # (B, C * levels, H, W), colour-major
        b, _, h, w = out.shape
        return out.view(b, self.in_channels, self.levels, h, w).transpose(1, 2)

    def log_prob(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        """Exact log-likelihood of each image in nats: (B,)."""
        logits = self(x, cond)
        nll = nn.functional.cross_entropy(logits, x.long(), reduction="none")
        return -nll.flatten(1).sum(1)

    def bits_per_dim(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        """Negative log-likelihood per dimension in bits: -log_prob / (D ln 2), (B,)."""
        return -self.log_prob(x, cond) / (self.dims * math.log(2.0))

    # -------------------------------------------------------------------------------------------------
    # sampling
    # -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self,
        n: int,
        *,
        seed=None,
        offset=0,
        method: str = "cached",
        cond: Tensor | None = None,
        first_sample: int = 0,
        backend: str | None = None,
    ) -> Tensor:
        """n images (n, C, H, W) of int64 levels. Sample s of a call draws from the stream as sample
        first_sample + s, so the same (seed, offset, sample index) gives the same image in any batch.
        method='cached' (default) computes each position once per layer; 'naive' reruns the network for
        every pixel and colour (the reference: same draws, logits equal to float tolerance)."""
        n = _checks.int64("n", n, low=0)
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        seed, offset = resolve_seed(seed), check_offset(offset)
        first_sample = _checks.int64("first_sample", first_sample, low=0)
        self._check_draw_range(n, first_sample)
        device = next(self.parameters()).device
        _checks.allocation("n", (n, self.dims), 8, device, "the samples")
        cond = self.check_cond(cond, n, device)
        program = None
        if method == "cached" and n:
            program = self.program(n, cond)
            program.check_caches("n", n, *self.image_size, device)  # before anything is allocated
        out = torch.zeros(n, self.in_channels, *self.image_size, dtype=torch.int64, device=device)
        if n == 0:
            return out
        if method == "naive":
            return self._sample_naive(out, cond, seed, offset, first_sample, backend)
        return program.run(
            out,
            levels=self.levels,
            scale=self.input_scale,
            shift=self.input_shift,
            seed=seed,
            offset=offset,
            first_sample=first_sample,
            backend=backend,
        )

    def _check_draw_range(self, n: int, first_sample: int) -> None:
        # Draw k of dimension i of sample s is stream element ((first_sample + s) * dims + i) * levels + k:
        # past int64 the kernels (uint64) and the reference (int64) would draw different levels.
        check_draw_range(n, first_sample, self.dims, self.levels)

    def _sample_naive(self, out, cond, seed, offset, first_sample, backend):
        n, colors, height, width = out.shape
        for i in range(height):
            for j in range(width):
                for c in range(colors):
                    logits = self(out, cond)[:, :, c, i, j].float().contiguous()
                    position = (i * width + j) * colors + c
                    base = draw_base(first_sample, n, self.dims, position, self.levels, out.device)
                    out[:, c, i, j] = gumbel_argmax(logits, base, seed=seed, offset=offset, backend=backend)
        return out
