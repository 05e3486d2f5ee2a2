"""genkern.diffusers.EulerDiscreteScheduler and EulerAncestralDiscreteScheduler: diffusers' k-diffusion Euler
schedulers with their step in genkern's fused sigma_step (docs/math.md 5.2)."""

from __future__ import annotations

import torch
from diffusers import EulerAncestralDiscreteScheduler as _DiffusersEulerAncestral
from diffusers import EulerDiscreteScheduler as _DiffusersEuler
from diffusers.schedulers import scheduling_euler_discrete
from diffusers.schedulers.scheduling_euler_ancestral_discrete import EulerAncestralDiscreteSchedulerOutput
from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteSchedulerOutput
from torch import Tensor

from ..diffusion import _ops
from ._common import _config_error
from ._sigma import SigmaStepMixin, make_output, rejects_integer_timestep, with_signature_of

# diffusers' prediction_type -> the op's ("original_sample" is EulerDiscreteScheduler's old name of "sample")
PREDICTION_TYPES = {
    "epsilon": "epsilon",
    "v_prediction": "v_prediction",
    "sample": "sample",
    "original_sample": "sample",
}


def _prediction_code(prediction_type) -> int:
    if prediction_type not in PREDICTION_TYPES:
        raise _config_error("prediction_type", prediction_type, tuple(PREDICTION_TYPES))
    return _ops.PREDICTIONS.index(PREDICTION_TYPES[prediction_type])


def _warn_unscaled(scheduler) -> None:
    if not scheduler.is_scale_input_called:
        scheduling_euler_discrete.logger.warning(
            "The `scale_model_input` function should be called before `step` to ensure correct denoising. "
            "See `StableDiffusionPipeline` for a usage example."
        )


@with_signature_of(_DiffusersEuler)
class EulerDiscreteScheduler(SigmaStepMixin, _DiffusersEuler):
    """diffusers' EulerDiscreteScheduler (same configuration, set_timesteps with every sigma option, timesteps,
    init_noise_sigma, scale_model_input, add_noise, save/load) whose `step` is one pass of genkern's fused
    Euler step (sigma_step kind 1).

    The kernel covers the deterministic step (gamma = 0: s_churn = 0, or sigma outside [s_tmin, s_tmax]) on a
    model output and sample of one floating dtype; a churned step (gamma > 0, which draws noise and steps from
    sigma_hat = sigma (1 + gamma)) and a mixed-dtype pair run diffusers' own step (`genkern_covers` says which a
    call gets)."""

    _kind = 1

    def _genkern_setup(self) -> None:
        super()._genkern_setup()
        self._prediction = _prediction_code(self.config.prediction_type)

    def genkern_covers(self, model_output, sample, s_churn: float = 0.0, s_tmin: float = 0.0,
                       s_tmax: float = float("inf"), step_index: int | None = None) -> bool:  # fmt: skip
        """Whether step(...) with these arguments at `step_index` (default: the next step) runs genkern's kernel
        (True) or diffusers' own step (False)."""
        if s_churn != 0:
            i = self.step_index if step_index is None else step_index
            sigma = self._sigma_value(0 if i is None else i)
            if s_tmin <= sigma <= s_tmax and min(s_churn / (len(self.sigmas) - 1), 2**0.5 - 1) != 0:
                return False  # gamma != 0: diffusers steps from sigma_hat = sigma (1 + gamma)
        return self._covers(model_output, sample)

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
        return_dict: bool = True,
    ) -> EulerDiscreteSchedulerOutput | tuple:
        """diffusers' EulerDiscreteScheduler.step: sample + (sample - x0_hat) / sigma (sigma_next - sigma) in one
        fused pass, or diffusers' own step where the kernel does not cover the call (class docstring)."""
        rejects_integer_timestep(timestep, "EulerDiscreteScheduler")
        if self.step_index is None:
            self._init_step_index(timestep)
        if not self.genkern_covers(model_output, sample, s_churn, s_tmin, s_tmax):
            return super().step(
                model_output, timestep, sample, s_churn, s_tmin, s_tmax, s_noise, generator, return_dict
            )
        _warn_unscaled(self)
        prev_sample, pred_original = self._step(model_output, sample, self._step_index, None, False, False, True)
        self._step_index += 1
        if not return_dict:
            return prev_sample, pred_original
        return make_output(EulerDiscreteSchedulerOutput, prev_sample=prev_sample, pred_original_sample=pred_original)


@with_signature_of(_DiffusersEulerAncestral)
class EulerAncestralDiscreteScheduler(SigmaStepMixin, _DiffusersEulerAncestral):
    """diffusers' EulerAncestralDiscreteScheduler (same configuration, set_timesteps, timesteps,
    init_noise_sigma, scale_model_input, add_noise, save/load) whose `step` is one pass of genkern's fused
    Euler ancestral step (sigma_step kind 2): the Euler step to sigma_down plus sigma_up z.

    Noise z: `variance_noise` (a keyword-only genkern extension), else drawn from `generator` with diffusers'
    randn_tensor on the model output's shape, dtype and device, exactly as diffusers draws it, so images equal
    the diffusers scheduler's for the same generator; with neither, genkern's Philox stream in the kernel: one
    seed drawn from torch's default generator at the first step after set_timesteps, step i at offset i + 1
    (reproducible under torch.manual_seed, with other values than diffusers' torch.randn; no draw per step).
    prediction_type "sample", which diffusers' step refuses, runs too. A mixed-dtype pair runs diffusers' own
    step."""

    _kind = 2

    def _genkern_setup(self) -> None:
        super()._genkern_setup()
        self._prediction = _prediction_code(self.config.prediction_type)

    def step(
        self,
        model_output: Tensor,
        timestep,
        sample: Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
        *,
        variance_noise: Tensor | None = None,
    ) -> EulerAncestralDiscreteSchedulerOutput | tuple:
        """diffusers' EulerAncestralDiscreteScheduler.step in one fused pass (noise: class docstring)."""
        rejects_integer_timestep(timestep, "EulerAncestralDiscreteScheduler")
        if not self._covers(model_output, sample):
            if variance_noise is not None:
                raise ValueError("variance_noise needs model_output and sample of one floating dtype")
            return super().step(model_output, timestep, sample, generator, return_dict)
        _warn_unscaled(self)
        if self.step_index is None:
            self._init_step_index(timestep)
        noise = self._noise(model_output.shape, model_output.device, model_output.dtype, generator, variance_noise)
        prev_sample, pred_original = self._step(model_output, sample, self._step_index, noise, True, False, True)
        self._step_index += 1
        if not return_dict:
            return prev_sample, pred_original
        return make_output(
            EulerAncestralDiscreteSchedulerOutput, prev_sample=prev_sample, pred_original_sample=pred_original
        )
