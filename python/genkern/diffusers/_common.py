"""What the DDPM and DDIM drop-ins share: the schedule taken from diffusers' configuration, the timestep rows,
the noise, the options and the call of the fused step op.

Only this package imports diffusers (an optional extra): `import genkern` never does.
"""

from __future__ import annotations

import numbers

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

from .. import _native
from .. import backend as _backend
from .._kernels import to_signed, to_unsigned
from ..diffusion import _ops
from ..diffusion.schedules import NoiseSchedule
from ..random import resolve_seed

SPACINGS = ("leading", "trailing", "linspace")
PREDICTIONS = _ops.PREDICTIONS  # epsilon, v_prediction, sample
GENKERN_BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}
_ROW_CACHE_LIMIT = 4096  # (value, batch, device) rows kept per scheduler


def _config_error(key: str, value, allowed, why: str = "") -> ValueError:
    why = f" ({why})" if why else ""
    return ValueError(f"genkern.diffusers: unsupported {key}={value!r}; supported: {allowed}{why}")


def _flag(key: str, value) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"genkern.diffusers: {key} must be a bool, got {value!r}")
    return bool(value)


def _positive(key: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
        raise ValueError(f"genkern.diffusers: {key} must be a positive number, got {value!r}")
    return float(value)


def _schedule_from_alphas_cumprod(alphas_cumprod: Tensor, final_alpha_one: bool) -> NoiseSchedule:
    """A NoiseSchedule whose alpha-bar is diffusers' own float32 alphas_cumprod: the betas are recovered in
    float64 from consecutive ratios, and their float64 cumulative product rounds back to exactly those float32
    values in the table (the kernels' alpha-bar column)."""
    ab = alphas_cumprod.detach().to(device="cpu", dtype=torch.float64)
    prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
    betas = 1.0 - ab / prev
    if not bool(((betas > 0) & (betas <= 1)).all()):
        raise ValueError(
            "genkern.diffusers: the scheduler's alphas_cumprod must decrease strictly (every beta in (0, 1] "
            "after float32 rounding); check trained_betas / beta_start"
        )
    return NoiseSchedule(betas=betas, final_alpha_one=final_alpha_one)


def _genkern_schedule(config, final_alpha_one: bool) -> NoiseSchedule:
    """genkern's own float64 schedule for a diffusers configuration (genkern_schedule=True)."""
    rescale = bool(config.rescale_betas_zero_snr)
    if config.trained_betas is not None:
        return NoiseSchedule(
            betas=config.trained_betas, rescale_zero_terminal_snr=rescale, final_alpha_one=final_alpha_one
        )
    name = config.beta_schedule
    if name not in GENKERN_BETA_SCHEDULES:
        raise _config_error(
            "beta_schedule",
            name,
            tuple(GENKERN_BETA_SCHEDULES),
            "with genkern_schedule=True; leave it False to use"
            " diffusers' own alphas_cumprod for any schedule diffusers builds",
        )
    return NoiseSchedule(
        GENKERN_BETA_SCHEDULES[name],
        num_train_timesteps=config.num_train_timesteps,
        beta_start=config.beta_start,
        beta_end=config.beta_end,
        rescale_zero_terminal_snr=rescale,
        final_alpha_one=final_alpha_one,
    )


def config_with(scheduler, flags: dict) -> dict:
    """A diffusers scheduler's configuration with `flags` overriding its values."""
    config = dict(scheduler.config)
    config.update(flags)
    # Keys the caller set explicitly must not be reset to defaults by diffusers' `_use_default_values`.
    if flags and "_use_default_values" in config:
        config["_use_default_values"] = [k for k in config["_use_default_values"] if k not in flags]
    return config


class GenkernStepMixin:
    """The genkern side of a drop-in scheduler; the class it is mixed into is diffusers' own scheduler (its
    configuration, set_timesteps, timesteps, init_noise_sigma, order, save/load), with `step`, `add_noise`
    and `scale_model_input` running genkern's ops.

    Attributes outside the configuration (not saved): `genkern_backend`, the genkern backend of the ops (None:
    genkern's selection, see genkern.set_backend)."""

    genkern_backend: str | None = None
    _kind: int  # _ops.DDPM or _ops.DDIM

    # ------------------------------------------------------------------------------------------ set-up
    @classmethod
    def from_scheduler(cls, scheduler, *, backend: str | None = None, **flags):
        """This class built from a diffusers scheduler's configuration (`flags` override configuration
        values, e.g. genkern_timesteps=True), its set_timesteps state copied; `backend`: genkern_backend."""
        new = cls.from_config(config_with(scheduler, flags))
        new.genkern_backend = backend
        if getattr(scheduler, "custom_timesteps", False):
            new.set_timesteps(timesteps=scheduler.timesteps.tolist(), device=scheduler.timesteps.device)
        elif scheduler.num_inference_steps is not None:
            new.set_timesteps(scheduler.num_inference_steps, device=scheduler.timesteps.device)
        return new

    def _genkern_setup(self, final_alpha_one: bool) -> None:
        config = self.config
        if config.prediction_type not in PREDICTIONS:
            raise _config_error("prediction_type", config.prediction_type, PREDICTIONS)
        if config.timestep_spacing not in SPACINGS:
            raise _config_error("timestep_spacing", config.timestep_spacing, SPACINGS)
        self._genkern_timesteps = _flag("genkern_timesteps", config.genkern_timesteps)
        if _flag("genkern_schedule", config.genkern_schedule):
            self._schedule = _genkern_schedule(config, final_alpha_one)
        else:
            self._schedule = _schedule_from_alphas_cumprod(self.alphas_cumprod, final_alpha_one)
        T = config.num_train_timesteps
        if self._schedule.num_train_timesteps != T:
            raise ValueError(
                f"genkern.diffusers: num_train_timesteps={T} but the schedule has "
                f"{self._schedule.num_train_timesteps} betas (trained_betas)"
            )
        clip = None
        if _flag("thresholding", config.thresholding):
            ratio = config.dynamic_thresholding_ratio
            if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not 0.0 <= ratio <= 1.0:
                raise ValueError(f"genkern.diffusers: dynamic_thresholding_ratio must be in [0, 1], got {ratio!r}")
            dynamic = (float(ratio), _positive("sample_max_value", config.sample_max_value))
        else:
            dynamic = (None, 1.0)
            if _flag("clip_sample", config.clip_sample):
                clip = _positive("clip_sample_range", config.clip_sample_range)
        self._base_options = dict(
            prediction=PREDICTIONS.index(config.prediction_type),
            clip=clip,
            dynamic_ratio=dynamic[0],
            dynamic_max=dynamic[1],
        )
        self._packed: dict[tuple, tuple[list[float], list[int]]] = {}
        self._rows: dict[tuple, Tensor] = {}
        self._described: dict = {}  # per device: the table's and the rows' descriptions for the core
        self._accepted: set[tuple] = set()  # step signatures the op has checked and accepted
        self._reset_step_state()

    def _reset_step_state(self) -> None:
        self._timestep_list: list[int] | None = None  # host copy of self.timesteps, made at the first step
        self._timestep_source = None  # the tensor it was made from
        self._index_of: dict[int, int] = {}
        self._step_index: int | None = None  # device timesteps: the step counted, not read back

    @property
    def genkern_schedule(self) -> NoiseSchedule:
        """The NoiseSchedule the ops read (its float32 table: diffusers' alphas_cumprod unless genkern_schedule)."""
        return self._schedule

    def _options(self, **kind_options) -> tuple[list[float], list[int], _ops.StepOptions]:
        """The op's (options, codes) lists and the StepOptions they pack, made and checked once per value."""
        key = tuple(sorted(kind_options.items()))
        packed = self._packed.get(key)
        if packed is None:
            options = _ops.StepOptions(**self._base_options, **kind_options)
            options.check(self._kind)
            packed = self._packed[key] = (*options.pack(), options)
        return packed

    def _row(self, value: int, batch: int, device: torch.device) -> Tensor:
        """An int64 (batch,) tensor of `value` on `device`, made once (timestep rows are read-only)."""
        key = (value, batch, device)
        row = self._rows.get(key)
        if row is None:
            if len(self._rows) >= _ROW_CACHE_LIMIT:
                self._rows.clear()
            row = self._rows[key] = torch.full((batch,), value, dtype=torch.int64, device=device)
        return row

    # ------------------------------------------------------------------------------------------ timesteps
    def _host_timesteps(self) -> list[int]:
        if self._timestep_source is not self.timesteps:  # set_timesteps, or timesteps assigned
            self._timestep_list = [int(v) for v in self.timesteps.tolist()]
            self._timestep_source = self.timesteps
            self._index_of = {}
            for i, v in enumerate(self._timestep_list):
                self._index_of.setdefault(v, i)
            self._step_index = None
        return self._timestep_list

    def _timestep_value(self, timestep) -> tuple[int, int | None]:
        """(t, its index in self.timesteps or None). A Python int or a CPU tensor is read (free); a tensor on
        an accelerator is not (that would synchronise the host): its step is counted from the first call after
        set_timesteps, whose value is read once, as diffusers' Euler schedulers count theirs, so it must follow
        self.timesteps in order."""
        timesteps = self._host_timesteps()
        if isinstance(timestep, Tensor) and timestep.device.type not in ("cpu", "meta"):
            if self._step_index is None or self._step_index + 1 >= len(timesteps):
                value = int(timestep.reshape(-1)[0])  # the one host read of a loop
                index = self._index_of.get(value)
                if index is None:
                    raise ValueError(f"timestep {value} is not one of the scheduler's timesteps")
            else:
                index = self._step_index + 1
            self._step_index = index
            return timesteps[index], index
        if isinstance(timestep, Tensor):
            if timestep.numel() != 1:
                raise ValueError(
                    f"timestep must be one value (diffusers' schedulers step one timestep for the whole batch), "
                    f"got a tensor of shape {tuple(timestep.shape)}"
                )
            if timestep.dtype.is_floating_point and timestep.item() != int(timestep.item()):
                raise ValueError(f"timestep must be an integer value, got {timestep.item()}")
            value = int(timestep.item())
        elif isinstance(timestep, numbers.Integral) and not isinstance(timestep, bool):
            value = int(timestep)
        elif isinstance(timestep, numbers.Real) and float(timestep).is_integer():
            value = int(timestep)
        else:
            raise TypeError(f"timestep must be an int or a one-element tensor, got {type(timestep).__name__}")
        return value, self._index_of.get(value)

    def _next_timestep(self, value: int, index: int | None) -> int:
        """The entry after `value` in self.timesteps, -1 after the last (DDPMScheduler.previous_timestep)."""
        if index is None:
            raise ValueError(f"timestep {value} is not one of the scheduler's timesteps (call set_timesteps first)")
        timesteps = self._timestep_list
        return timesteps[index + 1] if index + 1 < len(timesteps) else -1

    def set_timesteps(self, *args, **kwargs):
        super().set_timesteps(*args, **kwargs)
        if (
            self._genkern_timesteps
            and self.num_inference_steps is not None
            and not getattr(self, "custom_timesteps", False)
        ):
            # diffusers' trailing spacing, np.arange(T, 0, -T/N), has N + 1 entries for some N (T = 1000: 61,
            # 103, 121, ...), the last one -1: keep the first N, as genkern's NoiseSchedule.timesteps does.
            self.timesteps = self.timesteps[: self.num_inference_steps]
        self._reset_step_state()

    # ------------------------------------------------------------------------------------------ the ops
    def _noise(self, model_output, sample, generator, variance_noise):
        """The step's noise as diffusers would take it: `variance_noise`, else drawn from `generator` with
        diffusers' randn_tensor (so images match the diffusers scheduler's); None: genkern's Philox stream."""
        if variance_noise is not None:
            return variance_noise
        if generator is not None:
            return randn_tensor(sample.shape, generator=generator, device=model_output.device, dtype=model_output.dtype)
        return None

    def _call(self, op, model_output, sample, t: int, prev: int, noise, options, draws: bool):
        """op(...) at training timestep t -> prev for the whole batch; returns (prev_sample, pred_original).
        Without `noise`, a step that draws takes a fresh seed from torch's default generator (genkern's
        Philox stream in the kernel).

        The first call with given tensor types, shapes, dtypes, devices and options goes through the op (torch's
        dispatch and every check of the op); later ones with the same signature, whose timestep values are
        checked here on the host, call the selected backend's kernel directly: the dispatch of a Python custom
        op costs more than the fused kernel on a batch-1 latent (see genkern.diffusion._ops.PreparedStep). A
        tensor that needs gradients, tracing under torch.compile and the reference backend always take the op."""
        device, batch = sample.device, sample.shape[0] if sample.dim() else 0
        T = self.config.num_train_timesteps
        t_row = t + T if t < 0 else t  # diffusers indexes alphas_cumprod[t]: -1 is its last entry
        seed = to_signed(resolve_seed(None)) if noise is None and draws else 0
        floats, codes, step_options = options
        t_rows, prev_rows = self._row(t_row, batch, device), self._row(prev, batch, device)
        table = self._schedule.table(device)
        fast = (
            type(model_output) is Tensor
            and type(sample) is Tensor
            and (noise is None or type(noise) is Tensor)
            and not torch.compiler.is_compiling()
            and not (torch.is_grad_enabled() and (model_output.requires_grad or sample.requires_grad))
            and 0 <= t_row < T
            and -1 <= prev < t_row
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
                tuple(floats),
                tuple(codes),
            )
            if backend != "reference" and signature in self._accepted:
                if backend in ("cpu", "cuda") and step_options.dynamic_ratio is None:
                    return self._native_step(model_output, sample, t_row, prev, batch, noise, seed, step_options)
                kernels = _ops.KERNELS.on(backend)  # triton, or thresholds to compute first
                args = (model_output, sample, t_rows, prev_rows, table, noise, seed, 0, step_options, True)
                return _ops._step_kernel(kernels, self._kind, *args)
        args = (model_output, sample, t_rows, prev_rows, table, noise, seed, 0, floats, codes, True)
        result = _backend.call(self.genkern_backend, op, *args)
        if fast:  # the op accepted this signature
            if len(self._accepted) >= 64:
                self._accepted.clear()
            self._accepted.add(signature)
        return result

    def _native_step(self, model_output, sample, t: int, prev: int, batch: int, noise, seed: int, o):
        """The compiled core's step kernel on arguments the op has accepted before, with the descriptions of
        the table and the timestep rows made once (genkern.diffusion._ops.PreparedStep does the same)."""
        device = sample.device
        described = self._described.get(device)
        if described is None:
            described = self._described[device] = {"table": _native.array(self._schedule.table(device))}
        rows = []
        for value in (t, prev):
            row = described.get((value, batch))
            if row is None:
                if len(described) > _ROW_CACHE_LIMIT:
                    described.clear()
                    described["table"] = _native.array(self._schedule.table(device))  # cached by the schedule
                tensor = self._row(value, batch, device)
                row = described[(value, batch)] = (tensor, _native.array(tensor))  # the tensor kept alive
            rows.append(row[1])
        out = torch.empty(sample.shape, dtype=sample.dtype, device=device)
        x0 = torch.empty(sample.shape, dtype=sample.dtype, device=device)
        # Held in locals until the kernel has run: a description is a bare pointer, and a contiguous copy
        # made inside the argument list would be freed (its memory reusable) before the launch.
        model_output, sample = model_output.contiguous(), sample.contiguous()
        noise = None if noise is None else noise.contiguous()
        _native.launch(
            _ops.KERNELS.native().step,
            device,
            [
                _native.array(model_output),
                _native.array(sample),
                _native.array(noise),
                rows[0],
                rows[1],
                described["table"],
                None,
                None,
                _native.array(out),
                _native.array(x0),
                self._kind,
                o.prediction,
                o.variance,
                False,
                0.0,
                0.0 if o.clip is None else float(o.clip),
                float(o.eta),
                o.use_clipped_model_output,
                to_unsigned(seed),
                0,
            ],
        )
        return out, x0

    def add_noise(self, original_samples: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) noise with the given noise, in one pass (genkern.q_sample);
        timesteps one per sample (or one for all), ab from the same table the steps read."""
        from ..diffusion import q_sample

        if not isinstance(timesteps, Tensor):
            timesteps = torch.as_tensor(timesteps)
        batch = original_samples.shape[0] if original_samples.dim() else 0
        t = timesteps.reshape(-1)
        if t.numel() == 1 and batch != 1:
            t = t.reshape(())
        t = t.to(torch.int64)
        return q_sample(original_samples, t, self._schedule, noise=noise, backend=self.genkern_backend)
