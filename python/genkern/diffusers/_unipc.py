"""genkern.diffusers.UniPCMultistepScheduler: diffusers' UniPC multistep scheduler with its step in genkern's
fused unipc_step (docs/math.md 5.5).

What runs genkern's kernel (one pass: the data prediction x0_hat from the model output, its dynamic
thresholding, the UniC correction of the sample with it, and the UniP prediction from the corrected sample,
against the solver state read from the scheduler's device history tensor and overwritten there):

- predict_x0 (the default), solver_type "bh1" and "bh2", solver_order 1 and 2;
- prediction_type "epsilon", "v_prediction", "sample" and "flow_prediction", with or without thresholding;
- disable_corrector, lower_order_final and diffusers' warm-up (a first-order step while lower_order_nums is 0,
  e.g. the first step of an img2img loop started by set_begin_index), decided on the host from the step counter
  and the previous step's order (this_order), as diffusers decides them;
- every sigma table diffusers' own set_timesteps builds: timestep_spacing, steps_offset, use_karras_sigmas,
  use_exponential_sigmas, use_beta_sigmas, rescale_betas_zero_snr, final_sigmas_type "zero" and "sigma_min",
  and use_flow_sigmas (Wan's configuration, with flow_shift, use_dynamic_shifting's mu, shift_terminal or
  custom sigmas: alpha = 1 - sigma there); the kernel reads self.sigmas itself, copied to the device once per
  set_timesteps;
- a model output and sample of one floating dtype and one shape (float32 is computed in float32, as diffusers
  does; float16 and bfloat16 in float32 with the history stored in the sample's dtype; float64 in float64).

One difference, a diffusers bug: with solver_type "bh1", diffusers' first-order predictor adds
alpha_t B(h) * 0, which is -inf * 0 = NaN at a final sigma of 0 (final_sigmas_type "zero", flow_prediction
included); the kernel leaves the zero term out and returns x0_hat there, the limit of the step.

What runs diffusers' own step instead (`genkern_covers` says which a call gets): solver_order 3,
predict_x0=False, solver_p, a model output and sample of
different dtypes, shapes or devices (or not floating tensors), a second-order step whose inputs diffusers would
read from before the table (a step counter set by hand) or whose saved state is missing or of another shape,
a step before set_timesteps or past the last (diffusers raises its errors). A fallback step and a fused one
share their state, so a loop may mix them.

State: step_index, begin_index / set_begin_index, lower_order_nums, this_order, num_inference_steps,
timesteps, timestep_list, sigmas, scale_model_input (the identity) and add_noise are diffusers' own. After a
fused step, last_sample and model_outputs are views of the scheduler's history tensor (slot 0 the corrected
sample, slot 1 this step's x0_hat, slot 2 the previous one), diffusers' values, which the next step overwrites
in place. A step reads them as diffusers does: an entry that is not the history's view (a fallback step's, or
one set by hand) is copied into the history on the device first. The first step after set_timesteps reads its
timestep once to find step_index (diffusers' _init_step_index) unless begin_index is set; no later step reads
anything back from the device.
"""

from __future__ import annotations

import torch
from diffusers import UniPCMultistepScheduler as _DiffusersUniPC
from diffusers.schedulers.scheduling_utils import SchedulerOutput
from torch import Tensor

from .. import backend as _backend
from ..diffusion import _solver_ops
from ._sigma import SIGNATURE_LIMIT, SigmaStepMixin, SolverTablesMixin, make_output, with_signature_of

_SOLVER_STATE = ("model_outputs", "timestep_list", "lower_order_nums", "last_sample", "this_order")


@with_signature_of(_DiffusersUniPC)
class UniPCMultistepScheduler(SolverTablesMixin, SigmaStepMixin, _DiffusersUniPC):
    """diffusers' UniPCMultistepScheduler (same configuration, set_timesteps with every sigma option,
    timesteps, step_index, begin_index, lower_order_nums, scale_model_input, add_noise, save/load) whose `step`
    is one pass of genkern's fused unipc_step: the UniC corrector and UniP predictor, bh1 or bh2, of order 1
    and 2.

    The solver's state (the previous corrected sample and data predictions) is a device tensor the scheduler
    owns, read and overwritten by the kernel in the same pass; a step reads nothing back from the device. What
    the kernel covers and what runs diffusers' own step: the module docstring (genkern.diffusers._unipc)."""

    def _genkern_setup(self) -> None:
        super()._genkern_setup()
        c = self.config
        prediction = c.prediction_type
        predictions = _solver_ops.UNIPC_PREDICTIONS
        self._fused = (
            c.solver_order in (1, 2)
            and c.solver_type in _solver_ops.UNIPC_SOLVER_TYPES
            and prediction in predictions
            and bool(c.predict_x0)
        )
        self._codes = (
            predictions.index(prediction) if prediction in predictions else 0,
            _solver_ops.UNIPC_SOLVER_TYPES.index(c.solver_type)
            if c.solver_type in _solver_ops.UNIPC_SOLVER_TYPES
            else 0,
        )
        self._threshold = (float(c.dynamic_thresholding_ratio), float(c.sample_max_value)) if c.thresholding else None
        self._history: Tensor | None = None  # (solver_order + 1, *sample.shape) on the sample's device
        self._views: tuple = ()  # the history's slots: corrected sample, x0_hat, the previous x0_hat
        self._tables_source = None  # the self.sigmas the device tables below were made from
        self._tables: dict = {}  # device -> sigma table; (device, batch) -> (N, batch) step-index rows
        self._accepted: set = set()  # call signatures the op has checked and accepted (any sigma table)

    @classmethod
    def from_scheduler(cls, scheduler, *, backend: str | None = None, **flags):
        """This class built from a diffusers UniPCMultistepScheduler's configuration (`flags` override
        configuration values), its set_timesteps and solver state (timesteps, sigmas, step and begin index,
        lower_order_nums, this_order, model_outputs, timestep_list, last_sample) copied; `backend`:
        genkern_backend."""
        new = super().from_scheduler(scheduler, backend=backend, **flags)
        n = new.config.solver_order
        for name in _SOLVER_STATE:
            if not hasattr(scheduler, name):
                continue
            value = getattr(scheduler, name)
            if name in ("model_outputs", "timestep_list") and isinstance(value, list):
                value = ([None] * n + [v.clone() if isinstance(v, Tensor) else v for v in value])[-n:]
            elif isinstance(value, Tensor):
                value = value.clone()
            setattr(new, name, value)
        return new

    # ------------------------------------------------------------------------------------------ coverage
    def _orders(self, i: int) -> tuple[int, int, bool]:
        """(predictor order, corrector order, use_corrector) of diffusers' step at step index i."""
        c = self.config
        use_corrector = i > 0 and (i - 1) not in self.disable_corrector and self.last_sample is not None
        order = min(c.solver_order, len(self.timesteps) - i) if c.lower_order_final else c.solver_order
        corrector_order = getattr(self, "this_order", 1) if use_corrector else 1
        return min(order, self.lower_order_nums + 1), corrector_order, use_corrector

    def _decide(self, model_output, sample) -> tuple | None:
        """(predictor order, corrector order, use_corrector) of genkern's step for this call; None: diffusers'
        own step runs; () before the first step of a loop (step_index None)."""
        if not (
            self._fused
            and self.solver_p is None
            and self.num_inference_steps is not None
            and isinstance(model_output, Tensor)
            and isinstance(sample, Tensor)
            and model_output.dtype == sample.dtype
            and model_output.device == sample.device
            and sample.dtype.is_floating_point
            and model_output.shape == sample.shape
            and sample.dim() >= 1
        ):
            return None
        i = self._step_index
        if i is None:
            return ()
        if i + 1 >= len(self.sigmas):
            return None
        p_order, c_order, use_corrector = self._orders(i)
        if p_order not in (1, 2) or c_order not in (1, 2):
            return None

        def saved(t) -> bool:
            return isinstance(t, Tensor) and t.shape == sample.shape

        outputs = self.model_outputs
        if (p_order == 2 or use_corrector) and (i == 0 or not saved(outputs[-1])):
            return None
        if use_corrector and not saved(self.last_sample):
            return None
        if use_corrector and c_order == 2 and (i < 2 or len(outputs) < 2 or not saved(outputs[-2])):
            return None
        return p_order, c_order, use_corrector

    def genkern_covers(self, model_output, sample) -> bool:
        """Whether step(model_output, t, sample) at the next step runs genkern's kernel (True) or diffusers'
        own step (False). Before the first step of a loop (step_index None) it answers for the step index
        begin_index gives, or 0."""
        decided = self._decide(model_output, sample)
        if decided != ():
            return decided is not None
        saved = self._step_index
        self._step_index = self.begin_index if self.begin_index is not None else 0
        try:
            return bool(self._decide(model_output, sample))
        finally:
            self._step_index = saved

    # ------------------------------------------------------------------------------------------ step
    def step(self, model_output: Tensor, timestep, sample: Tensor, return_dict: bool = True) -> SchedulerOutput | tuple:
        """diffusers' UniPCMultistepScheduler.step: the UniC correction and UniP prediction in one fused pass,
        or diffusers' own step where the kernel does not cover the call (module docstring)."""
        decided = self._decide(model_output, sample)
        if decided == ():
            self._init_step_index(timestep)
            decided = self._decide(model_output, sample)
        if decided is None:
            return super().step(model_output, timestep, sample, return_dict)
        p_order, c_order, use_corrector = decided
        i = self._step_index
        table, rows = self._device_tables(sample.device, sample.shape[0])
        n = self.config.solver_order
        history = self._history
        if (
            history is None
            or history.shape != (n + 1, *sample.shape)
            or history.dtype != sample.dtype
            or history.device != sample.device
        ):
            history = self._history = torch.empty((n + 1, *sample.shape), dtype=sample.dtype, device=sample.device)
            self._views = tuple(history.unbind(0))
        views, outputs = self._views, self.model_outputs
        previous = outputs[-1] if isinstance(outputs[-1], Tensor) and outputs[-1].shape == sample.shape else None
        # diffusers' state where it is not the history's own (a fallback step, a value set by hand): the older
        # data prediction first, as the newer one may be the view it moves out of
        if use_corrector and c_order == 2 and outputs[-2] is not views[2]:
            views[2].copy_(outputs[-2])
        if previous is not None and previous is not views[1]:
            views[1].copy_(previous)
        if use_corrector and self.last_sample is not views[0]:
            views[0].copy_(self.last_sample)
        prev_sample = self._run(model_output, sample, history, table, rows[i], p_order, c_order, use_corrector)
        new_outputs = [views[1]] if n == 1 else [views[2] if previous is not None else None, views[1]]
        if isinstance(outputs, list) and len(outputs) == n:
            outputs[:] = new_outputs  # in place, as diffusers updates its list
        else:
            self.model_outputs = new_outputs
        times = self.timestep_list
        if isinstance(times, list) and len(times) == n:
            times[:] = [*times[1:], timestep]
        else:
            self.timestep_list = [None] * (n - 1) + [timestep]
        self.last_sample = views[0]
        self.this_order = p_order
        if self.lower_order_nums < n:
            self.lower_order_nums += 1
        self._step_index = i + 1
        if not return_dict:
            return (prev_sample,)
        return make_output(SchedulerOutput, prev_sample=prev_sample)

    def _run(self, model_output, sample, history, table, step_row, p_order: int, c_order: int, corrector: bool):
        """unipc_step at the step `step_row` ((B,) int64) of the sigma table for the whole batch, with the
        host-decided orders; returns prev_sample.

        The first call with given tensor types, shapes, dtypes, devices and options goes through the op (torch's
        dispatch and every check); later ones with the same signature launch the compiled core's kernel
        directly, as genkern.diffusers.DPMSolverMultistepScheduler does. A tensor that needs gradients, tracing
        under torch.compile, thresholding (the op's quantile pre-pass) and the triton and reference backends
        always take the op."""
        device = sample.device
        prediction, solver = self._codes
        ratio, max_value = (None, 1.0) if self._threshold is None else self._threshold
        eager = not torch.compiler.is_compiling() and not (
            torch.is_grad_enabled() and (model_output.requires_grad or sample.requires_grad)
        )
        plain = type(model_output) is Tensor and type(sample) is Tensor
        codes = (prediction, solver, p_order, c_order, False, corrector, bool(self.config.use_flow_sigmas))
        signature = None
        if eager and plain and ratio is None:
            signature = (
                _solver_ops.LoopSteps._signature_of(model_output, sample),
                codes,
                self.genkern_backend,
                _backend.scoped_choice(),
                _backend.get_backend(),
            )
            if signature in self._accepted:
                prev = torch.empty(sample.shape, dtype=sample.dtype, device=device)
                args = (model_output.contiguous(), sample.contiguous(), history, table, step_row, None, None, prev)
                return _solver_ops.launch_native("unipc_step", prev, *args, *codes, False, 0.0)
        op = torch.ops.genkern.unipc_step
        args = (model_output, sample, history, table, step_row, *codes)
        prev = _backend.call(self.genkern_backend, op, *args, None, 0.0, ratio, max_value)
        if signature is not None:
            backend = _backend.resolve(self.genkern_backend, device, sample.dtype, "diffusion")
            if backend in ("cpu", "cuda"):  # the op accepted this signature: later calls launch the kernel
                if len(self._accepted) >= SIGNATURE_LIMIT:
                    self._accepted.clear()
                self._accepted.add(signature)
        return prev
