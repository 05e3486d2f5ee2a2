"""Reference implementations of the diffusion family (docs/math.md, section 3).

    x_t = q_sample(x0, t, schedule, seed=s)                          # sqrt(ab_t) x0 + sqrt(1 - ab_t) eps
    loss = diffusion_loss(model(x_t, t), x0, t, schedule, seed=s)    # the same eps, regenerated
    x_prev, x0_hat = ddpm_step(model_output, t, x_t, schedule, seed=s, offset=k)
    x_prev, x0_hat = ddim_step(model_output, t, x_t, schedule, prev_t=p, eta=0.0)

ab_t = alpha-bar_t = schedule.alphas_cumprod[t]; alpha-bar at prev_t = -1 is schedule.final_alpha_cumprod.

Conventions, shared by every op here and by the kernels that follow them:

* Tensors are (B, ...): dim 0 is the batch, and for `learned_range` dim 1 the channels. A timestep `t`
  (and `prev_t`) is an int, a 0-dim integer tensor, or an integer tensor of shape (B,): a batch may hold
  samples at different timesteps, each sample's coefficients broadcast over its non-batch dims.
* Precision: half types compute in float32, other dtypes in their own; the per-sample coefficients
  (sqrt(ab_t), the DDPM posterior coefficients, sigma, ...) are computed in float64 from the float64 schedule,
  then cast to the compute dtype; results come back in the input dtype.
* Noise: `noise` when given (the output's shape, dtype and device), else the genkern stream
  `randn(shape, seed, offset)` over the output's full shape, element i of the (contiguous) output using
  stream element i. With guidance the output, hence the noise, has the (B, ...) shape of `sample`.
* Classifier-free guidance (`guidance_scale=s`): model_output has batch 2B, the unconditional half u first
  and the conditional half c last (diffusers' order); the step uses m = u + s (c - u), then with
  `guidance_rescale=phi`: m <- phi m std(c)/std(m) + (1 - phi) m, std per sample over the non-batch dims.
  With `learned_range`, guidance combines the first C channels (the prediction) only and the variance
  channels come from the conditional half (as DeepFloyd IF and unCLIP do).
* Thresholding of x0_hat: `clip_sample=r` clamps it to [-r, r]; `dynamic_threshold=(ratio, max_value)`
  (Imagen) takes q = quantile(|x0_hat|, ratio) per sample (linear interpolation between order statistics,
  torch.quantile's default), q <- min(max(q, 1), max_value), x0_hat <- clamp(x0_hat, -q, q) / q. At most one.

Where this differs from diffusers (DDPMScheduler, DDIMScheduler, version 0.42):

* DDIMScheduler.step takes its previous timestep as t - T // N for every `timestep_spacing`; that is the
  next inference timestep for "leading" only. For "trailing" and "linspace" spacing its steps do not end
  where the next step of `set_timesteps`' list starts (T = 1000, N = 3: trailing timesteps 999, 666, 332,
  but its step from 666 goes to 333; linspace timesteps 999, 500, 0, but its steps go 999 -> 666 and
  500 -> 167). Here `prev_t` is an argument (required for DDIM): pass `schedule.timesteps(...)[1][i]`, the
  next entry of the sequence. (DDPMScheduler looks the next entry up, and is right for every spacing.)
* diffusers' trailing timesteps (np.arange(T, 0, -T/N)) have N + 1 entries for some N (T = 1000: 61, 103,
  121, ...), the last one -1; NoiseSchedule.timesteps keeps the first N.
* Where 1 - ab_prev - sigma^2 rounds below 0 (at ab_t = 0 with eta = 1, i.e. the first step under zero
  terminal SNR; or for eta > 1), DDIM's direction coefficient is taken as 0 here instead of diffusers' NaN
  (its own scaled_linear zero-SNR v-prediction config, trailing spacing, N = 10: step 999 -> 899 is NaN).
* The epsilon min-SNR weight min(snr, gamma) / snr is computed as min(1, gamma / snr), equal for snr > 0,
  and 1 (its limit) at snr = 0 (zero terminal SNR) where the quotient is NaN.
* DDPMScheduler always uses alpha-bar 1 at prev_t = -1; here it is the schedule's final alpha (1 unless
  final_alpha_one=False).
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from .. import _checks
from ..random.reference import randn
from .schedules import NoiseSchedule

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
VARIANCE_TYPES = ("fixed_small", "fixed_large", "learned_range")
REDUCTIONS = ("mean", "none")
MIN_VARIANCE = 1e-20  # fixed_small's floor (diffusers' clamp), also under learned_range's log

__all__ = [
    "q_sample",
    "get_velocity",
    "diffusion_loss",
    "ddpm_step",
    "ddim_step",
    "check_q_sample_args",
    "check_velocity_args",
    "check_schedule",
    "check_choice",
    "check_threshold",
    "check_guidance",
    "check_loss_args",
    "check_ddpm_args",
    "check_ddim_args",
    "alpha_bar",
    "predict_x0_eps",
    "eps_from_x0",
    "loss_target",
    "snr",
    "min_snr_weight",
    "threshold_x0",
    "clip_x0",
    "dynamic_threshold_x0",
    "guide",
    "rescale_guidance",
    "ddpm_coefficients",
    "ddim_coefficients",
    "ddpm_update",
    "ddim_update",
]


# ============================================================================================ validation
# Each op's checks, in one function per op, raising before any computation. The public API reuses them;
# `check_values=False` skips reading timestep values (a host sync for device tensors).


def _real(name: str, x) -> float:
    if isinstance(x, bool) or isinstance(x, Tensor) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(x).__name__}")
    x = float(x)
    if not math.isfinite(x):
        raise ValueError(f"{name} must be finite, got {x}")
    return x


def check_choice(name: str, x, choices) -> str:
    if not isinstance(x, str):
        raise TypeError(f"{name} must be a str, got {type(x).__name__}")
    if x not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {x!r}")
    return x


def check_schedule(schedule) -> NoiseSchedule:
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"schedule must be a genkern.diffusion.schedules.NoiseSchedule, got {type(schedule).__name__}")
    return schedule


def _check_batched(name: str, x) -> Tensor:
    _checks.float_tensor(name, x)
    if x.dim() < 1:
        raise ValueError(f"{name} must have a batch dimension (dim 0), got a 0-dim tensor")
    return x


def _check_timestep(name: str, t, batch: int, low: int, high: int, check_values: bool) -> None:
    """An int in [low, high], or an integer tensor of shape () or (batch,) with values in [low, high]."""
    if isinstance(t, Tensor):
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise TypeError(f"{name} must be an int or an integer tensor, got a tensor of dtype {t.dtype}")
        if t.dim() > 1 or (t.dim() == 1 and t.shape[0] != batch):
            raise ValueError(
                f"{name} must be an int or a tensor of shape () or ({batch},) (one timestep per "
                f"sample), got shape {tuple(t.shape)}"
            )
        if check_values and t.numel():
            lo, hi = int(t.min()), int(t.max())
            if lo < low or hi > high:
                raise ValueError(f"{name} must be in [{low}, {high}], got values in [{lo}, {hi}]")
    else:
        _checks.integer(name, t, low=low, high=high)


def _check_prev_t(prev_t, t, batch: int, T: int, check_values: bool) -> None:
    _check_timestep("prev_t", prev_t, batch, -1, T - 2, check_values)
    if check_values:
        tt = t if isinstance(t, Tensor) else torch.tensor(t)
        pp = prev_t if isinstance(prev_t, Tensor) else torch.tensor(prev_t)
        if not bool((pp.cpu() < tt.cpu()).all()):
            raise ValueError("prev_t must be smaller than t (a step goes from t down to prev_t >= -1)")


def _check_noise(noise, seed, offset, ref_name: str, ref: Tensor) -> None:
    if noise is not None:
        _checks.like("noise", noise, ref_name, ref)
        return
    if seed is not None:  # None: the public API draws one
        _checks.integer("seed", seed, low=0, high=_checks.UINT64_MAX)
    _checks.integer("offset", offset, low=0, high=_checks.UINT64_MAX)


def check_threshold(clip_sample, dynamic_threshold) -> None:
    if clip_sample is not None and dynamic_threshold is not None:
        raise ValueError("give at most one of clip_sample and dynamic_threshold")
    if clip_sample is not None and _real("clip_sample", clip_sample) <= 0:
        raise ValueError(f"clip_sample must be positive (the range [-r, r]), got {clip_sample}")
    if dynamic_threshold is not None:
        if (
            isinstance(dynamic_threshold, (str, bytes))
            or not hasattr(dynamic_threshold, "__len__")
            or len(dynamic_threshold) != 2
        ):
            raise TypeError("dynamic_threshold must be a pair (ratio, max_value)")
        ratio = _real("dynamic_threshold ratio", dynamic_threshold[0])
        max_value = _real("dynamic_threshold max_value", dynamic_threshold[1])
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"dynamic_threshold ratio must be in [0, 1], got {ratio}")
        if max_value <= 0:
            raise ValueError(f"dynamic_threshold max_value must be positive, got {max_value}")


def check_guidance(guidance_scale, guidance_rescale) -> bool:
    """Whether guidance is on."""
    if guidance_scale is not None:
        _real("guidance_scale", guidance_scale)
    phi = _real("guidance_rescale", guidance_rescale)
    if not 0.0 <= phi <= 1.0:
        raise ValueError(f"guidance_rescale must be in [0, 1], got {phi}")
    if phi != 0.0 and guidance_scale is None:
        raise ValueError("guidance_rescale needs guidance_scale (classifier-free guidance)")
    return guidance_scale is not None


def _check_model_output(model_output, sample, guided: bool, learned: bool) -> None:
    _checks.float_tensor("model_output", model_output)
    _checks.same_place("model_output", model_output, "sample", sample)
    B = sample.shape[0]
    expected = [2 * B if guided else B, *sample.shape[1:]]
    if learned:
        if sample.dim() < 2:
            raise ValueError("variance_type='learned_range' needs a channel dimension (dim 1) in sample")
        expected[1] *= 2
    if tuple(model_output.shape) != tuple(expected):
        why = []
        if guided:
            why.append("2B: unconditional then conditional halves, for guidance")
        if learned:
            why.append("2C channels: prediction then variance, for learned_range")
        raise ValueError(
            f"model_output has shape {tuple(model_output.shape)}, expected {tuple(expected)}"
            + (f" ({'; '.join(why)})" if why else "")
        )


def check_q_sample_args(x0, t, schedule, noise=None, seed=0, offset=0, *, check_values: bool = True) -> None:
    """Arguments of q_sample (and get_velocity): x0 float (B, ...); t in [0, T); noise like x0 or (seed, offset)."""
    _check_batched("x0", x0)
    schedule = check_schedule(schedule)
    _check_timestep("t", t, x0.shape[0], 0, schedule.num_train_timesteps - 1, check_values)
    _check_noise(noise, seed, offset, "x0", x0)


check_velocity_args = check_q_sample_args


def check_loss_args(
    model_output,
    x0,
    t,
    schedule,
    noise=None,
    seed=0,
    offset=0,
    prediction_type="epsilon",
    snr_gamma=None,
    reduction="mean",
    *,
    check_values: bool = True,
) -> None:
    """Arguments of diffusion_loss: model_output like x0; the rest as q_sample; a prediction type,
    snr_gamma None or > 0, reduction 'mean' or 'none'."""
    check_q_sample_args(x0, t, schedule, noise, seed, offset, check_values=check_values)
    _checks.like("model_output", model_output, "x0", x0)
    check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    if snr_gamma is not None and _real("snr_gamma", snr_gamma) <= 0:
        raise ValueError(f"snr_gamma must be positive, got {snr_gamma}")
    check_choice("reduction", reduction, REDUCTIONS)


def _check_step_args(
    model_output,
    t,
    sample,
    schedule,
    prev_t,
    prediction_type,
    clip_sample,
    dynamic_threshold,
    noise,
    seed,
    offset,
    guidance_scale,
    guidance_rescale,
    learned: bool,
    check_values: bool,
) -> None:
    _check_batched("sample", sample)
    schedule = check_schedule(schedule)
    guided = check_guidance(guidance_scale, guidance_rescale)
    _check_model_output(model_output, sample, guided, learned)
    T, B = schedule.num_train_timesteps, sample.shape[0]
    _check_timestep("t", t, B, 0, T - 1, check_values)
    if prev_t is not None:
        _check_prev_t(prev_t, t, B, T, check_values)
    check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    check_threshold(clip_sample, dynamic_threshold)
    _check_noise(noise, seed, offset, "sample", sample)


def check_ddpm_args(
    model_output,
    t,
    sample,
    schedule,
    prev_t=None,
    variance_type="fixed_small",
    prediction_type="epsilon",
    clip_sample=None,
    dynamic_threshold=None,
    noise=None,
    seed=0,
    offset=0,
    guidance_scale=None,
    guidance_rescale=0.0,
    *,
    check_values: bool = True,
) -> None:
    """Arguments of ddpm_step: sample float (B, ...); model_output of sample's dtype and device with batch B
    (2B with guidance) and C channels (2C for learned_range); t in [0, T); prev_t (default t - 1) in [-1, t)."""
    learned = check_choice("variance_type", variance_type, VARIANCE_TYPES) == "learned_range"
    step = (model_output, t, sample, schedule, prev_t, prediction_type, clip_sample, dynamic_threshold)
    _check_step_args(*step, noise, seed, offset, guidance_scale, guidance_rescale, learned, check_values)


def check_ddim_args(
    model_output,
    t,
    sample,
    schedule,
    prev_t=None,
    eta=0.0,
    prediction_type="epsilon",
    clip_sample=None,
    dynamic_threshold=None,
    use_clipped_model_output=False,
    noise=None,
    seed=0,
    offset=0,
    guidance_scale=None,
    guidance_rescale=0.0,
    *,
    check_values: bool = True,
) -> None:
    """Arguments of ddim_step: as ddpm_step's (no learned variance), with prev_t required and eta >= 0."""
    if prev_t is None:
        raise ValueError(
            "prev_t is required for ddim_step: the next entry of the inference timesteps "
            "(schedule.timesteps(num_steps, spacing)[1]), -1 after the last step"
        )
    if _real("eta", eta) < 0:
        raise ValueError(f"eta must be non-negative, got {eta}")
    if not isinstance(use_clipped_model_output, bool):
        raise TypeError(f"use_clipped_model_output must be a bool, got {type(use_clipped_model_output).__name__}")
    step = (model_output, t, sample, schedule, prev_t, prediction_type, clip_sample, dynamic_threshold)
    _check_step_args(*step, noise, seed, offset, guidance_scale, guidance_rescale, False, check_values)


# ============================================================================================ pure helpers
# Per-sample coefficients are float64 tensors of shape () or (B,); element-wise helpers take tensors already
# in the compute dtype.


def _compute(x: Tensor | None) -> Tensor | None:
    """Half types compute in float32, as the kernels do."""
    if x is not None and x.dtype in (torch.float16, torch.bfloat16):
        return x.float()
    return x


def _coef(c: Tensor, like: Tensor) -> Tensor:
    """A float64 per-sample coefficient (shape () or (B,)) cast to like's dtype, shaped to broadcast over
    like's non-batch dims."""
    c = c.to(device=like.device, dtype=like.dtype)
    return c.reshape(-1, *([1] * (like.dim() - 1))) if c.dim() == 1 else c


def _per_sample(x: Tensor) -> Tensor:
    """(B, ...) -> (B, n): each sample's elements in a row."""
    return x.reshape(x.shape[0], math.prod(x.shape[1:]))


def per_sample_mean(x: Tensor) -> Tensor:
    """(B, ...) -> (B,): each sample's mean over its non-batch dims, 0 for a sample with no elements (and a
    (0,) tensor for an empty batch). NaN and inf propagate (nothing is replaced: the spec must not hide them)."""
    n = math.prod(x.shape[1:])
    return _per_sample(x).sum(dim=1) / max(n, 1)


def _fresh(x: Tensor, *inputs: Tensor | None) -> Tensor:
    """x, or a copy when it shares memory with one of the inputs: an op's outputs are new tensors (torch's
    custom-op rules reject an output aliasing an input), e.g. x0_hat = model_output for prediction 'sample'."""
    ptr = x.untyped_storage().data_ptr()
    if any(t is not None and t.untyped_storage().data_ptr() == ptr for t in inputs):
        return x.clone()
    return x


def alpha_bar(schedule: NoiseSchedule, t, device=None) -> Tensor:
    """alpha-bar_t in float64 for t an int or an integer tensor ((), (B,)) in [-1, T) (-1: the final alpha)."""
    if isinstance(t, Tensor):
        t = t.to(device) if device is not None else t
    out = schedule.alpha_cumprod(t)
    return out.to(device) if device is not None else out


def snr(alpha_t: Tensor) -> Tensor:
    """Signal-to-noise ratio ab / (1 - ab)."""
    return alpha_t / (1.0 - alpha_t)


def min_snr_weight(alpha_t: Tensor, prediction_type: str, snr_gamma: float) -> Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023) from float64 alpha-bar_t: epsilon min(snr, g) / snr,
    v_prediction min(snr, g) / (snr + 1), sample min(snr, g). The epsilon weight is computed as
    min(1, g / snr): the same number for snr > 0, and 1 (its limit) at snr = 0."""
    s = snr(alpha_t)
    if prediction_type == "epsilon":
        return torch.clamp(snr_gamma / s, max=1.0)
    if prediction_type == "v_prediction":
        return torch.clamp(s, max=snr_gamma) / (s + 1.0)
    return torch.clamp(s, max=snr_gamma)


def predict_x0_eps(
    model_output: Tensor, sample: Tensor, alpha_t: Tensor, prediction_type: str
) -> tuple[Tensor, Tensor]:
    """(x0_hat, eps_hat) from a model output m at x_t = sample, alpha_t float64 per sample:

    epsilon:       x0 = (x_t - sqrt(1 - ab) m) / sqrt(ab),   eps = m
    sample:        x0 = m,                                   eps = (x_t - sqrt(ab) m) / sqrt(1 - ab)
    v_prediction:  x0 = sqrt(ab) x_t - sqrt(1 - ab) m,       eps = sqrt(ab) m + sqrt(1 - ab) x_t
    """
    a, s = _coef(alpha_t.sqrt(), sample), _coef((1.0 - alpha_t).sqrt(), sample)
    if prediction_type == "epsilon":
        return (sample - s * model_output) / a, model_output
    if prediction_type == "sample":
        return model_output, (sample - a * model_output) / s
    if prediction_type == "v_prediction":
        return a * sample - s * model_output, a * model_output + s * sample
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def eps_from_x0(x0: Tensor, sample: Tensor, alpha_t: Tensor) -> Tensor:
    """eps_hat = (x_t - sqrt(ab) x0_hat) / sqrt(1 - ab) (DDIM's use_clipped_model_output)."""
    return (sample - _coef(alpha_t.sqrt(), sample) * x0) / _coef((1.0 - alpha_t).sqrt(), sample)


def loss_target(x0: Tensor, noise: Tensor, alpha_t: Tensor, prediction_type: str) -> Tensor:
    """What the model learns to predict: eps, v = sqrt(ab) eps - sqrt(1 - ab) x0, or x0."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return _coef(alpha_t.sqrt(), x0) * noise - _coef((1.0 - alpha_t).sqrt(), x0) * x0
    if prediction_type == "sample":
        return x0
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def clip_x0(x0: Tensor, r: float) -> Tensor:
    """clamp(x0_hat, -r, r)."""
    return x0.clamp(-r, r)


def dynamic_threshold_x0(x0: Tensor, ratio: float, max_value: float) -> Tensor:
    """Imagen's dynamic thresholding: q = quantile(|x0| per sample, ratio) (linear interpolation),
    q <- min(max(q, 1), max_value), x0 <- clamp(x0, -q, q) / q."""
    if x0.numel() == 0:  # torch.quantile rejects empty input; there is nothing to threshold
        return x0
    q = torch.quantile(_per_sample(x0).abs(), ratio, dim=1)
    q = torch.clamp(q, min=1.0, max=max_value)
    q = q.reshape(-1, *([1] * (x0.dim() - 1)))
    return torch.clamp(x0, -q, q) / q


def threshold_x0(x0: Tensor, clip_sample=None, dynamic_threshold=None) -> Tensor:
    """Apply `clip_sample` (a range r) or `dynamic_threshold` (ratio, max_value) to x0_hat, if either is set."""
    if dynamic_threshold is not None:
        return dynamic_threshold_x0(x0, float(dynamic_threshold[0]), float(dynamic_threshold[1]))
    if clip_sample is not None:
        return clip_x0(x0, float(clip_sample))
    return x0


def rescale_guidance(guided: Tensor, cond: Tensor, phi: float) -> Tensor:
    """Lin et al. (2023) section 3.4: m <- phi m std(c)/std(m) + (1 - phi) m, std per sample over the
    non-batch dims (population std here; diffusers' unbiased std gives the same ratio)."""
    std_c = _per_sample(cond).std(dim=1, correction=0)
    std_m = _per_sample(guided).std(dim=1, correction=0)
    ratio = (std_c / std_m).reshape(-1, *([1] * (guided.dim() - 1)))
    return phi * (guided * ratio) + (1.0 - phi) * guided


def guide(
    model_output: Tensor, guidance_scale: float, guidance_rescale: float = 0.0, channels: int | None = None
) -> Tensor:
    """Classifier-free guidance on a (2B, ...) model output, unconditional half first: u + s (c - u), then
    the std rescale when guidance_rescale > 0. With `channels=C` (learned_range), only channels [0, C) are
    combined; channels [C, 2C) (the variance) are taken from the conditional half."""
    B = model_output.shape[0] // 2
    uncond, cond = model_output[:B], model_output[B:]
    extra = None
    if channels is not None:
        extra = cond[:, channels:]
        uncond, cond = uncond[:, :channels], cond[:, :channels]
    m = uncond + guidance_scale * (cond - uncond)
    if guidance_rescale != 0.0:
        m = rescale_guidance(m, cond, guidance_rescale)
    return m if extra is None else torch.cat([m, extra], dim=1)


def ddpm_coefficients(alpha_t: Tensor, alpha_prev: Tensor) -> dict[str, Tensor]:
    """The DDPM posterior q(x_prev | x_t, x0) for a (possibly strided) step, from float64 alpha-bars:

    alpha' = ab_t / ab_prev,  beta' = 1 - alpha'
    mean = x0_coef x0 + xt_coef x_t,  x0_coef = sqrt(ab_prev) beta' / (1 - ab_t),
                                      xt_coef = sqrt(alpha') (1 - ab_prev) / (1 - ab_t)
    var_small = max((1 - ab_prev) / (1 - ab_t) beta', 1e-20)   (fixed_small)
    var_large = beta'                                          (fixed_large)
    """
    alpha_step = alpha_t / alpha_prev
    beta_step = 1.0 - alpha_step
    beta_t, beta_prev = 1.0 - alpha_t, 1.0 - alpha_prev
    return {
        "x0_coef": alpha_prev.sqrt() * beta_step / beta_t,
        "xt_coef": alpha_step.sqrt() * beta_prev / beta_t,
        "var_small": torch.clamp(beta_prev / beta_t * beta_step, min=MIN_VARIANCE),
        "var_large": beta_step,
    }


def ddim_coefficients(alpha_t: Tensor, alpha_prev: Tensor, eta: float) -> dict[str, Tensor]:
    """DDIM (Song et al. 2021, eq. 12 and 16) from float64 alpha-bars:

        sigma = eta sqrt((1 - ab_prev) / (1 - ab_t)) sqrt(1 - ab_t / ab_prev)
        x_prev = sqrt(ab_prev) x0 + sqrt(1 - ab_prev - sigma^2) eps + sigma z

    with the direction coefficient's radicand floored at 0 (it can round below 0; see the module notes).
    """
    variance = (1.0 - alpha_prev) / (1.0 - alpha_t) * (1.0 - alpha_t / alpha_prev)
    sigma = eta * variance.sqrt()
    return {
        "x0_coef": alpha_prev.sqrt(),
        "eps_coef": torch.clamp(1.0 - alpha_prev - sigma * sigma, min=0.0).sqrt(),
        "sigma": sigma,
    }


def _timestep(t, device) -> Tensor:
    """t as an int64 tensor (shape () or (B,)) on `device`."""
    if isinstance(t, Tensor):
        return t.to(device=device, dtype=torch.int64)
    return torch.tensor(int(t), dtype=torch.int64, device=device)


def _noise(noise, seed, offset, shape, like: Tensor) -> Tensor:
    if noise is not None:
        return _compute(noise)
    return randn(tuple(shape), seed, offset, dtype=like.dtype, device=like.device)


# ============================================================================================ the ops


def q_sample(
    x0: Tensor, t, schedule: NoiseSchedule, *, noise: Tensor | None = None, seed: int = 0, offset: int = 0
) -> Tensor:
    """The forward process: x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps, eps = `noise` or the stream's normals
    for (seed, offset) over x0's shape."""
    check_q_sample_args(x0, t, schedule, noise, seed, offset)
    dtype, x = x0.dtype, _compute(x0)
    eps = _noise(noise, seed, offset, x.shape, x)
    ab = alpha_bar(schedule, _timestep(t, x.device))
    return (_coef(ab.sqrt(), x) * x + _coef((1.0 - ab).sqrt(), x) * eps).to(dtype)


def get_velocity(
    x0: Tensor, t, schedule: NoiseSchedule, *, noise: Tensor | None = None, seed: int = 0, offset: int = 0
) -> Tensor:
    """The v-prediction target v = sqrt(ab_t) eps - sqrt(1 - ab_t) x0, eps as in q_sample (the same
    (seed, offset) gives the eps that q_sample used)."""
    check_velocity_args(x0, t, schedule, noise, seed, offset)
    dtype, x = x0.dtype, _compute(x0)
    eps = _noise(noise, seed, offset, x.shape, x)
    ab = alpha_bar(schedule, _timestep(t, x.device))
    return loss_target(x, eps, ab, "v_prediction").to(dtype)


def diffusion_loss(
    model_output: Tensor,
    x0: Tensor,
    t,
    schedule: NoiseSchedule,
    *,
    noise: Tensor | None = None,
    seed: int = 0,
    offset: int = 0,
    prediction_type: str = "epsilon",
    snr_gamma: float | None = None,
    reduction: str = "mean",
) -> Tensor:
    """The simplified loss: per sample, the mean over non-batch dims of (target - model_output)^2, with target
    eps, v or x0 by `prediction_type` (eps = `noise` or the stream's normals for (seed, offset) over x0's
    shape: those q_sample used to make the model's input), times the min-SNR-gamma weight when `snr_gamma`
    is set. reduction='mean': the mean over the batch (a 0-dim tensor); 'none': the (B,) per-sample losses.

    Non-finite values are never hidden: a NaN or inf in a sample's model output, x0 or noise makes that
    sample's loss NaN or inf (and the mean's), and a squared error that overflows is inf. A sample with no
    elements (x0 of shape (B, 0, ...)) has loss 0, the value of an empty sum, and an empty batch (B = 0)
    gives a (0,) tensor, whose mean (reduction='mean') is NaN as torch's mean of nothing is."""
    check_loss_args(model_output, x0, t, schedule, noise, seed, offset, prediction_type, snr_gamma, reduction)
    dtype, x, m = x0.dtype, _compute(x0), _compute(model_output)
    eps = _noise(noise, seed, offset, x.shape, x)
    ab = alpha_bar(schedule, _timestep(t, x.device))
    target = loss_target(x, eps, ab, prediction_type)
    per_sample = per_sample_mean((target - m) ** 2)
    if snr_gamma is not None:
        weight = min_snr_weight(ab, prediction_type, float(snr_gamma)).to(per_sample.dtype)
        per_sample = per_sample * weight
    return (per_sample.mean() if reduction == "mean" else per_sample).to(dtype)


def ddpm_step(
    model_output: Tensor,
    t,
    sample: Tensor,
    schedule: NoiseSchedule,
    *,
    prev_t=None,
    variance_type: str = "fixed_small",
    prediction_type: str = "epsilon",
    clip_sample: float | None = None,
    dynamic_threshold: tuple[float, float] | None = None,
    noise: Tensor | None = None,
    seed: int = 0,
    offset: int = 0,
    guidance_scale: float | None = None,
    guidance_rescale: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """One ancestral DDPM step x_t -> x_prev (Ho et al. 2020); returns (prev_sample, pred_original_sample).

    prev_t defaults to t - 1; a strided step (prev_t < t - 1, e.g. from schedule.timesteps) uses
    alpha' = ab_t / ab_prev. x0_hat comes from the model output by `prediction_type`, then clipping or
    dynamic thresholding; x_prev = mean + sigma z (see ddpm_coefficients), with sigma^2 by `variance_type`:
    fixed_small, fixed_large, or learned_range, where model_output has 2C channels and its second half
    v in [-1, 1] interpolates log sigma^2 = f log beta' + (1 - f) log var_small, f = (v + 1) / 2.
    No noise is added to the samples whose t is 0. Noise and guidance: see the module notes.
    """
    check_ddpm_args(
        model_output,
        t,
        sample,
        schedule,
        prev_t,
        variance_type,
        prediction_type,
        clip_sample,
        dynamic_threshold,
        noise,
        seed,
        offset,
        guidance_scale,
        guidance_rescale,
    )
    t = _timestep(t, sample.device)
    prev_t = t - 1 if prev_t is None else _timestep(prev_t, sample.device)
    return ddpm_update(
        model_output,
        sample,
        alpha_bar(schedule, t),
        alpha_bar(schedule, prev_t),
        t > 0,
        variance_type=variance_type,
        prediction_type=prediction_type,
        clip_sample=clip_sample,
        dynamic_threshold=dynamic_threshold,
        noise=noise,
        seed=seed,
        offset=offset,
        guidance_scale=guidance_scale,
        guidance_rescale=guidance_rescale,
    )


def ddpm_update(
    model_output: Tensor,
    sample: Tensor,
    alpha_t: Tensor,
    alpha_prev: Tensor,
    noisy: Tensor,
    *,
    variance_type: str = "fixed_small",
    prediction_type: str = "epsilon",
    clip_sample=None,
    dynamic_threshold=None,
    noise: Tensor | None = None,
    seed: int = 0,
    offset: int = 0,
    guidance_scale: float | None = None,
    guidance_rescale: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """ddpm_step given the step's float64 alpha-bars (shape () or (B,)) and which samples get noise (t > 0),
    instead of timesteps and a schedule; arguments unchecked."""
    dtype, x, m = sample.dtype, _compute(sample), _compute(model_output)
    C = x.shape[1] if variance_type == "learned_range" else None
    if guidance_scale is not None:
        m = guide(m, float(guidance_scale), float(guidance_rescale), channels=C)
    predicted_variance = None
    if C is not None:
        m, predicted_variance = m[:, :C], m[:, C:]
    coef = ddpm_coefficients(alpha_t, alpha_prev)

    x0, _ = predict_x0_eps(m, x, alpha_t, prediction_type)
    x0 = threshold_x0(x0, clip_sample, dynamic_threshold)
    mean = _coef(coef["x0_coef"], x) * x0 + _coef(coef["xt_coef"], x) * x

    if variance_type == "fixed_small":
        std = _coef(coef["var_small"].sqrt(), x)
    elif variance_type == "fixed_large":
        std = _coef(coef["var_large"].sqrt(), x)
    else:
        f = (predicted_variance + 1.0) / 2.0
        log_var = f * _coef(coef["var_large"].log(), x) + (1.0 - f) * _coef(coef["var_small"].log(), x)
        std = torch.exp(0.5 * log_var)
    z = _noise(noise, seed, offset, x.shape, x)
    noisy = noisy.to(x.device)
    noisy = noisy.reshape(-1, *([1] * (x.dim() - 1))) if noisy.dim() == 1 else noisy
    prev = torch.where(noisy, mean + std * z, mean)
    return _fresh(prev.to(dtype), model_output, sample), _fresh(x0.to(dtype), model_output, sample)


def ddim_step(
    model_output: Tensor,
    t,
    sample: Tensor,
    schedule: NoiseSchedule,
    *,
    prev_t=None,
    eta: float = 0.0,
    prediction_type: str = "epsilon",
    clip_sample: float | None = None,
    dynamic_threshold: tuple[float, float] | None = None,
    use_clipped_model_output: bool = False,
    noise: Tensor | None = None,
    seed: int = 0,
    offset: int = 0,
    guidance_scale: float | None = None,
    guidance_rescale: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """One DDIM step x_t -> x_prev (Song et al. 2021, eq. 12); returns (prev_sample, pred_original_sample).

    `prev_t` is required: the next entry of the inference timesteps, schedule.timesteps(N, spacing)[1][i]
    (-1 after the last step, where alpha-bar is schedule.final_alpha_cumprod). There is no number-of-steps
    argument to derive it from, and t - T // N (diffusers' rule) is right for "leading" spacing only.

    x0_hat and eps_hat come from the model output by `prediction_type`, x0_hat is clipped or thresholded,
    and with `use_clipped_model_output` eps_hat is re-derived from it as (x_t - sqrt(ab_t) x0_hat) /
    sqrt(1 - ab_t). x_prev = sqrt(ab_prev) x0_hat + sqrt(1 - ab_prev - sigma^2) eps_hat + sigma z with
    sigma = eta sqrt((1 - ab_prev)/(1 - ab_t)) sqrt(1 - ab_t/ab_prev); z is drawn (or read) only when eta > 0.
    Noise and guidance: see the module notes.
    """
    check_ddim_args(
        model_output,
        t,
        sample,
        schedule,
        prev_t,
        eta,
        prediction_type,
        clip_sample,
        dynamic_threshold,
        use_clipped_model_output,
        noise,
        seed,
        offset,
        guidance_scale,
        guidance_rescale,
    )
    ab_t = alpha_bar(schedule, _timestep(t, sample.device))
    ab_prev = alpha_bar(schedule, _timestep(prev_t, sample.device))
    return ddim_update(
        model_output,
        sample,
        ab_t,
        ab_prev,
        eta=eta,
        prediction_type=prediction_type,
        clip_sample=clip_sample,
        dynamic_threshold=dynamic_threshold,
        use_clipped_model_output=use_clipped_model_output,
        noise=noise,
        seed=seed,
        offset=offset,
        guidance_scale=guidance_scale,
        guidance_rescale=guidance_rescale,
    )


def ddim_update(
    model_output: Tensor,
    sample: Tensor,
    alpha_t: Tensor,
    alpha_prev: Tensor,
    *,
    eta: float = 0.0,
    prediction_type: str = "epsilon",
    clip_sample=None,
    dynamic_threshold=None,
    use_clipped_model_output: bool = False,
    noise: Tensor | None = None,
    seed: int = 0,
    offset: int = 0,
    guidance_scale: float | None = None,
    guidance_rescale: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """ddim_step given the step's float64 alpha-bars (shape () or (B,)) instead of timesteps and a schedule;
    arguments unchecked."""
    dtype, x, m = sample.dtype, _compute(sample), _compute(model_output)
    if guidance_scale is not None:
        m = guide(m, float(guidance_scale), float(guidance_rescale))
    ab_t, ab_prev = alpha_t, alpha_prev
    coef = ddim_coefficients(ab_t, ab_prev, float(eta))

    x0, eps = predict_x0_eps(m, x, ab_t, prediction_type)
    x0 = threshold_x0(x0, clip_sample, dynamic_threshold)
    if use_clipped_model_output:
        eps = eps_from_x0(x0, x, ab_t)
    prev = _coef(coef["x0_coef"], x) * x0 + _coef(coef["eps_coef"], x) * eps
    if eta > 0:
        prev = prev + _coef(coef["sigma"], x) * _noise(noise, seed, offset, x.shape, x)
    return _fresh(prev.to(dtype), model_output, sample), _fresh(x0.to(dtype), model_output, sample)


# ============================================================================================ flow matching
# Rectified flow (docs/math.md 5.1): x_sigma = (1 - sigma) x0 + sigma eps, velocity v = eps - x0. Sigmas are
# float32 per-sample values (diffusers keeps its sigmas in float32); float64 data computes in float64 from them.


def _sigmas(sigma, like: Tensor) -> Tensor:
    """sigma (a number, or a () or (B,) tensor) as float32 per-sample values on like's device."""
    s = sigma if isinstance(sigma, Tensor) else torch.tensor(float(sigma))
    return s.to(device=like.device, dtype=torch.float32).reshape(-1).expand(like.shape[0])


def flow_sample(x0: Tensor, sigma, *, noise: Tensor | None = None, seed: int = 0, offset: int = 0) -> Tensor:
    """x_sigma = (1 - sigma) x0 + sigma eps, eps = `noise` or the stream's normals for (seed, offset)."""
    dtype, x = x0.dtype, _compute(x0)
    eps = _noise(noise, seed, offset, x.shape, x)
    s = _sigmas(sigma, x)
    return (_coef(1.0 - s, x) * x + _coef(s, x) * eps).to(dtype)


FLOW_WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")


def flow_weight(sigma: Tensor, weighting: str) -> Tensor:
    """diffusers' compute_loss_weighting_for_sd3 (float32): 1, sigma^-2, or 2 / (pi (1 - 2 sigma + 2 sigma^2)).
    Its "logit_normal" and "mode" schemes shape how sigmas are drawn, not the weights (1 here)."""
    if weighting == "sigma_sqrt":
        return sigma**-2.0
    if weighting == "cosmap":
        return 2.0 / (math.pi * (1.0 - 2.0 * sigma + 2.0 * sigma**2))
    return torch.ones_like(sigma)


def flow_matching_loss(
    model_output: Tensor,
    x0: Tensor,
    sigma,
    *,
    noise: Tensor | None = None,
    seed: int = 0,
    offset: int = 0,
    weighting: str = "none",
) -> Tensor:
    """Per-sample w(sigma) * mean_j (m - (eps - x0))^2, eps as in flow_sample for the same (seed, offset)."""
    dtype, x = x0.dtype, _compute(x0)
    eps = _noise(noise, seed, offset, x.shape, x)
    s = _sigmas(sigma, x)
    err = per_sample_mean((_compute(model_output) - (eps - x)) ** 2)
    return (flow_weight(s, weighting).to(err.dtype) * err).to(dtype)


def sigma_predict_x0(m: Tensor, x: Tensor, sigma: Tensor, prediction_type: str) -> Tensor:
    """k-diffusion's x0_hat (docs/math.md 5.2): epsilon x - sigma m, v_prediction
    m (-sigma / sqrt(sigma^2 + 1)) + x / (sigma^2 + 1), sample m; sigma float32, widened to x's dtype."""
    s = _coef(sigma, x)
    if prediction_type == "epsilon":
        return x - s * m
    if prediction_type == "v_prediction":
        return m * (-s / (s * s + 1.0).sqrt()) + x / (s * s + 1.0)
    return m


def sigma_step(
    kind: str,
    model_output: Tensor,
    sample: Tensor,
    sigma,
    sigma_next,
    *,
    prediction_type: str = "epsilon",
    stochastic: bool = False,
    noise: Tensor | None = None,
    seed: int = 0,
    offset: int = 0,
    guidance_scale: float | None = None,
    guidance_rescale: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """(x_next, x0_hat) of one sigma-space step, each as its diffusers scheduler computes it (float32 sigmas):
    - "flow_euler" (FlowMatchEulerDiscreteScheduler.step, v = model_output): x + (sigma_next - sigma) v, or with
      stochastic sampling (1 - sigma_next) x0_hat + sigma_next z, x0_hat = x - sigma v;
    - "euler" (EulerDiscreteScheduler.step, no churn): d = (x - x0_hat) / sigma; x + d (sigma_next - sigma);
    - "euler_ancestral" (EulerAncestralDiscreteScheduler.step): sigma_up = sqrt(sigma_next^2 (sigma^2 -
      sigma_next^2) / sigma^2), sigma_down = sqrt(sigma_next^2 - sigma_up^2); x + d (sigma_down - sigma) + z sigma_up.
    x0_hat of the k-diffusion steps: sigma_predict_x0. With guidance_scale, model_output is (2B, ...) and
    combined as u + s (c - u) (and the std rescale). z = `noise` or the stream's normals for (seed, offset)."""
    dtype, x = sample.dtype, _compute(sample)
    m = _compute(model_output)
    if guidance_scale is not None:
        m = guide(m, float(torch.tensor(guidance_scale, dtype=torch.float32)), guidance_rescale)
    s, s_next = _sigmas(sigma, x), _sigmas(sigma_next, x)
    if kind == "flow_euler":
        x0 = x - _coef(s, x) * m
        if stochastic:
            z = _noise(noise, seed, offset, x.shape, x)
            out = _coef(1.0 - s_next.to(x.dtype), x) * x0 + _coef(s_next, x) * z
        else:
            out = x + _coef(s_next - s, x) * m
    else:
        x0 = sigma_predict_x0(m, x, s, prediction_type)
        if kind == "euler_ancestral":
            sc, nc = s.to(x.dtype), s_next.to(x.dtype)
            up = (nc * nc * (sc * sc - nc * nc) / (sc * sc)).sqrt()
            dt = (nc * nc - up * up).sqrt() - sc
        else:
            dt = (s_next - s).to(x.dtype)
        out = x + (x - x0) / _coef(s, x) * _coef(dt, x)
        if kind == "euler_ancestral":
            out = out + _noise(noise, seed, offset, x.shape, x) * _coef(up, x)
    return _fresh(out.to(dtype), model_output, sample), _fresh(x0.to(dtype), model_output, sample)


# ============================================================================================ DPM-Solver++
# docs/math.md 5.3, as diffusers' DPMSolverMultistepScheduler computes it on its float32 sigmas (k-diffusion
# sigmas sigma = sqrt((1 - ab) / ab)); float64 data computes in float64 from them. The history is the
# previous step's data prediction x0_hat(s1).
DPM_SOLVER_TYPES = ("midpoint", "heun")


def dpm_alpha_sigma_lambda(sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(alpha, sigma_vp, lambda) of k-diffusion sigmas: 1 / sqrt(sigma^2 + 1), sigma alpha, log alpha - log sigma_vp."""
    alpha = 1.0 / (sigma * sigma + 1.0).sqrt()
    s = sigma * alpha
    return alpha, s, alpha.log() - s.log()


def dpm_predict_x0(m: Tensor, x: Tensor, alpha: Tensor, sigma: Tensor, prediction_type: str) -> Tensor:
    """convert_model_output (dpmsolver++): epsilon (x - sigma m) / alpha, v_prediction alpha x - sigma m, sample m."""
    if prediction_type == "epsilon":
        return (x - _coef(sigma, x) * m) / _coef(alpha, x)
    if prediction_type == "v_prediction":
        return _coef(alpha, x) * x - _coef(sigma, x) * m
    return m


def dpm_solver_update(
    model_output: Tensor,
    sample: Tensor,
    history: Tensor,
    sigma_s1: Tensor,
    sigma_s0: Tensor,
    sigma_t: Tensor,
    second: Tensor,
    *,
    prediction_type: str = "epsilon",
    solver_type: str = "midpoint",
    sde: bool = False,
    noise: Tensor | None = None,
    seed: int = 0,
    offset: int = 0,
    guidance_scale: float | None = None,
    guidance_rescale: float = 0.0,
    dynamic_threshold: tuple[float, float] | None = None,
) -> tuple[Tensor, Tensor]:
    """(x_t, x0_hat(s0)) of one DPM-Solver++ step s0 -> t per sample: first order where `second` (a (B,) bool)
    is False, the 2M step with the history x0_hat(s1) where it is True (docs/math.md 5.3; sde: the
    SDE-DPM-Solver++ step, z = `noise` or the stream's normals for (seed, offset)). x0_hat is thresholded
    (Imagen's dynamic thresholding) before it enters the step and the history."""
    dtype, x = sample.dtype, _compute(sample)
    m = _compute(model_output).to(x.dtype)
    if guidance_scale is not None:
        m = guide(m, float(torch.tensor(guidance_scale, dtype=torch.float32)), guidance_rescale)
    ct = x.dtype
    a_t, s_t, l_t = dpm_alpha_sigma_lambda(sigma_t.to(x.device, ct))
    a_0, s_0, l_0 = dpm_alpha_sigma_lambda(sigma_s0.to(x.device, ct))
    _, _, l_1 = dpm_alpha_sigma_lambda(sigma_s1.to(x.device, ct))
    h = l_t - l_0
    d0 = dpm_predict_x0(m, x, a_0, s_0, prediction_type)
    if dynamic_threshold is not None:
        d0 = dynamic_threshold_x0(d0, float(dynamic_threshold[0]), float(dynamic_threshold[1]))
    if sde:
        e2 = torch.exp(-2.0 * h)
        ratio, k0 = s_t / s_0 * torch.exp(-h), a_t * (1 - e2)
        k1 = 0.5 * k0 if solver_type == "midpoint" else a_t * ((1.0 - e2) / (-2.0 * h) + 1.0)
    else:
        a = a_t * (torch.exp(-h) - 1.0)
        ratio, k0 = s_t / s_0, -a
        k1 = -(0.5 * a) if solver_type == "midpoint" else a_t * ((torch.exp(-h) - 1.0) / h + 1.0)
    out = _coef(ratio, x) * x + _coef(k0, x) * d0
    c1 = 1.0 / ((l_0 - l_1) / h)
    hist = _compute(history).to(ct)
    with_history = out + _coef(k1, x) * (_coef(c1, x) * (d0 - hist))
    out = torch.where(second.to(x.device).reshape(-1, *([1] * (x.dim() - 1))), with_history, out)
    if sde:
        out = out + _coef(s_t * (1.0 - e2).sqrt(), x) * _noise(noise, seed, offset, x.shape, x)
    return _fresh(out.to(dtype), model_output, sample), _fresh(d0.to(dtype), model_output, sample)


def heun_step(
    model_output: Tensor,
    sample: Tensor,
    origin: Tensor | None,
    derivative: Tensor,
    sigma,
    sigma_next,
    *,
    prediction_type: str = "epsilon",
    guidance_scale: float | None = None,
    guidance_rescale: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """(out, x0_hat, d) of a half of HeunDiscreteScheduler.step (docs/math.md 5.2), sigma -> sigma_next:
    - first half (origin None): d = (x - x0_hat) / sigma, out = x + d (sigma_next - sigma), the Euler point x';
    - second half (sample = x', origin = the first half's x, derivative = its d): x0_hat at x' with sigma_next,
      d' = (x' - x0_hat) / sigma_next, out = origin + (d + d') / 2 (sigma_next - sigma); x' itself where
      sigma_next = 0 (the Euler step alone). d is the derivative buffer's new value (unchanged by the second)."""
    dtype, x = sample.dtype, _compute(sample)
    m = _compute(model_output)
    if guidance_scale is not None:
        m = guide(m, float(torch.tensor(guidance_scale, dtype=torch.float32)), guidance_rescale)
    s, s_next = _sigmas(sigma, x), _sigmas(sigma_next, x)
    dt = _coef((s_next - s).to(x.dtype), x)
    if origin is None:
        x0 = sigma_predict_x0(m, x, s, prediction_type)
        d = (x - x0) / _coef(s, x)
        out = x + d * dt
    else:
        x0 = sigma_predict_x0(m, x, s_next, prediction_type)
        d = _compute(derivative)
        average = (d + (x - x0) / _coef(s_next, x)) / 2
        out = torch.where(_coef(s_next, x) == 0, x, _compute(origin) + average * dt)
    return _fresh(out.to(dtype), model_output, sample), _fresh(x0.to(dtype), model_output, sample), d.to(dtype)


# ============================================================================================ UniPC
# docs/math.md 5.5, as diffusers' UniPCMultistepScheduler computes it with predict_x0 (the data-prediction
# UniPC) on its float32 sigmas; float64 data computes in float64 from them. The history is (slots, B, ...):
# the previous step's corrected sample, its x0_hat, and (slots 3) the x0_hat of the step before.
UNIPC_SOLVER_TYPES = ("bh1", "bh2")
UNIPC_PREDICTIONS = (*PREDICTION_TYPES, "flow_prediction")


def unipc_alpha_sigma(sigma: Tensor, flow: bool) -> tuple[Tensor, Tensor]:
    """(alpha, sigma_vp) of table sigmas: DPM-Solver++'s, or on a flow-matching table 1 - sigma and sigma."""
    if flow:
        return 1 - sigma, sigma
    alpha, s, _ = dpm_alpha_sigma_lambda(sigma)
    return alpha, s


def _unipc_lambda(sigma: Tensor, flow: bool) -> tuple[Tensor, Tensor, Tensor]:
    alpha, s = unipc_alpha_sigma(sigma, flow)
    return alpha, s, alpha.log() - s.log()


def unipc_predict_x0(m: Tensor, x: Tensor, sigma_table, alpha, sigma, prediction_type: str) -> Tensor:
    """convert_model_output (predict_x0): DPM-Solver++'s, and flow_prediction x - sigma m (the table's sigma)."""
    if prediction_type == "flow_prediction":
        return x - _coef(sigma_table, x) * m
    return dpm_predict_x0(m, x, alpha, sigma, prediction_type)


def unipc_coefficients(
    sigma_before: Tensor,
    sigma_s0: Tensor,
    sigma_t: Tensor,
    solver_type: str,
    second: Tensor,
    corrector: bool,
    flow: bool = False,
) -> dict[str, Tensor]:
    """The (B,) coefficients of one UniPC update s0 -> t (the step before it at sigma_before, read where
    `second`): ratio = sigma_t / sigma_s0, ah = alpha_t (e^-h - 1), aB = alpha_t B(h) (B = -h for bh1,
    e^-h - 1 for bh2), rk = (lambda_before - lambda_s0) / h; a corrector's weights rho0 (of D1) and rho1 (of
    D1_t): 1/2 for order 1, else R rho = b with R = [[1, 1], [rk, 1]], b1 = g1 / B(h), b2 = 2 g2 / B(h),
    g1 = (e^-h - 1) / (-h) - 1, g2 = g1 / (-h) - 1/2, as diffusers' UniC builds them (solved by
    torch.linalg.solve, as diffusers does). flow: a flow-matching table (unipc_alpha_sigma)."""
    a_t, s_t, l_t = _unipc_lambda(sigma_t, flow)
    _, s_0, l_0 = _unipc_lambda(sigma_s0, flow)
    _, _, l_b = _unipc_lambda(sigma_before, flow)
    h = l_t - l_0
    hh = -h
    h_phi_1 = torch.expm1(hh)
    b_h = hh if solver_type == "bh1" else torch.expm1(hh)
    out = {"ratio": s_t / s_0, "ah": a_t * h_phi_1, "aB": a_t * b_h, "rk": (l_b - l_0) / h}
    if corrector:
        h_phi_k = h_phi_1 / hh - 1
        b1 = h_phi_k * 1 / b_h
        h_phi_k = h_phi_k / hh - 1 / 2
        b2 = h_phi_k * 2 / b_h
        rk = torch.where(second, out["rk"], torch.full_like(out["rk"], 0.5))  # a solvable R where unused
        ones = torch.ones_like(rk)
        R = torch.stack([torch.stack([ones, ones], -1), torch.stack([rk, ones], -1)], -2)
        rho = torch.linalg.solve(R, torch.stack([b1, b2], -1)) if rk.numel() else torch.zeros(0, 2, dtype=rk.dtype)
        out["rho0"] = torch.where(second, rho[:, 0], torch.zeros_like(rk))
        out["rho1"] = torch.where(second, rho[:, 1], torch.full_like(rk, 0.5))
    return out


def unipc_update(
    model_output: Tensor,
    sample: Tensor,
    history: Tensor,
    sigmas: tuple[Tensor, Tensor, Tensor, Tensor],
    p_second: Tensor,
    correct: Tensor,
    c_second: Tensor,
    *,
    prediction_type: str = "epsilon",
    solver_type: str = "bh2",
    flow_sigmas: bool = False,
    guidance_scale: float | None = None,
    guidance_rescale: float = 0.0,
    dynamic_threshold: tuple[float, float] | None = None,
) -> tuple[Tensor, Tensor]:
    """(x_next, new history) of one UniPC step at sigma_i per sample, sigmas = (sigma_{i-2}, sigma_{i-1},
    sigma_i, sigma_{i+1}) as (B,) float32 rows:
    - x0_hat = convert_model_output(model_output, sample) at sigma_i (unipc_predict_x0; flow_sigmas: alpha and
      sigma_vp of a flow-matching table), thresholded;
    - where `correct`: UniC from sigma_{i-1} to sigma_i, x_c = ratio last - ah m0 - aB (rho0 D1 + rho1 D1_t)
      with last = history[0], m0 = history[1], D1 = (history[2] - m0) / rk (where c_second, else rho0 = 0 and
      rho1 = 1/2) and D1_t = x0_hat - m0; else x_c = sample;
    - UniP from sigma_i to sigma_{i+1}: x_next = ratio x_c - ah x0_hat - aB (1/2 (m0 - x0_hat) / rk) (the last
      term where p_second);
    - the new history: (x_c, x0_hat, m0) (its first history.shape[0] entries)."""
    dtype, x = sample.dtype, _compute(sample)
    m = _compute(model_output).to(x.dtype)
    if guidance_scale is not None:
        m = guide(m, float(torch.tensor(guidance_scale, dtype=torch.float32)), guidance_rescale)
    ct = x.dtype
    s2, s1, s0, t = (s.to(x.device, ct) for s in sigmas)
    a_0, sg_0 = unipc_alpha_sigma(s0, flow_sigmas)
    d0 = unipc_predict_x0(m, x, s0, a_0, sg_0, prediction_type)
    if dynamic_threshold is not None:
        d0 = dynamic_threshold_x0(d0, float(dynamic_threshold[0]), float(dynamic_threshold[1]))
    hist = _compute(history).to(ct)
    last, m0 = hist[0], hist[1]
    shape = (-1, *([1] * (x.dim() - 1)))
    c_second, p_second = c_second.to(x.device), p_second.to(x.device)
    c = unipc_coefficients(s2, s1, s0, solver_type, c_second, True, flow_sigmas)
    d1t = d0 - m0
    res = _coef(c["rho1"], x) * d1t
    if hist.shape[0] > 2:
        with_d1 = _coef(c["rho0"], x) * ((hist[2] - m0) / _coef(c["rk"], x)) + res
        res = torch.where(c_second.reshape(shape), with_d1, res)
    corrected = _coef(c["ratio"], x) * last - _coef(c["ah"], x) * m0 - _coef(c["aB"], x) * res
    xc = torch.where(correct.to(x.device).reshape(shape), corrected, x)
    p = unipc_coefficients(s1, s0, t, solver_type, p_second, False, flow_sigmas)
    out = _coef(p["ratio"], x) * xc - _coef(p["ah"], x) * d0
    with_m1 = out - _coef(p["aB"], x) * (0.5 * ((m0 - d0) / _coef(p["rk"], x)))
    out = torch.where(p_second.reshape(shape), with_m1, out)
    new_history = torch.stack([xc, d0, m0][: history.shape[0]]).to(history.dtype)
    return _fresh(out.to(dtype), model_output, sample), new_history
