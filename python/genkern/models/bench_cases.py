"""Benchmark cases of `genkern bench --ops sampling`: samples/s of whole `genkern.sample` runs, end to end
(the model's sampler, the uint8 conversion and the shard, grid and manifest files written into a temporary
directory), against the naive eager sampler of the same model.

- The shipped models (trained on 8 x 8 digits), at batch 64 and 256: a call draws SHARDS batches (shards)
  of the fast models (NADE, VAE, GAN), so that writing one overlaps drawing the next as in a real run, and
  one of the PixelCNNs.
- PixelCNN at 28 x 28, 256 levels, 64 channels, 9 layers, batch 64, random weights: the issue's CPU target
  (the cached sampler at least 500x the naive one, file writing included).

The naive samplers are what a PyTorch user writes: for PixelCNN and GatedPixelCNN the whole network once per
pixel (timed over the first NAIVE_STEPS pixels and scaled, marked extrapolated); for NADE, the VAE and the
GAN the model's own sampler with every genkern op on its eager reference (genkern's spec: plain PyTorch ops,
NADE's one loop iteration per dimension). The baseline writes no files: that only favours it.
"""

from __future__ import annotations

import functools
import tempfile

import torch

from .. import backend as _backend
from .._sampling import sample
from ..autoregressive.bench_cases import eager_naive_steps
from ..bench import BenchCase

FAMILY = "sampling"
NAIVE_STEPS = 4  # as in the pixelcnn_sampling cases (genkern.autoregressive.bench_cases)
SHIPPED = ("pixelcnn", "gated_pixelcnn", "nade", "vae", "dcgan")
SHARDS = 8


@functools.cache
def _shipped(name: str, device: torch.device):
    from .._checkpoints import load, packaged

    model, _ = load(packaged(name), expect=name)
    return model.to(device).eval()


@functools.cache
def _pixelcnn28(device: torch.device):
    from .pixelcnn import PixelCNN

    torch.manual_seed(0)
    return PixelCNN(1, 256, 28, hidden_channels=64, n_layers=9).to(device).eval()


def _inputs(model_of, batch: int, shards: int):
    def make(size, device, dtype):
        # The directory lives as long as the inputs: TemporaryDirectory removes it when collected.
        return model_of(device), batch, shards, tempfile.TemporaryDirectory(prefix="genkern-bench-sample-")

    return make


def genkern_sample(model, batch, shards, out, backend=None):
    """`shards` shards of `batch` samples, written to disk (the same files are replaced on every call)."""
    with _backend.scoped(backend):
        return sample(model, shards * batch, seed=0, batch_size=batch, out_dir=out.name, force=True)


def _is_pixelcnn(model) -> bool:
    from .gated_pixelcnn import GatedPixelCNN
    from .pixelcnn import PixelCNN

    return isinstance(model, (PixelCNN, GatedPixelCNN))


@torch.no_grad()
def eager_sample(model, batch, shards, out):
    """The naive sampler (see the module docstring); for PixelCNNs only its first NAIVE_STEPS pixels."""
    device = next(model.parameters()).device
    if _is_pixelcnn(model):
        x = torch.zeros(shards * batch, model.in_channels, *model.image_size, dtype=torch.int64, device=device)
        return eager_naive_steps(model, x)
    with _backend.set_backend("reference"):
        return [model.sample(batch, seed=s) for s in range(shards)]


def _naive_scale(model_of):
    """Naive PixelCNN sampling is one full network pass per dimension, of which eager_sample runs NAIVE_STEPS."""
    return lambda size: model_of(torch.device("cpu")).dims / NAIVE_STEPS


def _case(name: str, model_of, batch: int, per_pixel: bool, default: bool = False) -> BenchCase:
    shards = 1 if per_pixel else SHARDS
    return BenchCase(
        name=name,
        family=FAMILY,
        make_inputs=_inputs(model_of, batch, shards),
        genkern=genkern_sample,
        eager=eager_sample,
        shape=lambda size, n=shards * batch: (n,),
        bytes_moved=lambda n, dt: 0,
        default=default,
        compile=False,
        items=lambda size, n=shards * batch: n,
        item_unit="img",
        eager_scale=_naive_scale(model_of) if per_pixel else None,
        max_repeats=3,
        timed="genkern.sample run to files",
        sized=False,
    )


CASES = (
    *(
        _case(f"sample_{name}_b{batch}", functools.partial(_shipped, name), batch, "pixelcnn" in name)
        for name in SHIPPED
        for batch in (64, 256)
    ),
    _case("sample_pixelcnn28_b64", _pixelcnn28, 64, per_pixel=True, default=True),  # the headline
)
