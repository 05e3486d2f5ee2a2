"""Fused diffusion ops, training side (the denoising steps and samplers follow the same pattern).

    schedule = genkern.schedules.NoiseSchedule("cosine")
    t = torch.randint(0, 1000, (B,))
    x_t = genkern.q_sample(x0, t, schedule, seed=s)                        # one pass, noise drawn in-kernel
    loss = genkern.diffusion_loss(model(x_t, t), x0, t, schedule, seed=s)  # regenerates that noise

Neither the noise nor the target is ever stored: the same (seed, offset) regenerates the noise inside the
loss kernel (and its backward). Timesteps are ints or per-sample integer tensors; the coefficients are read
inside the kernels from the schedule's table on the data's device. The readable definitions are in
genkern.reference.diffusion.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import backend as _backend
from .ops import diffusion as _ops  # noqa: F401  (registers the genkern:: ops)
from .ops._backends import to_signed
from .random import check_offset, resolve_seed
from .reference import diffusion as _spec
from .schedules import NoiseSchedule


def _timesteps(t, batch: int, device: torch.device) -> Tensor:
    """Per-sample int64 timesteps on the data's device (an int or a 0-d tensor applies to every sample)."""
    if isinstance(t, Tensor):
        return t.to(device=device, dtype=torch.int64).expand(batch).contiguous() if t.dim() == 0 else \
            t.to(device=device, dtype=torch.int64).contiguous()
    return torch.full((batch,), int(t), dtype=torch.int64, device=device)


def _check_values(t) -> bool:
    # Reading a GPU tensor's values would synchronise the host, and under torch.compile it cannot be traced:
    # there the kernels clamp the table index instead (no memory outside the table is ever read), and range
    # errors are raised for eager CPU timesteps only.
    if not isinstance(t, Tensor):
        return True
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def _noise_args(noise, seed, offset) -> tuple[int, int]:
    offset = check_offset(offset)
    if noise is not None:
        return 0, 0
    return to_signed(resolve_seed(seed)), to_signed(offset)


def q_sample(x0: Tensor, t, schedule: NoiseSchedule, *, noise: Tensor | None = None, seed: int | None = None,
             offset: int = 0, backend: str | None = None) -> Tensor:
    """x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps in one pass; eps is `noise` or the genkern stream's normals
    for (seed, offset) over x0's shape (element i of x_t uses stream element i)."""
    _spec.check_q_sample_args(x0, t, schedule, noise, 0 if seed is None else seed, offset,
                              check_values=_check_values(t))
    name = _backend.resolve(backend, x0.device, x0.dtype)
    seed, offset = _noise_args(noise, seed, offset)
    return torch.ops.genkern.q_sample(x0, _timesteps(t, x0.shape[0], x0.device), schedule.table(x0.device), noise,
                                      seed, offset, name)


def diffusion_loss(model_output: Tensor, x0: Tensor, t, schedule: NoiseSchedule, *, noise: Tensor | None = None,
                   seed: int | None = None, offset: int = 0, prediction_type: str = "epsilon",
                   snr_gamma: float | None = None, reduction: str = "mean", backend: str | None = None) -> Tensor:
    """The simplified diffusion loss: per sample, the mean over non-batch dims of (target - model_output)^2,
    target = eps, v or x0 by `prediction_type`, weighted by min-SNR-gamma when `snr_gamma` is set; the mean
    over the batch (reduction='mean') or the (B,) per-sample losses ('none'). With the (seed, offset) given
    to `q_sample`, eps is regenerated inside the kernel. Differentiable w.r.t. model_output (and x0, noise)."""
    _spec.check_loss_args(model_output, x0, t, schedule, noise, 0 if seed is None else seed, offset,
                          prediction_type, snr_gamma, reduction, check_values=_check_values(t))
    name = _backend.resolve(backend, x0.device, x0.dtype)
    seed, offset = _noise_args(noise, seed, offset)
    per_sample = torch.ops.genkern.diffusion_loss(
        model_output, x0, _timesteps(t, x0.shape[0], x0.device), schedule.table(x0.device), noise, seed, offset,
        _ops.PREDICTIONS.index(prediction_type), float(snr_gamma or 0.0), name,
    )
    return per_sample.mean() if reduction == "mean" else per_sample
