"""What the sigma-space drop-ins (Euler, Euler ancestral, flow matching Euler) share: the state copied from a
diffusers scheduler, the step index, the sigma rows on the device and the call of the fused sigma_step op.

diffusers' sigma-space schedulers keep their inference sigmas on the CPU and count the step (`step_index`)
instead of looking the timestep up; the drop-ins keep both (diffusers' own code), so `set_begin_index`,
img2img starts and custom sigmas behave as in diffusers. Only this package imports diffusers.
"""

from __future__ import annotations

import functools

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
        self._rows: dict[tuple, tuple[Tensor, list]] = {}  # (device, batch) -> ((N + 1, B) rows, descriptions)
        self._rows_source = None  # the self.sigmas they were made from
        self._host_sigmas_of = None
        self._host_sigmas: list[float] = []
        self._accepted: set[tuple] = set()  # call signatures the op has checked and accepted

    def _sigma_value(self, i: int) -> float:
        """sigmas[i] as a Python float (the float32 value), from a host copy made once per set_timesteps."""
        if self._host_sigmas_of is not self.sigmas:
            self._host_sigmas, self._host_sigmas_of = self.sigmas.tolist(), self.sigmas
        return self._host_sigmas[i]

    def _sigma_rows(self, device: torch.device, batch: int) -> tuple[Tensor, list]:
        """((N + 1, batch) float32 rows of self.sigmas on `device`, their descriptions for the core), made once
        per set_timesteps: step i reads rows i and i + 1, and copies nothing to the device."""
        if self._rows_source is not self.sigmas:
            self._rows, self._rows_source = {}, self.sigmas
        key = (device, batch)
        cached = self._rows.get(key)
        if cached is None:
            if len(self._rows) >= _ROW_CACHE_LIMIT:
                self._rows.clear()
            rows = self.sigmas.to(device=device, dtype=torch.float32)[:, None].expand(-1, batch).contiguous()
            described = [_native.array(row) for row in rows] if _native.available() else []
            cached = self._rows[key] = (rows, described)
        return cached

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
        the same state), else None: genkern's Philox stream in the kernel, its seed from torch's generator."""
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

        The first call with given tensor types, shapes, dtypes, devices and options goes through the op (torch's
        dispatch and every check); later ones with the same signature on the compiled core launch its kernel
        directly, the sigma rows described once per set_timesteps (the dispatch of a Python custom op costs
        more than the fused kernel on a batch-1 latent; genkern.diffusion._ops.PreparedStep does the same). A
        tensor that needs gradients, tracing under torch.compile, the triton and reference backends take the op."""
        device = sample.device
        batch = sample.shape[0] if sample.dim() else 0
        if i + 1 >= len(self.sigmas):
            raise IndexError(f"step {i} is past the last of the {len(self.sigmas) - 1} steps; call set_timesteps again")
        rows, described = self._sigma_rows(device, batch)
        if noise is not None and noise.dtype != sample.dtype and noise.dtype.is_floating_point:
            noise = noise.to(sample.dtype)  # diffusers draws flow's noise in float32 whatever the sample's dtype
        seed = to_signed(resolve_seed(None)) if draws and noise is None else 0
        fast = (
            type(model_output) is Tensor
            and type(sample) is Tensor
            and (noise is None or type(noise) is Tensor)
            and not torch.compiler.is_compiling()
            and not (torch.is_grad_enabled() and (model_output.requires_grad or sample.requires_grad))
        )
        if fast:
            backend = _backend.resolve(self.genkern_backend, device, sample.dtype, "diffusion")
            signature = (
                backend,
                model_output.shape,
                model_output.dtype,
                model_output.device,
                sample.shape,
                sample.dtype,
                device,
                None if noise is None else (noise.shape, noise.dtype, noise.device),
                stochastic,
                want_x0,
            )
            if backend in ("cpu", "cuda") and described and signature in self._accepted:
                return self._native_step(model_output, sample, described[i], described[i + 1], noise, seed,
                                         stochastic, want_x0)  # fmt: skip
        args = (model_output, sample, rows[i], rows[i + 1], noise, seed, 0, self._kind, self._prediction, None, 0.0)
        result = _backend.call(self.genkern_backend, torch.ops.genkern.sigma_step, *args, stochastic, want_x0)
        if fast:  # the op accepted this signature
            if len(self._accepted) >= 64:
                self._accepted.clear()
            self._accepted.add(signature)
        return result

    def _native_step(self, model_output, sample, sigma, sigma_next, noise, seed: int, stochastic: bool,
                     want_x0: bool) -> tuple[Tensor, Tensor]:  # fmt: skip
        """The compiled core's sigma_step kernel on arguments the op has accepted before."""
        device = sample.device
        prev = torch.empty(sample.shape, dtype=sample.dtype, device=device)
        x0 = torch.empty(sample.shape if want_x0 else (0,), dtype=sample.dtype, device=device)
        # Held in locals until the kernel has run: a description is a bare pointer, and a contiguous copy
        # made inside the argument list would be freed (its memory reusable) before the launch.
        model_output, sample = model_output.contiguous(), sample.contiguous()
        noise = None if noise is None else noise.contiguous()
        _native.launch(
            _ops.KERNELS.native().sigma_step,
            device,
            [
                _native.array(model_output),
                _native.array(sample),
                _native.array(noise),
                sigma,
                sigma_next,
                None,
                _native.array(prev),
                _native.array(x0) if want_x0 and x0.numel() else None,
                self._kind,
                self._prediction,
                False,
                0.0,
                stochastic,
                to_unsigned(seed),
                0,
            ],
        )
        return prev, x0
