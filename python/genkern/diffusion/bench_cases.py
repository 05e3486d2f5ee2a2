"""Benchmark cases of the diffusion family: the training ops, the sampling steps, and a sampling loop.

Inputs are image batches: a size N is (N / 3072) samples of 3 x 32 x 32 with per-sample timesteps. The eager
baselines are the code a PyTorch user writes: noise from torch.randn_like, coefficients gathered from the
schedule's alphas_cumprod per sample, the loss recomputing the target from that noise, and a step written
out as diffusers' schedulers compute it (epsilon prediction, both outputs returned). The `_out` variants of
the steps write into preallocated outputs (`out=`; the eager code's last ops take `out=` too), as a sampling
loop reusing its buffers does: on the CPU a fresh 64 MB output costs page faults worth as much as the step.

`ddim_loop` is different: a whole 50-step DDIM sampling run at batch 1 on a (1, 4, 64, 64) latent with a
trivial denoiser, to expose per-step overhead; its baseline is the same loop driven by diffusers'
DDIMScheduler (needs diffusers, a test extra), and it ignores the size. genkern runs it with DDIMSampler
(on CUDA with the whole loop captured in a CUDA graph). `ddim_step_small` is one step of that loop (16K
elements). Both are timed a second time with every core busy (`_busy`, see genkern.bench.under_load): a
small call must stay cheap on a loaded machine.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

import genkern

from ..bench import BenchCase, under_load
from .schedules import NoiseSchedule

FAMILY = "diffusion"
_SAMPLE = (3, 32, 32)
_SCHEDULE = NoiseSchedule("cosine")


def _shape(size: int) -> tuple[int, ...]:
    return (max(1, size // (3 * 32 * 32)), *_SAMPLE)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _x0_t(size, device, dtype):
    x0 = torch.randn(_shape(size), device=device, dtype=dtype)
    t = torch.randint(0, 1000, (x0.shape[0],), device=device)
    return x0, t


def _m_x0_t(size, device, dtype):
    x0, t = _x0_t(size, device, dtype)
    return torch.randn_like(x0), x0, t


def _coefficients(t, x):
    ab = _SCHEDULE.alphas_cumprod.to(device=x.device, dtype=x.dtype)[t].reshape(-1, 1, 1, 1)
    return ab.sqrt(), (1 - ab).sqrt()


def eager_q_sample(x0, t):
    a, s = _coefficients(t, x0)
    return a * x0 + s * torch.randn_like(x0)


def eager_diffusion_loss(model_output, x0, t):
    # The user keeps the noise of x_t to compute the loss: it is drawn here, as in a training step.
    noise = torch.randn_like(x0)
    return ((noise - model_output) ** 2).mean()


def _alpha_bars(t, x):
    """alpha-bar at t (-1: 1) per sample, shaped to broadcast over x."""
    extended = torch.cat([torch.ones(1, dtype=torch.float64), _SCHEDULE.alphas_cumprod])
    return extended.to(device=x.device, dtype=x.dtype)[t + 1].reshape(-1, *([1] * (x.dim() - 1)))


def _step_inputs(size, device, dtype):
    """(model_output, sample, t, prev_t): per-sample strided steps, as in a 50-step DDPM or DDIM run."""
    sample, t = _x0_t(size, device, dtype)
    t = t.clamp(min=20)
    return torch.randn_like(sample), sample, t, t - 20


# The steps write into `prev` and `x0` when given (the _out cases; torch ops take out=None as "allocate").
def eager_ddpm_step(model_output, sample, t, prev_t, prev=None, x0=None):
    ab_t, ab_prev = _alpha_bars(t, sample), _alpha_bars(prev_t, sample)
    alpha = ab_t / ab_prev
    beta_t, beta_prev, beta = 1 - ab_t, 1 - ab_prev, 1 - alpha
    x0 = torch.div(sample - beta_t.sqrt() * model_output, ab_t.sqrt(), out=x0)
    mean = (ab_prev.sqrt() * beta / beta_t) * x0 + (alpha.sqrt() * beta_prev / beta_t) * sample
    std = (beta_prev / beta_t * beta).clamp(min=1e-20).sqrt()
    return torch.add(mean, std * torch.randn_like(sample), out=prev), x0


def eager_ddim_step(model_output, sample, t, prev_t, prev=None, x0=None):
    ab_t, ab_prev = _alpha_bars(t, sample), _alpha_bars(prev_t, sample)
    x0 = torch.div(sample - (1 - ab_t).sqrt() * model_output, ab_t.sqrt(), out=x0)
    return torch.add(ab_prev.sqrt() * x0, (1 - ab_prev).sqrt() * model_output, out=prev), x0


def _out(prev, x0):
    return None if prev is None else (prev, x0)


def genkern_ddpm_step(model_output, sample, t, prev_t, prev=None, x0=None, backend=None):
    return genkern.ddpm_step(model_output, t, sample, _SCHEDULE, prev_t=prev_t, out=_out(prev, x0), backend=backend)


def genkern_ddim_step(model_output, sample, t, prev_t, prev=None, x0=None, backend=None):
    return genkern.ddim_step(model_output, t, sample, _SCHEDULE, prev_t=prev_t, out=_out(prev, x0), backend=backend)


def _step_out_inputs(size, device, dtype):
    """_step_inputs plus preallocated (prev_sample, pred_original), as a sampling loop reuses its buffers."""
    model_output, sample, t, prev_t = _step_inputs(size, device, dtype)
    return model_output, sample, t, prev_t, torch.empty_like(sample), torch.empty_like(sample)


_LOOP_SHAPE = (1, 4, 64, 64)
_LOOP_STEPS = 50


def _trivial_denoiser(x, t):
    return 0.1 * x


def _loop_inputs(size, device, dtype):
    return (genkern.randn(_LOOP_SHAPE, seed=0, device=device, dtype=dtype),)


def diffusers_ddim_loop(x):
    from diffusers import DDIMScheduler  # a test extra, declared in the case's `requires`

    scheduler = _diffusers_scheduler(DDIMScheduler)
    for t in scheduler.timesteps:
        x = scheduler.step(_trivial_denoiser(x, t), t, x).prev_sample
    return x


@functools.cache
def _diffusers_scheduler(cls):
    scheduler = cls(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=False)
    scheduler.set_timesteps(_LOOP_STEPS)
    return scheduler


@functools.cache
def _ddim_sampler(backend):
    from . import DDIMSampler

    return DDIMSampler(_SCHEDULE, backend=backend)


def genkern_ddim_loop(x, backend=None):
    # One sampler for the run, as the baseline keeps one scheduler (its timesteps set once).
    return _ddim_sampler(backend).sample(
        _trivial_denoiser,
        x.shape,
        _LOOP_STEPS,
        x_T=x,
        device=x.device,
        dtype=x.dtype,
        cuda_graph=x.device.type == "cuda",
    )


def _small_step_inputs(size, device, dtype):
    """One step of the batch-1 loop: (model_output, sample, t, prev_t) on a (1, 4, 64, 64) latent."""
    sample = torch.randn(_LOOP_SHAPE, device=device, dtype=dtype)
    t = torch.tensor([500], device=device)
    return torch.randn_like(sample), sample, t, t - 20


def _flow_step_inputs(size, device, dtype):
    """(model_output, sample, sigma, sigma_next): per-sample sigmas of a 28-step flow-matching run."""
    sample = torch.randn(_shape(size), device=device, dtype=dtype)
    sigma = torch.rand(sample.shape[0], device=device) * 0.9 + 0.05
    return torch.randn_like(sample), sample, sigma, sigma - 0.035


def eager_flow_euler_step(model_output, sample, sigma, sigma_next):
    """diffusers' FlowMatchEulerDiscreteScheduler.step: sample + (sigma_next - sigma) model_output, and the
    x0 estimate its pipelines take (sample - sigma model_output)."""
    view = (-1, *([1] * (sample.dim() - 1)))
    s, dt = sigma.view(view), (sigma_next - sigma).view(view)
    return sample + dt * model_output, sample - s * model_output


def genkern_flow_euler_step(model_output, sample, sigma, sigma_next, backend=None):
    return genkern.flow_euler_step(model_output, sigma, sigma_next, sample, return_pred_original=True, backend=backend)


def genkern_q_sample(x0, t, backend=None):
    return genkern.q_sample(x0, t, _SCHEDULE, backend=backend)


def genkern_diffusion_loss(model_output, x0, t, backend=None):
    return genkern.diffusion_loss(model_output, x0, t, _SCHEDULE, backend=backend)


def _step_case(name, make_inputs, genkern_fn, eager_fn, default=False) -> BenchCase:
    return BenchCase(
        name=name,
        family=FAMILY,
        make_inputs=make_inputs,
        genkern=genkern_fn,
        eager=eager_fn,
        shape=_shape,
        # reads model_output and sample, writes prev_sample and pred_original (the noise is generated)
        bytes_moved=lambda n, dt: 4 * _itemsize(dt) * _shape(n)[0] * 3 * 32 * 32,
        default=default,
    )


CASES = (
    BenchCase(
        name="q_sample",
        family=FAMILY,
        make_inputs=_x0_t,
        genkern=genkern_q_sample,
        eager=eager_q_sample,
        shape=_shape,
        # reads x0, writes x_t; the noise is generated, never read from memory
        bytes_moved=lambda n, dt: 2 * _itemsize(dt) * _shape(n)[0] * 3 * 32 * 32,
        default=False,
    ),
    BenchCase(
        name="diffusion_loss",
        family=FAMILY,
        make_inputs=_m_x0_t,
        genkern=genkern_diffusion_loss,
        eager=eager_diffusion_loss,
        shape=_shape,
        # reads model_output and x0 (the noise is regenerated, the target never stored)
        bytes_moved=lambda n, dt: 2 * _itemsize(dt) * _shape(n)[0] * 3 * 32 * 32,
        default=False,
    ),
    _step_case("ddpm_step", _step_inputs, genkern_ddpm_step, eager_ddpm_step, default=True),
    _step_case("ddim_step", _step_inputs, genkern_ddim_step, eager_ddim_step),
    _step_case("ddpm_step_out", _step_out_inputs, genkern_ddpm_step, eager_ddpm_step),
    _step_case("ddim_step_out", _step_out_inputs, genkern_ddim_step, eager_ddim_step),
    BenchCase(
        name="flow_euler_step",
        family=FAMILY,
        make_inputs=_flow_step_inputs,
        genkern=genkern_flow_euler_step,
        eager=eager_flow_euler_step,
        shape=_shape,
        # reads model_output and sample, writes prev_sample and pred_original
        bytes_moved=lambda n, dt: 4 * _itemsize(dt) * _shape(n)[0] * 3 * 32 * 32,
        default=False,
    ),
    _SMALL_STEP := BenchCase(
        name="ddim_step_small",
        family=FAMILY,
        make_inputs=_small_step_inputs,
        genkern=genkern_ddim_step,
        eager=eager_ddim_step,
        shape=lambda n: _LOOP_SHAPE,
        sized=False,
        default=False,
        # reads model_output and sample, writes prev_sample and pred_original
        bytes_moved=lambda n, dt: 4 * _itemsize(dt) * 4 * 64 * 64,
    ),
    under_load(_SMALL_STEP),
    _LOOP := BenchCase(
        name="ddim_loop",
        family=FAMILY,
        make_inputs=_loop_inputs,
        genkern=genkern_ddim_loop,
        eager=diffusers_ddim_loop,
        shape=lambda n: _LOOP_SHAPE,
        compile=False,
        sized=False,
        requires=("diffusers",),
        # per step: reads the model output and the sample, writes the next sample (the denoiser excluded)
        bytes_moved=lambda n, dt: _LOOP_STEPS * 3 * _itemsize(dt) * 4 * 64 * 64,
    ),
    under_load(_LOOP),
)


# ---------------------------------------------------------------------------------------------------------
# The multistep and second-order solvers: a DPM-Solver++ 2M step, a UniPC step and Heun's second half at
# per-sample steps, and 25-step Heun / 50-step DPM-Solver++ 2M and UniPC loops against diffusers' schedulers
# (as ddim_loop).
# ---------------------------------------------------------------------------------------------------------
_SOLVER_STEPS = 50


def _solver_sigmas(device):
    from .dpm_solver import dpm_solver_sigmas

    return dpm_solver_sigmas(_SCHEDULE, _SOLVER_STEPS)[0].to(device)


def _dpm_step_inputs(size, device, dtype):
    """(model_output, sample, history, sigmas, step): second-order steps of a 50-step run, per sample."""
    sample = torch.randn(_shape(size), device=device, dtype=dtype)
    step = torch.randint(1, _SOLVER_STEPS - 1, (sample.shape[0],), device=device)
    return torch.randn_like(sample), sample, torch.randn_like(sample), _solver_sigmas(device), step


def _alpha_sigma_lambda(s):
    alpha = 1 / (s**2 + 1) ** 0.5
    sigma = s * alpha
    return alpha, sigma, torch.log(alpha) - torch.log(sigma)


def eager_dpm_solver_step(model_output, sample, history, sigmas, step):
    """DPMSolverMultistepScheduler's convert_model_output and 2M midpoint update (dpmsolver++, epsilon) with
    per-sample sigmas; returns x_t (x0_hat is the next step's history: diffusers keeps the tensor)."""
    view = (-1, *([1] * (sample.dim() - 1)))
    alpha_t, sigma_t, lambda_t = _alpha_sigma_lambda(sigmas[step + 1].view(view))
    alpha_s0, sigma_s0, lambda_s0 = _alpha_sigma_lambda(sigmas[step].view(view))
    _, _, lambda_s1 = _alpha_sigma_lambda(sigmas[step - 1].view(view))
    x0 = (sample - sigma_s0 * model_output) / alpha_s0
    h, h_0 = lambda_t - lambda_s0, lambda_s0 - lambda_s1
    d1 = (1.0 / (h_0 / h)) * (x0 - history)
    k = alpha_t * (torch.exp(-h) - 1.0)
    return (sigma_t / sigma_s0) * sample - k * x0 - 0.5 * k * d1


def genkern_dpm_solver_step(model_output, sample, history, sigmas, step, backend=None):
    return genkern.dpm_solver_step(model_output, sigmas, step, sample, history, backend=backend)


def _heun_step_inputs(size, device, dtype):
    """(model_output, x', origin, derivative, sigma, sigma_next): Heun's second half, per-sample sigmas."""
    sample = torch.randn(_shape(size), device=device, dtype=dtype)
    sigma = torch.rand(sample.shape[0], device=device) * 10 + 0.1
    return (torch.randn_like(sample), sample, torch.randn_like(sample), torch.randn_like(sample), sigma,
            sigma * 0.8)  # fmt: skip


def eager_heun_step(model_output, sample, origin, derivative, sigma, sigma_next):
    """HeunDiscreteScheduler.step's second half (epsilon): x0_hat at x', d' and the averaged step."""
    view = (-1, *([1] * (sample.dim() - 1)))
    s, s_next = sigma.view(view), sigma_next.view(view)
    x0 = sample - s_next * model_output
    d = (derivative + (sample - x0) / s_next) / 2
    return origin + d * (s_next - s)


def genkern_heun_step(model_output, sample, origin, derivative, sigma, sigma_next, backend=None):
    return genkern.heun_step(model_output, sigma, sigma_next, sample, derivative, origin=origin, backend=backend)


def _unipc_step_inputs(size, device, dtype):
    """(model_output, sample, history, sigmas, step): steps of a 50-step run whose corrector and predictor are
    both second order, per sample; history (3, *sample.shape)."""
    sample = torch.randn(_shape(size), device=device, dtype=dtype)
    step = torch.randint(2, _SOLVER_STEPS - 1, (sample.shape[0],), device=device)
    history = torch.randn((3, *sample.shape), device=device, dtype=dtype)
    return torch.randn_like(sample), sample, history, _solver_sigmas(device), step


def _unipc_terms(sigmas, s, view):
    """UniPC's (sigma_t / sigma_s0, alpha_t, e^-h - 1, rk, h) of the update sigmas[s] -> sigmas[s + 1]."""
    alpha_t, sigma_t, lambda_t = _alpha_sigma_lambda(sigmas[s + 1].view(view))
    _, sigma_s0, lambda_s0 = _alpha_sigma_lambda(sigmas[s].view(view))
    _, _, lambda_s1 = _alpha_sigma_lambda(sigmas[s - 1].view(view))
    h = lambda_t - lambda_s0
    return sigma_t / sigma_s0, alpha_t, torch.expm1(-h), (lambda_s1 - lambda_s0) / h, h


def eager_unipc_step(model_output, sample, history, sigmas, step):
    """UniPCMultistepScheduler's convert_model_output, second-order UniC of the sample and second-order UniP
    (bh2: B(h) = e^-h - 1, epsilon) with per-sample sigmas; the corrector's weights solved per sample, as
    diffusers solves them per step. Returns x_next (the corrected sample and x0_hat are the next step's
    state)."""
    view = (-1, *([1] * (sample.dim() - 1)))
    last, m0, m1 = history
    alpha_s0, sigma_s0, _ = _alpha_sigma_lambda(sigmas[step].view(view))
    x0 = (sample - sigma_s0 * model_output) / alpha_s0
    ratio, alpha_t, b_h, rk, h = _unipc_terms(sigmas, step - 1, view)
    g1 = b_h / -h - 1
    b = torch.stack([g1 / b_h, 2 * (g1 / -h - 0.5) / b_h], -1).reshape(-1, 2)
    ones = torch.ones_like(rk.reshape(-1))
    R = torch.stack([torch.stack([ones, ones], -1), torch.stack([rk.reshape(-1), ones], -1)], -2)
    rho0, rho1 = torch.linalg.solve(R, b).unbind(-1)
    res = rho0.view(view) * ((m1 - m0) / rk) + rho1.view(view) * (x0 - m0)
    corrected = ratio * last - alpha_t * b_h * m0 - alpha_t * b_h * res
    ratio, alpha_t, b_h, rk, _ = _unipc_terms(sigmas, step, view)
    return ratio * corrected - alpha_t * b_h * x0 - alpha_t * b_h * (0.5 * ((m0 - x0) / rk))


def genkern_unipc_step(model_output, sample, history, sigmas, step, backend=None):
    return genkern.unipc_step(model_output, sigmas, step, sample, history, backend=backend)


_HEUN_STEPS = 25
_LOOP_CONFIG = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
_LOOP_SCHEDULE = NoiseSchedule("scaled_linear", beta_start=0.00085, beta_end=0.012)


@functools.cache
def _diffusers_solver(name: str):
    import diffusers  # a test extra, declared in the case's `requires`

    return getattr(diffusers, name)(**_LOOP_CONFIG)


def diffusers_heun_loop(x):
    scheduler = _diffusers_solver("HeunDiscreteScheduler")
    scheduler.set_timesteps(_HEUN_STEPS)  # a fresh run, as a pipeline starts one (the scheduler has state)
    x = x * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x = scheduler.step(_trivial_denoiser(scheduler.scale_model_input(x, t), t), t, x).prev_sample
    return x


def diffusers_unipc_loop(x):
    scheduler = _diffusers_solver("UniPCMultistepScheduler")
    scheduler.set_timesteps(_SOLVER_STEPS)
    for t in scheduler.timesteps:
        x = scheduler.step(_trivial_denoiser(x, t), t, x).prev_sample
    return x


def diffusers_dpm_loop(x):
    scheduler = _diffusers_solver("DPMSolverMultistepScheduler")
    scheduler.set_timesteps(_SOLVER_STEPS)
    for t in scheduler.timesteps:
        x = scheduler.step(_trivial_denoiser(x, t), t, x).prev_sample
    return x


@functools.cache
def _genkern_solver(cls_name: str, backend):
    from . import DPMSolverMultistepSampler, HeunSampler, UniPCMultistepSampler

    cls = {"heun": HeunSampler, "dpm": DPMSolverMultistepSampler, "unipc": UniPCMultistepSampler}[cls_name]
    return cls(_LOOP_SCHEDULE, backend=backend)


def _genkern_loop(kind, steps, x, backend):
    sampler = _genkern_solver(kind, backend)
    return sampler.sample(_trivial_denoiser, x.shape, steps, x_T=x, device=x.device, dtype=x.dtype,
                          cuda_graph=x.device.type == "cuda")  # fmt: skip


def genkern_heun_loop(x, backend=None):
    return _genkern_loop("heun", _HEUN_STEPS, x, backend)


def genkern_dpm_loop(x, backend=None):
    return _genkern_loop("dpm", _SOLVER_STEPS, x, backend)


def genkern_unipc_loop(x, backend=None):
    return _genkern_loop("unipc", _SOLVER_STEPS, x, backend)


def _loop_case(name, genkern_fn, eager_fn, steps, model_calls) -> BenchCase:
    return BenchCase(
        name=name,
        family=FAMILY,
        make_inputs=_loop_inputs,
        genkern=genkern_fn,
        eager=eager_fn,
        shape=lambda n: _LOOP_SHAPE,
        compile=False,
        sized=False,
        requires=("diffusers",),
        default=False,  # ddim_loop is the family's headline loop
        # per step: the model input scaled (Heun), the model output, the sample and the step's buffers
        bytes_moved=lambda n, dt: model_calls * 3 * _itemsize(dt) * 4 * 64 * 64,
    )


def _solver_step_case(name, make_inputs, genkern_fn, eager_fn, arrays) -> BenchCase:
    """_step_case with the solver's own traffic: `arrays` full-size reads and writes."""
    case = _step_case(name, make_inputs, genkern_fn, eager_fn)
    return dataclasses.replace(case, bytes_moved=lambda n, dt: arrays * _itemsize(dt) * _shape(n)[0] * 3 * 32 * 32)


def _euler_step_inputs(size, device, dtype):
    """(model_output, sample, sigma, sigma_next): Euler (ancestral) steps at per-sample sigmas of a 30-step run."""
    sample = torch.randn(_shape(size), device=device, dtype=dtype)
    sigma = torch.rand(sample.shape[0], device=device) * 10 + 0.1
    return torch.randn_like(sample), sample, sigma, sigma * 0.8


def eager_euler_step(model_output, sample, sigma, sigma_next):
    """EulerDiscreteScheduler.step (epsilon, no churn) at per-sample sigmas: x0_hat, d, the Euler step."""
    view = (-1, *([1] * (sample.dim() - 1)))
    s = sigma.view(view)
    x0 = sample - s * model_output
    d = (sample - x0) / s
    return sample + d * (sigma_next - sigma).view(view)


def genkern_euler_step(model_output, sample, sigma, sigma_next, backend=None):
    return genkern.euler_step(model_output, sigma, sigma_next, sample, backend=backend)


def eager_euler_ancestral_step(model_output, sample, sigma, sigma_next):
    """EulerAncestralDiscreteScheduler.step (epsilon): the Euler step to sigma_down, then noise times sigma_up
    (the noise drawn with randn_like, as the scheduler's randn_tensor)."""
    view = (-1, *([1] * (sample.dim() - 1)))
    s, s_next = sigma.view(view), sigma_next.view(view)
    x0 = sample - s * model_output
    up = (s_next**2 * (s**2 - s_next**2) / s**2) ** 0.5
    down = (s_next**2 - up**2) ** 0.5
    d = (sample - x0) / s
    return sample + d * (down - s) + torch.randn_like(sample) * up


def genkern_euler_ancestral_step(model_output, sample, sigma, sigma_next, backend=None):
    return genkern.euler_ancestral_step(model_output, sigma, sigma_next, sample, seed=0, backend=backend)


_BATCH16_SHAPE = (16, 4, 64, 64)


def _loop_inputs_batch16(size, device, dtype):
    return (genkern.randn(_BATCH16_SHAPE, seed=0, device=device, dtype=dtype),)


def _batch16(case: BenchCase, model_calls: int) -> BenchCase:
    """A whole-loop case again at batch 16 (<name>_b16)."""
    return dataclasses.replace(
        case,
        name=f"{case.name}_b16",
        make_inputs=_loop_inputs_batch16,
        shape=lambda n: _BATCH16_SHAPE,
        default=False,
        bytes_moved=lambda n, dt: model_calls * 3 * _itemsize(dt) * 16 * 4 * 64 * 64,
    )


SOLVER_CASES = (
    # reads model_output and sample, writes prev_sample (Euler ancestral: its noise drawn in the kernel)
    _solver_step_case("euler_step", _euler_step_inputs, genkern_euler_step, eager_euler_step, 3),
    _solver_step_case(
        "euler_ancestral_step", _euler_step_inputs, genkern_euler_ancestral_step, eager_euler_ancestral_step, 3
    ),  # fmt: skip
    # reads model_output, sample, history; writes prev_sample and the history
    _solver_step_case("dpm_solver_step", _dpm_step_inputs, genkern_dpm_solver_step, eager_dpm_solver_step, 5),
    # reads model_output, sample and the three history slots; writes prev_sample and the history
    _solver_step_case("unipc_step", _unipc_step_inputs, genkern_unipc_step, eager_unipc_step, 8),
    # reads model_output, x', origin, derivative; writes prev_sample
    _solver_step_case("heun_step", _heun_step_inputs, genkern_heun_step, eager_heun_step, 5),
    _HEUN_LOOP := _loop_case("heun_loop", genkern_heun_loop, diffusers_heun_loop, _HEUN_STEPS, 2 * _HEUN_STEPS - 1),
    _DPM_LOOP := _loop_case("dpm_solver_loop", genkern_dpm_loop, diffusers_dpm_loop, _SOLVER_STEPS, _SOLVER_STEPS),
    _UNIPC_LOOP := _loop_case("unipc_loop", genkern_unipc_loop, diffusers_unipc_loop, _SOLVER_STEPS, _SOLVER_STEPS),
    _batch16(_LOOP, _LOOP_STEPS),
    _batch16(_HEUN_LOOP, 2 * _HEUN_STEPS - 1),
    _batch16(_DPM_LOOP, _SOLVER_STEPS),
    _batch16(_UNIPC_LOOP, _SOLVER_STEPS),
    # batch 1 with every core kept busy by other processes (the small-call overhead under load)
    under_load(_HEUN_LOOP),
    under_load(_DPM_LOOP),
    under_load(_UNIPC_LOOP),
)
CASES = CASES + SOLVER_CASES
