"""The diffusion family as torch ops (training side): `genkern::q_sample` and `genkern::diffusion_loss`.

Each op takes the per-sample timesteps as an int64 (B,) tensor and the schedule as its float32 table
(NoiseSchedule.table: rows t + 1, columns alpha-bar, 1 - alpha-bar and their square roots) on the data's
device, so coefficients are read inside the kernels and nothing passes through the host. The noise is the
given tensor or the genkern stream for (seed, offset) over x0's shape; the loss regenerates it.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..reference import random as ref_random
from ._backends import kernels, to_unsigned

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
    """min-SNR-gamma per sample, as csrc/common/diffusion.h computes it."""
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
    kernels("diffusion", backend).q_sample(x0.contiguous(), noise, t.contiguous(), table.contiguous(), x_t, seed, offset)
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
    kernels("diffusion", backend).loss(model_output.contiguous(), x0.contiguous(), noise, t.contiguous(),
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
    kernels("diffusion", backend).loss_backward(grad_loss.contiguous(), model_output.contiguous(), x0.contiguous(),
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
