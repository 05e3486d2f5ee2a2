"""UniPC (Zhao et al. 2023; docs/math.md 5.5) on a model trained with a NoiseSchedule: the data-prediction
multistep predictor-corrector of order 1 or 2 with the B(h) variants bh1 and bh2, with diffusers' sigma
schedules (UniPCMultistepScheduler with predict_x0, the default of Wan and many other pipelines).

    sampler = genkern.diffusion.UniPCMultistepSampler(schedule)
    x = sampler.sample(unet, (B, C, H, W), 20, seed=0, guidance_scale=7.5)

Every step is one fused kernel (genkern::unipc_step, csrc/diffusion/unipc_math.h): it converts the model
output to the data prediction x0_hat, thresholds it, corrects the previous step's result with it (UniC),
and predicts the next sample from the corrected one (UniP), reading the solver's state (the previous corrected
sample and data predictions) from the sampler's history tensor and overwriting it in the same pass. The
coefficients come from the loop's sigma table on the device, indexed by per-sample step indices, so the loop
reads nothing back from the device and can be captured in a CUDA graph.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .. import _checks
from .. import backend as _backend
from . import (
    _ops,
    _solver_ops,
    sigma_schedules,
)
from . import reference as _spec
from .dpm_solver import _step_tensor, _train_sigmas, dpm_solver_sigmas
from .flow import loop_start
from .k_diffusion import _sigma_to_t
from .samplers import _check_flag
from .schedules import NoiseSchedule

__all__ = ["UniPCMultistepSampler", "unipc_history", "unipc_sigmas", "unipc_step"]


def unipc_sigmas(
    schedule: NoiseSchedule,
    num_steps: int,
    *,
    spacing: str = "linspace",
    steps_offset: int = 0,
    sigma_schedule: str | None = None,
    final_sigma: str = "zero",
) -> tuple[Tensor, Tensor]:
    """(sigmas, timesteps) of diffusers' UniPCMultistepScheduler.set_timesteps: dpm_solver_sigmas' table
    but for two differences of UniPC's: with a sigma_schedule, final_sigma="sigma_min" repeats the ramp's
    last sigma, and karras timesteps are rounded for every schedule (cosine included)."""
    ramp_final = sigma_schedule is not None and final_sigma == "sigma_min"
    sigmas, timesteps = dpm_solver_sigmas(
        schedule, num_steps, spacing=spacing, steps_offset=steps_offset, sigma_schedule=sigma_schedule,
        final_sigma="zero" if ramp_final else final_sigma,
    )  # fmt: skip
    if ramp_final:
        sigmas[-1] = sigmas[-2]
    if sigma_schedule == "karras" and schedule._schedule == "cosine":
        train = _train_sigmas(schedule)
        desc = np.flip(train).copy()
        ramp = sigma_schedules.ramp("karras", desc[-1].item(), desc[0].item(), int(num_steps))
        timesteps = torch.from_numpy(np.asarray(_sigma_to_t(ramp, np.log(train)).round())).to(torch.int64)
    return sigmas, timesteps


def unipc_history(sample: Tensor, solver_order: int = 2) -> Tensor:
    """An (uninitialised) history for unipc_step: (solver_order + 1, *sample.shape) of sample's dtype and
    device. The first step writes it before any step reads it."""
    order = _checks.integer("solver_order", solver_order, low=1)
    if order > 2:
        raise ValueError(f"solver_order must be 1 or 2, got {solver_order}")
    _checks.tensor("sample", sample)
    return torch.empty((order + 1, *sample.shape), dtype=sample.dtype, device=sample.device)


def _codes(prediction_type: str, solver_type: str, predictions=_ops.PREDICTIONS) -> tuple[int, int]:
    prediction = predictions.index(_spec.check_choice("prediction_type", prediction_type, predictions))
    solver = _spec.UNIPC_SOLVER_TYPES.index(_spec.check_choice("solver_type", solver_type, _spec.UNIPC_SOLVER_TYPES))
    return prediction, solver


def unipc_step(
    model_output: Tensor,
    sigmas: Tensor,
    step,
    sample: Tensor,
    history: Tensor,
    *,
    prediction_type: str = "epsilon",
    solver_type: str = "bh2",
    solver_order: int = 2,
    corrector_order: int | None = None,
    final_first_order: bool = True,
    use_corrector: bool = True,
    flow_sigmas: bool = False,
    guidance_scale: float | None = None,
    guidance_rescale: float = 0.0,
    dynamic_threshold: tuple[float, float] | None = None,
    backend: str | None = None,
) -> Tensor:
    """UniPCMultistepScheduler.step (predict_x0, bh1 or bh2, solver_order 1 or 2), fused: step `step` (an
    int or per-sample (B,) indices) of the loop whose sigmas are `sigmas` (unipc_sigmas' float32 table). The
    model output is at `sample`, the previous step's result; the step corrects that result with this model
    output (UniC of order corrector_order, default solver_order; not on step 0, nor with use_corrector=False:
    diffusers' disable_corrector), then predicts the next sample from the corrected one (UniP of order
    solver_order; first order on step 0 and, with final_first_order (diffusers' lower_order_final), on the last
    step). `history` (unipc_history: (solver_order + 1, *sample.shape)) holds the previous step's state and is
    overwritten with this step's, in the same pass; step 0 reads none of it. flow_sigmas: `sigmas` is a
    flow-matching table (diffusers' use_flow_sigmas: alpha = 1 - sigma), for prediction_type "flow_prediction"
    (x0_hat = x - sigma m) or any other. dynamic_threshold: (ratio, max_value), diffusers' thresholding.
    Returns the next sample."""
    prediction, solver = _codes(prediction_type, solver_type, _spec.UNIPC_PREDICTIONS)
    _spec.check_guidance(guidance_scale, guidance_rescale)
    _spec.check_threshold(None, dynamic_threshold)
    _check_flag("final_first_order", final_first_order)
    _check_flag("use_corrector", use_corrector)
    _check_flag("flow_sigmas", flow_sigmas)
    for name, t in (("model_output", model_output), ("sample", sample), ("history", history), ("sigmas", sigmas)):
        _checks.tensor(name, t)
    order = _checks.integer("solver_order", solver_order)
    c_order = order if corrector_order is None else _checks.integer("corrector_order", corrector_order)
    for name, value in (("solver_order", order), ("corrector_order", c_order)):
        if value not in (1, 2):
            raise ValueError(f"{name} must be 1 or 2 (order 3 is not implemented), got {value}")
    if sigmas.is_meta and not sample.is_meta:
        raise ValueError("sigmas must hold values (unipc_sigmas' table), got a meta tensor")
    sigmas_d = sigmas.to(sample.device)
    ratio, max_value = (None, 1.0) if dynamic_threshold is None else map(float, dynamic_threshold)
    args = (model_output, sample, history, sigmas_d, _step_tensor(step, sample), prediction, solver, order, c_order)
    scale = None if guidance_scale is None else float(guidance_scale)
    op = torch.ops.genkern.unipc_step
    options = (bool(final_first_order), bool(use_corrector), flow_sigmas, scale, float(guidance_rescale), ratio,
               max_value)  # fmt: skip
    return _backend.call(backend, op, *args, *options)


class UniPCMultistepSampler:
    """UniPC sampling (bh2, order 2 by default) of a model trained on `schedule`, with
    UniPCMultistepScheduler's options of the same names (predict_x0; disable_corrector: the step indices
    whose result is not corrected).

    model(x, t, **model_kwargs) gets the int64 timesteps of unipc_sigmas as a (B,) tensor (the model sees x
    itself: diffusers' scale_model_input is the identity here); with guidance_scale, model(cat([x, x]),
    cat([t, t])) and model_kwargs of batch 2B. x_T is the genkern stream's randn(shape) at offset 0 for `seed`,
    so sample b depends only on (seed, b). The solver's state lives in a device tensor of the loop, read and
    written by each step's kernel: nothing is read back from the device, and cuda_graph=True captures the
    whole loop once per configuration."""

    def __init__(
        self,
        schedule: NoiseSchedule,
        *,
        prediction_type: str = "epsilon",
        solver_order: int = 2,
        solver_type: str = "bh2",
        lower_order_final: bool = True,
        disable_corrector=(),
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
        self.prediction, self.solver = _codes(prediction_type, solver_type)
        self.order = _checks.integer("solver_order", solver_order, low=1)
        if self.order > 2:
            raise ValueError(f"solver_order must be 1 or 2 (order 3 is not implemented), got {solver_order}")
        for name, flag in (("lower_order_final", lower_order_final), ("use_karras_sigmas", use_karras_sigmas),
                           ("thresholding", thresholding)):  # fmt: skip
            _check_flag(name, flag)
        if isinstance(disable_corrector, (str, bytes)) or not hasattr(disable_corrector, "__iter__"):
            raise TypeError(f"disable_corrector must be a collection of step indices, got {disable_corrector!r}")
        self.disable_corrector = frozenset(
            _checks.integer("disable_corrector entry", s, low=0) for s in disable_corrector
        )
        if use_karras_sigmas and sigma_schedule not in (None, "karras"):
            raise ValueError(f"use_karras_sigmas=True conflicts with sigma_schedule={sigma_schedule!r}")
        self.lower_order_final = lower_order_final
        self.options = dict(
            spacing=spacing,
            steps_offset=steps_offset,
            sigma_schedule="karras" if use_karras_sigmas else sigma_schedule,
            final_sigma=final_sigma,
        )
        unipc_sigmas(self.schedule, 1, **self.options)  # checks the options
        self.dynamic_threshold = (dynamic_thresholding_ratio, sample_max_value) if thresholding else None
        _spec.check_threshold(None, self.dynamic_threshold)
        self.backend = backend
        self._graphs: dict = {}

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
            return _UniPcLoop(self, model, num_steps, shape[0], x.device, guidance_scale, guidance_rescale)

        key = (num_steps, guidance_scale, guidance_rescale)
        return _solver_ops.run_loop(self, make_loop, model, x, model_kwargs, cuda_graph, key)

    def clear_cuda_graphs(self) -> None:
        """Release the captured graphs (and the memory pools they hold)."""
        self._graphs.clear()


class _UniPcLoop:
    """One UniPC run from x_T: the sigma table, the per-step index rows and the options built once."""

    def __init__(self, sampler, model, num_steps, batch, device, guidance_scale, guidance_rescale):
        self.sampler, self.model = sampler, model
        sigmas, timesteps = unipc_sigmas(sampler.schedule, _checks.integer("num_steps", num_steps, low=1),
                                         **sampler.options)  # fmt: skip
        self.sigmas = sigmas.to(device)
        self.steps = torch.arange(num_steps, device=device)[:, None].expand(-1, batch).contiguous()
        t_model = timesteps.to(device)[:, None].expand(-1, batch).contiguous()
        self.t_model = t_model.repeat(1, 2) if guidance_scale is not None else t_model
        self.guidance_scale = None if guidance_scale is None else float(guidance_scale)
        self.guidance_rescale = float(guidance_rescale)
        ratio, max_value = (None, 1.0) if sampler.dynamic_threshold is None else sampler.dynamic_threshold
        self.threshold = (None if ratio is None else float(ratio), float(max_value))

    def __call__(self, x: Tensor, model_kwargs: dict) -> Tensor:
        s = self.sampler
        # step 0 neither corrects nor reads the history: it writes every slot before a step reads one
        history = torch.empty((s.order + 1, *x.shape), dtype=x.dtype, device=x.device)
        op = torch.ops.genkern.unipc_step
        # The kernel's own codes; rescale factors and thresholds are pre-passes only the op computes.
        pre_pass = self.guidance_rescale != 0.0 or self.threshold[0] is not None
        steps = _solver_ops.LoopSteps(s.backend, x, native=not pre_pass)
        guided = self.guidance_scale is not None
        for i in range(self.steps.shape[0]):
            x_in = torch.cat([x, x]) if guided else x
            m = self.model(x_in, self.t_model[i], **model_kwargs)
            corrector = (i - 1) not in s.disable_corrector
            options = (s.prediction, s.solver, s.order, s.order, s.lower_order_final, corrector, False)

            def op_call(m=m, x=x, i=i, options=options):
                args = (m, x, history, self.sigmas, self.steps[i], *options)
                extra = (self.guidance_scale, self.guidance_rescale, *self.threshold)
                return _backend.call(s.backend, op, *args, *extra)

            def native_call(m=m, x=x, i=i, options=options):
                prev = torch.empty_like(x)
                args = (m.contiguous(), x, history, self.sigmas, self.steps[i], None, None, prev)
                return _solver_ops.launch_native(
                    "unipc_step", prev, *args, *options, guided, _ops._or_zero(self.guidance_scale)
                )

            x = steps(op_call, native_call, m, x)
        return x
