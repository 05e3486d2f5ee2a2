"""Benchmark cases of the pixelcnn_sampling family: images/s sampling a 256-level PixelCNN with 9 masked
layers (a 7x7 mask A, eight residual 3x3 mask B, a 1x1 head):

- 28x28 grey images, 64 channels, at batch 1 to 256 (the CPU target is batch 64; plain `genkern bench` runs
  that one);
- 32x32 RGB images, 96 channels (divisible by the 3 colour groups), at batch 256: the GPU target (plain
  `genkern bench` runs it on a GPU only).

genkern runs the cached sampler (each position once per layer, the pixel loop in compiled code). The eager
baseline is naive sampling as a PyTorch user writes it: the whole network (F.conv2d on the masked weights)
once per pixel and colour, then a Gumbel-max draw. Naive sampling is D identical full passes (D = colours x
height x width), so the baseline times the first NAIVE_STEPS of them and is scaled by D / NAIVE_STEPS
(marked extrapolated). The sizes are ignored; `--ops pixelcnn_sampling` runs every case.
"""
from __future__ import annotations

import functools

import torch

from .. import backend as _backend
from ..bench import BenchCase
from ..models import PixelCNN
from ..pixelcnn_sampling import draw_base, gumbel_argmax

FAMILY = "pixelcnn_sampling"
LEVELS, LAYERS = 256, 9
NAIVE_STEPS = 4
# (name, colours, image side, hidden channels, batch, default)
SHAPES = (*((f"pixelcnn_sample_b{b}", 1, 28, 64, b, b == 64) for b in (1, 4, 16, 64, 256)),
          ("pixelcnn_sample_rgb32_b256", 3, 32, 96, 256, "cuda"))


@functools.lru_cache(maxsize=None)
def _model(colors: int, side: int, hidden: int, device: torch.device) -> PixelCNN:
    torch.manual_seed(0)
    return PixelCNN(colors, LEVELS, side, hidden_channels=hidden, n_layers=LAYERS).to(device).eval()


def _inputs(colors: int, side: int, hidden: int, batch: int):
    def make(size, device, dtype):
        x = torch.zeros(batch, colors, side, side, dtype=torch.int64, device=device)
        return _model(colors, side, hidden, device), x

    return make


@torch.no_grad()
def eager_naive_steps(model, x):
    """The first NAIVE_STEPS draws of naive sampling, all in eager PyTorch (genkern's reference backend)."""
    colors, height, width = x.shape[1:]
    with _backend.set_backend("reference"):
        for d in range(NAIVE_STEPS):
            pixel, c = divmod(d, colors)
            i, j = divmod(pixel, width)
            logits = model(x)[:, :, c, i, j].contiguous()
            base = draw_base(0, x.shape[0], model.dims, d, LEVELS, x.device)
            x[:, c, i, j] = gumbel_argmax(logits, base, seed=0)
    return x


def genkern_cached(model, x, backend=None):
    return model.sample(x.shape[0], seed=0, backend=backend)


CASES = tuple(
    BenchCase(
        name=name, family=FAMILY, make_inputs=_inputs(colors, side, hidden, batch), genkern=genkern_cached,
        eager=eager_naive_steps, shape=lambda size, s=(batch, colors, side, side): s, bytes_moved=lambda n, dt: 0,
        default=default, compile=False, items=lambda size, b=batch: b, item_unit="img",
        eager_scale=lambda size, d=colors * side * side: d / NAIVE_STEPS, max_repeats=3, timed="whole sampling run",
        sized=False,
    )
    for name, colors, side, hidden, batch, default in SHAPES
)
