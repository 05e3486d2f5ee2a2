"""Fused diffusion ops: noising and the loss for training, DDPM and DDIM steps for sampling.

    schedule = genkern.diffusion.schedules.NoiseSchedule("cosine")
    t = torch.randint(0, 1000, (B,))
    x_t = genkern.q_sample(x0, t, schedule, seed=s)                        # one pass, noise drawn in-kernel
    loss = genkern.diffusion_loss(model(x_t, t), x0, t, schedule, seed=s)  # regenerates that noise

    timesteps, prev_timesteps = schedule.timesteps(50, spacing="trailing")
    for i, t in enumerate(timesteps.tolist()):
        x, x0_hat = genkern.ddim_step(model(x, t), t, x, schedule, prev_t=int(prev_timesteps[i]))

Neither the noise nor the target is ever stored: the same (seed, offset) regenerates the noise inside the
loss kernel (and its backward). Timesteps are ints or per-sample integer tensors; the coefficients are read
inside the kernels from the schedule's table on the data's device, so a step never synchronises with the
host and a captured CUDA graph replays with new timesteps written into its timestep tensors. The readable
definitions, and where they differ from diffusers, are in genkern.diffusion.reference.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _checks
from .. import backend as _backend
from . import _ops
from .._kernels import to_signed
from ..random import check_offset, resolve_seed
from . import reference as _spec
from .schedules import NoiseSchedule
from .samplers import DDIMSampler, DDPMSampler
from .training import training_loss

__all__ = ["DDIMSampler", "DDPMSampler", "ddim_step", "ddpm_step", "diffusion_loss", "q_sample", "training_loss"]


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


def _optional_timesteps(t, batch: int, device: torch.device) -> Tensor | None:
    return None if t is None else _timesteps(t, batch, device)


def _step_options(schedule, sample, t, prev_t, prediction_type, clip_sample, dynamic_threshold, guidance_scale,
                  guidance_rescale):
    """The arguments the step ops share, in their order after (model_output, sample)."""
    B, device = sample.shape[0], sample.device
    ratio, max_value = (None, 1.0) if dynamic_threshold is None else map(float, dynamic_threshold)
    return dict(t=_timesteps(t, B, device), prev_t=_optional_timesteps(prev_t, B, device),
                table=schedule.table(device), prediction=_ops.PREDICTIONS.index(prediction_type),
                clip=None if clip_sample is None else float(clip_sample), dynamic_ratio=ratio, dynamic_max=max_value,
                guidance_scale=None if guidance_scale is None else float(guidance_scale),
                guidance_rescale=float(guidance_rescale))


def _step_noise_args(noise, seed, offset, noisy: bool) -> tuple[int, int]:
    # Without noise to draw, no seed is drawn either: a deterministic step leaves torch's generator alone.
    if noise is None and seed is None and not noisy:
        return 0, to_signed(check_offset(offset))
    return _noise_args(noise, seed, offset)


def _check_out(out, sample: Tensor, return_pred_original: bool) -> tuple[Tensor, Tensor | None]:
    """(prev_sample, pred_original) buffers from `out`: a tensor (pred_original then new, if returned), or a
    pair whose second entry may be None (not written)."""
    if isinstance(out, Tensor):
        prev = out
        x0 = torch.empty_like(sample, memory_format=torch.contiguous_format) if return_pred_original else None
    elif isinstance(out, (tuple, list)) and len(out) == 2 and isinstance(out[0], Tensor):
        prev, x0 = out
    else:
        raise TypeError("out must be a tensor or a pair (prev_sample, pred_original or None)")
    for name, x in (("out prev_sample", prev), ("out pred_original", x0)):
        if x is not None:
            _checks.like(name, x, "sample", sample)
            if not x.is_contiguous():
                raise ValueError(f"{name} must be contiguous")
    if x0 is not None and x0.numel() and x0.data_ptr() == prev.data_ptr():
        raise ValueError("out prev_sample and pred_original must be different tensors")
    return prev, x0


def ddpm_step(model_output: Tensor, t, sample: Tensor, schedule: NoiseSchedule, *, prev_t=None,
              variance_type: str = "fixed_small", prediction_type: str = "epsilon", clip_sample: float | None = None,
              dynamic_threshold: tuple[float, float] | None = None, noise: Tensor | None = None,
              seed: int | None = None, offset: int = 0, guidance_scale: float | None = None,
              guidance_rescale: float = 0.0, return_pred_original: bool = True, out=None,
              backend: str | None = None) -> tuple[Tensor, Tensor | None]:
    """One ancestral DDPM step x_t -> x_prev in one pass; returns (prev_sample, pred_original_sample).

    prev_t defaults to t - 1 (strided steps: alpha' = ab_t / ab_prev); variance_type fixed_small, fixed_large
    or learned_range (model_output has 2C channels, the second half interpolating log sigma^2); no noise
    where t = 0. With guidance_scale, model_output has batch 2B (unconditional half first) and the kernel
    combines u + s (c - u); guidance_rescale and dynamic_threshold take a per-sample pre-pass.
    return_pred_original=False skips writing x0_hat (returns None in its place). `out`: a tensor for
    prev_sample, or a pair (prev_sample, pred_original) (pred_original may be None), contiguous, of sample's
    shape, dtype and device, written instead of new tensors; prev_sample may be `sample` itself (an in-place
    update). See genkern.diffusion.reference.ddpm_step for the definition."""
    _spec.check_ddpm_args(model_output, t, sample, schedule, prev_t, variance_type, prediction_type, clip_sample,
                          dynamic_threshold, noise, 0 if seed is None else seed, offset, guidance_scale,
                          guidance_rescale, check_values=_check_values(t) and _check_values(prev_t))
    name = _backend.resolve(backend, sample.device, sample.dtype)
    seed, offset = _noise_args(noise, seed, offset)
    o = _step_options(schedule, sample, t, prev_t, prediction_type, clip_sample, dynamic_threshold, guidance_scale,
                      guidance_rescale)
    args = (model_output, sample, o["t"], o["prev_t"], o["table"], noise, seed, offset, o["prediction"],
            _ops.VARIANCES.index(variance_type), o["clip"], o["dynamic_ratio"], o["dynamic_max"],
            o["guidance_scale"], o["guidance_rescale"], name)
    if out is not None:
        prev, x0 = _check_out(out, sample, return_pred_original)
        torch.ops.genkern.ddpm_step_out(*args, prev, x0)
        return prev, x0
    prev, x0 = torch.ops.genkern.ddpm_step(*args, bool(return_pred_original))
    return prev, (x0 if return_pred_original else None)


def ddim_step(model_output: Tensor, t, sample: Tensor, schedule: NoiseSchedule, *, prev_t=None, eta: float = 0.0,
              prediction_type: str = "epsilon", clip_sample: float | None = None,
              dynamic_threshold: tuple[float, float] | None = None, use_clipped_model_output: bool = False,
              noise: Tensor | None = None, seed: int | None = None, offset: int = 0,
              guidance_scale: float | None = None, guidance_rescale: float = 0.0, return_pred_original: bool = True,
              out=None, backend: str | None = None) -> tuple[Tensor, Tensor | None]:
    """One DDIM step x_t -> x_prev (Song et al. 2021, eq. 12) in one pass; returns (prev_sample,
    pred_original_sample).

    prev_t is required: the next entry of the inference timesteps, schedule.timesteps(N, spacing)[1][i]
    (-1 after the last step). Noise (eta > 0 only) is `noise` or the genkern stream for (seed, offset).
    Guidance, thresholding, return_pred_original and `out` as in ddpm_step. See genkern.diffusion.reference.ddim_step
    for the definition and where diffusers' DDIMScheduler differs."""
    _spec.check_ddim_args(model_output, t, sample, schedule, prev_t, eta, prediction_type, clip_sample,
                          dynamic_threshold, use_clipped_model_output, noise, 0 if seed is None else seed, offset,
                          guidance_scale, guidance_rescale, check_values=_check_values(t) and _check_values(prev_t))
    name = _backend.resolve(backend, sample.device, sample.dtype)
    seed, offset = _step_noise_args(noise, seed, offset, float(eta) > 0)
    o = _step_options(schedule, sample, t, prev_t, prediction_type, clip_sample, dynamic_threshold, guidance_scale,
                      guidance_rescale)
    args = (model_output, sample, o["t"], o["prev_t"], o["table"], noise, seed, offset, o["prediction"], float(eta),
            bool(use_clipped_model_output), o["clip"], o["dynamic_ratio"], o["dynamic_max"], o["guidance_scale"],
            o["guidance_rescale"], name)
    if out is not None:
        prev, x0 = _check_out(out, sample, return_pred_original)
        torch.ops.genkern.ddim_step_out(*args, prev, x0)
        return prev, x0
    prev, x0 = torch.ops.genkern.ddim_step(*args, bool(return_pred_original))
    return prev, (x0 if return_pred_original else None)


def _prepared_step(kind: str, model_output: Tensor, sample: Tensor, schedule: NoiseSchedule, *, seed: int,
                   prediction_type: str, clip_sample, dynamic_threshold, guidance_scale, guidance_rescale,
                   backend: str | None, **kind_options):
    """A sampling loop's step with every argument checked once, from the first step's tensors: returns
    step(model_output, sample, t, prev_t, offset) -> prev_sample, which calls the op directly. The loop's
    later steps have the same shapes, dtypes and options, and timesteps taken from the schedule, so the
    public functions' per-call checks (about half of a small step's cost on the CPU) would only repeat."""
    t0 = torch.zeros(sample.shape[0], dtype=torch.int64, device=sample.device)
    options = dict(prediction_type=prediction_type, clip_sample=clip_sample, dynamic_threshold=dynamic_threshold,
                   seed=seed, guidance_scale=guidance_scale, guidance_rescale=guidance_rescale)
    if kind == "ddpm":
        _spec.check_ddpm_args(model_output, t0, sample, schedule, None, kind_options["variance_type"], **options,
                              check_values=False)
    else:
        _spec.check_ddim_args(model_output, t0, sample, schedule, t0 - 1, kind_options["eta"], prediction_type,
                              clip_sample, dynamic_threshold, kind_options["use_clipped_model_output"], None, seed,
                              0, guidance_scale, guidance_rescale, check_values=False)
    name = _backend.resolve(backend, sample.device, sample.dtype)
    o = _step_options(schedule, sample, t0, None, prediction_type, clip_sample, dynamic_threshold, guidance_scale,
                      guidance_rescale)
    shared = (o["table"], None, to_signed(seed))
    tail = (o["clip"], o["dynamic_ratio"], o["dynamic_max"], o["guidance_scale"], o["guidance_rescale"], name, False)
    if kind == "ddpm":
        variance = _ops.VARIANCES.index(kind_options["variance_type"])

        def step(model_output: Tensor, sample: Tensor, t: Tensor, prev_t: Tensor, offset: int) -> Tensor:
            return torch.ops.genkern.ddpm_step(model_output, sample, t, prev_t, *shared, offset, o["prediction"],
                                               variance, *tail)[0]
    else:
        eta, clipped = float(kind_options["eta"]), bool(kind_options["use_clipped_model_output"])

        def step(model_output: Tensor, sample: Tensor, t: Tensor, prev_t: Tensor, offset: int) -> Tensor:
            return torch.ops.genkern.ddim_step(model_output, sample, t, prev_t, *shared, offset, o["prediction"], eta,
                                               clipped, *tail)[0]
    return step
