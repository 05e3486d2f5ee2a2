"""genkern.diffusers.DPMSolverMultistepScheduler: diffusers' DPM-Solver++ multistep scheduler with its step in
genkern's fused dpm_solver_step (docs/math.md 5.3).

What runs genkern's kernel (one pass: the data prediction x0_hat from the model output, its dynamic
thresholding, the first-order or 2M update against the previous x0_hat read from the scheduler's device history
tensor and overwritten there, and the SDE noise):

- algorithm_type "dpmsolver++" and "sde-dpmsolver++", solver_order 1 and 2, solver_type "midpoint" and "heun";
- prediction_type "epsilon", "v_prediction" and "sample", with or without thresholding;
- every sigma table diffusers' own set_timesteps builds for a variance-preserving schedule: timestep_spacing,
  steps_offset, lambda_min_clipped, custom timesteps, use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas,
  use_lu_lambdas, rescale_betas_zero_snr, final_sigmas_type "zero" and "sigma_min" (the kernel reads
  self.sigmas itself, copied to the device once per set_timesteps);
- lower_order_final, euler_at_final and diffusers' warm-up (a first-order step while lower_order_nums is 0, e.g.
  the first step of an img2img loop started by set_begin_index), decided on the host from the step counter;
- a model output and sample of one floating dtype and one shape (float32 is computed in float32, as diffusers
  does; float16 and bfloat16 in float32 with the history stored in the sample's dtype, as diffusers stores its
  model_outputs; float64 in float64, where diffusers rounds its update to float32).

SDE noise, as the Euler ancestral drop-in takes it: `variance_noise` when given (diffusers' own argument; it
wins over `generator`, as in diffusers), else drawn from `generator` by diffusers' own randn_tensor on the
model output's shape in float32, exactly as diffusers draws it, so images equal the diffusers scheduler's and
the generator ends in the same state. Every generator diffusers accepts (one, a list of one per sample, one on
another device than the model output) is drawn that way, so no generator's noise goes unreproduced and none
makes the step fall back. With neither, genkern's Philox stream in the kernel: one seed drawn from torch's
default generator at the first SDE step after set_timesteps, step i at offset i + 1 (reproducible under
torch.manual_seed, with other values than diffusers' torch.randn, and no draw or copy per step). The kernel
gets the noise in the sample's dtype. The ODE variants draw nothing, whatever `generator`.

What runs diffusers' own step instead (`genkern_covers` says which a call gets): solver_order 3,
algorithm_type "dpmsolver" and "sde-dpmsolver", prediction_type "flow_prediction", use_flow_sigmas,
variance_type "learned" / "learned_range", a model output and sample of different dtypes, shapes or devices
(or not floating tensors), a variance_noise of another shape than the sample (diffusers broadcasts it), a
second-order step at step_index 0 (a step counter set by hand: diffusers reads sigmas[-1] there) or whose
previous data prediction is missing or of another shape, a step before set_timesteps or past the last
(diffusers raises its errors). A fallback step and a fused one share their state, so a loop may mix them.

State: step_index, begin_index / set_begin_index, lower_order_nums, num_inference_steps, timesteps, sigmas and
scale_model_input (the identity) and add_noise are diffusers' own. model_outputs keeps diffusers' meaning for
its last entry: after a fused step, model_outputs[-1] is the scheduler's history tensor, holding this step's
x0_hat (the next step overwrites it in place); the earlier entries are None, as the kernel has overwritten the
previous x0_hat. A step reads model_outputs[-1]: an entry that is not the history tensor (a fallback step's
output, or one set by hand) is copied into the history on the device first. The first step after
set_timesteps reads its timestep once to find step_index (diffusers' _init_step_index) unless begin_index is
set; no later step reads anything back from the device.
"""

from __future__ import annotations

import torch
from diffusers import DPMSolverMultistepScheduler as _DiffusersDPM
from diffusers.schedulers.scheduling_utils import SchedulerOutput
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

from .. import backend as _backend
from .._kernels import to_signed, to_unsigned
from ..diffusion import _ops, _solver_ops
from ..random import resolve_seed
from ._sigma import SIGNATURE_LIMIT, SigmaStepMixin, SolverTablesMixin, make_output, with_signature_of

ALGORITHMS = ("dpmsolver++", "sde-dpmsolver++")  # the kernel's; "dpmsolver", "sde-dpmsolver" fall back


@with_signature_of(_DiffusersDPM)
class DPMSolverMultistepScheduler(SolverTablesMixin, SigmaStepMixin, _DiffusersDPM):
    """diffusers' DPMSolverMultistepScheduler (same configuration, set_timesteps with every sigma option,
    timesteps, step_index, begin_index, lower_order_nums, scale_model_input, add_noise, save/load) whose `step`
    is one pass of genkern's fused dpm_solver_step for DPM-Solver++ and SDE-DPM-Solver++ of order 1 and 2.

    The solver's history (the previous data prediction) is a device tensor the scheduler owns, read and
    overwritten by the kernel in the same pass; a step reads nothing back from the device. What the kernel
    covers, the noise, and what runs diffusers' own step: the module docstring (genkern.diffusers._dpm)."""

    def _genkern_setup(self) -> None:
        super()._genkern_setup()
        c = self.config
        prediction = c.prediction_type
        self._fused = (
            c.algorithm_type in ALGORITHMS
            and c.solver_order in (1, 2)
            and c.solver_type in _solver_ops.DPM_SOLVER_TYPES
            and prediction in _ops.PREDICTIONS
            and not c.use_flow_sigmas
            and c.variance_type not in ("learned", "learned_range")
        )
        self._codes = (
            _ops.PREDICTIONS.index(prediction) if prediction in _ops.PREDICTIONS else 0,
            _solver_ops.DPM_SOLVER_TYPES.index(c.solver_type) if c.solver_type in _solver_ops.DPM_SOLVER_TYPES else 0,
            c.algorithm_type == "sde-dpmsolver++",
        )
        self._threshold = (float(c.dynamic_thresholding_ratio), float(c.sample_max_value)) if c.thresholding else None
        self._history: Tensor | None = None  # the previous x0_hat, on the sample's device
        self._tables_source = None  # the self.sigmas the device tables below were made from
        self._tables: dict = {}  # device -> sigma table; (device, batch) -> (N, batch) step-index rows
        self._accepted: set = set()  # call signatures the op has checked and accepted (any sigma table)
        self._dpm_seed: int | None = None  # the in-kernel SDE noise's seed for this set_timesteps

    @classmethod
    def from_scheduler(cls, scheduler, *, backend: str | None = None, **flags):
        """This class built from a diffusers DPMSolverMultistepScheduler's configuration (`flags` override
        configuration values), its set_timesteps and solver state (timesteps, sigmas, step and begin index,
        lower_order_nums, model_outputs) copied; `backend`: genkern_backend."""
        new = super().from_scheduler(scheduler, backend=backend, **flags)
        if getattr(scheduler, "model_outputs", None) is not None:
            outputs = [None if m is None else m.clone() for m in scheduler.model_outputs]
            n = new.config.solver_order
            new.model_outputs = ([None] * n + outputs)[-n:]
            new.lower_order_nums = min(int(getattr(scheduler, "lower_order_nums", 0)), n)
        return new

    # ------------------------------------------------------------------------------------------ coverage
    def _decide(self, model_output, sample, variance_noise) -> int:
        """The order of genkern's step for this call (1 or 2), or 0: diffusers' own step runs."""
        if not (
            self._fused
            and self.num_inference_steps is not None
            and isinstance(model_output, Tensor)
            and isinstance(sample, Tensor)
            and model_output.dtype == sample.dtype
            and model_output.device == sample.device
            and sample.dtype.is_floating_point
            and model_output.shape == sample.shape
            and sample.dim() >= 1
            and (
                variance_noise is None or (isinstance(variance_noise, Tensor) and variance_noise.shape == sample.shape)
            )
        ):
            return 0
        i = self._step_index
        if i is None:  # the step index the step will start from (diffusers' _init_step_index runs first)
            return -1
        n = len(self.timesteps)
        if i + 1 >= len(self.sigmas):
            return 0
        c = self.config
        final = i == n - 1 and (c.euler_at_final or (c.lower_order_final and n < 15) or c.final_sigmas_type == "zero")
        if c.solver_order == 1 or self.lower_order_nums < 1 or final:
            return 1
        previous = self.model_outputs[-1]
        if i == 0 or not isinstance(previous, Tensor) or previous.shape != sample.shape:
            return 0
        return 2

    def genkern_covers(self, model_output, sample, variance_noise=None) -> bool:
        """Whether step(model_output, t, sample, variance_noise=...) at the next step runs genkern's kernel
        (True) or diffusers' own step (False). Before the first step of a loop (step_index None) it answers for
        the step index begin_index gives, or 0."""
        order = self._decide(model_output, sample, variance_noise)
        if order != -1:
            return order > 0
        saved = self._step_index
        self._step_index = self.begin_index if self.begin_index is not None else 0
        try:
            return self._decide(model_output, sample, variance_noise) > 0
        finally:
            self._step_index = saved

    # ------------------------------------------------------------------------------------------ step
    def step(
        self,
        model_output: Tensor,
        timestep,
        sample: Tensor,
        generator: torch.Generator | None = None,
        variance_noise: Tensor | None = None,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple:
        """diffusers' DPMSolverMultistepScheduler.step: the first-order or 2M DPM-Solver++ (SDE) update in one
        fused pass, or diffusers' own step where the kernel does not cover the call (module docstring)."""
        order = self._decide(model_output, sample, variance_noise)
        if order == -1:
            self._init_step_index(timestep)
            order = self._decide(model_output, sample, variance_noise)
        if order == 0:
            return super().step(model_output, timestep, sample, generator, variance_noise, return_dict)
        i = self._step_index
        table, rows = self._device_tables(sample.device, sample.shape[0])
        noise, seed, offset = None, 0, 0
        if self._codes[2]:  # SDE
            if variance_noise is not None:
                noise = variance_noise.to(device=sample.device, dtype=sample.dtype)
            elif generator is not None:
                shape, device = model_output.shape, model_output.device
                noise = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
                noise = noise.to(sample.dtype)
            else:
                if self._dpm_seed is None:  # one draw from torch's generator per set_timesteps
                    self._dpm_seed = to_signed(resolve_seed(None))
                seed, offset = self._dpm_seed, i + 1
        history = self._history
        if history is None or history.shape != sample.shape or history.dtype != sample.dtype:
            history = None
        elif history.device != sample.device:
            history = None
        if history is None:
            history = self._history = torch.empty(sample.shape, dtype=sample.dtype, device=sample.device)
        if order == 2:
            previous = self.model_outputs[-1]
            if previous is not history:  # a fallback step's data prediction, or one set by hand
                history.copy_(previous)
        prev_sample = self._run(model_output, sample, history, table, rows[i], order, noise, seed, offset)
        n = self.config.solver_order
        outputs = [None] * (n - 1) + [history]
        if isinstance(self.model_outputs, list) and len(self.model_outputs) == n:
            self.model_outputs[:] = outputs  # in place, as diffusers updates its list
        else:
            self.model_outputs = outputs
        if self.lower_order_nums < n:
            self.lower_order_nums += 1
        self._step_index = i + 1
        if not return_dict:
            return (prev_sample,)
        return make_output(SchedulerOutput, prev_sample=prev_sample)

    def _new_sigmas(self) -> None:
        self._dpm_seed = None  # one draw from torch's generator per set_timesteps

    def _run(self, model_output, sample, history, table, step_row, order: int, noise, seed: int, offset: int):
        """dpm_solver_step at the step `step_row` ((B,) int64) of the sigma table, of order `order`, for the whole
        batch; returns prev_sample.

        The first call with given tensor types, shapes, dtypes, devices and options goes through the op (torch's
        dispatch and every check); later ones with the same signature launch the compiled core's kernel
        directly: the dispatch of a mutating Python custom op costs more than the fused kernel on a batch-1
        latent (genkern.diffusion._solver_ops.LoopSteps does the same). A tensor that needs gradients, tracing
        under torch.compile, thresholding (the op's quantile pre-pass) and the triton and reference backends
        always take the op."""
        device = sample.device
        prediction, solver, sde = self._codes
        ratio, max_value = (None, 1.0) if self._threshold is None else self._threshold
        eager = not torch.compiler.is_compiling() and not (
            torch.is_grad_enabled() and (model_output.requires_grad or sample.requires_grad)
        )
        plain = type(model_output) is Tensor and type(sample) is Tensor and (noise is None or type(noise) is Tensor)
        signature = None
        if eager and plain and ratio is None:
            signature = (
                _solver_ops.LoopSteps._signature_of(model_output, sample),
                None if noise is None else (noise.shape, noise.dtype, noise.device),
                order,
                self.genkern_backend,
                _backend.scoped_choice(),
                _backend.get_backend(),
            )
            if signature in self._accepted:
                prev = torch.empty(sample.shape, dtype=sample.dtype, device=device)
                model_c, sample_c = model_output.contiguous(), sample.contiguous()
                noise_c = None if noise is None else noise.contiguous()
                args = (model_c, sample_c, noise_c, history, table, step_row, None, None, prev)
                codes = (prediction, solver, order, sde, False, False, 0.0, to_unsigned(seed), to_unsigned(offset))
                return _solver_ops.launch_native("dpm_step", prev, *args, *codes)
        op = torch.ops.genkern.dpm_solver_step
        args = (model_output, sample, history, table, step_row, noise, seed, offset, prediction, solver, order, sde)
        prev = _backend.call(self.genkern_backend, op, *args, False, None, 0.0, ratio, max_value)
        if signature is not None:
            backend = _backend.resolve(self.genkern_backend, device, sample.dtype, "diffusion")
            if backend in ("cpu", "cuda"):  # the op accepted this signature: later calls launch the kernel
                if len(self._accepted) >= SIGNATURE_LIMIT:
                    self._accepted.clear()
                self._accepted.add(signature)
        return prev
