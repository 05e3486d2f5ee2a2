"""The diffusion family as torch ops: `genkern::q_sample` and `genkern::diffusion_loss` (training),
`genkern::ddpm_step` and `genkern::ddim_step` (sampling).

Each op takes the per-sample timesteps as an int64 (B,) tensor and the schedule as its float32 table
(NoiseSchedule.table: rows t + 1, columns alpha-bar, 1 - alpha-bar and their square roots) on the data's
device, so coefficients are read inside the kernels and nothing passes through the host. The noise is the
given tensor or the genkern stream for (seed, offset) over x0's shape; the loss regenerates it.

Each op's body is its reference (the eager spec, on every device and for every dtype); cpu and cuda tensors
get the kernel registered below it (`@KERNELS.register(op, check=...)`) unless the reference is selected.
Every op validates its arguments in one `_check_<op>` function (errors name the argument), run before a
backend is picked or a kernel asked for, by the body, and by the fake implementation (a traced call fails the
same way): the public functions in genkern.diffusion only normalise. The steps take their options grouped,
as `StepOptions(...).pack()`.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor

from .. import _checks, _native
from .. import backend as _backend
from .._kernels import KernelGroup, to_unsigned
from ..random import reference as ref_random
from . import reference as ref


def _triton_diffusion():
    from ..kernels.diffusion import diffusion

    return diffusion


KERNELS = KernelGroup("diffusion", native=lambda: _native._C.diffusion, triton=_triton_diffusion)

PREDICTIONS = ("epsilon", "v_prediction", "sample")  # the kernels' codes 0, 1, 2


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def _levels(table: Tensor, t: Tensor, like: Tensor) -> Tensor:
    """The table rows of each sample's timestep, shaped (4, B, 1, ..., 1) to broadcast over a sample."""
    rows = table[t + 1].to(_compute_dtype(like))  # (B, 4)
    return rows.t().reshape(4, -1, *([1] * (like.dim() - 1)))


def _eager_noise(noise: Optional[Tensor], seed: int, offset: int, x0: Tensor) -> Tensor:
    if noise is not None:
        return noise.to(_compute_dtype(x0))
    return ref_random.randn(tuple(x0.shape), seed, offset, dtype=_compute_dtype(x0), device=x0.device)


def _eager_target(x0: Tensor, eps: Tensor, levels: Tensor, prediction: int) -> Tensor:
    if prediction == 0:
        return eps
    if prediction == 1:
        return levels[2] * eps - levels[3] * x0
    return x0


def _eager_weight(levels: Tensor, snr_gamma: float, prediction: int) -> Tensor:
    """min-SNR-gamma per sample, as csrc/diffusion/diffusion_math.h computes it."""
    ab, one_minus = levels[0].reshape(-1), levels[1].reshape(-1)
    if not snr_gamma > 0:
        return torch.ones_like(ab)
    if prediction == 0:
        ratio = snr_gamma * one_minus / ab
        return torch.where((ab > 0) & (ratio < 1), ratio, torch.ones_like(ratio))
    snr = ab / one_minus
    clipped = torch.minimum(snr, torch.full_like(snr, snr_gamma))
    return clipped / (snr + 1) if prediction == 1 else clipped


# ---------------------------------------------------------------------------------------------------------
# Checks: each op's arguments, once, whoever calls it (torch.ops.genkern.* is public), before any computation
# ---------------------------------------------------------------------------------------------------------
def _check_batched(name: str, x) -> Tensor:
    _checks.float_tensor(name, x)
    if x.dim() < 1:
        raise ValueError(f"{name} must have a batch dimension (dim 0), got a 0-dim tensor")
    return x


def _check_table(table: Tensor, like: Tensor) -> int:
    """The schedule's table on the data's device; returns T, the number of training timesteps."""
    if (
        not isinstance(table, Tensor)
        or table.dtype != torch.float32
        or table.dim() != 2
        or table.shape[1] != 4
        or table.shape[0] < 2
        or table.device != like.device
    ):
        raise ValueError("table must be NoiseSchedule.table(device) of the data's device")
    return table.shape[0] - 1


def check_timestep_values(name: str, values: list[int], low: int, high: int) -> None:
    """Timestep values (read on the host) in [low, high]."""
    if values:
        lo, hi = min(values), max(values)
        if lo < low or hi > high:
            raise ValueError(f"{name} must be in [{low}, {high}], got values in [{lo}, {hi}]")


def check_steps_down(t: list[int], prev_t: list[int]) -> None:
    if any(p >= q for p, q in zip(prev_t, t)):
        raise ValueError("prev_t must be smaller than t (a step goes from t down to prev_t >= -1)")


def _host_values(x: Tensor) -> Optional[list[int]]:
    """A CPU tensor's values; None on a device, whose values are never read: that would synchronise the host
    (and break a CUDA graph capture), and None for a fake tensor (tracing). The kernels clamp the table index,
    so no value reads outside the table."""
    return x.tolist() if x.device.type == "cpu" and not isinstance(x, FakeTensor) else None


def _check_timesteps(
    name: str, t: Tensor, like: Tensor, low: int, high: int, like_name: str = "sample"
) -> Optional[list[int]]:
    """An int64 (B,) tensor on the data's device, values in [low, high] when they can be read; returns them."""
    B = like.shape[0]
    if not isinstance(t, Tensor) or t.dtype != torch.int64 or tuple(t.shape) != (B,) or t.device != like.device:
        got = (
            f"a tensor of dtype {t.dtype}, shape {tuple(t.shape)} on {t.device}"
            if isinstance(t, Tensor)
            else type(t).__name__
        )
        raise ValueError(
            f"{name} must be an int64 tensor of shape ({B},) ({like_name}'s batch) on {like.device}, got {got}"
        )
    values = _host_values(t)
    if values is not None:
        check_timestep_values(name, values, low, high)
    return values


def _check_noise(noise: Optional[Tensor], ref_name: str, like: Tensor) -> None:
    if noise is not None:
        _checks.like("noise", noise, ref_name, like)


def _check_q_sample(
    x0: Tensor, t: Tensor, table: Tensor, noise: Optional[Tensor], seed: int = 0, offset: int = 0
) -> None:
    _check_batched("x0", x0)
    T = _check_table(table, x0)
    _check_timesteps("t", t, x0, 0, T - 1, "x0")
    _check_noise(noise, "x0", x0)


def _check_loss(
    model_output: Tensor,
    x0: Tensor,
    t: Tensor,
    table: Tensor,
    noise: Optional[Tensor],
    seed: int,
    offset: int,
    prediction: int,
    snr_gamma: Optional[float],
) -> None:
    _check_q_sample(x0, t, table, noise)
    _checks.like("model_output", model_output, "x0", x0)
    _check_code("prediction", prediction, PREDICTIONS)
    if snr_gamma is not None and not (math.isfinite(snr_gamma) and snr_gamma > 0):
        raise ValueError(f"snr_gamma must be positive and finite (None: no weighting), got {snr_gamma}")


def _check_code(name: str, code: int, names: tuple[str, ...]) -> None:
    if not 0 <= code < len(names):
        raise ValueError(f"{name} must be a code in [0, {len(names)}) ({', '.join(names)}), got {code}")


# ---------------------------------------------------------------------------------------------------------
# q_sample: x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps
# ---------------------------------------------------------------------------------------------------------
@torch.library.custom_op("genkern::q_sample", mutates_args=())
def q_sample(x0: Tensor, t: Tensor, table: Tensor, noise: Optional[Tensor], seed: int, offset: int) -> Tensor:
    _check_q_sample(x0, t, table, noise, seed, offset)
    levels = _levels(table, t, x0)
    eps = _eager_noise(noise, to_unsigned(seed), to_unsigned(offset), x0)
    return (levels[2] * x0.to(eps.dtype) + levels[3] * eps).to(x0.dtype).contiguous()


@KERNELS.register(q_sample, check=_check_q_sample)
def _(kernels, x0, t, table, noise, seed, offset):
    x_t = torch.empty(x0.shape, dtype=x0.dtype, device=x0.device)
    noise = None if noise is None else noise.contiguous()
    kernels.q_sample(
        x0.contiguous(), noise, t.contiguous(), table.contiguous(), x_t, to_unsigned(seed), to_unsigned(offset)
    )
    return x_t


@q_sample.register_fake
def _(x0, t, table, noise, seed, offset):
    _check_q_sample(x0, t, table, noise, seed, offset)
    return torch.empty(x0.shape, dtype=x0.dtype, device=x0.device)


def _q_sample_setup(ctx, inputs, output):
    x0, t, table, noise, seed, offset = inputs
    ctx.save_for_backward(t, table)


def _q_sample_grad(ctx, grad):
    # Linear in x0 and in the given noise, with per-sample coefficients: no kernel needed.
    t, table = ctx.saved_tensors
    levels = _levels(table, t, grad)
    grad_x0 = (grad.to(levels.dtype) * levels[2]).to(grad.dtype) if ctx.needs_input_grad[0] else None
    grad_noise = (grad.to(levels.dtype) * levels[3]).to(grad.dtype) if ctx.needs_input_grad[3] else None
    return grad_x0, None, None, grad_noise, None, None


q_sample.register_autograd(_q_sample_grad, setup_context=_q_sample_setup)


# ---------------------------------------------------------------------------------------------------------
# diffusion_loss: per-sample mean of (target - model_output)^2, min-SNR weighted; (B,)
# ---------------------------------------------------------------------------------------------------------
@torch.library.custom_op("genkern::diffusion_loss", mutates_args=())
def diffusion_loss(
    model_output: Tensor,
    x0: Tensor,
    t: Tensor,
    table: Tensor,
    noise: Optional[Tensor],
    seed: int,
    offset: int,
    prediction: int,
    snr_gamma: Optional[float],
) -> Tensor:
    """prediction: a PREDICTIONS code; snr_gamma None: no min-SNR weighting."""
    _check_loss(model_output, x0, t, table, noise, seed, offset, prediction, snr_gamma)
    levels = _levels(table, t, x0)
    eps = _eager_noise(noise, to_unsigned(seed), to_unsigned(offset), x0)
    diff = _eager_target(x0.to(eps.dtype), eps, levels, prediction) - model_output.to(eps.dtype)
    per_sample = ref.per_sample_mean(diff * diff)  # NaN and inf propagate; an empty sample's mean is 0
    return (per_sample * _eager_weight(levels, snr_gamma or 0.0, prediction)).to(x0.dtype)


@KERNELS.register(diffusion_loss, check=_check_loss)
def _(kernels, model_output, x0, t, table, noise, seed, offset, prediction, snr_gamma):
    loss = torch.empty(x0.shape[:1], dtype=x0.dtype, device=x0.device)
    noise = None if noise is None else noise.contiguous()
    kernels.loss(
        model_output.contiguous(),
        x0.contiguous(),
        noise,
        t.contiguous(),
        table.contiguous(),
        loss,
        prediction,
        snr_gamma or 0.0,
        to_unsigned(seed),
        to_unsigned(offset),
    )
    return loss


@diffusion_loss.register_fake
def _(model_output, x0, t, table, noise, seed, offset, prediction, snr_gamma):
    _check_loss(model_output, x0, t, table, noise, seed, offset, prediction, snr_gamma)
    return torch.empty(x0.shape[:1], dtype=x0.dtype, device=x0.device)


def _check_loss_backward(grad_loss, model_output, x0, t, table, noise, seed, offset, prediction, snr_gamma) -> None:
    _check_loss(model_output, x0, t, table, noise, seed, offset, prediction, snr_gamma)
    _checks.like("grad_loss", grad_loss, "x0", x0, shape=x0.shape[:1])


@torch.library.custom_op("genkern::diffusion_loss_backward", mutates_args=())
def diffusion_loss_backward(
    grad_loss: Tensor,
    model_output: Tensor,
    x0: Tensor,
    t: Tensor,
    table: Tensor,
    noise: Optional[Tensor],
    seed: int,
    offset: int,
    prediction: int,
    snr_gamma: Optional[float],
) -> Tensor:
    """d loss / d model_output = grad_loss[b] * weight[b] * 2 (model_output - target) / n."""
    _check_loss_backward(grad_loss, model_output, x0, t, table, noise, seed, offset, prediction, snr_gamma)
    levels = _levels(table, t, x0)
    eps = _eager_noise(noise, to_unsigned(seed), to_unsigned(offset), x0)
    diff = model_output.to(eps.dtype) - _eager_target(x0.to(eps.dtype), eps, levels, prediction)
    n = max(x0[0].numel(), 1) if x0.shape[0] else 1
    scale = grad_loss.to(eps.dtype) * _eager_weight(levels, snr_gamma or 0.0, prediction) * 2.0 / n
    return (diff * scale.reshape(-1, *([1] * (x0.dim() - 1)))).to(x0.dtype).contiguous()


@KERNELS.register(diffusion_loss_backward, check=_check_loss_backward)
def _(kernels, grad_loss, model_output, x0, t, table, noise, seed, offset, prediction, snr_gamma):
    grad = torch.empty(x0.shape, dtype=x0.dtype, device=x0.device)
    noise = None if noise is None else noise.contiguous()
    kernels.loss_backward(
        grad_loss.contiguous(),
        model_output.contiguous(),
        x0.contiguous(),
        noise,
        t.contiguous(),
        table.contiguous(),
        grad,
        prediction,
        snr_gamma or 0.0,
        to_unsigned(seed),
        to_unsigned(offset),
    )
    return grad


@diffusion_loss_backward.register_fake
def _(grad_loss, model_output, x0, t, table, noise, seed, offset, prediction, snr_gamma):
    _check_loss_backward(grad_loss, model_output, x0, t, table, noise, seed, offset, prediction, snr_gamma)
    return torch.empty(x0.shape, dtype=x0.dtype, device=x0.device)


def _loss_setup(ctx, inputs, output):
    model_output, x0, t, table, noise, seed, offset, prediction, snr_gamma = inputs
    ctx.save_for_backward(model_output, x0, t, table, noise)
    ctx.args = (seed, offset, prediction, snr_gamma)
    ctx.backend = _backend.scoped_choice()  # the backward runs on the forward's backend


def _loss_grad(ctx, grad_loss):
    model_output, x0, t, table, noise = ctx.saved_tensors
    seed, offset, prediction, snr_gamma = ctx.args
    with _backend.scoped(ctx.backend):
        grad_m = diffusion_loss_backward(
            grad_loss, model_output, x0, t, table, noise, seed, offset, prediction, snr_gamma
        )
    # The target is linear in x0 and in the noise: d/dx0 and d/dnoise are -grad_m times its coefficients.
    levels = _levels(table, t, grad_m)
    x0_coef = {0: None, 1: -levels[3], 2: 1.0}[prediction]
    noise_coef = {0: 1.0, 1: levels[2], 2: None}[prediction]
    grad_x0 = grad_noise = None
    if ctx.needs_input_grad[1]:
        grad_x0 = torch.zeros_like(x0) if x0_coef is None else (-grad_m.to(levels.dtype) * x0_coef).to(x0.dtype)
    if ctx.needs_input_grad[4]:
        grad_noise = (
            torch.zeros_like(x0) if noise_coef is None else (-grad_m.to(levels.dtype) * noise_coef).to(x0.dtype)
        )
    return grad_m, grad_x0, None, None, grad_noise, None, None, None, None


diffusion_loss.register_autograd(_loss_grad, setup_context=_loss_setup)


# ---------------------------------------------------------------------------------------------------------
# ddpm_step, ddim_step: one denoising step t -> prev_t; (prev_sample, pred_original_sample)
# ---------------------------------------------------------------------------------------------------------
VARIANCES = ("fixed_small", "fixed_large", "learned_range")  # the kernels' codes 0, 1, 2
DDPM, DDIM = 0, 1  # gk::diffusion::StepKind


class StepOptions(NamedTuple):
    """A DDPM or DDIM step's options, by name. The step ops take them as two lists, `options: list[float]` and
    `codes: list[int]`, from `pack()`; build them by name and let `pack` and `unpack` own the layout:

        options, codes = StepOptions(prediction=1, eta=0.5, guidance_scale=3.0).pack()
        prev, x0 = torch.ops.genkern.ddim_step(m, x, t, prev_t, table, None, seed, offset, options, codes, True)
    """

    prediction: int = 0  # a PREDICTIONS code
    variance: int = 0  # a VARIANCES code (DDPM only)
    eta: float = 0.0  # the noise of a DDIM step (DDIM only)
    use_clipped_model_output: bool = False  # re-derive eps_hat from the thresholded x0_hat (DDIM only)
    clip: Optional[float] = None  # clamp x0_hat to [-clip, clip]
    dynamic_ratio: Optional[float] = None  # Imagen's dynamic thresholding: the quantile ratio ...
    dynamic_max: float = 1.0  # ... and the largest threshold
    guidance_scale: Optional[float] = None  # classifier-free guidance: model_output has batch 2B
    guidance_rescale: float = 0.0  # guidance rescale phi (needs guidance_scale)

    def pack(self) -> tuple[list[float], list[int]]:
        """(options, codes): the float options, absent ones as 0.0, and the codes with a presence flag for each
        optional float."""
        options = [
            float(self.eta),
            _or_zero(self.clip),
            _or_zero(self.dynamic_ratio),
            float(self.dynamic_max),
            _or_zero(self.guidance_scale),
            float(self.guidance_rescale),
        ]
        codes = [
            int(self.prediction),
            int(self.variance),
            int(self.use_clipped_model_output),
            int(self.clip is not None),
            int(self.dynamic_ratio is not None),
            int(self.guidance_scale is not None),
        ]
        return options, codes

    @classmethod
    def unpack(cls, options: list[float], codes: list[int]) -> StepOptions:
        if len(options) != 6 or len(codes) != 6:
            raise ValueError(
                f"options and codes must be StepOptions(...).pack()'s lists of 6 floats and 6 ints, got "
                f"{len(options)} and {len(codes)}"
            )
        eta, clip, ratio, max_value, scale, rescale = options
        prediction, variance, clipped, has_clip, has_dynamic, guided = codes
        for name, flag in (
            ("use_clipped_model_output", clipped),
            ("clip flag", has_clip),
            ("dynamic_threshold flag", has_dynamic),
            ("guidance flag", guided),
        ):
            if flag not in (0, 1):
                raise ValueError(f"codes: {name} must be 0 or 1, got {flag}")
        return cls(
            prediction,
            variance,
            eta,
            bool(clipped),
            clip if has_clip else None,
            ratio if has_dynamic else None,
            max_value,
            scale if guided else None,
            rescale,
        )

    @property
    def dynamic_threshold(self) -> Optional[tuple[float, float]]:
        return None if self.dynamic_ratio is None else (self.dynamic_ratio, self.dynamic_max)

    def check(self, kind: int) -> None:
        """The options' values (their types are the schema's)."""
        _check_code("prediction", self.prediction, PREDICTIONS)
        _check_code("variance", self.variance, VARIANCES)
        if not (math.isfinite(self.eta) and self.eta >= 0):
            raise ValueError(f"eta must be non-negative and finite, got {self.eta}")
        if kind == DDPM and (self.eta != 0 or self.use_clipped_model_output):
            raise ValueError("eta and use_clipped_model_output are DDIM options: a DDPM step takes 0 and False")
        if kind == DDIM and self.variance != 0:
            raise ValueError("variance is a DDPM option: a DDIM step takes code 0")
        ref.check_threshold(self.clip, self.dynamic_threshold)
        ref.check_guidance(self.guidance_scale, self.guidance_rescale)


def _or_zero(x: Optional[float]) -> float:
    return 0.0 if x is None else float(x)


def _alpha_bars(table: Tensor, t: Tensor) -> Tensor:
    """Float64 alpha-bars of table rows t + 1, each taken from the column that holds its digits (1 - (1 - ab)
    where ab > 1/2), as the kernels' step_beta does."""
    rows = table[t + 1].double()
    return torch.where(rows[:, 0] > 0.5, 1.0 - rows[:, 1], rows[:, 0])


def _per_sample(x: Tensor, batch: int) -> Tensor:
    return x.reshape(batch, -1)


def _guided_prediction(model_output: Tensor, batch: int, learned: bool, guidance_scale: float) -> tuple[Tensor, Tensor]:
    """(u + s (c - u), c), the prediction part of each sample as (B, n) in the compute dtype."""
    mo = _per_sample(model_output.to(_compute_dtype(model_output)), 2 * batch)
    if learned:
        mo = mo[:, : mo.shape[1] // 2]
    uncond, cond = mo[:batch], mo[batch:]
    return uncond + guidance_scale * (cond - uncond), cond


def _rescale_factors(
    model_output: Tensor, batch: int, learned: bool, guidance_scale: float, guidance_rescale: float
) -> Tensor:
    """Each sample's guidance rescale factor k = phi std(c)/std(m) + 1 - phi (Lin et al. 2023), float32 (B,):
    the kernel multiplies the guided prediction by it. A pre-pass: the stds need the whole sample."""
    m, cond = _guided_prediction(model_output, batch, learned, guidance_scale)
    ratio = cond.std(dim=1, correction=0) / m.std(dim=1, correction=0)
    return (guidance_rescale * ratio + (1.0 - guidance_rescale)).float().contiguous()


def _quantile_rows(x: Tensor, q: float) -> Tensor:
    """torch.quantile(x, q, dim=1) (linear interpolation) by two selections, without quantile's size limit.
    A row holding a NaN has a NaN quantile, as torch.quantile gives (kthvalue alone would skip it)."""
    n = x.shape[1]
    pos = q * (n - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, n - 1)
    below = torch.kthvalue(x, lo + 1, dim=1).values
    above = torch.kthvalue(x, hi + 1, dim=1).values if hi != lo else below
    quantile = torch.lerp(below, above, pos - lo)
    return torch.where(x.isnan().any(dim=1), torch.nan, quantile)


def _dynamic_thresholds(
    model_output: Tensor,
    sample: Tensor,
    t: Tensor,
    table: Tensor,
    prediction: int,
    learned: bool,
    guidance_scale: Optional[float],
    rescale: Optional[Tensor],
    ratio: float,
    max_value: float,
) -> Tensor:
    """Imagen's per-sample threshold q = clamp(quantile(|x0_hat|, ratio), 1, max_value), float32 (B,): a
    pre-pass computing x0_hat as the kernel does (prediction, guidance, rescale) before thresholding."""
    B = sample.shape[0]
    ct = _compute_dtype(sample)
    x = _per_sample(sample.to(ct), B)
    if guidance_scale is not None:
        m, _ = _guided_prediction(model_output, B, learned, guidance_scale)
        if rescale is not None:
            m = m * rescale.to(ct)[:, None]
    else:
        m = _per_sample(model_output.to(ct), B)
        m = m[:, : m.shape[1] // 2] if learned else m
    levels = table[t + 1].to(ct)
    signal, noise = levels[:, 2:3], levels[:, 3:4]
    x0 = (x - noise * m) / signal if prediction == 0 else m if prediction == 2 else signal * x - noise * m
    if x0.shape[1] == 0:
        return torch.ones(B, dtype=torch.float32, device=sample.device)
    q = _quantile_rows(x0.abs(), ratio).clamp(min=1.0, max=max_value)
    return q.float().contiguous()


@functools.lru_cache(maxsize=64)
def _checked_options(kind: int, options: tuple[float, ...], codes: tuple[int, ...]) -> StepOptions:
    """The options, checked: a sampling loop passes the same ones at every step, so they are checked once."""
    o = StepOptions.unpack(options, codes)
    o.check(kind)
    return o


def _check_step(
    kind: int,
    model_output: Tensor,
    sample: Tensor,
    t: Tensor,
    prev_t: Optional[Tensor],
    table: Tensor,
    noise: Optional[Tensor],
    options: list[float],
    codes: list[int],
    prev: Optional[Tensor] = None,
    x0: Optional[Tensor] = None,
) -> StepOptions:
    """Every argument of a step op (prev, x0: the _out ops' buffers); returns the options."""
    o = _checked_options(kind, tuple(options), tuple(codes))
    _check_batched("sample", sample)
    try:
        ref._check_model_output(model_output, sample, o.guidance_scale is not None, o.variance == 2)
    except ValueError as exc:  # a wrong shape may be sample's: name it too
        raise ValueError(f"{exc}, for sample of shape {tuple(sample.shape)}") from None
    T = _check_table(table, sample)
    t_values = _check_timesteps("t", t, sample, 0, T - 1)
    if prev_t is not None:
        prev_values = _check_timesteps("prev_t", prev_t, sample, -1, T - 2)
        if t_values is not None and prev_values is not None:
            check_steps_down(t_values, prev_values)
    _check_noise(noise, "sample", sample)
    for name, out in (("out prev_sample", prev), ("out pred_original", x0)):
        if out is not None:
            _checks.like(name, out, "sample", sample)
            if not out.is_contiguous():
                raise ValueError(f"{name} must be contiguous")
    if (
        prev is not None
        and x0 is not None
        and x0.numel()
        and x0.device.type != "meta"  # a meta or fake tensor has no data
        and not isinstance(x0, FakeTensor)
        and x0.data_ptr() == prev.data_ptr()
    ):
        raise ValueError("out prev_sample and pred_original must be different tensors")
    return o


def _check_ddpm_step(
    model_output, sample, t, prev_t, table, noise, seed, offset, options, codes, return_pred_original
) -> StepOptions:
    return _check_step(DDPM, model_output, sample, t, prev_t, table, noise, options, codes)


def _check_ddim_step(
    model_output, sample, t, prev_t, table, noise, seed, offset, options, codes, return_pred_original
) -> StepOptions:
    return _check_step(DDIM, model_output, sample, t, prev_t, table, noise, options, codes)


def _check_ddpm_step_out(
    model_output, sample, t, prev_t, table, noise, seed, offset, options, codes, prev_sample, pred_original
) -> StepOptions:
    return _check_step(DDPM, model_output, sample, t, prev_t, table, noise, options, codes, prev_sample, pred_original)


def _check_ddim_step_out(
    model_output, sample, t, prev_t, table, noise, seed, offset, options, codes, prev_sample, pred_original
) -> StepOptions:
    return _check_step(DDIM, model_output, sample, t, prev_t, table, noise, options, codes, prev_sample, pred_original)


def _step_reference(
    kind: int,
    model_output: Tensor,
    sample: Tensor,
    t: Tensor,
    prev_t: Optional[Tensor],
    table: Tensor,
    noise: Optional[Tensor],
    seed: int,
    offset: int,
    o: StepOptions,
    return_pred_original: bool,
    prev: Optional[Tensor] = None,
    x0: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """The steps' reference, into `prev` and `x0` when given (the _out ops), else into new tensors."""
    kwargs = dict(
        prediction_type=PREDICTIONS[o.prediction],
        clip_sample=o.clip,
        dynamic_threshold=o.dynamic_threshold,
        noise=noise,
        seed=to_unsigned(seed),
        offset=to_unsigned(offset),
        guidance_scale=o.guidance_scale,
        guidance_rescale=o.guidance_rescale,
    )
    prev_rows = t - 1 if prev_t is None else prev_t
    ab_t, ab_prev = _alpha_bars(table, t), _alpha_bars(table, prev_rows)
    if kind == DDPM:
        prev_ref, x0_ref = ref.ddpm_update(
            model_output, sample, ab_t, ab_prev, t > 0, variance_type=VARIANCES[o.variance], **kwargs
        )
    else:
        prev_ref, x0_ref = ref.ddim_update(
            model_output,
            sample,
            ab_t,
            ab_prev,
            eta=o.eta,
            use_clipped_model_output=o.use_clipped_model_output,
            **kwargs,
        )
    if prev is not None:
        prev.copy_(prev_ref)
        if x0 is not None:
            x0.copy_(x0_ref)
        return prev, x0
    inputs = (model_output, sample, noise)
    x0_out = _new(x0_ref.contiguous(), *inputs) if return_pred_original else sample.new_empty(0)
    return _new(prev_ref.contiguous(), *inputs), x0_out


def _new(x: Tensor, *inputs: Optional[Tensor]) -> Tensor:
    """x, or a copy of it when it shares memory with an input: an op's outputs are new tensors (torch's
    custom-op rules reject an output aliasing an input), and the spec may hand back an input itself, e.g.
    x0_hat = model_output for prediction 'sample' without clipping, thresholding or guidance."""
    ptr = x.untyped_storage().data_ptr()
    if any(t is not None and t.untyped_storage().data_ptr() == ptr for t in inputs):
        return x.clone()
    return x


def _step_kernel(
    kernels,
    kind: int,
    model_output: Tensor,
    sample: Tensor,
    t: Tensor,
    prev_t: Optional[Tensor],
    table: Tensor,
    noise: Optional[Tensor],
    seed: int,
    offset: int,
    o: StepOptions,
    return_pred_original: bool,
    prev: Optional[Tensor] = None,
    x0: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """The steps' kernel, into `prev` and `x0` when given (the _out ops), else into new tensors."""
    B = sample.shape[0]
    guided, learned = o.guidance_scale is not None, o.variance == 2
    rescale = None
    if guided and o.guidance_rescale != 0.0 and sample.numel():
        rescale = _rescale_factors(model_output, B, learned, o.guidance_scale, o.guidance_rescale)
    thresholds = None
    if o.dynamic_ratio is not None and sample.numel():
        thresholds = _dynamic_thresholds(
            model_output,
            sample,
            t,
            table,
            o.prediction,
            learned,
            o.guidance_scale,
            rescale,
            o.dynamic_ratio,
            o.dynamic_max,
        )
    if prev is None:
        prev = torch.empty(sample.shape, dtype=sample.dtype, device=sample.device)
        x0 = torch.empty(sample.shape if return_pred_original else (0,), dtype=sample.dtype, device=sample.device)
    noise = None if noise is None else noise.contiguous()
    kernels.step(
        model_output.contiguous(),
        sample.contiguous(),
        noise,
        t.contiguous(),
        None if prev_t is None else prev_t.contiguous(),
        table.contiguous(),
        rescale,
        thresholds,
        prev,
        x0 if return_pred_original and x0 is not None and x0.numel() else None,
        kind,
        o.prediction,
        o.variance,
        guided,
        _or_zero(o.guidance_scale),
        _or_zero(o.clip),
        float(o.eta),
        o.use_clipped_model_output,
        to_unsigned(seed),
        to_unsigned(offset),
    )
    return prev, x0


def _step_fake(sample: Tensor, return_pred_original: bool) -> tuple[Tensor, Tensor]:
    prev = torch.empty(sample.shape, dtype=sample.dtype, device=sample.device)
    x0 = torch.empty(sample.shape if return_pred_original else (0,), dtype=sample.dtype, device=sample.device)
    return prev, x0


@torch.library.custom_op("genkern::ddpm_step", mutates_args=())
def ddpm_step(
    model_output: Tensor,
    sample: Tensor,
    t: Tensor,
    prev_t: Optional[Tensor],
    table: Tensor,
    noise: Optional[Tensor],
    seed: int,
    offset: int,
    options: list[float],
    codes: list[int],
    return_pred_original: bool,
) -> tuple[Tensor, Tensor]:
    """prev_t None: t - 1. options, codes: StepOptions(...).pack() (no eta, no use_clipped_model_output).
    Without guidance model_output has batch B, with it 2B (unconditional half first). pred_original is empty
    (0,) unless return_pred_original."""
    args = (model_output, sample, t, prev_t, table, noise, seed, offset, options, codes, return_pred_original)
    return _new_outputs(DDPM, _check_ddpm_step(*args), _step_reference, *args)


@torch.library.custom_op("genkern::ddim_step", mutates_args=())
def ddim_step(
    model_output: Tensor,
    sample: Tensor,
    t: Tensor,
    prev_t: Tensor,
    table: Tensor,
    noise: Optional[Tensor],
    seed: int,
    offset: int,
    options: list[float],
    codes: list[int],
    return_pred_original: bool,
) -> tuple[Tensor, Tensor]:
    """As ddpm_step, with prev_t required and the DDIM options (eta >= 0: noise is drawn only when eta > 0;
    use_clipped_model_output), variance code 0."""
    args = (model_output, sample, t, prev_t, table, noise, seed, offset, options, codes, return_pred_original)
    return _new_outputs(DDIM, _check_ddim_step(*args), _step_reference, *args)


# The same steps into given outputs (`out=` of the public functions): a sampling loop reuses its buffers
# instead of allocating (and, on the CPU, page-faulting) two fresh outputs per step. prev_sample may be the
# sample itself: each element is read before it is written.
@torch.library.custom_op("genkern::ddpm_step_out", mutates_args=("prev_sample", "pred_original"))
def ddpm_step_out(
    model_output: Tensor,
    sample: Tensor,
    t: Tensor,
    prev_t: Optional[Tensor],
    table: Tensor,
    noise: Optional[Tensor],
    seed: int,
    offset: int,
    options: list[float],
    codes: list[int],
    prev_sample: Tensor,
    pred_original: Optional[Tensor],
) -> None:
    args = (model_output, sample, t, prev_t, table, noise, seed, offset, options, codes, prev_sample, pred_original)
    _into_outputs(DDPM, _check_ddpm_step_out(*args), _step_reference, *args)


@torch.library.custom_op("genkern::ddim_step_out", mutates_args=("prev_sample", "pred_original"))
def ddim_step_out(
    model_output: Tensor,
    sample: Tensor,
    t: Tensor,
    prev_t: Tensor,
    table: Tensor,
    noise: Optional[Tensor],
    seed: int,
    offset: int,
    options: list[float],
    codes: list[int],
    prev_sample: Tensor,
    pred_original: Optional[Tensor],
) -> None:
    args = (model_output, sample, t, prev_t, table, noise, seed, offset, options, codes, prev_sample, pred_original)
    _into_outputs(DDIM, _check_ddim_step_out(*args), _step_reference, *args)


def _new_outputs(kind, o, impl, m, x, t, prev_t, table, noise, seed, offset, options, codes, return_pred_original):
    """A step op (ddpm_step, ddim_step) on `impl` (_step_reference, or _step_kernel with its kernels bound)."""
    return impl(kind, m, x, t, prev_t, table, noise, seed, offset, o, return_pred_original)


def _into_outputs(kind, o, impl, m, x, t, prev_t, table, noise, seed, offset, options, codes, prev, x0) -> None:
    """A step op into given outputs (ddpm_step_out, ddim_step_out) on `impl`."""
    impl(kind, m, x, t, prev_t, table, noise, seed, offset, o, x0 is not None, prev, x0)


def _register_step(op, kind: int, check, run) -> None:
    """op's kernel (through `run`: _new_outputs or _into_outputs) and its fake."""

    def kernel(kernels, *args):
        o = StepOptions.unpack(args[8], args[9])  # checked by KERNELS.register
        return run(kind, o, functools.partial(_step_kernel, kernels), *args)

    def fake(*args):
        check(*args)
        if run is _new_outputs:
            return _step_fake(args[1], args[10])

    KERNELS.register(op, check=check)(kernel)
    op.register_fake(fake)


_register_step(ddpm_step, DDPM, _check_ddpm_step, _new_outputs)
_register_step(ddim_step, DDIM, _check_ddim_step, _new_outputs)
_register_step(ddpm_step_out, DDPM, _check_ddpm_step_out, _into_outputs)
_register_step(ddim_step_out, DDIM, _check_ddim_step_out, _into_outputs)


# ---------------------------------------------------------------------------------------------------------
# sigma_step: one sigma-space step sigma -> sigma_next (flow matching's Euler, k-diffusion's Euler and Euler
# ancestral); (prev_sample, pred_original_sample). Flow matching's noising and loss are q_sample and
# diffusion_loss on flow tables (genkern.diffusion.flow).
# ---------------------------------------------------------------------------------------------------------
SIGMA_STEPS = ("flow_euler", "euler", "euler_ancestral")  # the kernels' codes 0, 1, 2 (gk::diffusion::SigmaStepKind)


def _check_sigma(name: str, sigma, sample: Tensor) -> None:
    if (
        not isinstance(sigma, Tensor)
        or sigma.dtype != torch.float32
        or tuple(sigma.shape) != (sample.shape[0],)
        or sigma.device != sample.device
    ):
        got = (
            f"dtype {sigma.dtype}, shape {tuple(sigma.shape)} on {sigma.device}"
            if isinstance(sigma, Tensor)
            else (type(sigma).__name__)
        )
        raise ValueError(
            f"{name} must be a float32 tensor of shape ({sample.shape[0]},) (sample's batch) on {sample.device}, "
            f"got {got}"
        )
    values = _host_values(sigma)
    bad = None if values is None else next((v for v in values if not 0.0 <= v < math.inf), None)  # NaN too
    if bad is not None:
        raise ValueError(f"{name} must be finite and non-negative, got {bad}")


def _check_sigma_step(
    model_output, sample, sigma, sigma_next, noise, seed, offset, kind, prediction, guidance_scale,
    guidance_rescale, stochastic, return_pred_original,
) -> None:  # fmt: skip
    _check_code("kind", kind, SIGMA_STEPS)
    _check_code("prediction", prediction, PREDICTIONS)
    if stochastic and kind != 0:
        raise ValueError("stochastic is flow matching's option (kind 0); Euler ancestral always adds noise")
    _check_batched("sample", sample)
    guided = guidance_scale is not None
    try:
        ref._check_model_output(model_output, sample, guided, False)
    except ValueError as exc:
        raise ValueError(f"{exc}, for sample of shape {tuple(sample.shape)}") from None
    _check_sigma("sigma", sigma, sample)
    _check_sigma("sigma_next", sigma_next, sample)
    _check_noise(noise, "sample", sample)
    ref.check_guidance(guidance_scale, guidance_rescale)


@torch.library.custom_op("genkern::sigma_step", mutates_args=())
def sigma_step(
    model_output: Tensor,
    sample: Tensor,
    sigma: Tensor,
    sigma_next: Tensor,
    noise: Optional[Tensor],
    seed: int,
    offset: int,
    kind: int,
    prediction: int,
    guidance_scale: Optional[float],
    guidance_rescale: float,
    stochastic: bool,
    return_pred_original: bool,
) -> tuple[Tensor, Tensor]:
    """kind: a SIGMA_STEPS code; prediction: a PREDICTIONS code (k-diffusion; flow models predict the velocity,
    code 0). sigma, sigma_next: float32 (B,). Without guidance model_output has batch B, with it 2B
    (unconditional half first). pred_original is empty (0,) unless return_pred_original. Noise (flow with
    stochastic, Euler ancestral): `noise` or the genkern stream for (seed, offset)."""
    args = (model_output, sample, sigma, sigma_next, noise, seed, offset, kind, prediction, guidance_scale)
    _check_sigma_step(*args, guidance_rescale, stochastic, return_pred_original)
    prev, x0 = ref.sigma_step(
        SIGMA_STEPS[kind], model_output, sample, sigma, sigma_next, prediction_type=PREDICTIONS[prediction],
        stochastic=stochastic, noise=noise, seed=to_unsigned(seed), offset=to_unsigned(offset),
        guidance_scale=guidance_scale, guidance_rescale=guidance_rescale,
    )  # fmt: skip
    return prev.contiguous(), (x0.contiguous() if return_pred_original else sample.new_empty(0))


@KERNELS.register(sigma_step, check=_check_sigma_step)
def _(kernels, model_output, sample, sigma, sigma_next, noise, seed, offset, kind, prediction, scale, phi, stochastic,
      want_x0):  # fmt: skip
    B, guided = sample.shape[0], scale is not None
    rescale = None
    if guided and phi != 0.0 and sample.numel():
        rescale = _rescale_factors(model_output, B, False, scale, phi)
    prev = torch.empty(sample.shape, dtype=sample.dtype, device=sample.device)
    x0 = torch.empty(sample.shape if want_x0 else (0,), dtype=sample.dtype, device=sample.device)
    kernels.sigma_step(
        model_output.contiguous(), sample.contiguous(), None if noise is None else noise.contiguous(), sigma,
        sigma_next, rescale, prev, x0 if want_x0 and x0.numel() else None, kind, prediction, guided, _or_zero(scale),
        stochastic, to_unsigned(seed), to_unsigned(offset),
    )  # fmt: skip
    return prev, x0


@sigma_step.register_fake
def _(*args):
    _check_sigma_step(*args)
    return _step_fake(args[1], args[12])


class PreparedStep:
    """The step of one sampling loop: the same kind, options, table and seed at every step, the timesteps of
    every step known in advance (rows of `t_rows` and `prev_rows`, checked once here).

    `step(model_output, sample, i)` is the op's step i (noise offset i + 1). An eager call whose tensors look
    like the last call's that the op's checks accepted (same shapes, dtypes and devices: the values of a loop's
    timesteps were checked here) runs the selected backend's kernel directly; on the compiled core, with the
    descriptions of the table and timestep rows made once. torch's custom-op dispatch costs tens of
    microseconds a call on a CPU, several times the fused kernel on a batch-1 latent, and made a 50-step loop
    slower than diffusers' eager chain. Anything else (another shape, a tensor that needs gradients, tracing
    under torch.compile, the reference backend) calls the op, which checks everything."""

    def __init__(
        self,
        kind: int,
        table: Tensor,
        seed: int,
        options: StepOptions,
        t_rows: Tensor,
        prev_rows: Tensor,
        backend: Optional[str],
    ):
        self.op = torch.ops.genkern.ddpm_step if kind == DDPM else torch.ops.genkern.ddim_step
        self.kind, self.table, self.seed, self.options, self.backend = kind, table, seed, options, backend
        options.check(kind)
        self.floats, self.codes = options.pack()
        T = _check_table(table, t_rows)
        if t_rows.dim() != 2 or tuple(prev_rows.shape) != tuple(t_rows.shape):
            raise ValueError("t_rows and prev_rows must be (steps, batch) tensors of one shape")
        t_values, prev_values = t_rows.cpu().reshape(-1).tolist(), prev_rows.cpu().reshape(-1).tolist()
        check_timestep_values("t", t_values, 0, T - 1)
        check_timestep_values("prev_t", prev_values, -1, T - 2)
        check_steps_down(t_values, prev_values)
        self.t_rows, self.prev_rows = t_rows, prev_rows
        self._signature = None  # of the last call the op's checks accepted ...
        self._fast = None  # ... and the kernel call that repeats it: fast(model_output, sample, i) -> prev

    @staticmethod
    def _signature_of(model_output, sample) -> tuple:
        return (
            type(model_output),
            model_output.shape,
            model_output.dtype,
            model_output.device,
            type(sample),
            sample.shape,
            sample.dtype,
            sample.device,
        )

    def __call__(self, model_output: Tensor, sample: Tensor, i: int) -> Tensor:
        eager = not torch.compiler.is_compiling() and not (
            torch.is_grad_enabled() and (model_output.requires_grad or sample.requires_grad)
        )
        if eager and self._fast is not None and self._signature == self._signature_of(model_output, sample):
            return self._fast(model_output, sample, i)
        args = (model_output, sample, self.t_rows[i], self.prev_rows[i], self.table, None, self.seed, i + 1)
        prev = _backend.call(self.backend, self.op, *args, self.floats, self.codes, False)[0]
        if eager and type(model_output) is Tensor and type(sample) is Tensor:  # the op accepted these tensors
            name = _backend.resolve(self.backend, sample.device, sample.dtype, "diffusion")
            if name != "reference":
                self._signature, self._fast = self._signature_of(model_output, sample), self._fast_call(name)
        return prev

    def _fast_call(self, backend: str):
        """The kernel call of step i on `backend`, the op's checks done."""
        o, kernels = self.options, KERNELS.on(backend)
        if backend not in ("cpu", "cuda") or o.dynamic_ratio is not None or o.guidance_rescale != 0.0:
            # Triton launches, thresholds and rescale factors cost more than the dispatch saved.
            def general(model_output, sample, i):
                t, prev_t = self.t_rows[i], self.prev_rows[i]
                args = (model_output, sample, t, prev_t, self.table, None, self.seed, i + 1, o, False)
                return _step_kernel(kernels, self.kind, *args)[0]

            return general

        fn, device = KERNELS.native().step, self.table.device
        table = _native.array(self.table)
        rows = [(_native.array(t), _native.array(p)) for t, p in zip(self.t_rows, self.prev_rows)]
        options = (
            self.kind, o.prediction, o.variance, o.guidance_scale is not None, _or_zero(o.guidance_scale),
            _or_zero(o.clip), float(o.eta), o.use_clipped_model_output, to_unsigned(self.seed),
        )  # fmt: skip

        def native(model_output, sample, i):
            prev = torch.empty(sample.shape, dtype=sample.dtype, device=sample.device)
            # The contiguous tensors stay referenced until the launch returns: a description holds no storage.
            model_c, sample_c = model_output.contiguous(), sample.contiguous()
            model, x = _native.array(model_c), _native.array(sample_c)
            t, prev_t = rows[i]
            _native.launch(
                fn, device, [model, x, None, t, prev_t, table, None, None, _native.array(prev), None, *options, i + 1]
            )
            return prev

        return native
