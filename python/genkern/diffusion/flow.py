"""Flow matching (rectified flow, docs/math.md 5.1): the noising, the training loss, the Euler step and its
sampler, for models that predict the velocity v = eps - x0 (SD3, Flux, Wan and other rectified-flow models).

    sigma = torch.rand(B)                                                 # or a logit-normal draw
    x = genkern.diffusion.flow_sample(x0, sigma, seed=s)                  # (1 - sigma) x0 + sigma eps, eps in-kernel
    loss = genkern.diffusion.flow_matching_loss(model(x, 1000 * sigma), x0, sigma, seed=s)  # regenerates eps

    sigmas = genkern.diffusion.flow_sigmas(28, shift=3.0)                 # diffusers' FlowMatchEulerDiscrete
    images = genkern.diffusion.FlowMatchEulerSampler(shift=3.0).sample(model, (B, C, H, W), 28, seed=0)

The noising and the loss run the diffusion family's fused q_sample and loss kernels on a *flow table*: rows
whose signal and noise columns hold 1 - sigma_b and sigma_b (noising), or 1 and 1 (the target eps - x0 is the
v-prediction target with both coefficients 1). The kernels do exactly this arithmetic, so no second copy of
them exists; the table is a few (B,)-element torch ops on the device, never a host synchronisation. The Euler
step has its own kernel (csrc/diffusion/flow_math.h): x + (sigma_next - sigma) v, as diffusers computes it.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from .. import _checks
from .. import backend as _backend
from .._kernels import to_signed
from ..random import check_offset, randn, resolve_seed
from . import _sigma_loops, sigma_schedules
from . import reference as _spec

__all__ = [
    "FlowMatchEulerSampler",
    "flow_euler_step",
    "flow_matching_loss",
    "flow_sample",
    "flow_sigmas",
]


def _sigma_tensor(sigma, like: Tensor, name: str = "sigma", like_name: str = "sample", high=None) -> Tensor:
    """sigma (a number, or a () or (B,) tensor) as float32 (B,) on like's device. Numbers are checked here
    (finite, in [0, high]); a tensor's values by the op (the step ops) or here with `high` (flow_sample and
    flow_matching_loss, whose ops see a table instead), where they can be read without a device sync."""
    _checks.tensor(like_name, like)
    if like.dim() < 1:
        raise ValueError(f"{like_name} must have a batch dimension (dim 0), got a 0-dim tensor")
    B = like.shape[0]
    if isinstance(sigma, Tensor):
        if not sigma.dtype.is_floating_point:
            raise TypeError(f"{name} must be a float or a floating tensor, got a tensor of dtype {sigma.dtype}")
        if sigma.dim() > 1 or (sigma.dim() == 1 and sigma.shape[0] != B):
            raise ValueError(
                f"{name} must be a number or have shape ({B},) ({like_name}'s batch), got {tuple(sigma.shape)}"
            )
        if sigma.device.type == "meta" and like.device.type != "meta":
            raise ValueError(f"{name} is a meta tensor (no values) and {like_name} is on {like.device}")
        if high is not None and sigma.device.type == "cpu" and _checks.has_values(sigma):
            _check_sigma_values(name, sigma.tolist() if sigma.dim() else [sigma.item()], high)
        s = sigma.to(device=like.device, dtype=torch.float32)
        return s.reshape(-1).expand(B).contiguous()
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)):
        raise TypeError(f"{name} must be a float or a floating tensor, got {type(sigma).__name__}")
    _check_sigma_values(name, [float(sigma)], high)
    return torch.full((B,), float(sigma), dtype=torch.float32, device=like.device)


def _check_tensors(model_output, noise) -> None:
    """The torch.Tensor arguments besides the data, before the op's schema sees them (and fails unnamed)."""
    if model_output is not None:
        _checks.tensor("model_output", model_output)
    if noise is not None:
        _checks.tensor("noise", noise)


def _check_sigma_values(name: str, values, high=None) -> None:
    bad = next((v for v in values if not (0.0 <= v <= (math.inf if high is None else high))), None)
    if bad is not None:
        raise ValueError(f"{name} must be in [0, {'inf)' if high is None else f'{high}]'}, got {bad}")


def _noising_table(sigma: Tensor) -> tuple[Tensor, Tensor]:
    """(t, table) on which q_sample computes (1 - sigma_b) x0 + sigma_b eps: row b + 1 holds signal 1 - sigma_b,
    noise sigma_b (and their squares as alpha-bar and 1 - alpha-bar, which q_sample does not read)."""
    signal = 1.0 - sigma
    rows = torch.stack([signal * signal, sigma * sigma, signal, sigma], dim=1)
    clean = rows.new_tensor([[1.0, 0.0, 1.0, 0.0]])
    # The last row is never indexed: a table has at least two rows (t = -1 and one timestep), an empty batch too.
    table = torch.cat([clean, rows, clean])
    return torch.arange(sigma.shape[0], device=sigma.device), table


def _target_table(device: torch.device) -> Tensor:
    """A table whose every row has signal = noise = 1: the v-prediction target is then eps - x0."""
    return torch.tensor([[0.5, 0.5, 1.0, 1.0]] * 2, dtype=torch.float32, device=device)


def flow_sample(x0: Tensor, sigma, *, noise: Tensor | None = None, seed: int | None = None, offset: int = 0,
                backend: str | None = None) -> Tensor:  # fmt: skip
    """x_sigma = (1 - sigma) x0 + sigma eps, one fused pass; eps = `noise` or the genkern stream for
    (seed, offset) over x0's shape (seed None: drawn from torch's generator). sigma: a number or a (B,) tensor.
    Differentiable in x0 (and noise)."""
    _check_tensors(None, noise)
    s = _sigma_tensor(sigma, x0, like_name="x0", high=1.0)
    t, table = _noising_table(s)
    seed = to_signed(resolve_seed(seed)) if noise is None else 0
    offset = to_signed(check_offset(offset)) if noise is None else 0
    return _backend.call(backend, torch.ops.genkern.q_sample, x0, t, table, noise, seed, offset)


def flow_matching_loss(
    model_output: Tensor,
    x0: Tensor,
    sigma,
    *,
    noise: Tensor | None = None,
    seed: int | None = None,
    offset: int = 0,
    weighting: str = "none",
    backend: str | None = None,
) -> Tensor:
    """Per-sample w(sigma) mean_j (m - (eps - x0))^2, eps regenerated from (seed, offset) as flow_sample drew
    it (never stored; the backward regenerates it too). weighting: "none", "sigma_sqrt" (sigma^-2) or "cosmap"
    (diffusers' compute_loss_weighting_for_sd3; its logit_normal and mode schemes shape how sigma is drawn and
    weigh 1). Returns a (B,) tensor: take .mean() for the batch loss."""
    weighting = _spec.check_choice("weighting", weighting, _spec.FLOW_WEIGHTINGS)
    _check_tensors(model_output, noise)
    s = _sigma_tensor(sigma, x0, like_name="x0", high=1.0)
    t = torch.zeros(x0.shape[0], dtype=torch.int64, device=x0.device)
    seed = to_signed(resolve_seed(seed)) if noise is None else 0
    offset = to_signed(check_offset(offset)) if noise is None else 0
    args = (model_output, x0, t, _target_table(x0.device), noise, seed, offset, 1, None)  # v-target, no min-SNR
    loss = _backend.call(backend, torch.ops.genkern.diffusion_loss, *args)
    return loss if weighting == "none" else loss * _spec.flow_weight(s, weighting).to(loss.dtype)


def flow_euler_step(
    model_output: Tensor,
    sigma,
    sigma_next,
    sample: Tensor,
    *,
    stochastic: bool = False,
    noise: Tensor | None = None,
    seed: int | None = None,
    offset: int = 0,
    guidance_scale: float | None = None,
    guidance_rescale: float = 0.0,
    return_pred_original: bool = False,
    backend: str | None = None,
):
    """One Euler step sigma -> sigma_next of diffusers' FlowMatchEulerDiscreteScheduler, fused: prev_sample =
    sample + (sigma_next - sigma) v, or with stochastic=True (1 - sigma_next) x0_hat + sigma_next z, where
    x0_hat = sample - sigma v and z = `noise` or the genkern stream for (seed, offset). v = model_output, or with
    guidance_scale u + s (c - u) of its (2B, ...) halves (unconditional first), rescaled by guidance_rescale.
    Returns prev_sample, or (prev_sample, pred_original_sample) with return_pred_original."""
    _checks.boolean("stochastic", stochastic)
    _checks.boolean("return_pred_original", return_pred_original)
    _check_tensors(model_output, noise)
    _spec.check_guidance(guidance_scale, guidance_rescale)
    s, s_next = _sigma_tensor(sigma, sample), _sigma_tensor(sigma_next, sample, "sigma_next")
    draws = stochastic and noise is None
    seed = to_signed(resolve_seed(seed)) if draws else 0
    offset = to_signed(check_offset(offset)) if draws else 0
    scale = None if guidance_scale is None else float(guidance_scale)
    args = (model_output, sample, s, s_next, noise, seed, offset, 0, 0, scale, float(guidance_rescale), stochastic)
    prev, x0 = _backend.call(backend, torch.ops.genkern.sigma_step, *args, bool(return_pred_original))
    return (prev, x0) if return_pred_original else prev


def time_shift(sigmas: np.ndarray, *, shift: float = 1.0, mu: float | None = None) -> np.ndarray:
    """SD3's shift s sigma / (1 + (s - 1) sigma), or with mu Flux's dynamic (exponential) shift
    e^mu / (e^mu + (1 / sigma - 1)), in float64."""
    if mu is not None:
        with np.errstate(divide="ignore"):
            return math.exp(mu) / (math.exp(mu) + (1.0 / sigmas - 1.0))
    return shift * sigmas / (1.0 + (shift - 1.0) * sigmas)


def flow_sigmas(
    num_steps: int,
    *,
    shift: float = 1.0,
    mu: float | None = None,
    num_train_timesteps: int = 1000,
    sigma_schedule: str | None = None,
) -> Tensor:
    """The inference sigmas of diffusers' FlowMatchEulerDiscreteScheduler.set_timesteps(num_steps) (float32,
    num_steps + 1 values, a terminal 0): timesteps linspace(sigma_max T, sigma_min T, N) / T, shifted, where
    sigma_max and sigma_min are the training sigmas' ends after the same shift (diffusers shifts sigma_min
    twice; so does this, for parity). mu: dynamic shifting (Flux), instead of `shift`. sigma_schedule
    "karras", "exponential" or "beta": that ramp between the shifted sigmas' ends (use_karras_sigmas, ...;
    docs/math.md 5.4); the model's timesteps are then sigma T."""
    num_steps = _checks.integer("num_steps", num_steps, low=1)
    T = _checks.integer("num_train_timesteps", num_train_timesteps, low=1)
    if not (isinstance(shift, (int, float)) and shift > 0):
        raise ValueError(f"shift must be a positive number, got {shift!r}")
    train = np.linspace(1, T, T, dtype=np.float32)[::-1].copy() / T
    if mu is None:  # diffusers' __init__ shifts the training sigmas unless dynamic shifting is on
        train = shift * train / (1 + (shift - 1) * train)
    sigma_max, sigma_min = float(train[0]), float(train[-1])
    sigmas = np.linspace(sigma_max * T, sigma_min * T, num_steps) / T
    sigmas = time_shift(sigmas, shift=shift, mu=mu)
    if sigma_schedule is not None:
        _spec.check_choice("sigma_schedule", sigma_schedule, sigma_schedules.SIGMA_SCHEDULES)
        sigmas = sigma_schedules.ramp(sigma_schedule, float(sigmas[-1]), float(sigmas[0]), num_steps)
    return torch.cat([torch.from_numpy(np.asarray(sigmas)).to(torch.float32), torch.zeros(1)])


def loop_start(model, shape, seed, guidance_scale, guidance_rescale, model_kwargs, x_T, device, dtype, backend):
    """What a sigma-space sampler checks and draws before its loop: (model_kwargs, seed, shape, x_T), x_T being
    the genkern stream's randn(shape) at offset 0 for `seed` unless given, on `device` (default: x_T's, else
    the CPU) in `dtype`."""
    if not callable(model):
        raise TypeError(f"model must be callable as model(x, t, **model_kwargs), got {type(model).__name__}")
    _spec.check_guidance(guidance_scale, guidance_rescale)
    seed, shape = resolve_seed(seed), tuple(shape)
    device = torch.device(device) if device is not None else (x_T.device if x_T is not None else torch.device("cpu"))
    if x_T is None:
        x_T = randn(shape, seed=seed, device=device, dtype=dtype, backend=backend)
    return ({} if model_kwargs is None else model_kwargs), seed, shape, x_T.to(device=device, dtype=dtype)


class FlowMatchEulerSampler:
    """Euler sampling of a velocity model from sigma = 1 to 0 (flow_sigmas), every step fused.

    model(x, t, **model_kwargs) gets t = sigma * num_train_timesteps as a float32 (B,) tensor, as diffusers'
    pipelines pass the timestep; with guidance_scale, model(cat([x, x]), cat([t, t])) and model_kwargs of batch
    2B (unconditional half first). x_T is the genkern stream's randn(shape) at offset 0 for `seed`; step i
    draws its noise (stochastic only) at offset i + 1, so sample b depends only on (seed, b) for any batch
    size. The loop reads nothing back from the device."""

    def __init__(
        self,
        *,
        shift: float = 1.0,
        mu: float | None = None,
        stochastic: bool = False,
        num_train_timesteps: int = 1000,
        sigma_schedule: str | None = None,
        backend: str | None = None,
    ):
        flow_sigmas(1, shift=shift, mu=mu, num_train_timesteps=num_train_timesteps, sigma_schedule=sigma_schedule)
        self.sigma_schedule = sigma_schedule
        _checks.boolean("stochastic", stochastic)
        self.shift, self.mu, self.stochastic, self.T = shift, mu, stochastic, num_train_timesteps
        self.backend = backend

    @torch.no_grad()
    def sample(
        self,
        model,
        shape,
        num_steps: int = 28,
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
        """cuda_graph: capture the loop in a CUDA graph on the first call with a given shape, dtype, device,
        model, num_steps, guidance and model_kwargs signature (and seed, with stochastic sampling: its noise is
        captured), and replay it on later calls, copying x_T and the model_kwargs tensors in; the model must be
        capturable. clear_cuda_graphs() releases the captures."""
        _sigma_loops.check_cuda_graph(cuda_graph, device if device is not None else getattr(x_T, "device", "cpu"))
        model_kwargs, seed, shape, x = loop_start(
            model, shape, seed, guidance_scale, guidance_rescale, model_kwargs, x_T, device, dtype, self.backend
        )
        sigmas = flow_sigmas(
            num_steps, shift=self.shift, mu=self.mu, num_train_timesteps=self.T, sigma_schedule=self.sigma_schedule
        )
        loop = _sigma_loops.SigmaLoop(model, 0, 0, self.stochastic, sigmas, sigmas[:-1] * self.T, None, 1.0,
                                      shape[0], x.device, dtype, seed, guidance_scale, guidance_rescale,
                                      self.backend)  # fmt: skip
        key = ("flow", num_steps, self.shift, self.mu, self.sigma_schedule, self.stochastic, self.T, self.backend,
               guidance_scale, guidance_rescale, seed if self.stochastic else None)  # fmt: skip
        return _sigma_loops.run(self, loop, key, x, model_kwargs, cuda_graph)

    def clear_cuda_graphs(self) -> None:
        """Release the captured graphs (and the memory pools they hold)."""
        _sigma_loops.clear_cuda_graphs(self)
