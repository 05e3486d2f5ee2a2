"""genkern.diffusers.DDIMScheduler: diffusers' DDIMScheduler with its step in genkern's fused ddim_step."""

from __future__ import annotations

import numbers

import numpy as np
import torch
from diffusers import DDIMScheduler as _DiffusersDDIMScheduler
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput
from torch import Tensor

from ..diffusion import _ops
from ._common import GenkernStepMixin, _flag


class DDIMScheduler(GenkernStepMixin, _DiffusersDDIMScheduler):
    """diffusers' DDIMScheduler (same configuration, set_timesteps, timesteps, save/load) whose `step` is one
    pass of genkern's fused `ddim_step` and `add_noise` genkern's `q_sample`.

    Configuration keys beyond diffusers' (saved with it; diffusers ignores them):
        genkern_schedule: alpha-bar from genkern's float64 NoiseSchedule, rounded once to float32, instead of
            diffusers' float32 cumulative product (the default, so that results match diffusers' scheduler).
        genkern_timesteps: a step goes to the next entry of `timesteps` (-1 after the last), and trailing
            spacing keeps exactly N timesteps. diffusers (the default) steps from t to t - T // N, the next
            entry for "leading" spacing only (see genkern.diffusion.reference)."""

    _kind = _ops.DDIM

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        clip_sample: bool = True,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        rescale_betas_zero_snr: bool = False,
        genkern_schedule: bool = False,
        genkern_timesteps: bool = False,
    ):
        super().__init__(
            num_train_timesteps=num_train_timesteps,
            beta_start=beta_start,
            beta_end=beta_end,
            beta_schedule=beta_schedule,
            trained_betas=trained_betas,
            clip_sample=clip_sample,
            set_alpha_to_one=set_alpha_to_one,
            steps_offset=steps_offset,
            prediction_type=prediction_type,
            thresholding=thresholding,
            dynamic_thresholding_ratio=dynamic_thresholding_ratio,
            clip_sample_range=clip_sample_range,
            sample_max_value=sample_max_value,
            timestep_spacing=timestep_spacing,
            rescale_betas_zero_snr=rescale_betas_zero_snr,
        )
        self._genkern_setup(final_alpha_one=_flag("set_alpha_to_one", set_alpha_to_one))

    def step(
        self,
        model_output: Tensor,
        timestep,
        sample: Tensor,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        generator: torch.Generator | None = None,
        variance_noise: Tensor | None = None,
        return_dict: bool = True,
    ) -> DDIMSchedulerOutput | tuple:
        """diffusers' DDIMScheduler.step in one fused pass. Noise (eta > 0 only): `variance_noise`, else drawn
        from `generator` exactly as diffusers draws it, else genkern's in-kernel Philox stream with a seed drawn
        from torch's default generator."""
        if self.num_inference_steps is None:
            raise ValueError(
                "Number of inference steps is 'None', you need to run 'set_timesteps' after creating the scheduler"
            )
        if isinstance(eta, bool) or not isinstance(eta, numbers.Real):
            raise TypeError(f"eta must be a real number, got {type(eta).__name__}")
        eta = float(eta)
        t, index = self._timestep_value(timestep)
        if self._genkern_timesteps:
            prev = self._next_timestep(t, index)
        else:
            prev = max(t - self.config.num_train_timesteps // self.num_inference_steps, -1)
        noise = None
        if eta > 0:
            if variance_noise is not None and generator is not None:
                raise ValueError(
                    "Cannot pass both generator and variance_noise. Please make sure that either `generator` or"
                    " `variance_noise` stays `None`."
                )
            noise = self._noise(model_output, sample, generator, variance_noise)
        options = self._options(eta=eta, use_clipped_model_output=bool(use_clipped_model_output))
        prev_sample, pred_original = self._call(
            torch.ops.genkern.ddim_step, model_output, sample, t, prev, noise, options, eta > 0
        )
        if not return_dict:
            return prev_sample, pred_original
        return DDIMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original)
