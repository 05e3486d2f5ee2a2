"""What the latent-variable models (VAE, DCGAN, the diffusion sampler of genkern.sample) share: a sample's
noise and its network evaluation keyed by the sample's index, so sample i depends only on (seed, i).

Noise: the latent of sample i is row i % BLOCK of genkern.randn((BLOCK, dim), seed, offset=1 + i // BLOCK)
(an offset is an independent stream, docs/random.md). A window of samples needs at most one partial block
at each end, and element j of a stream depends on j alone, so a prefix of a block is its first rows.

Network: torch's CPU matmuls do not give a row the same bits at every batch size (a batch of 1 goes
through gemv, a batch of 7 through another kernel path than 64). The decoders therefore always run on
aligned groups of GRANULE consecutive indices, [g * GRANULE, (g + 1) * GRANULE): a sample is computed with
the same neighbours whatever the batch, the resume point or the process that draws it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .. import _checks
from ..random import randn, resolve_seed

BLOCK = 4096  # samples per noise stream (offset)
GRANULE = 64  # samples per network evaluation
MAX_INDEX = 1 << 62  # first_sample + n stays below this (offsets and stream elements fit int64)


def check_window(n, first_sample) -> tuple[int, int]:
    n = _checks.int64("n", n, low=0)
    first_sample = _checks.int64("first_sample", first_sample, low=0)
    if first_sample + n > MAX_INDEX:
        raise ValueError(f"first_sample + n must be at most 2^62, got {first_sample} + {n}")
    return n, first_sample


def normals(n: int, dim: int, *, seed: int, first_sample: int = 0, device=None, dtype=torch.float32) -> Tensor:
    """(n, dim) standard normals: row s is the latent of sample first_sample + s (see the module docstring)."""
    n, first_sample = check_window(n, first_sample)
    out = torch.empty(n, dim, device=device, dtype=dtype)
    i, end = first_sample, first_sample + n
    while i < end:
        block, start = divmod(i, BLOCK)
        stop = min(BLOCK, start + end - i)
        rows = randn((stop, dim), seed=seed, offset=1 + block, device=device, dtype=dtype)
        out[i - first_sample : i - first_sample + stop - start] = rows[start:]
        i += stop - start
    return out


def by_granule(n: int, first_sample: int, make: Callable[[int, int], Tensor]) -> Tensor:
    """make(first, count) over the aligned groups of GRANULE indices that cover [first_sample, first_sample + n),
    each called with a whole group, concatenated and cut to the window."""
    if n == 0:
        return make(first_sample, 0)
    lo = first_sample // GRANULE * GRANULE
    hi = -(-(first_sample + n) // GRANULE) * GRANULE
    parts = [make(g, GRANULE) for g in range(lo, hi, GRANULE)]
    return torch.cat(parts)[first_sample - lo : first_sample - lo + n]


def seed_of(seed) -> int:
    return resolve_seed(seed)
