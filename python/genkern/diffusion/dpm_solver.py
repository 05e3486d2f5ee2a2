"""DPM-Solver++ (Lu et al. 2022; docs/math.md 5.3) on a model trained with a NoiseSchedule: the multistep
solver of order 1 or 2 (2M, midpoint or heun), its SDE variant, with diffusers' sigma schedules
(DPMSolverMultistepScheduler with algorithm_type "dpmsolver++" or "sde-dpmsolver++").

    sampler = genkern.diffusion.DPMSolverMultistepSampler(schedule, use_karras_sigmas=True)
    x = sampler.sample(unet, (B, C, H, W), 20, seed=0, guidance_scale=7.5)

Every step is one fused kernel (genkern::dpm_solver_step, csrc/diffusion/dpm_solver_math.h): it converts the
model output to the data prediction x0_hat, thresholds it, combines it with the previous one, which it reads
from the sampler's history tensor and overwrites in the same pass, and (SDE) adds noise drawn in the kernel.
The step's coefficients come from the loop's sigma table on the device, indexed by per-sample step indices, so
the loop reads nothing back from the device and can be captured in a CUDA graph.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .. import _checks
from .. import backend as _backend
from .._kernels import to_signed, to_unsigned
from ..random import check_offset, resolve_seed
from . import (
    _ops,
    _solver_ops,  # noqa: F401 - registers genkern::dpm_solver_step
    sigma_schedules,
)
from . import reference as _spec
from .flow import loop_start
from .k_diffusion import SPACINGS, _sigma_to_t
from .samplers import _check_flag
from .schedules import NoiseSchedule

__all__ = ["DPMSolverMultistepSampler", "dpm_solver_sigmas", "dpm_solver_step"]

ALGORITHMS = ("dpmsolver++", "sde-dpmsolver++")


def _train_sigmas(schedule: NoiseSchedule) -> np.ndarray:
    """sqrt((1 - ab) / ab) of every training timestep from float32 alpha-bars, as diffusers holds them."""
    ab = schedule.alpha_cumprod(torch.arange(schedule.num_train_timesteps)).to(torch.float32)
    return (((1 - ab) / ab) ** 0.5).numpy()


def dpm_solver_sigmas(
    schedule: NoiseSchedule,
    num_steps: int,
    *,
    spacing: str = "linspace",
    steps_offset: int = 0,
    sigma_schedule: str | None = None,
    final_sigma: str = "zero",
) -> tuple[Tensor, Tensor]:
    """(sigmas, timesteps) of diffusers' DPMSolverMultistepScheduler.set_timesteps: float32 k-diffusion sigmas
    (num_steps + 1,), the last one 0 or (final_sigma="sigma_min") the smallest training sigma, and the model's
    int64 timesteps (num_steps,). sigma_schedule None: the training sigmas interpolated at the spaced timesteps;
    "karras", "exponential" or "beta": that ramp between the largest and the smallest training sigma, the
    timesteps interpolated back from the sigmas (rounded for karras unless the schedule is cosine, then
    truncated to integers, as diffusers does)."""
    schedule = _spec.check_schedule(schedule)
    N = _checks.integer("num_steps", num_steps, low=1)
    spacing = _spec.check_choice("spacing", spacing, SPACINGS)
    steps_offset = _checks.integer("steps_offset", steps_offset, low=0)
    if sigma_schedule is not None:
        _spec.check_choice("sigma_schedule", sigma_schedule, sigma_schedules.SIGMA_SCHEDULES)
    final_sigma = _spec.check_choice("final_sigma", final_sigma, ("zero", "sigma_min"))
    T = schedule.num_train_timesteps
    if N > T:
        raise ValueError(f"num_steps must be at most the schedule's {T} training timesteps, got {N}")
    if spacing == "linspace":
        timesteps = np.linspace(0, T - 1, N + 1).round()[::-1][:-1].copy().astype(np.int64)
    elif spacing == "leading":
        ratio = T // (N + 1)
        timesteps = (np.arange(0, N + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64) + steps_offset
    else:
        timesteps = np.arange(T, 0, -T / N).round().copy().astype(np.int64) - 1
    train = _train_sigmas(schedule)
    if sigma_schedule is None:
        sigmas = np.interp(timesteps, np.arange(0, len(train)), train)
    else:
        desc = np.flip(train).copy()
        sigmas = sigma_schedules.ramp(sigma_schedule, desc[-1].item(), desc[0].item(), N)
        timesteps = _sigma_to_t(sigmas, np.log(train))
        if sigma_schedule == "karras" and schedule._schedule != "cosine":  # diffusers' squaredcos_cap_v2 exception
            timesteps = timesteps.round()
    last = train[0] if final_sigma == "sigma_min" else 0.0
    sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
    return torch.from_numpy(sigmas), torch.from_numpy(np.asarray(timesteps)).to(torch.int64)


def _codes(prediction_type: str, solver_type: str, algorithm_type: str) -> tuple[int, int, bool]:
    prediction = _ops.PREDICTIONS.index(_spec.check_choice("prediction_type", prediction_type, _ops.PREDICTIONS))
    solver = _spec.DPM_SOLVER_TYPES.index(_spec.check_choice("solver_type", solver_type, _spec.DPM_SOLVER_TYPES))
    sde = _spec.check_choice("algorithm_type", algorithm_type, ALGORITHMS) == "sde-dpmsolver++"
    return prediction, solver, sde


def _step_tensor(step, like: Tensor) -> Tensor:
    """A step index (an int, or a (B,) integer tensor) as int64 (B,) on like's device."""
    if isinstance(step, Tensor):
        if step.dtype.is_floating_point or step.dtype == torch.bool:
            raise TypeError(f"step must be an int or an integer tensor, got a tensor of dtype {step.dtype}")
        if step.numel() not in (1, like.shape[0]) or step.dim() > 1:
            raise ValueError(f"step must be an int or a ({like.shape[0]},) tensor, got shape {tuple(step.shape)}")
        return step.to(device=like.device, dtype=torch.int64).reshape(-1).expand(like.shape[0]).contiguous()
    step = _checks.integer("step", step, low=0)
    return torch.full((like.shape[0],), step, dtype=torch.int64, device=like.device)


def dpm_solver_step(
    model_output: Tensor,
    sigmas: Tensor,
    step,
    sample: Tensor,
    history: Tensor,
    *,
    prediction_type: str = "epsilon",
    solver_type: str = "midpoint",
    solver_order: int = 2,
    algorithm_type: str = "dpmsolver++",
    final_first_order: bool = True,
    noise: Tensor | None = None,
    seed: int | None = None,
    offset: int = 0,
    guidance_scale: float | None = None,
    guidance_rescale: float = 0.0,
    dynamic_threshold: tuple[float, float] | None = None,
    backend: str | None = None,
) -> Tensor:
    """DPMSolverMultistepScheduler.step (dpmsolver++ or sde-dpmsolver++, solver_order 1 or 2), fused: step
    `step` (an int or per-sample (B,) indices) of the loop whose sigmas are `sigmas` (dpm_solver_sigmas' float32
    table). `history` (sample's shape) holds the previous step's data prediction and is overwritten with this
    step's, in the same pass; its contents are not read on a first-order step (step 0, and the last step when
    final_first_order: diffusers' lower_order_final with fewer than 15 steps, euler_at_final, or a final sigma
    of 0). SDE noise: `noise` or the genkern stream for (seed, offset), drawn in the kernel. dynamic_threshold:
    (ratio, max_value), diffusers' thresholding. Returns prev_sample."""
    prediction, solver, sde = _codes(prediction_type, solver_type, algorithm_type)
    _spec.check_guidance(guidance_scale, guidance_rescale)
    _spec.check_threshold(None, dynamic_threshold)
    _check_flag("final_first_order", final_first_order)
    for name, t in (("model_output", model_output), ("sample", sample), ("history", history), ("sigmas", sigmas)):
        _checks.tensor(name, t)
    if noise is not None:
        _checks.tensor("noise", noise)
    _checks.integer("solver_order", solver_order)
    if sigmas.is_meta and not sample.is_meta:
        raise ValueError("sigmas must hold values (dpm_solver_sigmas' table), got a meta tensor")
    draws = sde and noise is None
    seed = to_signed(resolve_seed(seed)) if draws else 0
    offset = to_signed(check_offset(offset)) if draws else 0
    sigmas_d = sigmas.to(sample.device)
    ratio, max_value = (None, 1.0) if dynamic_threshold is None else map(float, dynamic_threshold)
    args = (model_output, sample, history, sigmas_d, _step_tensor(step, sample), noise, seed, offset, prediction)
    options = (solver, int(solver_order), sde, bool(final_first_order))
    scale = None if guidance_scale is None else float(guidance_scale)
    op = torch.ops.genkern.dpm_solver_step
    return _backend.call(backend, op, *args, *options, scale, float(guidance_rescale), ratio, max_value)


class DPMSolverMultistepSampler:
    """DPM-Solver++ sampling (2M by default; algorithm_type="sde-dpmsolver++" for its SDE variant) of a model
    trained on `schedule`, with DPMSolverMultistepScheduler's options of the same names.

    model(x, t, **model_kwargs) gets the int64 timesteps of dpm_solver_sigmas as a (B,) tensor (the model sees
    x itself: diffusers' scale_model_input is the identity here); with guidance_scale, model(cat([x, x]),
    cat([t, t])) and model_kwargs of batch 2B. x_T is the genkern stream's randn(shape) at offset 0 for `seed`;
    step i draws its SDE noise at offset i + 1, so sample b depends only on (seed, b). The data prediction of
    the previous step lives in a device tensor of the loop, read and written by each step's kernel: nothing is
    read back from the device, and cuda_graph=True captures the whole loop once per configuration."""

    def __init__(
        self,
        schedule: NoiseSchedule,
        *,
        prediction_type: str = "epsilon",
        solver_order: int = 2,
        solver_type: str = "midpoint",
        algorithm_type: str = "dpmsolver++",
        lower_order_final: bool = True,
        euler_at_final: bool = False,
        use_karras_sigmas: bool = False,
        sigma_schedule: str | None = None,
        final_sigma: str = "zero",
        spacing: str = "linspace",
        steps_offset: int = 0,
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        backend: str | None = None,
    ):
        self.schedule = _spec.check_schedule(schedule)
        self.prediction, self.solver, self.sde = _codes(prediction_type, solver_type, algorithm_type)
        self.order = _checks.integer("solver_order", solver_order, low=1)
        if self.order > 2:
            raise ValueError(f"solver_order must be 1 or 2 (3M is not implemented), got {solver_order}")
        for name, flag in (("lower_order_final", lower_order_final), ("euler_at_final", euler_at_final),
                           ("use_karras_sigmas", use_karras_sigmas), ("thresholding", thresholding)):  # fmt: skip
            _check_flag(name, flag)
        if use_karras_sigmas and sigma_schedule not in (None, "karras"):
            raise ValueError(f"use_karras_sigmas=True conflicts with sigma_schedule={sigma_schedule!r}")
        self.lower_order_final, self.euler_at_final = lower_order_final, euler_at_final
        self.options = dict(
            spacing=spacing,
            steps_offset=steps_offset,
            sigma_schedule="karras" if use_karras_sigmas else sigma_schedule,
            final_sigma=final_sigma,
        )
        dpm_solver_sigmas(self.schedule, 1, **self.options)  # checks the options
        self.dynamic_threshold = (dynamic_thresholding_ratio, sample_max_value) if thresholding else None
        _spec.check_threshold(None, self.dynamic_threshold)
        self.backend = backend
        self._graphs: dict = {}

    def _final_first_order(self, num_steps: int) -> bool:
        """diffusers' lower_order_final condition of the last step."""
        return (
            self.euler_at_final or (self.lower_order_final and num_steps < 15) or self.options["final_sigma"] == "zero"
        )

    @torch.no_grad()
    def sample(
        self,
        model,
        shape,
        num_steps: int = 20,
        *,
        seed: int | None = None,
        guidance_scale: float | None = None,
        guidance_rescale: float = 0.0,
        model_kwargs: dict | None = None,
        x_T: Tensor | None = None,
        device=None,
        dtype: torch.dtype = torch.float32,
        cuda_graph: bool = False,
    ) -> Tensor:
        model_kwargs, seed, shape, x = loop_start(
            model, shape, seed, guidance_scale, guidance_rescale, model_kwargs, x_T, device, dtype, self.backend
        )

        def make_loop():
            return _DpmLoop(self, model, num_steps, shape[0], x.device, guidance_scale, guidance_rescale, seed)

        key = (num_steps, guidance_scale, guidance_rescale, seed if self.sde else None)
        return _solver_ops.run_loop(self, make_loop, model, x, model_kwargs, cuda_graph, key)

    def clear_cuda_graphs(self) -> None:
        """Release the captured graphs (and the memory pools they hold)."""
        self._graphs.clear()


class _DpmLoop:
    """One DPM-Solver++ run from x_T: the sigma table, the per-step index rows and the history built once."""

    def __init__(self, sampler, model, num_steps, batch, device, guidance_scale, guidance_rescale, seed):
        self.sampler, self.model = sampler, model
        sigmas, timesteps = dpm_solver_sigmas(sampler.schedule, num_steps, **sampler.options)
        self.sigmas = sigmas.to(device)
        self.steps = torch.arange(num_steps, device=device)[:, None].expand(-1, batch).contiguous()
        t_model = timesteps.to(device)[:, None].expand(-1, batch).contiguous()
        self.t_model = t_model.repeat(1, 2) if guidance_scale is not None else t_model
        self.guidance_scale = None if guidance_scale is None else float(guidance_scale)
        self.guidance_rescale = float(guidance_rescale)
        self.seed = to_signed(seed)
        self.final_first_order = sampler._final_first_order(num_steps)
        ratio, max_value = (None, 1.0) if sampler.dynamic_threshold is None else sampler.dynamic_threshold
        self.threshold = (None if ratio is None else float(ratio), float(max_value))

    def __call__(self, x: Tensor, model_kwargs: dict) -> Tensor:
        s = self.sampler
        history = torch.empty_like(x)  # step 0 is first order: it writes the history before any step reads it
        op = torch.ops.genkern.dpm_solver_step
        options = (s.prediction, s.solver, s.order, s.sde, self.final_first_order, self.guidance_scale,
                   self.guidance_rescale, *self.threshold)  # fmt: skip
        # The kernel's own codes; rescale factors and thresholds are pre-passes only the op computes.
        pre_pass = self.guidance_rescale != 0.0 or self.threshold[0] is not None
        steps = _solver_ops.LoopSteps(s.backend, x, native=not pre_pass)
        codes = (s.prediction, s.solver, s.order, s.sde, self.final_first_order, self.guidance_scale is not None,
                 _ops._or_zero(self.guidance_scale), to_unsigned(self.seed))  # fmt: skip
        for i in range(self.steps.shape[0]):
            x_in = torch.cat([x, x]) if self.guidance_scale is not None else x
            m = self.model(x_in, self.t_model[i], **model_kwargs)

            def op_call(m=m, x=x, i=i):
                args = (m, x, history, self.sigmas, self.steps[i], None, self.seed, i + 1)
                return _backend.call(s.backend, op, *args, *options)

            def native_call(m=m, x=x, i=i):
                prev = torch.empty_like(x)
                args = (m.contiguous(), x, None, history, self.sigmas, self.steps[i], None, None, prev)
                return _solver_ops.launch_native("dpm_step", prev, *args, *codes[:7], codes[7], i + 1)

            x = steps(op_call, native_call, m, x)
        return x
