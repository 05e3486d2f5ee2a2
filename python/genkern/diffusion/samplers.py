"""Denoising loops: DDPM (ancestral) and DDIM sampling with the fused steps.

    sampler = DDIMSampler(schedule)
    images = sampler.sample(model, (64, 1, 8, 8), num_steps=50, seed=0)

    # Classifier-free guidance: model_kwargs hold batch-2B values, the unconditional half first
    null = torch.full_like(labels, num_classes)
    images = sampler.sample(model, (B, 1, 8, 8), guidance_scale=3.0,
                            model_kwargs={"class_labels": torch.cat([null, labels])})

The model is called as model(x, t, **model_kwargs), x (B, ...) and t a (B,) int64 tensor on the device;
with `guidance_scale` set, as model(cat([x, x]), cat([t, t]), **model_kwargs), and the step combines the two
halves of its output (u + s (c - u), see genkern.diffusion.reference). The sampler does not change the
model's mode: call model.eval() first if it has dropout.

Randomness depends only on `seed`: x_T is the genkern stream's randn(shape) at offset 0 (unless `x_T` is
given), and step i draws its noise at offset i + 1. An offset selects an independent Philox stream (it is
counter words 2-3, docs/math.md section 1), so consecutive offsets never overlap.

The loop runs without gradients and without host synchronisation: timesteps are device tensors, never
read back. `cuda_graph=True` captures the whole loop once per configuration and replays it (see
`sample`).
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from .. import _checks
from ..random import randn, resolve_seed
from . import reference as _spec
from .schedules import NoiseSchedule

DDIM_DEFAULT_STEPS = 50


def _check_shape(shape) -> tuple[int, ...]:
    if isinstance(shape, (str, bytes, Tensor)) or not hasattr(shape, "__iter__"):
        raise TypeError(f"shape must be a sequence of ints, got {type(shape).__name__}")
    shape = tuple(_checks.integer("shape", s, low=1) for s in shape)
    if not shape:
        raise ValueError("shape must have a batch dimension (dim 0)")
    return shape


def _check_flag(name: str, x) -> bool:
    if not isinstance(x, bool):
        raise TypeError(f"{name} must be a bool, got {type(x).__name__}")
    return x


class _Sampler:
    """The loop shared by DDPM and DDIM; a subclass supplies the step's own arguments."""

    kind: str  # "ddpm" or "ddim": which step function
    max_default_steps: int | None  # num_steps=None: this many steps, at most T (None: T)

    def __init__(self, schedule: NoiseSchedule, prediction_type: str, clip_sample, dynamic_threshold, backend):
        self.schedule = _spec.check_schedule(schedule)
        self.prediction_type = _spec.check_choice("prediction_type", prediction_type, _spec.PREDICTION_TYPES)
        _spec.check_threshold(clip_sample, dynamic_threshold)
        self.clip_sample, self.dynamic_threshold = clip_sample, dynamic_threshold
        if backend is not None and not isinstance(backend, str):
            raise TypeError(f"backend must be a str or None, got {type(backend).__name__}")
        self.backend = backend
        self._graphs: dict[tuple, _GraphedLoop] = {}
        self._last_loop: tuple[tuple, _Loop] | None = None  # (key, loop): replaced whole, safe across threads

    def _sample(
        self,
        model,
        shape,
        num_steps,
        step_kwargs: dict,
        draws_noise: bool,
        *,
        guidance_scale,
        guidance_rescale,
        seed,
        spacing,
        steps_offset,
        model_kwargs,
        x_T,
        device,
        dtype,
        cuda_graph,
    ) -> Tensor:
        if not callable(model):
            raise TypeError(f"model must be callable as model(x, t, **model_kwargs), got {type(model).__name__}")
        shape = _check_shape(shape)
        if num_steps is None:
            T = self.schedule.num_train_timesteps
            num_steps = T if self.max_default_steps is None else min(self.max_default_steps, T)
        _spec.check_guidance(guidance_scale, guidance_rescale)
        if model_kwargs is None:
            model_kwargs = {}
        if not isinstance(model_kwargs, dict):
            raise TypeError(f"model_kwargs must be a dict, got {type(model_kwargs).__name__}")
        if dtype not in _checks.FLOAT_DTYPES:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype}")
        if x_T is not None:
            _checks.float_tensor("x_T", x_T)
            if tuple(x_T.shape) != shape:
                raise ValueError(f"x_T has shape {tuple(x_T.shape)}, expected shape {shape}")
        if device is None:
            device = x_T.device if x_T is not None else torch.device("cpu")
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"device: {exc}") from None
        _check_flag("cuda_graph", cuda_graph)
        if cuda_graph and device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs a CUDA device, got device {device}")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())  # one cache key for "cuda" and "cuda:0"
        seed = resolve_seed(seed)

        x = (
            x_T.to(device=device, dtype=dtype)
            if x_T is not None
            else randn(shape, seed=seed, offset=0, device=device, dtype=dtype, backend=self.backend)
        )

        def loop() -> _Loop:
            timesteps, prev_timesteps = self.schedule.timesteps(num_steps, spacing, steps_offset)
            return _Loop(
                self,
                model,
                step_kwargs,
                timesteps,
                prev_timesteps,
                shape[0],
                device,
                guidance_scale,
                guidance_rescale,
                seed,
            )

        # What a loop depends on besides x_T and the model_kwargs' values. The step kernels take the seed as a
        # host scalar, so a sampler that draws noise (DDPM, DDIM with eta > 0) needs one loop per seed.
        key = (
            shape, dtype, device, id(model), num_steps, spacing, steps_offset, tuple(sorted(step_kwargs.items())),
            guidance_scale, guidance_rescale, seed if draws_noise else None, self.prediction_type,
            self.clip_sample, self.dynamic_threshold, self.backend,
        )  # fmt: skip
        with torch.no_grad():
            if not cuda_graph:
                # The last call's loop (its device timestep rows, its checked step) serves the next call with
                # the same key: building them costs as much as a third of a short batch-1 run.
                last = self._last_loop
                if last is None or last[0] != key:
                    last = self._last_loop = (key, loop())
                return last[1](x, model_kwargs)
            # A capture holds its per-step noise and reads x_T and the model_kwargs tensors from static buffers,
            # copied in on each call.
            key += (_kwargs_key(model_kwargs),)
            graphed = self._graphs.get(key)
            if graphed is None:
                graphed = self._graphs[key] = _GraphedLoop(loop(), model, x, model_kwargs)
            return graphed(x, model_kwargs)

    def clear_cuda_graphs(self) -> None:
        """Release the captured graphs (and the memory pools they hold)."""
        self._graphs.clear()


class _Loop:
    """One denoising run from x_T: everything on the device built once, so a CUDA graph can capture it."""

    def __init__(
        self,
        sampler: _Sampler,
        model,
        step_kwargs: dict,
        timesteps: Tensor,
        prev_timesteps: Tensor,
        batch: int,
        device: torch.device,
        guidance_scale,
        guidance_rescale,
        seed: int,
    ):
        self.sampler, self.model, self.step_kwargs, self.seed = sampler, model, step_kwargs, seed
        self.guidance_scale, self.guidance_rescale = guidance_scale, guidance_rescale
        # Row i: step i's timestep for every sample (contiguous (B,) rows, indexed without reading them).
        self.t = timesteps.to(device)[:, None].expand(-1, batch).contiguous()
        self.prev_t = prev_timesteps.to(device)[:, None].expand(-1, batch).contiguous()
        self.t_model = self.t.repeat(1, 2) if guidance_scale is not None else self.t
        self.t_model_rows = self.t_model.unbind(0)
        self.step = None  # made on the first call (under a capture's warm-up, not during the capture)

    def __call__(self, x: Tensor, model_kwargs: dict) -> Tensor:
        from . import _prepared_step  # genkern.diffusion imports this module during its own initialisation

        sampler = self.sampler
        # The options normalised and the timesteps checked once for the whole loop (see PreparedStep).
        step = self.step or _prepared_step(
            sampler.kind,
            sampler.schedule,
            self.t,
            self.prev_t,
            seed=self.seed,
            prediction_type=sampler.prediction_type,
            clip_sample=sampler.clip_sample,
            dynamic_threshold=sampler.dynamic_threshold,
            guidance_scale=self.guidance_scale,
            guidance_rescale=self.guidance_rescale,
            backend=sampler.backend,
            **self.step_kwargs,
        )
        self.step = step
        for i, t in enumerate(self.t_model_rows):
            x_in = torch.cat([x, x]) if self.guidance_scale is not None else x
            x = step(self.model(x_in, t, **model_kwargs), x, i)
        return x


def _kwargs_key(model_kwargs: dict) -> tuple:
    """What a capture depends on: the tensors' shapes, dtypes and devices (their values are copied in on each
    replay), the other values themselves (they must be hashable)."""
    key = []
    for name, value in sorted(model_kwargs.items()):
        if isinstance(value, Tensor):
            key.append((name, "tensor", tuple(value.shape), value.dtype, value.device))
        else:
            try:
                hash(value)
            except TypeError:
                raise TypeError(
                    f"with cuda_graph=True, model_kwargs[{name!r}] must be a tensor or hashable, "
                    f"got {type(value).__name__}"
                ) from None
            key.append((name, "value", value))
    return tuple(key)


class _GraphedLoop:
    """A denoising loop captured in a torch.cuda.CUDAGraph, with static buffers for x_T and the model_kwargs
    tensors (torch.cuda.graph's "whole network capture" recipe)."""

    def __init__(self, loop: _Loop, model, x_T: Tensor, model_kwargs: dict):
        self.model = model  # keeps id(model), part of the cache key, from being reused by another object
        self.loop = loop  # the graph reads its timestep tensors
        self.static_x = x_T.clone()
        self.static_kwargs = {k: v.clone() if isinstance(v, Tensor) else v for k, v in model_kwargs.items()}
        # Warm up on a side stream, as torch.cuda.graph requires: lazy initialisation (cuBLAS/cuDNN handles,
        # Triton compilation, the schedule's device table) must not happen during capture.
        side = torch.cuda.Stream(device=x_T.device)
        side.wait_stream(torch.cuda.current_stream(x_T.device))
        with torch.cuda.stream(side):
            loop(self.static_x.clone(), self.static_kwargs)
        torch.cuda.current_stream(x_T.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_out = loop(self.static_x, self.static_kwargs)

    def __call__(self, x_T: Tensor, model_kwargs: dict) -> Tensor:
        self.static_x.copy_(x_T)
        for name, value in model_kwargs.items():
            if isinstance(value, Tensor):
                self.static_kwargs[name].copy_(value)
        self.graph.replay()
        # The output buffer is overwritten by the next replay: hand back a copy.
        return self.static_out.clone()


class DDPMSampler(_Sampler):
    """Ancestral sampling (Ho et al. 2020) with genkern.diffusion.ddpm_step; strided when num_steps < T.

    Args:
        schedule: the NoiseSchedule the model was trained with.
        prediction_type: what the model predicts: "epsilon", "v_prediction" or "sample".
        variance_type: "fixed_small", "fixed_large", or "learned_range" (the model outputs 2C channels).
        clip_sample: clamp x0_hat to [-clip_sample, clip_sample] (e.g. 1.0 for data in [-1, 1]).
        dynamic_threshold: (ratio, max_value), Imagen's dynamic thresholding instead of clip_sample.
        backend: the genkern backend of the steps (None: the fastest for the device and dtype).
    """

    kind = "ddpm"
    max_default_steps = None  # every training timestep

    def __init__(
        self,
        schedule: NoiseSchedule,
        *,
        prediction_type: str = "epsilon",
        variance_type: str = "fixed_small",
        clip_sample: float | None = None,
        dynamic_threshold: tuple[float, float] | None = None,
        backend: str | None = None,
    ):
        super().__init__(schedule, prediction_type, clip_sample, dynamic_threshold, backend)
        self.variance_type = _spec.check_choice("variance_type", variance_type, _spec.VARIANCE_TYPES)

    def sample(
        self,
        model,
        shape,
        num_steps: int | None = None,
        *,
        guidance_scale: float | None = None,
        guidance_rescale: float = 0.0,
        seed: int | None = None,
        spacing: str = "leading",
        steps_offset: int = 0,
        model_kwargs: dict | None = None,
        x_T: Tensor | None = None,
        device=None,
        dtype: torch.dtype = torch.float32,
        cuda_graph: bool = False,
    ) -> Tensor:
        """Samples of `shape` (B, ...) after num_steps steps (default: T, every training timestep).

        guidance_scale: classifier-free guidance; model_kwargs must then hold batch-2B values, the
            unconditional half first (e.g. class_labels = cat([null labels, labels])).
        seed: the run's randomness (None: drawn from torch's default generator); x_T overrides the start.
        spacing, steps_offset: the timesteps, as NoiseSchedule.timesteps.
        device, dtype: of the samples (device defaults to x_T's, else CPU).
        cuda_graph: capture the loop in a CUDA graph on the first call with a given shape, dtype, device,
            model, timesteps, guidance, model_kwargs layout and seed (the seed fixes the per-step noise a
            capture replays), and replay it afterwards with the new x_T and model_kwargs tensors (which
            must be on the device). The model must be capturable: no host synchronisation, no
            data-dependent control flow; a replay sees in-place updates of its parameters, but not
            changes that alter its code path (e.g. train/eval). Captures stay cached until
            clear_cuda_graphs().
        """
        return self._sample(
            model,
            shape,
            num_steps,
            {"variance_type": self.variance_type},
            True,
            guidance_scale=guidance_scale,
            guidance_rescale=guidance_rescale,
            seed=seed,
            spacing=spacing,
            steps_offset=steps_offset,
            model_kwargs=model_kwargs,
            x_T=x_T,
            device=device,
            dtype=dtype,
            cuda_graph=cuda_graph,
        )


class DDIMSampler(_Sampler):
    """DDIM sampling (Song et al. 2021) with genkern.diffusion.ddim_step: deterministic at eta = 0.

    Args: as DDPMSampler's, without variance_type, plus
        use_clipped_model_output: re-derive eps_hat from the clipped x0_hat (diffusers' option).
    """

    kind = "ddim"
    max_default_steps = DDIM_DEFAULT_STEPS

    def __init__(
        self,
        schedule: NoiseSchedule,
        *,
        prediction_type: str = "epsilon",
        clip_sample: float | None = None,
        dynamic_threshold: tuple[float, float] | None = None,
        use_clipped_model_output: bool = False,
        backend: str | None = None,
    ):
        super().__init__(schedule, prediction_type, clip_sample, dynamic_threshold, backend)
        self.use_clipped_model_output = _check_flag("use_clipped_model_output", use_clipped_model_output)

    def sample(
        self,
        model,
        shape,
        num_steps: int | None = None,
        *,
        eta: float = 0.0,
        guidance_scale: float | None = None,
        guidance_rescale: float = 0.0,
        seed: int | None = None,
        spacing: str = "leading",
        steps_offset: int = 0,
        model_kwargs: dict | None = None,
        x_T: Tensor | None = None,
        device=None,
        dtype: torch.dtype = torch.float32,
        cuda_graph: bool = False,
    ) -> Tensor:
        """Samples of `shape` (B, ...) after num_steps steps (default 50, at most T). eta: the noise
        injected per step (0: the deterministic DDIM ODE, 1: DDPM-like); with cuda_graph=True and eta = 0
        a capture serves every seed (only x_T depends on it). Other arguments: DDPMSampler.sample."""
        if isinstance(eta, bool) or not isinstance(eta, numbers.Real) or not math.isfinite(eta):
            raise TypeError(f"eta must be a finite real number, got {eta!r}")
        if eta < 0:
            raise ValueError(f"eta must be non-negative, got {eta}")
        step_kwargs = {"eta": float(eta), "use_clipped_model_output": self.use_clipped_model_output}
        return self._sample(
            model,
            shape,
            num_steps,
            step_kwargs,
            eta > 0,
            guidance_scale=guidance_scale,
            guidance_rescale=guidance_rescale,
            seed=seed,
            spacing=spacing,
            steps_offset=steps_offset,
            model_kwargs=model_kwargs,
            x_T=x_T,
            device=device,
            dtype=dtype,
            cuda_graph=cuda_graph,
        )
