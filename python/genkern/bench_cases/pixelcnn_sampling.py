"""Benchmark cases of the pixelcnn_sampling family: images/s sampling a 28x28, 256-level PixelCNN (64
channels, 9 masked layers: a 7x7 mask A, eight residual 3x3 mask B, a 1x1 head) at batch 1 to 256.

genkern runs the cached sampler (each position once per layer, the pixel loop in compiled code). The eager
baseline is naive sampling as a PyTorch user writes it: the whole network (F.conv2d on the masked weights)
once per pixel, then a Gumbel-max draw. Naive sampling is 784 identical full passes, so the baseline times
the first NAIVE_STEPS of them and is scaled by 784 / NAIVE_STEPS (marked extrapolated). The sizes are
ignored; plain `genkern bench` runs batch 64 only (the target shape), `--ops pixelcnn_sampling` all of them.
"""
from __future__ import annotations

import functools

import torch

from .. import backend as _backend
from ..bench import BenchCase
from ..models import PixelCNN
from ..pixelcnn_sampling import draw_base, gumbel_argmax

FAMILY = "pixelcnn_sampling"
LEVELS, SIZE, HIDDEN, LAYERS = 256, 28, 64, 9
DIMS = SIZE * SIZE
NAIVE_STEPS = 4
BATCHES = (1, 4, 16, 64, 256)


@functools.lru_cache(maxsize=None)
def _model(device: torch.device) -> PixelCNN:
    torch.manual_seed(0)
    return PixelCNN(1, LEVELS, SIZE, hidden_channels=HIDDEN, n_layers=LAYERS).to(device).eval()


def _inputs(batch: int):
    def make(size, device, dtype):
        return _model(device), torch.zeros(batch, 1, SIZE, SIZE, dtype=torch.int64, device=device)

    return make


@torch.no_grad()
def eager_naive_steps(model, x):
    """The first NAIVE_STEPS pixels of naive sampling, all in eager PyTorch (genkern's reference backend)."""
    with _backend.set_backend("reference"):
        for d in range(NAIVE_STEPS):
            i, j = divmod(d, SIZE)
            logits = model(x)[:, :, 0, i, j].contiguous()
            base = draw_base(0, x.shape[0], DIMS, d, LEVELS, x.device)
            x[:, 0, i, j] = gumbel_argmax(logits, base, seed=0)
    return x


def genkern_cached(model, x, backend=None):
    return model.sample(x.shape[0], seed=0, backend=backend)


CASES = tuple(
    BenchCase(
        name=f"pixelcnn_sample_b{batch}", family=FAMILY, make_inputs=_inputs(batch), genkern=genkern_cached,
        eager=eager_naive_steps, shape=lambda size, b=batch: (b, 1, SIZE, SIZE), bytes_moved=lambda n, dt: 0,
        default=batch == 64, compile=False, items=lambda size, b=batch: b, item_unit="img",
        eager_scale=lambda size: DIMS / NAIVE_STEPS, max_repeats=3, timed="whole sampling run", sized=False,
    )
    for batch in BATCHES
)
