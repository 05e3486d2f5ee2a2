"""What the sigma-space drop-ins (Euler, Euler ancestral, flow matching Euler) share: the state copied from a
diffusers scheduler, the step index, the sigma rows on the device and the call of the fused sigma_step op.

diffusers' sigma-space schedulers keep their inference sigmas on the CPU and count the step (`step_index`)
instead of looking the timestep up; the drop-ins keep both (diffusers' own code), so `set_begin_index`,
img2img starts and custom sigmas behave as in diffusers. Only this package imports diffusers.
"""

from __future__ import annotations

import functools
from collections import OrderedDict

import torch
from torch import Tensor

from .. import _native
from .. import backend as _backend
from .._kernels import to_signed, to_unsigned
from ..diffusion import _ops
from ..random import resolve_seed
from ._common import config_with

# What set_timesteps (and set_begin_index, set_shift, scale_model_input) leave on a scheduler: copied by
# from_scheduler, because set_timesteps may have been given custom sigmas, timesteps or Flux's mu.
_STATE = (
    "timesteps",
    "sigmas",
    "num_inference_steps",
    "_step_index",
    "_begin_index",
    "_shift",
    "is_scale_input_called",
)
_ROW_CACHE_LIMIT = 64  # (device, batch) sigma rows kept per scheduler


def rejects_integer_timestep(timestep, name: str) -> None:
    """diffusers' sigma-space steps refuse integer indices (from enumerate(timesteps)) as timesteps."""
    if isinstance(timestep, (int, torch.IntTensor, torch.LongTensor)):
        raise ValueError(
            "Passing integer indices (e.g. from `enumerate(timesteps)`) as timesteps to"
            f" `{name}.step()` is not supported. Make sure to pass one of the `scheduler.timesteps` as a timestep."
        )


def with_signature_of(diffusers_class):
    """Class decorator: the drop-in's __init__ (SigmaStepMixin's) presents diffusers' signature, which
    diffusers' from_config and save/load read (inspect.signature follows __wrapped__), so every configuration
    key is diffusers' own, today's and future releases'."""

    def decorate(cls):
        init = SigmaStepMixin.__init__

        @functools.wraps(diffusers_class.__init__)
        def __init__(self, *args, **kwargs):
            init(self, *args, **kwargs)

        cls.__init__ = __init__
        return cls

    return decorate


class SigmaStepMixin:
    """The genkern side of a sigma-space drop-in; the class it is mixed into is diffusers' own scheduler.

    Attributes outside the configuration (not saved): `genkern_backend`, the genkern backend of the op (None:
    genkern's selection, see genkern.set_backend)."""

    genkern_backend: str | None = None
    _kind: int  # an _ops.SIGMA_STEPS code
    _prediction: int = 0  # an _ops.PREDICTIONS code (flow models predict the velocity: code 0)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._genkern_setup()

    @classmethod
    def from_scheduler(cls, scheduler, *, backend: str | None = None, **flags):
        """This class built from a diffusers scheduler's configuration (`flags` override configuration values),
        its set_timesteps state (timesteps, sigmas, step and begin index, shift) copied; `backend`:
        genkern_backend."""
        new = cls.from_config(config_with(scheduler, flags))
        new.genkern_backend = backend
        for name in _STATE:
            if hasattr(scheduler, name):
                value = getattr(scheduler, name)
                setattr(new, name, value.clone() if isinstance(value, Tensor) else value)
        return new

    def _genkern_setup(self) -> None:
        self._rows: dict[tuple, Tensor] = {}  # (device, batch) -> the (N + 1, B) sigma rows
        self._launchers: dict[tuple, object] = {}  # call signatures the op has accepted -> their kernel launch
        self._rows_source = None  # the self.sigmas both were made from
        self._loop_seed: int | None = None  # the in-kernel noise's seed for this set_timesteps
        self._host_sigmas_of = None
        self._host_sigmas: list[float] = []

    def _sigma_value(self, i: int) -> float:
        """sigmas[i] as a Python float (the float32 value), from a host copy made once per set_timesteps."""
        if self._host_sigmas_of is not self.sigmas:
            self._host_sigmas, self._host_sigmas_of = self.sigmas.tolist(), self.sigmas
        return self._host_sigmas[i]

    def _covers(self, model_output, sample) -> bool:
        """Whether the kernel runs this step: tensors of one floating dtype (diffusers computes a mixed pair in
        float32 and returns model_output's dtype; that case keeps diffusers' own step)."""
        return (
            isinstance(model_output, Tensor)
            and isinstance(sample, Tensor)
            and model_output.dtype == sample.dtype
            and sample.dtype.is_floating_point
        )

    def _noise(self, shape, device: torch.device, dtype: torch.dtype, generator, variance_noise):
        """The step's noise: `variance_noise`, else drawn from `generator` with diffusers' randn_tensor (the
        shape and dtype diffusers draws, so images match the diffusers scheduler's and the generator ends in
        the same state), else None: genkern's Philox stream in the kernel (`_step` draws its seed)."""
        if variance_noise is not None:
            if generator is not None:
                raise ValueError(
                    "Cannot pass both generator and variance_noise. Please make sure that either `generator` or"
                    " `variance_noise` stays `None`."
                )
            return variance_noise
        if generator is not None:
            from diffusers.utils.torch_utils import randn_tensor

            return randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        return None

    def _step(self, model_output: Tensor, sample: Tensor, i: int, noise, draws: bool, stochastic: bool,
              want_x0: bool) -> tuple[Tensor, Tensor]:  # fmt: skip
        """sigma_step from sigmas[i] to sigmas[i + 1] for the whole batch: (prev_sample, pred_original).

        The first call with given tensor types, shapes, dtypes, devices, options and backend choice goes
        through the op (torch's dispatch and every check); later ones with the same signature launch the
        compiled core's kernel directly (`_launcher`): the dispatch of a Python custom op costs more than the
        fused kernel on a batch-1 latent (genkern.diffusion._ops.PreparedStep does the same). A tensor that
        needs gradients, tracing under torch.compile, the triton and reference backends always take the op."""
        if self._rows_source is not self.sigmas:  # set_timesteps, or sigmas assigned: new rows, launchers, seed
            self._rows, self._launchers, self._rows_source, self._loop_seed = {}, {}, self.sigmas, None
        if i + 1 >= len(self.sigmas):
            raise IndexError(f"step {i} is past the last of the {len(self.sigmas) - 1} steps; call set_timesteps again")
        if noise is not None and noise.dtype != sample.dtype and noise.dtype.is_floating_point:
            noise = noise.to(sample.dtype)  # diffusers draws flow's noise in float32 whatever the sample's dtype
        seed = 0
        if draws and noise is None:
            if self._loop_seed is None:  # one draw from torch's generator per set_timesteps; step i at offset i + 1
                self._loop_seed = to_signed(resolve_seed(None))
            seed = self._loop_seed
        eager = not torch.compiler.is_compiling() and not (
            torch.is_grad_enabled() and (model_output.requires_grad or sample.requires_grad)
        )
        if eager:
            signature = (
                _ops.PreparedStep._signature_of(model_output, sample),
                None if noise is None else (type(noise), noise.shape, noise.dtype, noise.device),
                stochastic,
                want_x0,
                self.genkern_backend,
                _backend.scoped_choice(),
                _backend.get_backend(),
            )
            launch = self._launchers.get(signature)
            if launch is not None:
                return launch(model_output, sample, noise, i, seed)
        batch = sample.shape[0] if sample.dim() else 0
        rows = self._sigma_rows(sample.device, batch)
        args = (model_output, sample, rows[i], rows[i + 1], noise, seed, i + 1, self._kind, self._prediction, None, 0.0)
        result = _backend.call(self.genkern_backend, torch.ops.genkern.sigma_step, *args, stochastic, want_x0)
        plain = type(model_output) is Tensor and type(sample) is Tensor and (noise is None or type(noise) is Tensor)
        if eager and plain:  # the op accepted this signature
            backend = _backend.resolve(self.genkern_backend, sample.device, sample.dtype, "diffusion")
            if backend in ("cpu", "cuda"):
                if len(self._launchers) >= _ROW_CACHE_LIMIT:
                    self._launchers.clear()
                self._launchers[signature] = self._launcher(model_output, sample, rows, stochastic, want_x0)
        return result

    def _sigma_rows(self, device: torch.device, batch: int) -> Tensor:
        """(N + 1, batch) float32 rows of self.sigmas on `device`, made once per set_timesteps: step i reads
        rows i and i + 1, and copies nothing to the device."""
        key = (device, batch)
        rows = self._rows.get(key)
        if rows is None:
            if len(self._rows) >= _ROW_CACHE_LIMIT:
                self._rows.clear()
            rows = self.sigmas.to(device=device, dtype=torch.float32)[:, None].expand(-1, batch).contiguous()
            self._rows[key] = rows
        return rows

    def _launcher(self, model_output: Tensor, sample: Tensor, rows: Tensor, stochastic: bool, want_x0: bool):
        """launch(model_output, sample, noise, i, seed) -> (prev_sample, pred_original): the compiled core's
        sigma_step on tensors of the signature the op has just accepted, with every description that does not
        depend on the tensors' data made here once: the sigma rows', and the shapes and contiguous strides."""
        device, dtype, shape = sample.device, sample.dtype, sample.shape
        fn, kind, prediction = _ops.KERNELS.native().sigma_step, self._kind, self._prediction
        described_rows = [_native.array(row) for row in rows]  # `rows` stays referenced by self._rows
        array, flat = _describer(sample)
        numel = sample.numel()
        batch = shape[0]
        # Contiguous tensors described flat (the kernel reads numel, and the sample's batch): two-element
        # lists convert to the core's shapes faster than the tensors' own, a microsecond a description.
        sample_shape, sample_strides = [batch, numel // batch if batch else 0], [numel // batch if batch else 0, 1]
        empty = sample.new_empty(0)

        def launch(model_output, sample, noise, i, seed):
            prev = torch.empty(shape, dtype=dtype, device=device)
            x0 = torch.empty(shape, dtype=dtype, device=device) if want_x0 else empty
            # Held in locals until the kernel has run: a description is a bare pointer, and a contiguous copy
            # made inside the argument list would be freed (its memory reusable) before the launch.
            model_c, sample_c = model_output.contiguous(), sample.contiguous()
            noise_c = None if noise is None else noise.contiguous()
            described = [
                flat(model_c, model_output.numel()),
                array(sample_c.data_ptr(), sample_shape, sample_strides),
                None if noise_c is None else flat(noise_c, numel),
                described_rows[i],
                described_rows[i + 1],
                None,
                flat(prev, numel),
                flat(x0, numel) if want_x0 and numel else None,
                kind,
                prediction,
                False,
                0.0,
                stochastic,
                to_unsigned(seed),
                i + 1,
            ]
            _native.launch(fn, device, described)
            return prev, x0

        return launch


def _describer(like: Tensor):
    """(array(data_ptr, shape, strides), flat(t, numel)): the core's descriptions of tensors of like's dtype
    and device, without _native.array's per-call dispatch on the tensor's kind (four of them a step)."""
    Array = _native._C.Array
    dtype = _native._dtype_enums()[like.dtype]
    kind, index = (_native._C.Device.cuda, like.get_device()) if like.is_cuda else (_native._C.Device.cpu, 0)

    def array(data_ptr: int, shape: list, strides: list):
        return Array(data_ptr, shape, strides, dtype, kind, index)

    def flat(t: Tensor, numel: int):
        """A contiguous tensor as one row of numel elements."""
        return Array(t.data_ptr(), [numel], [1], dtype, kind, index)

    return array, flat


def make_output(cls, **values):
    """cls(**values), a diffusers BaseOutput, for non-None values, without the dataclass __init__ and
    __post_init__ (its field walk costs several microseconds a step): the same mapping and attributes."""
    out = cls.__new__(cls)
    for name, value in values.items():
        OrderedDict.__setitem__(out, name, value)
        object.__setattr__(out, name, value)
    return out


SIGNATURE_LIMIT = 64  # call signatures the op has accepted, and device tables, kept per scheduler


class SolverTablesMixin:
    """The multistep drop-ins' (DPM-Solver++, UniPC) device copies of the sigma table and of the per-step
    index rows, made once per set_timesteps: a step passes row i of the rows and copies nothing to the device.
    The class sets `_tables_source = None` and `_tables = {}` in its __init__; `_new_sigmas()` runs when the
    tables are rebuilt for new sigmas (DPM draws its SDE seed anew then)."""

    def set_timesteps(self, *args, **kwargs):
        """diffusers' set_timesteps; with a device given (or timesteps already there), the kernel's copy of the
        sigma table is made on that device here, before the loop, so that no step copies to the device."""
        super().set_timesteps(*args, **kwargs)
        device = self.timesteps.device
        if device.type != "cpu":
            self._device_tables(device, None)

    def _new_sigmas(self) -> None:
        pass

    def _device_tables(self, device: torch.device, batch: int | None) -> tuple[Tensor, Tensor | None]:
        """(sigma table, (N, batch) int64 step-index rows) on `device`, made once per set_timesteps (the rows on
        the device itself): step i passes row i, and copies nothing to the device."""
        if self._tables_source is not self.sigmas:  # set_timesteps, or sigmas assigned
            self._tables, self._tables_source = {}, self.sigmas
            self._new_sigmas()
        table = self._tables.get(device)
        if table is None:
            table = self._tables[device] = self.sigmas.to(device=device, dtype=torch.float32).contiguous()
        if batch is None:
            return table, None
        rows = self._tables.get((device, batch))
        if rows is None:
            if len(self._tables) >= SIGNATURE_LIMIT:
                self._tables = {device: table}
            steps = torch.arange(len(self.sigmas) - 1, dtype=torch.int64, device=device)
            rows = self._tables[(device, batch)] = steps[:, None].expand(-1, batch).contiguous()
        return table, rows
