"""k-diffusion's sigma-space samplers (Karras et al. 2022; docs/math.md 5.2) on a model trained with a
NoiseSchedule: Euler and Euler ancestral steps, fused, with diffusers' sigma schedules (EulerDiscreteScheduler,
EulerAncestralDiscreteScheduler).

    sigmas, timesteps = genkern.diffusion.euler_sigmas(schedule, 30, use_karras_sigmas=True)
    x = genkern.diffusion.EulerSampler(schedule, ancestral=True).sample(unet, (B, C, H, W), 30, seed=0)

In sigma space x = x0 + sigma eps; the model sees x / sqrt(sigma^2 + 1) (`scale_model_input`) and its
timestep, and the step turns its prediction into d = (x - x0_hat) / sigma. The steps run the sigma_step
kernel (csrc/diffusion/sigma_step_math.h) in the order diffusers computes them.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .. import _checks, _native
from .. import backend as _backend
from .._kernels import to_signed
from ..random import check_offset, resolve_seed
from . import (
    _ops,
    _sigma_loops,
    _solver_ops,  # noqa: F401 - registers genkern::heun_step
    sigma_schedules,
)
from . import reference as _spec
from .flow import _check_tensors, _sigma_tensor, loop_start
from .schedules import NoiseSchedule

__all__ = [
    "EulerSampler",
    "HeunSampler",
    "euler_ancestral_step",
    "euler_sigmas",
    "euler_step",
    "heun_step",
    "scale_model_input",
]

SPACINGS = ("linspace", "leading", "trailing")


def _sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """The (fractional) training timestep of each sigma: log-sigma interpolation, as diffusers' _sigma_to_t."""
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    dists = log_sigma - log_sigmas[:, None]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    w = np.clip((lo - log_sigma) / (lo - hi), 0, 1)
    return (1 - w) * low + w * (low + 1)


def _sigma_schedule(use_karras_sigmas, sigma_schedule) -> str | None:
    """The ramp a sampler asks for: use_karras_sigmas (diffusers' flag) or a sigma_schedule name."""
    if not isinstance(use_karras_sigmas, bool):
        raise TypeError(f"use_karras_sigmas must be a bool, got {type(use_karras_sigmas).__name__}")
    if sigma_schedule is not None:
        _spec.check_choice("sigma_schedule", sigma_schedule, (*sigma_schedules.SIGMA_SCHEDULES, "simple"))
    if use_karras_sigmas and sigma_schedule not in (None, "karras"):
        raise ValueError(f"use_karras_sigmas=True conflicts with sigma_schedule={sigma_schedule!r}")
    return "karras" if use_karras_sigmas else sigma_schedule


def euler_sigmas(
    schedule: NoiseSchedule,
    num_steps: int,
    *,
    spacing: str = "linspace",
    steps_offset: int = 0,
    use_karras_sigmas: bool = False,
    final_sigma: str = "zero",
    sigma_schedule: str | None = None,
) -> tuple[Tensor, Tensor]:
    """(sigmas, timesteps) of diffusers' EulerDiscreteScheduler.set_timesteps: float32 sigmas (num_steps + 1,
    the last one 0, or the smallest training sigma with final_sigma="sigma_min") and the model's float32
    timesteps (num_steps,). sigma_t = sqrt((1 - ab_t) / ab_t) of the schedule, linearly interpolated at the
    spaced timesteps; with use_karras_sigmas (sigma_schedule="karras") the Karras ramp (rho = 7) between their
    ends, with sigma_schedule "exponential" or "beta" diffusers' use_exponential_sigmas / use_beta_sigmas ramp,
    with "simple" ComfyUI's every (T / N)-th training sigma (docs/math.md 5.4); the timesteps then
    interpolated back from the sigmas."""
    schedule = _spec.check_schedule(schedule)
    N = _checks.integer("num_steps", num_steps, low=1)
    spacing = _spec.check_choice("spacing", spacing, SPACINGS)
    final_sigma = _spec.check_choice("final_sigma", final_sigma, ("zero", "sigma_min"))
    T = schedule.num_train_timesteps
    if N > T:
        raise ValueError(f"num_steps must be at most the schedule's {T} training timesteps, got {N}")
    if spacing == "linspace":
        timesteps = np.linspace(0, T - 1, N, dtype=np.float32)[::-1].copy()
    elif spacing == "leading":
        timesteps = (np.arange(0, N) * (T // N)).round()[::-1].copy().astype(np.float32) + steps_offset
    else:
        timesteps = np.arange(T, 0, -T / N).round().copy().astype(np.float32) - 1
    ab = schedule.alpha_cumprod(torch.arange(T)).to(torch.float32).numpy()
    train = ((1 - ab) / ab) ** 0.5
    sigmas = np.interp(timesteps, np.arange(0, len(train)), train)
    kind = _sigma_schedule(use_karras_sigmas, sigma_schedule)
    if kind is not None:
        if kind == "simple":
            sigmas = sigma_schedules.simple(train, N)
        else:
            sigmas = sigma_schedules.ramp(kind, sigmas[-1].item(), sigmas[0].item(), N)
        timesteps = _sigma_to_t(sigmas, np.log(train))
    last = train[0] if final_sigma == "sigma_min" else 0.0
    sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
    return torch.from_numpy(sigmas), torch.from_numpy(np.asarray(timesteps, dtype=np.float32))


def scale_model_input(sample: Tensor, sigma) -> Tensor:
    """What the model sees: sample / sqrt(sigma^2 + 1) (sigma a number or a (B,) tensor)."""
    s = _sigma_tensor(sigma, sample).to(sample.dtype)
    return sample / (s * s + 1).sqrt().view(-1, *([1] * (sample.dim() - 1)))


def _step(kind, model_output, sigma, sigma_next, sample, prediction_type, noise, seed, offset, guidance_scale,
          guidance_rescale, return_pred_original, backend):  # fmt: skip
    prediction = _ops.PREDICTIONS.index(_spec.check_choice("prediction_type", prediction_type, _ops.PREDICTIONS))
    _spec.check_guidance(guidance_scale, guidance_rescale)
    _checks.boolean("return_pred_original", return_pred_original)
    _check_tensors(model_output, noise)
    s, s_next = _sigma_tensor(sigma, sample), _sigma_tensor(sigma_next, sample, "sigma_next")
    draws = kind == 2 and noise is None
    seed = to_signed(resolve_seed(seed)) if draws else 0
    offset = to_signed(check_offset(offset)) if draws else 0
    scale = None if guidance_scale is None else float(guidance_scale)
    args = (model_output, sample, s, s_next, noise, seed, offset, kind, prediction, scale, float(guidance_rescale))
    prev, x0 = _backend.call(backend, torch.ops.genkern.sigma_step, *args, False, bool(return_pred_original))
    return (prev, x0) if return_pred_original else prev


def euler_step(
    model_output: Tensor,
    sigma,
    sigma_next,
    sample: Tensor,
    *,
    prediction_type: str = "epsilon",
    guidance_scale: float | None = None,
    guidance_rescale: float = 0.0,
    return_pred_original: bool = False,
    backend: str | None = None,
):
    """EulerDiscreteScheduler.step (no churn), fused: d = (sample - x0_hat) / sigma, sample + d (sigma_next -
    sigma); x0_hat from the model output by prediction_type (docs/math.md 5.2). Guidance as in flow_euler_step.
    Returns prev_sample, or (prev_sample, pred_original_sample) with return_pred_original."""
    return _step(1, model_output, sigma, sigma_next, sample, prediction_type, None, None, 0, guidance_scale,
                 guidance_rescale, return_pred_original, backend)  # fmt: skip


def euler_ancestral_step(
    model_output: Tensor,
    sigma,
    sigma_next,
    sample: Tensor,
    *,
    prediction_type: str = "epsilon",
    noise: Tensor | None = None,
    seed: int | None = None,
    offset: int = 0,
    guidance_scale: float | None = None,
    guidance_rescale: float = 0.0,
    return_pred_original: bool = False,
    backend: str | None = None,
):
    """EulerAncestralDiscreteScheduler.step, fused: the Euler step to sigma_down, plus sigma_up z, where
    sigma_up = sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2), sigma_down = sqrt(sigma_next^2 -
    sigma_up^2) and z = `noise` or the genkern stream for (seed, offset), drawn in the kernel."""
    return _step(2, model_output, sigma, sigma_next, sample, prediction_type, noise, seed, offset, guidance_scale,
                 guidance_rescale, return_pred_original, backend)  # fmt: skip


class EulerSampler:
    """Euler (or, with ancestral=True, Euler ancestral) sampling of a model trained on `schedule`.

    model(x / sqrt(sigma^2 + 1), t, **model_kwargs) gets the float32 timesteps of euler_sigmas as a (B,)
    tensor; with guidance_scale, model(cat([x, x]), cat([t, t])) and model_kwargs of batch 2B. x_T is
    init_noise_sigma times the genkern stream's randn(shape) at offset 0 for `seed` (init_noise_sigma =
    sigma_max, or sqrt(sigma_max^2 + 1) with leading spacing, as diffusers); step i draws its noise at offset
    i + 1, so sample b depends only on (seed, b). The loop reads nothing back from the device."""

    def __init__(
        self,
        schedule: NoiseSchedule,
        *,
        ancestral: bool = False,
        prediction_type: str = "epsilon",
        spacing: str = "linspace",
        use_karras_sigmas: bool = False,
        final_sigma: str = "zero",
        backend: str | None = None,
    ):
        self.schedule = _spec.check_schedule(schedule)
        if not isinstance(ancestral, bool):
            raise TypeError(f"ancestral must be a bool, got {type(ancestral).__name__}")
        self.kind = 2 if ancestral else 1
        self.prediction = _ops.PREDICTIONS.index(
            _spec.check_choice("prediction_type", prediction_type, _ops.PREDICTIONS)
        )
        self.options = dict(spacing=spacing, use_karras_sigmas=use_karras_sigmas, final_sigma=final_sigma)
        euler_sigmas(self.schedule, 1, **self.options)  # checks the options
        self.backend = backend

    @torch.no_grad()
    def sample(
        self,
        model,
        shape,
        num_steps: int = 30,
        *,
        seed: int | None = None,
        guidance_scale: float | None = None,
        guidance_rescale: float = 0.0,
        model_kwargs: dict | None = None,
        x_T: Tensor | None = None,
        device=None,
        dtype: torch.dtype = torch.float32,
        cuda_graph: bool = False,
    ) -> Tensor:
        """cuda_graph: capture the loop in a CUDA graph, as FlowMatchEulerSampler.sample does (the seed is part
        of the capture's key for Euler ancestral, whose noise is captured)."""
        _sigma_loops.check_cuda_graph(cuda_graph, device if device is not None else getattr(x_T, "device", "cpu"))
        model_kwargs, seed, shape, x_T = loop_start(
            model, shape, seed, guidance_scale, guidance_rescale, model_kwargs, x_T, device, dtype, self.backend
        )
        sigmas, timesteps = euler_sigmas(self.schedule, num_steps, **self.options)
        sigma_max = float(sigmas[0])
        init = (sigma_max**2 + 1) ** 0.5 if self.options["spacing"] == "leading" else sigma_max
        scales = (sigmas[:-1].to(dtype) ** 2 + 1).sqrt()  # scale_model_input divides by these, one a step
        loop = _sigma_loops.SigmaLoop(model, self.kind, self.prediction, False, sigmas, timesteps, scales, init,
                                      shape[0], x_T.device, dtype, seed, guidance_scale, guidance_rescale,
                                      self.backend)  # fmt: skip
        key = ("euler", num_steps, self.kind, self.prediction, tuple(sorted(self.options.items())), self.backend,
               guidance_scale, guidance_rescale, seed if self.kind == 2 else None)  # fmt: skip
        return _sigma_loops.run(self, loop, key, x_T, model_kwargs, cuda_graph)

    def clear_cuda_graphs(self) -> None:
        """Release the captured graphs (and the memory pools they hold)."""
        _sigma_loops.clear_cuda_graphs(self)


# ============================================================================================ Heun
def heun_step(
    model_output: Tensor,
    sigma,
    sigma_next,
    sample: Tensor,
    derivative: Tensor,
    *,
    origin: Tensor | None = None,
    prediction_type: str = "epsilon",
    guidance_scale: float | None = None,
    guidance_rescale: float = 0.0,
    backend: str | None = None,
) -> Tensor:
    """A half of HeunDiscreteScheduler.step sigma -> sigma_next, fused (docs/math.md 5.2). origin None: the
    first half, the Euler step to x' (returned), d = (sample - x0_hat) / sigma written into `derivative` (a
    buffer of sample's shape, the caller's). With origin (the first half's sample) and sample = x': the
    second half, origin + (d + d') / 2 (sigma_next - sigma), d' from the model output at x'; x' where
    sigma_next = 0. Guidance as in euler_step."""
    prediction = _ops.PREDICTIONS.index(_spec.check_choice("prediction_type", prediction_type, _ops.PREDICTIONS))
    _spec.check_guidance(guidance_scale, guidance_rescale)
    _check_tensors(model_output, None)
    for name, t in (("sample", sample), ("derivative", derivative), ("origin", origin)):
        if t is not None or name != "origin":
            _checks.tensor(name, t)
    s, s_next = _sigma_tensor(sigma, sample), _sigma_tensor(sigma_next, sample, "sigma_next")
    scale = None if guidance_scale is None else float(guidance_scale)
    args = (model_output, sample, origin, derivative, s, s_next, prediction, scale, float(guidance_rescale))
    return _backend.call(backend, torch.ops.genkern.heun_step, *args)


class HeunSampler:
    """Heun's second-order sampling (Karras et al. 2022, Alg. 1 without churn; diffusers' HeunDiscreteScheduler)
    of a model trained on `schedule`: two model calls a step, the Euler step alone into the final sigma 0.

    model(x / sqrt(sigma^2 + 1), t, **model_kwargs) gets the float32 timesteps of euler_sigmas (the second call
    of step i those of step i + 1, as diffusers interleaves them); guidance, x_T and the seed as EulerSampler
    (Heun draws no noise). The derivative of the first half lives in a device buffer of the loop, written by
    the first half's kernel and read by the second's: nothing is read back, and cuda_graph=True captures the
    whole loop once per configuration."""

    def __init__(
        self,
        schedule: NoiseSchedule,
        *,
        prediction_type: str = "epsilon",
        spacing: str = "linspace",
        steps_offset: int = 0,
        use_karras_sigmas: bool = False,
        sigma_schedule: str | None = None,
        backend: str | None = None,
    ):
        self.schedule = _spec.check_schedule(schedule)
        self.prediction = _ops.PREDICTIONS.index(
            _spec.check_choice("prediction_type", prediction_type, _ops.PREDICTIONS)
        )
        self.options = dict(
            spacing=spacing,
            steps_offset=steps_offset,
            use_karras_sigmas=use_karras_sigmas,
            sigma_schedule=sigma_schedule,
        )
        euler_sigmas(self.schedule, 1, **self.options)  # checks the options
        self.backend = backend
        self._graphs: dict = {}

    @torch.no_grad()
    def sample(
        self,
        model,
        shape,
        num_steps: int = 25,
        *,
        seed: int | None = None,
        guidance_scale: float | None = None,
        guidance_rescale: float = 0.0,
        model_kwargs: dict | None = None,
        x_T: Tensor | None = None,
        device=None,
        dtype: torch.dtype = torch.float32,
        cuda_graph: bool = False,
    ) -> Tensor:
        model_kwargs, seed, shape, x_T = loop_start(
            model, shape, seed, guidance_scale, guidance_rescale, model_kwargs, x_T, device, dtype, self.backend
        )

        def make_loop():
            return _HeunLoop(self, model, num_steps, shape, x_T.device, dtype, guidance_scale, guidance_rescale)

        key = (num_steps, guidance_scale, guidance_rescale)
        return _solver_ops.run_loop(self, make_loop, model, x_T, model_kwargs, cuda_graph, key)

    def clear_cuda_graphs(self) -> None:
        """Release the captured graphs (and the memory pools they hold)."""
        self._graphs.clear()


class _HeunLoop:
    """One Heun run from x_T (the genkern stream's randn, unscaled): the sigma and timestep rows, the model
    input scales and the derivative buffer built once."""

    def __init__(self, sampler, model, num_steps, shape, device, dtype, guidance_scale, guidance_rescale):
        self.sampler, self.model, batch = sampler, model, shape[0]
        sigmas, timesteps = euler_sigmas(sampler.schedule, num_steps, **sampler.options)
        sigma_max = float(sigmas[0])
        self.init = (sigma_max**2 + 1) ** 0.5 if sampler.options["spacing"] == "leading" else sigma_max
        self.rows = sigmas.to(device)[:, None].expand(-1, batch).contiguous()
        t_model = timesteps.to(device)[:, None].expand(-1, batch).contiguous()
        t_model = t_model.repeat(1, 2) if guidance_scale is not None else t_model
        self.t_model = list(t_model.unbind(0))  # views made once: indexing a tensor costs a microsecond
        self.scales = (self.rows[:-1].to(dtype) ** 2 + 1).sqrt()
        self.guidance_scale = None if guidance_scale is None else float(guidance_scale)
        self.guidance_rescale = float(guidance_rescale)
        self.scale_views = list((self.scales.view(num_steps, batch, *([1] * (len(shape) - 1)))).unbind(0))
        self._described = None

    def described(self) -> tuple:
        """The descriptions of the sigma rows and the model input scales, made at the first direct launch and
        kept with the loop (the sampler reuses it for the next run of the same shape)."""
        if self._described is None:
            self._described = ([_native.array(r) for r in self.rows], [_native.array(s) for s in self.scales])
        return self._described

    def _model(self, x_in: Tensor, i: int, model_kwargs) -> Tensor:
        """The model at step i on x_in, the sample already divided by the step's scale."""
        x_in = torch.cat([x_in, x_in]) if self.guidance_scale is not None else x_in
        return self.model(x_in, self.t_model[i], **model_kwargs)

    def __call__(self, x_T: Tensor, model_kwargs: dict) -> Tensor:
        s, rows = self.sampler, self.rows
        op, scale_views = torch.ops.genkern.heun_step, self.scale_views
        options = (s.prediction, self.guidance_scale, self.guidance_rescale)
        x = x_T * self.init
        derivative = torch.empty_like(x)
        # The compiled kernel launched directly after the op's own checks (run once per kind of half and model
        # output signature: the loop's other tensors are its own), skipping torch's custom-op dispatch, which
        # costs several times the kernel at batch 1; it also writes the next model input. Not on the Triton
        # or reference backend, with guidance rescale (a pre-pass only the op computes), or while tracing:
        # those call the op.
        name = _backend.resolve(s.backend, x.device, x.dtype, "diffusion")
        direct = name in ("cpu", "cuda") and self.guidance_rescale == 0.0
        direct = direct and not torch.compiler.is_compiling() and not torch.is_grad_enabled()
        guided = self.guidance_scale is not None
        codes = (s.prediction, guided, 0.0 if not guided else self.guidance_scale, False, 0, 0)
        launch = _HeunLaunch(self.described(), derivative, codes) if direct else None
        checked = set()  # (model output shape, dtype, device, first half?) the checks accepted
        N = rows.shape[0] - 1

        def half(m, x, origin, i):
            """A half of step i: its result, and the next model input (None after the last step's first half)."""
            has_next = origin is not None or i < N - 1
            if launch is None or type(m) is not Tensor:
                out = _backend.call(s.backend, op, m, x, origin, derivative, rows[i], rows[i + 1], *options)
                return out, out / scale_views[i + 1] if has_next else None
            signature = (m.shape, m.dtype, m.device, origin is None)
            if signature not in checked:
                _solver_ops.check_heun_step(m, x, origin, derivative, rows[i], rows[i + 1], *options)
                checked.add(signature)
            return launch(m.contiguous(), x, origin, i, has_next)

        x_in = x / scale_views[0]
        for i in range(N):
            x_prime, x_in = half(self._model(x_in, i, model_kwargs), x, None, i)
            if i == N - 1:  # into sigma 0: the Euler step alone
                return x_prime
            x, x_in = half(self._model(x_in, i + 1, model_kwargs), x_prime, x, i)
        return x


class _HeunLaunch:
    """The Heun halves of one loop run as direct sigma_step launches, with every description made once but the
    model output's: the sigma rows and model input scales, the derivative buffer, three output buffers that
    the halves take in turn (each writes one that is neither of its inputs) and two for the next model input
    (each written while the model output being read may alias the other). A half costs a few microseconds of
    kernel on a batch-1 latent; describing its arrays afresh, or dividing by the scale in a separate op, cost
    about as much again (a profile of heun_loop)."""

    def __init__(self, described: tuple, derivative: Tensor, codes: tuple):
        self.fn = _ops.KERNELS.native().sigma_step
        self.device, self.codes = derivative.device, codes
        self.rows, self.scales = described  # of the loop's rows and scales (_HeunLoop.described)
        self.derivative = _native.array(derivative)
        self.buffers = [torch.empty_like(derivative) for _ in range(3)]
        self.described = [_native.array(buffer) for buffer in self.buffers]
        self.inputs = [torch.empty_like(derivative) for _ in range(2)]
        self.inputs_described = [_native.array(buffer) for buffer in self.inputs]
        self.calls = 0

    def _describe(self, t: Tensor):
        for buffer, described in zip(self.buffers, self.described):
            if t is buffer:
                return described
        return _native.array(t)

    def __call__(self, m: Tensor, x: Tensor, origin: Tensor | None, i: int, has_next: bool):
        b = self.buffers
        k = 0 if b[0] is not x and b[0] is not origin else 1 if b[1] is not x and b[1] is not origin else 2
        kind = _solver_ops.HEUN_FIRST if origin is None else _solver_ops.HEUN_SECOND
        x_d, origin_d = self._describe(x), None if origin is None else self._describe(origin)
        args = (_native.array(m), x_d, None, self.rows[i], self.rows[i + 1], None, self.described[k], None, kind)
        j = self.calls = self.calls ^ 1
        model_input = (self.inputs_described[j], self.scales[i + 1]) if has_next else (None, None)
        _native.launch(self.fn, self.device, [*args, *self.codes, origin_d, self.derivative, *model_input])
        return b[k], self.inputs[j] if has_next else None
