"""Benchmark cases of the diffusion family's training ops, forward pass.

Inputs are image batches: a size N is (N / 3072) samples of 3 x 32 x 32 with per-sample timesteps. The eager
baselines are the code a PyTorch user writes: noise from torch.randn_like, coefficients gathered from the
schedule's alphas_cumprod per sample, and the loss recomputing the target from that noise.
"""
from __future__ import annotations

import torch

import genkern
from genkern.schedules import NoiseSchedule

from ..bench import BenchCase

FAMILY = "diffusion"
_SAMPLE = (3, 32, 32)
_SCHEDULE = NoiseSchedule("cosine")


def _shape(size: int) -> tuple[int, ...]:
    return (max(1, size // (3 * 32 * 32)), *_SAMPLE)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _x0_t(size, device, dtype):
    x0 = torch.randn(_shape(size), device=device, dtype=dtype)
    t = torch.randint(0, 1000, (x0.shape[0],), device=device)
    return x0, t


def _m_x0_t(size, device, dtype):
    x0, t = _x0_t(size, device, dtype)
    return torch.randn_like(x0), x0, t


def _coefficients(t, x):
    ab = _SCHEDULE.alphas_cumprod.to(device=x.device, dtype=x.dtype)[t].reshape(-1, 1, 1, 1)
    return ab.sqrt(), (1 - ab).sqrt()


def eager_q_sample(x0, t):
    a, s = _coefficients(t, x0)
    return a * x0 + s * torch.randn_like(x0)


def eager_diffusion_loss(model_output, x0, t):
    # The user keeps the noise of x_t to compute the loss: it is drawn here, as in a training step.
    noise = torch.randn_like(x0)
    return ((noise - model_output) ** 2).mean()


def genkern_q_sample(x0, t, backend=None):
    return genkern.q_sample(x0, t, _SCHEDULE, backend=backend)


def genkern_diffusion_loss(model_output, x0, t, backend=None):
    return genkern.diffusion_loss(model_output, x0, t, _SCHEDULE, backend=backend)


CASES = (
    BenchCase(
        name="q_sample", family=FAMILY, make_inputs=_x0_t, genkern=genkern_q_sample, eager=eager_q_sample,
        shape=_shape,
        # reads x0, writes x_t; the noise is generated, never read from memory
        bytes_moved=lambda n, dt: 2 * _itemsize(dt) * _shape(n)[0] * 3 * 32 * 32,
    ),
    BenchCase(
        name="diffusion_loss", family=FAMILY, make_inputs=_m_x0_t, genkern=genkern_diffusion_loss,
        eager=eager_diffusion_loss, shape=_shape,
        # reads model_output and x0 (the noise is regenerated, the target never stored)
        bytes_moved=lambda n, dt: 2 * _itemsize(dt) * _shape(n)[0] * 3 * 32 * 32,
    ),
)
