"""genkern.diffusers.FlowMatchEulerDiscreteScheduler: diffusers' flow-matching Euler scheduler (SD3, Flux,
Wan, ...) with its step in genkern's fused sigma_step (docs/math.md 5.1)."""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler as _DiffusersFlowMatchEuler
from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteSchedulerOutput
from torch import Tensor

from ._sigma import SigmaStepMixin, make_output, rejects_integer_timestep, with_signature_of


@with_signature_of(_DiffusersFlowMatchEuler)
class FlowMatchEulerDiscreteScheduler(SigmaStepMixin, _DiffusersFlowMatchEuler):
    """diffusers' FlowMatchEulerDiscreteScheduler (same configuration: shift, dynamic shifting with mu and
    either time_shift_type, shift_terminal, Karras / exponential / beta sigmas, invert_sigmas; set_timesteps,
    timesteps, scale_noise, save/load) whose `step` is one pass of genkern's fused flow Euler step (sigma_step
    kind 0): sample + (sigma_next - sigma) v, or with stochastic_sampling (1 - sigma_next) x0_hat + sigma_next z.

    Noise z (stochastic_sampling only): `variance_noise` (a keyword-only genkern extension), else drawn from
    `generator` with diffusers' randn_tensor on the sample's shape in float32, as diffusers draws it, so images
    equal the diffusers scheduler's; with neither, genkern's Philox stream in the kernel, one seed drawn from
    torch's default generator per set_timesteps, step i at offset i + 1. `per_token_timesteps` (per-token
    sigmas) and a model output and sample of different dtypes run diffusers' own step. s_churn, s_tmin, s_tmax
    and s_noise are accepted and ignored, as diffusers' step ignores them."""

    _kind = 0
    init_noise_sigma = 1.0  # x_1 is the noise itself (diffusers' flow pipelines scale by nothing)

    def scale_model_input(self, sample: Tensor, timestep=None) -> Tensor:
        """The sample itself: a flow model sees x_sigma unscaled (diffusers' flow scheduler has no such method;
        this one makes the scheduler interchangeable with the others in a generic loop)."""
        return sample

    def step(
        self,
        model_output: Tensor,
        timestep,
        sample: Tensor,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = float("inf"),
        s_noise: float = 1.0,
        generator: torch.Generator | None = None,
        per_token_timesteps: Tensor | None = None,
        return_dict: bool = True,
        *,
        variance_noise: Tensor | None = None,
    ) -> FlowMatchEulerDiscreteSchedulerOutput | tuple:
        """diffusers' FlowMatchEulerDiscreteScheduler.step in one fused pass (the exceptions: class docstring)."""
        rejects_integer_timestep(timestep, "FlowMatchEulerDiscreteScheduler")
        if per_token_timesteps is not None or not self._covers(model_output, sample):
            if variance_noise is not None:
                raise ValueError(
                    "variance_noise needs model_output and sample of one floating dtype and no per_token_timesteps"
                )
            return super().step(model_output, timestep, sample, s_churn, s_tmin, s_tmax, s_noise, generator,
                                per_token_timesteps, return_dict)  # fmt: skip
        if self.step_index is None:
            self._init_step_index(timestep)
        stochastic = bool(self.config.stochastic_sampling)
        noise = None
        if stochastic:
            noise = self._noise(sample.shape, sample.device, torch.float32, generator, variance_noise)
        prev_sample = self._step(model_output, sample, self._step_index, noise, stochastic, stochastic, False)[0]
        self._step_index += 1
        if not return_dict:
            return (prev_sample,)
        return make_output(FlowMatchEulerDiscreteSchedulerOutput, prev_sample=prev_sample)
