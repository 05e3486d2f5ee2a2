"""genkern.diffusers.DDPMScheduler: diffusers' DDPMScheduler with its step in genkern's fused ddpm_step."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import DDPMScheduler as _DiffusersDDPMScheduler
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_ddpm import DDPMSchedulerOutput
from torch import Tensor

from ..diffusion import _ops
from ._common import GenkernStepMixin, _config_error

# diffusers' variance_type -> the op's (fixed_small_log is fixed_small's std computed as exp(log(var) / 2)).
VARIANCE_TYPES = {
    "fixed_small": "fixed_small",
    "fixed_small_log": "fixed_small",
    "fixed_large": "fixed_large",
    "learned_range": "learned_range",
}


class DDPMScheduler(GenkernStepMixin, _DiffusersDDPMScheduler):
    """diffusers' DDPMScheduler (same configuration, set_timesteps, timesteps, save/load) whose `step` is one
    pass of genkern's fused `ddpm_step` and `add_noise` genkern's `q_sample`.

    Configuration keys beyond diffusers' (saved with it; diffusers ignores them):
        genkern_schedule: alpha-bar from genkern's float64 NoiseSchedule, rounded once to float32, instead of
            diffusers' float32 cumulative product (the default, so that results match diffusers' scheduler).
        genkern_timesteps: trailing spacing keeps exactly N timesteps (diffusers' has N + 1 for some N, the last
            one -1, a step diffusers takes at alphas_cumprod[-1]).

    Unsupported: variance_type "learned" and "fixed_large_log" (a ValueError naming the key)."""

    _kind = _ops.DDPM

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        variance_type: str = "fixed_small",
        clip_sample: bool = True,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        genkern_schedule: bool = False,
        genkern_timesteps: bool = False,
    ):
        if variance_type not in VARIANCE_TYPES:
            raise _config_error("variance_type", variance_type, tuple(VARIANCE_TYPES))
        super().__init__(
            num_train_timesteps=num_train_timesteps,
            beta_start=beta_start,
            beta_end=beta_end,
            beta_schedule=beta_schedule,
            trained_betas=trained_betas,
            variance_type=variance_type,
            clip_sample=clip_sample,
            prediction_type=prediction_type,
            thresholding=thresholding,
            dynamic_thresholding_ratio=dynamic_thresholding_ratio,
            clip_sample_range=clip_sample_range,
            sample_max_value=sample_max_value,
            timestep_spacing=timestep_spacing,
            steps_offset=steps_offset,
            rescale_betas_zero_snr=rescale_betas_zero_snr,
        )
        self._variance = _ops.VARIANCES.index(VARIANCE_TYPES[variance_type])
        self._genkern_setup(final_alpha_one=True)  # DDPMScheduler's alpha-bar after the last step is 1

    def step(
        self,
        model_output: Tensor,
        timestep,
        sample: Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
        *,
        variance_noise: Tensor | None = None,
    ) -> DDPMSchedulerOutput | tuple:
        """diffusers' DDPMScheduler.step in one fused pass. Noise (t > 0 only): `variance_noise` (a genkern
        extension), else drawn from `generator` exactly as diffusers draws it, else genkern's in-kernel Philox
        stream with a seed drawn from torch's default generator."""
        t, index = self._timestep_value(timestep)
        if self.custom_timesteps or self.num_inference_steps:
            prev = self._next_timestep(t, index)
        else:
            prev = t - 1
        noise = None
        noisy = t > 0  # diffusers' rule (t = -1, its trailing spacing's extra entry, is no noisy step)
        if noisy:
            noise = self._noise(model_output, sample, generator, variance_noise)
        elif t < 0:
            noise = torch.zeros_like(sample)  # the kernel reads t = -1 as T - 1 (alphas_cumprod[-1]), a noisy row
        prev_sample, pred_original = self._call(
            torch.ops.genkern.ddpm_step,
            model_output,
            sample,
            t,
            prev,
            noise,
            self._options(variance=self._variance),
            noisy,
        )
        if not return_dict:
            return prev_sample, pred_original
        return DDPMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original)
