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

import numbers

import torch
from torch import Tensor

from .. import _checks
from .. import backend as _backend
from .._kernels import to_signed
from ..random import check_offset, resolve_seed
from . import _ops, sigma_schedules
from . import reference as _spec
from .dpm_solver import DPMSolverMultistepSampler, dpm_solver_sigmas, dpm_solver_step
from .flow import FlowMatchEulerSampler, flow_euler_step, flow_matching_loss, flow_sample, flow_sigmas
from .k_diffusion import (
    EulerSampler,
    HeunSampler,
    euler_ancestral_step,
    euler_sigmas,
    euler_step,
    heun_step,
    scale_model_input,
)
from .samplers import DDIMSampler, DDPMSampler
from .schedules import NoiseSchedule
from .training import training_loss
from .unipc import UniPCMultistepSampler, unipc_history, unipc_sigmas, unipc_step

__all__ = [
    "DDIMSampler",
    "DDPMSampler",
    "DPMSolverMultistepSampler",
    "EulerSampler",
    "FlowMatchEulerSampler",
    "HeunSampler",
    "NoiseSchedule",
    "UniPCMultistepSampler",
    "ddim_step",
    "ddpm_step",
    "diffusion_loss",
    "dpm_solver_sigmas",
    "dpm_solver_step",
    "euler_ancestral_step",
    "euler_sigmas",
    "euler_step",
    "flow_euler_step",
    "flow_matching_loss",
    "flow_sample",
    "flow_sigmas",
    "heun_step",
    "q_sample",
    "scale_model_input",
    "schedules",
    "sigma_schedules",
    "training_loss",
    "unipc_history",
    "unipc_sigmas",
    "unipc_step",
]

# The public functions normalise their arguments (timesteps to per-sample int64 tensors, names to the kernels'
# codes, options to floats, seeds drawn) and call the op, which checks every value once (genkern.diffusion._ops).


def _batch(name: str, x) -> int:
    """The batch size of tensor x (0 for a 0-dim tensor, which the op then rejects)."""
    _checks.tensor(name, x)
    return x.shape[0] if x.dim() else 0


def _optional_tensor(name: str, x):
    return x if x is None else _checks.tensor(name, x)


def _float(name: str, x) -> float:
    if isinstance(x, (bool, Tensor)) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(x).__name__}")
    return float(x)


def _timestep_tensor(name: str, t, batch: int, device: torch.device) -> tuple[Tensor, list[int] | None]:
    """Per-sample int64 timesteps on the data's device (an int or a 0-d tensor applies to every sample), and
    their values when they are on the host but the data is not: the op reads the values of CPU timesteps only
    (reading a device tensor would synchronise the host), so those are checked here, where it is free."""
    if isinstance(t, Tensor):
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise TypeError(f"{name} must be an int or an integer tensor, got a tensor of dtype {t.dtype}")
        if t.device.type == "meta" and device.type != "meta":
            raise ValueError(f"{name} is a meta tensor (no values) but the data is on {device}")
        values = None
        if device.type != "cpu" and t.device.type == "cpu" and not torch.compiler.is_compiling():
            values = t.reshape(-1).tolist()
        t = t.to(device=device, dtype=torch.int64)
        return (t.expand(batch) if t.dim() == 0 else t).contiguous(), values
    t = _checks.int64(name, t)  # its range is the op's check
    return torch.full((batch,), t, dtype=torch.int64, device=device), ([t] if device.type != "cpu" else None)


def _timesteps(schedule: NoiseSchedule, t, prev_t, batch: int, device: torch.device) -> tuple[Tensor, Tensor | None]:
    """(t, prev_t) as the ops take them; prev_t None stays None."""
    T = schedule.num_train_timesteps
    t, t_values = _timestep_tensor("t", t, batch, device)
    if t_values is not None:
        _ops.check_timestep_values("t", t_values, 0, T - 1)
    if prev_t is None:
        return t, None
    prev_t, prev_values = _timestep_tensor("prev_t", prev_t, batch, device)
    if prev_values is not None:
        _ops.check_timestep_values("prev_t", prev_values, -1, T - 2)
        if t_values is not None:  # an int or a 0-d tensor applies to every sample
            t_values = t_values * len(prev_values) if len(t_values) == 1 else t_values
            prev_values = prev_values * len(t_values) if len(prev_values) == 1 else prev_values
            if len(t_values) == len(prev_values):  # else the op rejects the shapes
                _ops.check_steps_down(t_values, prev_values)
    return t, prev_t


def _noise_args(noise, seed, offset) -> tuple[int, int]:
    offset = check_offset(offset)
    if noise is not None:
        return 0, 0
    return to_signed(resolve_seed(seed)), to_signed(offset)


def q_sample(
    x0: Tensor,
    t,
    schedule: NoiseSchedule,
    *,
    noise: Tensor | None = None,
    seed: int | None = None,
    offset: int = 0,
    backend: str | None = None,
) -> Tensor:
    """x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps in one pass; eps is `noise` or the genkern stream's normals
    for (seed, offset) over x0's shape (element i of x_t uses stream element i)."""
    batch = _batch("x0", x0)
    schedule = _spec.check_schedule(schedule)
    t, _ = _timesteps(schedule, t, None, batch, x0.device)
    noise = _optional_tensor("noise", noise)
    seed, offset = _noise_args(noise, seed, offset)
    return _backend.call(backend, torch.ops.genkern.q_sample, x0, t, schedule.table(x0.device), noise, seed, offset)


def diffusion_loss(
    model_output: Tensor,
    x0: Tensor,
    t,
    schedule: NoiseSchedule,
    *,
    noise: Tensor | None = None,
    seed: int | None = None,
    offset: int = 0,
    prediction_type: str = "epsilon",
    snr_gamma: float | None = None,
    reduction: str = "mean",
    backend: str | None = None,
) -> Tensor:
    """The simplified diffusion loss: per sample, the mean over non-batch dims of (target - model_output)^2,
    target = eps, v or x0 by `prediction_type`, weighted by min-SNR-gamma when `snr_gamma` is set; the mean
    over the batch (reduction='mean') or the (B,) per-sample losses ('none'). With the (seed, offset) given
    to `q_sample`, eps is regenerated inside the kernel. Differentiable w.r.t. model_output (and x0, noise)."""
    _checks.tensor("model_output", model_output)
    batch = _batch("x0", x0)
    schedule = _spec.check_schedule(schedule)
    prediction = _ops.PREDICTIONS.index(_spec.check_choice("prediction_type", prediction_type, _ops.PREDICTIONS))
    snr_gamma = None if snr_gamma is None else _float("snr_gamma", snr_gamma)
    _spec.check_choice("reduction", reduction, _spec.REDUCTIONS)
    t, _ = _timesteps(schedule, t, None, batch, x0.device)
    noise = _optional_tensor("noise", noise)
    seed, offset = _noise_args(noise, seed, offset)
    per_sample = _backend.call(
        backend,
        torch.ops.genkern.diffusion_loss,
        model_output,
        x0,
        t,
        schedule.table(x0.device),
        noise,
        seed,
        offset,
        prediction,
        snr_gamma,
    )
    return per_sample.mean() if reduction == "mean" else per_sample


def _step_options(
    prediction_type,
    clip_sample,
    dynamic_threshold,
    guidance_scale,
    guidance_rescale,
    *,
    variance_type: str = "fixed_small",
    eta=0.0,
    use_clipped_model_output=False,
) -> _ops.StepOptions:
    """The public step arguments as the ops' StepOptions (names to codes, numbers to floats)."""
    if not isinstance(use_clipped_model_output, bool):
        raise TypeError(f"use_clipped_model_output must be a bool, got {type(use_clipped_model_output).__name__}")
    ratio, max_value = None, 1.0
    if dynamic_threshold is not None:
        if (
            isinstance(dynamic_threshold, (str, bytes))
            or not hasattr(dynamic_threshold, "__len__")
            or len(dynamic_threshold) != 2
        ):
            raise TypeError("dynamic_threshold must be a pair (ratio, max_value)")
        ratio = _float("dynamic_threshold ratio", dynamic_threshold[0])
        max_value = _float("dynamic_threshold max_value", dynamic_threshold[1])
    return _ops.StepOptions(
        prediction=_ops.PREDICTIONS.index(_spec.check_choice("prediction_type", prediction_type, _ops.PREDICTIONS)),
        variance=_ops.VARIANCES.index(_spec.check_choice("variance_type", variance_type, _ops.VARIANCES)),
        eta=_float("eta", eta),
        use_clipped_model_output=use_clipped_model_output,
        clip=None if clip_sample is None else _float("clip_sample", clip_sample),
        dynamic_ratio=ratio,
        dynamic_max=max_value,
        guidance_scale=None if guidance_scale is None else _float("guidance_scale", guidance_scale),
        guidance_rescale=_float("guidance_rescale", guidance_rescale),
    )


def _step_noise_args(noise, seed, offset, noisy: bool) -> tuple[int, int]:
    # Without noise to draw, no seed is drawn either: a deterministic step leaves torch's generator alone.
    if noise is None and seed is None and not noisy:
        return 0, to_signed(check_offset(offset))
    return _noise_args(noise, seed, offset)


def _out_buffers(out, sample: Tensor, return_pred_original: bool) -> tuple[Tensor, Tensor | None]:
    """(prev_sample, pred_original) buffers from `out`: a tensor (pred_original then new, if returned), or a
    pair whose second entry may be None (not written). The op checks them against sample."""
    if isinstance(out, Tensor):
        x0 = torch.empty_like(sample, memory_format=torch.contiguous_format) if return_pred_original else None
        return out, x0
    if (
        isinstance(out, (tuple, list))
        and len(out) == 2
        and isinstance(out[0], Tensor)
        and (out[1] is None or isinstance(out[1], Tensor))
    ):
        return out[0], out[1]
    raise TypeError("out must be a tensor or a pair (prev_sample, pred_original or None)")


def _step(
    op,
    op_out,
    model_output: Tensor,
    sample: Tensor,
    t: Tensor,
    prev_t: Tensor | None,
    schedule: NoiseSchedule,
    noise,
    seed: int,
    offset: int,
    options: _ops.StepOptions,
    return_pred_original,
    out,
    backend,
) -> tuple[Tensor, Tensor | None]:
    floats, codes = options.pack()
    args = (model_output, sample, t, prev_t, schedule.table(sample.device), noise, seed, offset, floats, codes)
    if out is not None:
        prev, x0 = _out_buffers(out, sample, return_pred_original)
        _backend.call(backend, op_out, *args, prev, x0)
        return prev, x0
    prev, x0 = _backend.call(backend, op, *args, bool(return_pred_original))
    return prev, (x0 if return_pred_original else None)


def ddpm_step(
    model_output: Tensor,
    t,
    sample: Tensor,
    schedule: NoiseSchedule,
    *,
    prev_t=None,
    variance_type: str = "fixed_small",
    prediction_type: str = "epsilon",
    clip_sample: float | None = None,
    dynamic_threshold: tuple[float, float] | None = None,
    noise: Tensor | None = None,
    seed: int | None = None,
    offset: int = 0,
    guidance_scale: float | None = None,
    guidance_rescale: float = 0.0,
    return_pred_original: bool = True,
    out=None,
    backend: str | None = None,
) -> tuple[Tensor, Tensor | None]:
    """One ancestral DDPM step x_t -> x_prev in one pass; returns (prev_sample, pred_original_sample).

    prev_t defaults to t - 1 (strided steps: alpha' = ab_t / ab_prev); variance_type fixed_small, fixed_large
    or learned_range (model_output has 2C channels, the second half interpolating log sigma^2); no noise
    where t = 0. With guidance_scale, model_output has batch 2B (unconditional half first) and the kernel
    combines u + s (c - u); guidance_rescale and dynamic_threshold take a per-sample pre-pass.
    return_pred_original=False skips writing x0_hat (returns None in its place). `out`: a tensor for
    prev_sample, or a pair (prev_sample, pred_original) (pred_original may be None), contiguous, of sample's
    shape, dtype and device, written instead of new tensors; prev_sample may be `sample` itself (an in-place
    update). See genkern.diffusion.reference.ddpm_step for the definition."""
    _checks.tensor("model_output", model_output)
    batch = _batch("sample", sample)
    schedule = _spec.check_schedule(schedule)
    options = _step_options(
        prediction_type, clip_sample, dynamic_threshold, guidance_scale, guidance_rescale, variance_type=variance_type
    )
    t, prev_t = _timesteps(schedule, t, prev_t, batch, sample.device)
    noise = _optional_tensor("noise", noise)
    seed, offset = _noise_args(noise, seed, offset)
    ops = torch.ops.genkern.ddpm_step, torch.ops.genkern.ddpm_step_out
    args = (model_output, sample, t, prev_t, schedule, noise, seed, offset, options, return_pred_original, out)
    return _step(*ops, *args, backend)


def ddim_step(
    model_output: Tensor,
    t,
    sample: Tensor,
    schedule: NoiseSchedule,
    *,
    prev_t=None,
    eta: float = 0.0,
    prediction_type: str = "epsilon",
    clip_sample: float | None = None,
    dynamic_threshold: tuple[float, float] | None = None,
    use_clipped_model_output: bool = False,
    noise: Tensor | None = None,
    seed: int | None = None,
    offset: int = 0,
    guidance_scale: float | None = None,
    guidance_rescale: float = 0.0,
    return_pred_original: bool = True,
    out=None,
    backend: str | None = None,
) -> tuple[Tensor, Tensor | None]:
    """One DDIM step x_t -> x_prev (Song et al. 2021, eq. 12) in one pass; returns (prev_sample,
    pred_original_sample).

    prev_t is required: the next entry of the inference timesteps, schedule.timesteps(N, spacing)[1][i]
    (-1 after the last step). Noise (eta > 0 only) is `noise` or the genkern stream for (seed, offset).
    Guidance, thresholding, return_pred_original and `out` as in ddpm_step. See genkern.diffusion.reference.ddim_step
    for the definition and where diffusers' DDIMScheduler differs."""
    if prev_t is None:
        raise ValueError(
            "prev_t is required for ddim_step: the next entry of the inference timesteps "
            "(schedule.timesteps(num_steps, spacing)[1]), -1 after the last step"
        )
    _checks.tensor("model_output", model_output)
    batch = _batch("sample", sample)
    schedule = _spec.check_schedule(schedule)
    options = _step_options(
        prediction_type,
        clip_sample,
        dynamic_threshold,
        guidance_scale,
        guidance_rescale,
        eta=eta,
        use_clipped_model_output=use_clipped_model_output,
    )
    t, prev_t = _timesteps(schedule, t, prev_t, batch, sample.device)
    noise = _optional_tensor("noise", noise)
    seed, offset = _step_noise_args(noise, seed, offset, options.eta > 0)
    ops = torch.ops.genkern.ddim_step, torch.ops.genkern.ddim_step_out
    args = (model_output, sample, t, prev_t, schedule, noise, seed, offset, options, return_pred_original, out)
    return _step(*ops, *args, backend)


def _prepared_step(
    kind: str,
    schedule: NoiseSchedule,
    t_rows: Tensor,
    prev_rows: Tensor,
    *,
    seed: int,
    prediction_type: str,
    clip_sample,
    dynamic_threshold,
    guidance_scale,
    guidance_rescale,
    backend: str | None,
    **kind_options,
) -> _ops.PreparedStep:
    """A sampling loop's step with its options normalised once: step(model_output, sample, i) -> prev_sample,
    step i of the (steps, B) timestep rows t_rows -> prev_rows (see genkern.diffusion._ops.PreparedStep)."""
    options = _step_options(
        prediction_type, clip_sample, dynamic_threshold, guidance_scale, guidance_rescale, **kind_options
    )
    return _ops.PreparedStep(
        _ops.DDPM if kind == "ddpm" else _ops.DDIM,
        schedule.table(t_rows.device),
        to_signed(seed),
        options,
        t_rows,
        prev_rows,
        backend,
    )
