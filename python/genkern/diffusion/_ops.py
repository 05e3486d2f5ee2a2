"""The diffusion family as torch ops: `genkern::q_sample` and `genkern::diffusion_loss` (training),
`genkern::ddpm_step` and `genkern::ddim_step` (sampling).

Each op takes the per-sample timesteps as an int64 (B,) tensor and the schedule as its float32 table
(NoiseSchedule.table: rows t + 1, columns alpha-bar, 1 - alpha-bar and their square roots) on the data's
device, so coefficients are read inside the kernels and nothing passes through the host. The noise is the
given tensor or the genkern stream for (seed, offset) over x0's shape; the loss regenerates it.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from . import reference as ref
from ..random import reference as ref_random
from .. import _native
from .._kernels import KernelGroup, to_unsigned


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


def _check(x0: Tensor, t: Tensor, table: Tensor, noise: Optional[Tensor], others=()) -> None:
    """What the kernels rely on, whoever calls the op (torch.ops.genkern.* is public)."""
    if x0.dim() < 1:
        raise ValueError("x0 must have a batch dimension")
    if t.dtype != torch.int64 or tuple(t.shape) != (x0.shape[0],) or t.device != x0.device:
        raise ValueError(f"t must be an int64 tensor of shape ({x0.shape[0]},) on {x0.device}")
    if table.dtype != torch.float32 or table.dim() != 2 or table.shape[1] != 4 or table.device != x0.device:
        raise ValueError("table must be NoiseSchedule.table(device) of the data's device")
    for name, x in (("noise", noise), *others):
        if x is not None and (x.shape != x0.shape or x.dtype != x0.dtype or x.device != x0.device):
            raise ValueError(f"{name} must match x0 in shape, dtype and device")


# ---------------------------------------------------------------------------------------------------------
# q_sample: x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps
# ---------------------------------------------------------------------------------------------------------
@torch.library.custom_op("genkern::q_sample", mutates_args=())
def q_sample(x0: Tensor, t: Tensor, table: Tensor, noise: Optional[Tensor], seed: int, offset: int,
             backend: str) -> Tensor:
    _check(x0, t, table, noise)
    seed, offset = to_unsigned(seed), to_unsigned(offset)
    if backend == "reference":
        levels = _levels(table, t, x0)
        eps = _eager_noise(noise, seed, offset, x0)
        return (levels[2] * x0.to(eps.dtype) + levels[3] * eps).to(x0.dtype).contiguous()
    x_t = torch.empty(x0.shape, dtype=x0.dtype, device=x0.device)
    noise = None if noise is None else noise.contiguous()
    KERNELS.on(backend).q_sample(x0.contiguous(), noise, t.contiguous(), table.contiguous(), x_t, seed, offset)
    return x_t


@q_sample.register_fake
def _(x0, t, table, noise, seed, offset, backend):
    return torch.empty(x0.shape, dtype=x0.dtype, device=x0.device)


def _q_sample_setup(ctx, inputs, output):
    x0, t, table, noise, seed, offset, backend = inputs
    ctx.save_for_backward(t, table)
    ctx.x0_ndim = x0.dim()


def _q_sample_grad(ctx, grad):
    # Linear in x0 and in the given noise, with per-sample coefficients: no kernel needed.
    t, table = ctx.saved_tensors
    levels = _levels(table, t, grad)
    grad_x0 = (grad.to(levels.dtype) * levels[2]).to(grad.dtype) if ctx.needs_input_grad[0] else None
    grad_noise = (grad.to(levels.dtype) * levels[3]).to(grad.dtype) if ctx.needs_input_grad[3] else None
    return grad_x0, None, None, grad_noise, None, None, None


q_sample.register_autograd(_q_sample_grad, setup_context=_q_sample_setup)


# ---------------------------------------------------------------------------------------------------------
# diffusion_loss: per-sample mean of (target - model_output)^2, min-SNR weighted; (B,)
# ---------------------------------------------------------------------------------------------------------
@torch.library.custom_op("genkern::diffusion_loss", mutates_args=())
def diffusion_loss(model_output: Tensor, x0: Tensor, t: Tensor, table: Tensor, noise: Optional[Tensor], seed: int,
                   offset: int, prediction: int, snr_gamma: float, backend: str) -> Tensor:
    _check(x0, t, table, noise, (("model_output", model_output),))
    seed, offset = to_unsigned(seed), to_unsigned(offset)
    if backend == "reference":
        levels = _levels(table, t, x0)
        eps = _eager_noise(noise, seed, offset, x0)
        diff = _eager_target(x0.to(eps.dtype), eps, levels, prediction) - model_output.to(eps.dtype)
        per_sample = (diff * diff).reshape(x0.shape[0], -1).mean(dim=1).nan_to_num(0.0)
        return (per_sample * _eager_weight(levels, snr_gamma, prediction)).to(x0.dtype)
    loss = torch.empty(x0.shape[:1], dtype=x0.dtype, device=x0.device)
    noise = None if noise is None else noise.contiguous()
    KERNELS.on(backend).loss(model_output.contiguous(), x0.contiguous(), noise, t.contiguous(),
                                       table.contiguous(), loss, prediction, snr_gamma, seed, offset)
    return loss


@diffusion_loss.register_fake
def _(model_output, x0, t, table, noise, seed, offset, prediction, snr_gamma, backend):
    return torch.empty(x0.shape[:1], dtype=x0.dtype, device=x0.device)


@torch.library.custom_op("genkern::diffusion_loss_backward", mutates_args=())
def diffusion_loss_backward(grad_loss: Tensor, model_output: Tensor, x0: Tensor, t: Tensor, table: Tensor,
                            noise: Optional[Tensor], seed: int, offset: int, prediction: int, snr_gamma: float,
                            backend: str) -> Tensor:
    """d loss / d model_output = grad_loss[b] * weight[b] * 2 (model_output - target) / n."""
    _check(x0, t, table, noise, (("model_output", model_output),))
    seed, offset = to_unsigned(seed), to_unsigned(offset)
    if backend == "reference":
        levels = _levels(table, t, x0)
        eps = _eager_noise(noise, seed, offset, x0)
        diff = model_output.to(eps.dtype) - _eager_target(x0.to(eps.dtype), eps, levels, prediction)
        n = max(x0[0].numel(), 1) if x0.shape[0] else 1
        scale = grad_loss.to(eps.dtype) * _eager_weight(levels, snr_gamma, prediction) * 2.0 / n
        return (diff * scale.reshape(-1, *([1] * (x0.dim() - 1)))).to(x0.dtype).contiguous()
    grad = torch.empty(x0.shape, dtype=x0.dtype, device=x0.device)
    noise = None if noise is None else noise.contiguous()
    KERNELS.on(backend).loss_backward(grad_loss.contiguous(), model_output.contiguous(), x0.contiguous(),
                                                noise, t.contiguous(), table.contiguous(), grad, prediction,
                                                snr_gamma, seed, offset)
    return grad


@diffusion_loss_backward.register_fake
def _(grad_loss, model_output, x0, t, table, noise, seed, offset, prediction, snr_gamma, backend):
    return torch.empty(x0.shape, dtype=x0.dtype, device=x0.device)


def _loss_setup(ctx, inputs, output):
    model_output, x0, t, table, noise, seed, offset, prediction, snr_gamma, backend = inputs
    ctx.save_for_backward(model_output, x0, t, table, noise)
    ctx.args = (seed, offset, prediction, snr_gamma, backend)


def _loss_grad(ctx, grad_loss):
    model_output, x0, t, table, noise = ctx.saved_tensors
    seed, offset, prediction, snr_gamma, backend = ctx.args
    grad_m = diffusion_loss_backward(grad_loss, model_output, x0, t, table, noise, seed, offset, prediction,
                                     snr_gamma, backend)
    # The target is linear in x0 and in the noise: d/dx0 and d/dnoise are -grad_m times its coefficients.
    levels = _levels(table, t, grad_m)
    x0_coef = {0: None, 1: -levels[3], 2: 1.0}[prediction]
    noise_coef = {0: 1.0, 1: levels[2], 2: None}[prediction]
    grad_x0 = grad_noise = None
    if ctx.needs_input_grad[1]:
        grad_x0 = torch.zeros_like(x0) if x0_coef is None else (-grad_m.to(levels.dtype) * x0_coef).to(x0.dtype)
    if ctx.needs_input_grad[4]:
        grad_noise = torch.zeros_like(x0) if noise_coef is None else (-grad_m.to(levels.dtype) * noise_coef).to(x0.dtype)
    return grad_m, grad_x0, None, None, grad_noise, None, None, None, None, None


diffusion_loss.register_autograd(_loss_grad, setup_context=_loss_setup)


# ---------------------------------------------------------------------------------------------------------
# ddpm_step, ddim_step: one denoising step t -> prev_t; (prev_sample, pred_original_sample)
# ---------------------------------------------------------------------------------------------------------
VARIANCES = ("fixed_small", "fixed_large", "learned_range")  # the kernels' codes 0, 1, 2
DDPM, DDIM = 0, 1  # gk::diffusion::StepKind


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


def _rescale_factors(model_output: Tensor, batch: int, learned: bool, guidance_scale: float,
                     guidance_rescale: float) -> Tensor:
    """Each sample's guidance rescale factor k = phi std(c)/std(m) + 1 - phi (Lin et al. 2023), float32 (B,):
    the kernel multiplies the guided prediction by it. A pre-pass: the stds need the whole sample."""
    m, cond = _guided_prediction(model_output, batch, learned, guidance_scale)
    ratio = cond.std(dim=1, correction=0) / m.std(dim=1, correction=0)
    return (guidance_rescale * ratio + (1.0 - guidance_rescale)).float().contiguous()


def _quantile_rows(x: Tensor, q: float) -> Tensor:
    """torch.quantile(x, q, dim=1) (linear interpolation) by two selections, without quantile's size limit."""
    n = x.shape[1]
    pos = q * (n - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, n - 1)
    below = torch.kthvalue(x, lo + 1, dim=1).values
    above = torch.kthvalue(x, hi + 1, dim=1).values if hi != lo else below
    return torch.lerp(below, above, pos - lo)


def _dynamic_thresholds(model_output: Tensor, sample: Tensor, t: Tensor, table: Tensor, prediction: int,
                        learned: bool, guidance_scale: Optional[float], rescale: Optional[Tensor], ratio: float,
                        max_value: float) -> Tensor:
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
    x0 = ((x - noise * m) / signal if prediction == 0 else m if prediction == 2 else signal * x - noise * m)
    if x0.shape[1] == 0:
        return torch.ones(B, dtype=torch.float32, device=sample.device)
    q = _quantile_rows(x0.abs(), ratio).clamp(min=1.0, max=max_value)
    return q.float().contiguous()


def _check_step(model_output: Tensor, sample: Tensor, t: Tensor, prev_t: Optional[Tensor], table: Tensor,
                noise: Optional[Tensor], guided: bool, learned: bool) -> None:
    _check(sample, t, table, noise)
    if prev_t is not None and (prev_t.dtype != torch.int64 or tuple(prev_t.shape) != (sample.shape[0],)
                               or prev_t.device != sample.device):
        raise ValueError(f"prev_t must be an int64 tensor of shape ({sample.shape[0]},) on {sample.device}")
    expected = [sample.shape[0] * (2 if guided else 1), *sample.shape[1:]]
    if learned:
        if sample.dim() < 2:
            raise ValueError("learned_range needs a channel dimension (dim 1) in sample")
        expected[1] *= 2
    if (tuple(model_output.shape) != tuple(expected) or model_output.dtype != sample.dtype
            or model_output.device != sample.device):
        raise ValueError(f"model_output must have shape {tuple(expected)} and sample's dtype and device")


def _step(kind: int, model_output: Tensor, sample: Tensor, t: Tensor, prev_t: Optional[Tensor], table: Tensor,
          noise: Optional[Tensor], seed: int, offset: int, prediction: int, variance: int, eta: float,
          use_clipped_model_output: bool, clip: Optional[float], dynamic_ratio: Optional[float], dynamic_max: float,
          guidance_scale: Optional[float], guidance_rescale: float, backend: str, return_pred_original: bool,
          prev: Optional[Tensor] = None, x0: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """The steps' implementation, into `prev` and `x0` when given (the _out ops), else into new tensors."""
    guided, learned = guidance_scale is not None, variance == 2
    _check_step(model_output, sample, t, prev_t, table, noise, guided, learned)
    seed, offset = to_unsigned(seed), to_unsigned(offset)
    dynamic = None if dynamic_ratio is None else (dynamic_ratio, dynamic_max)
    out_prev, out_x0 = prev, x0
    for name, out in (("prev_sample", out_prev), ("pred_original", out_x0)):
        if out is not None and (out.shape != sample.shape or out.dtype != sample.dtype or out.device != sample.device
                                or not out.is_contiguous()):
            raise ValueError(f"{name} must be a contiguous tensor of sample's shape, dtype and device")
    if backend == "reference":
        kwargs = dict(prediction_type=PREDICTIONS[prediction], clip_sample=clip, dynamic_threshold=dynamic,
                      noise=noise, seed=seed, offset=offset, guidance_scale=guidance_scale,
                      guidance_rescale=guidance_rescale)
        prev_rows = t - 1 if prev_t is None else prev_t
        ab_t, ab_prev = _alpha_bars(table, t), _alpha_bars(table, prev_rows)
        if kind == DDPM:
            prev_ref, x0_ref = ref.ddpm_update(model_output, sample, ab_t, ab_prev, t > 0, variance_type=VARIANCES[variance],
                                       **kwargs)
        else:
            prev_ref, x0_ref = ref.ddim_update(model_output, sample, ab_t, ab_prev, eta=eta,
                                       use_clipped_model_output=use_clipped_model_output, **kwargs)
        if out_prev is not None:
            out_prev.copy_(prev_ref)
            if out_x0 is not None:
                out_x0.copy_(x0_ref)
            return out_prev, out_x0
        return prev_ref.contiguous(), (x0_ref.contiguous() if return_pred_original else sample.new_empty(0))
    B = sample.shape[0]
    rescale = None
    if guided and guidance_rescale != 0.0 and sample.numel():
        rescale = _rescale_factors(model_output, B, learned, guidance_scale, guidance_rescale)
    thresholds = None
    if dynamic is not None and sample.numel():
        thresholds = _dynamic_thresholds(model_output, sample, t, table, prediction, learned, guidance_scale, rescale,
                                         dynamic_ratio, dynamic_max)
    if prev is None:
        prev = torch.empty(sample.shape, dtype=sample.dtype, device=sample.device)
        x0 = torch.empty(sample.shape if return_pred_original else (0,), dtype=sample.dtype, device=sample.device)
    noise = None if noise is None else noise.contiguous()
    KERNELS.on(backend).step(
        model_output.contiguous(), sample.contiguous(), noise, t.contiguous(),
        None if prev_t is None else prev_t.contiguous(), table.contiguous(), rescale, thresholds, prev,
        x0 if return_pred_original and x0 is not None and x0.numel() else None, kind, prediction, variance, guided,
        0.0 if guidance_scale is None else float(guidance_scale), 0.0 if clip is None else float(clip), float(eta),
        use_clipped_model_output, seed, offset)
    return prev, x0


def _step_fake(sample: Tensor, return_pred_original: bool) -> tuple[Tensor, Tensor]:
    prev = torch.empty(sample.shape, dtype=sample.dtype, device=sample.device)
    x0 = torch.empty(sample.shape if return_pred_original else (0,), dtype=sample.dtype, device=sample.device)
    return prev, x0


@torch.library.custom_op("genkern::ddpm_step", mutates_args=())
def ddpm_step(model_output: Tensor, sample: Tensor, t: Tensor, prev_t: Optional[Tensor], table: Tensor,
              noise: Optional[Tensor], seed: int, offset: int, prediction: int, variance: int, clip: Optional[float],
              dynamic_ratio: Optional[float], dynamic_max: float, guidance_scale: Optional[float],
              guidance_rescale: float, backend: str, return_pred_original: bool) -> tuple[Tensor, Tensor]:
    """prev_t None: t - 1. clip None: no clipping; dynamic_ratio None: no dynamic thresholding. guidance_scale
    None: model_output has batch B, else 2B (unconditional half first). pred_original is empty (0,) unless
    return_pred_original."""
    return _step(DDPM, model_output, sample, t, prev_t, table, noise, seed, offset, prediction, variance, 0.0, False,
                 clip, dynamic_ratio, dynamic_max, guidance_scale, guidance_rescale, backend, return_pred_original)


@ddpm_step.register_fake
def _(model_output, sample, t, prev_t, table, noise, seed, offset, prediction, variance, clip, dynamic_ratio,
      dynamic_max, guidance_scale, guidance_rescale, backend, return_pred_original):
    return _step_fake(sample, return_pred_original)


@torch.library.custom_op("genkern::ddim_step", mutates_args=())
def ddim_step(model_output: Tensor, sample: Tensor, t: Tensor, prev_t: Tensor, table: Tensor, noise: Optional[Tensor],
              seed: int, offset: int, prediction: int, eta: float, use_clipped_model_output: bool,
              clip: Optional[float], dynamic_ratio: Optional[float], dynamic_max: float,
              guidance_scale: Optional[float], guidance_rescale: float, backend: str,
              return_pred_original: bool) -> tuple[Tensor, Tensor]:
    """As ddpm_step, with prev_t required and eta >= 0 (noise is drawn only when eta > 0)."""
    return _step(DDIM, model_output, sample, t, prev_t, table, noise, seed, offset, prediction, 0, eta,
                 use_clipped_model_output, clip, dynamic_ratio, dynamic_max, guidance_scale, guidance_rescale,
                 backend, return_pred_original)


@ddim_step.register_fake
def _(model_output, sample, t, prev_t, table, noise, seed, offset, prediction, eta, use_clipped_model_output, clip,
      dynamic_ratio, dynamic_max, guidance_scale, guidance_rescale, backend, return_pred_original):
    return _step_fake(sample, return_pred_original)


# The same steps into given outputs (`out=` of the public functions): a sampling loop reuses its buffers
# instead of allocating (and, on the CPU, page-faulting) two fresh outputs per step. prev_sample may be the
# sample itself: each element is read before it is written.
@torch.library.custom_op("genkern::ddpm_step_out", mutates_args=("prev_sample", "pred_original"))
def ddpm_step_out(model_output: Tensor, sample: Tensor, t: Tensor, prev_t: Optional[Tensor], table: Tensor,
                  noise: Optional[Tensor], seed: int, offset: int, prediction: int, variance: int,
                  clip: Optional[float], dynamic_ratio: Optional[float], dynamic_max: float,
                  guidance_scale: Optional[float], guidance_rescale: float, backend: str, prev_sample: Tensor,
                  pred_original: Optional[Tensor]) -> None:
    _step(DDPM, model_output, sample, t, prev_t, table, noise, seed, offset, prediction, variance, 0.0, False, clip,
          dynamic_ratio, dynamic_max, guidance_scale, guidance_rescale, backend, pred_original is not None,
          prev_sample, pred_original)


@torch.library.custom_op("genkern::ddim_step_out", mutates_args=("prev_sample", "pred_original"))
def ddim_step_out(model_output: Tensor, sample: Tensor, t: Tensor, prev_t: Tensor, table: Tensor,
                  noise: Optional[Tensor], seed: int, offset: int, prediction: int, eta: float,
                  use_clipped_model_output: bool, clip: Optional[float], dynamic_ratio: Optional[float],
                  dynamic_max: float, guidance_scale: Optional[float], guidance_rescale: float, backend: str,
                  prev_sample: Tensor, pred_original: Optional[Tensor]) -> None:
    _step(DDIM, model_output, sample, t, prev_t, table, noise, seed, offset, prediction, 0, eta,
          use_clipped_model_output, clip, dynamic_ratio, dynamic_max, guidance_scale, guidance_rescale, backend,
          pred_original is not None, prev_sample, pred_original)


@ddpm_step_out.register_fake
def _(*args):
    return None


@ddim_step_out.register_fake
def _(*args):
    return None
