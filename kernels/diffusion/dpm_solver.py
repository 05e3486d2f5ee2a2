"""The DPM-Solver++ step (docs/math.md 5.3) in Triton, as _C.diffusion.dpm_step (gk::diffusion::DpmStepArgs in
csrc/diffusion/dpm_solver.h, whose comments define it; the per-element formula and the per-sample
coefficients are csrc/diffusion/dpm_solver_math.h's, in the same operation order).

One program per BLOCK flat elements of the (batch, n) arrays (BLOCK a multiple of 4, so a program's SDE noise
is whole Philox blocks); each element reads its own sample's step index and sigmas. Compute type: float64 for
float64 tensors, float32 otherwise; square roots tl.sqrt_rn and divisions tl.div_rn in float32; exp and log
are Triton's (lambda is +inf at a final sigma of 0, outside the range of fastmath's log).
"""

import triton
import triton.language as tl

from ..core.launch import check, compute_type, launch
from ..core.philox import KEY_ARGS, key_args, stream_normals_run, to_dtype
from .diffusion import _div, _float32
from .sigma_step import _sqrt

BLOCK = 1024
EPSILON = tl.constexpr(0)  # gk::diffusion::kEpsilon
V_PREDICTION = tl.constexpr(1)  # kVPrediction
MIDPOINT = tl.constexpr(0)  # gk::diffusion::kMidpoint


@triton.jit
def _alpha_sigma(s):
    """alpha = 1 / sqrt(s^2 + 1), sigma = s alpha, lambda = log alpha - log sigma (dpm_alpha_sigma)."""
    alpha = _div(tl.full(s.shape, 1.0, s.dtype), _sqrt(s * s + 1.0))
    sigma = s * alpha
    return alpha, sigma, tl.log(alpha) - tl.log(sigma)


@triton.jit(do_not_specialize=["total", "n", "num_sigmas"] + KEY_ARGS)
def _dpm_step_kernel(
    m_ptr,
    x_ptr,
    eps_ptr,
    hist_ptr,
    sigmas_ptr,
    step_ptr,
    rescale_ptr,
    limit_ptr,
    prev_ptr,
    total,
    n,
    num_sigmas,
    scale,
    seed_lo,
    seed_hi,
    off_lo,
    off_hi,
    PREDICTION: tl.constexpr,
    SOLVER: tl.constexpr,
    ORDER: tl.constexpr,
    SDE: tl.constexpr,
    FINAL_FIRST: tl.constexpr,
    GUIDED: tl.constexpr,
    RESCALE: tl.constexpr,
    THRESHOLDED: tl.constexpr,
    HAS_EPS: tl.constexpr,
    CT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    start = tl.program_id(0).to(tl.int64) * BLOCK
    offs = start + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < total
    b = offs // n
    last = num_sigmas - 2
    i = tl.load(step_ptr + b, mask=mask, other=0)
    i = tl.minimum(tl.maximum(i, 0), last)  # clamped into the table, as gk::diffusion::dpm_coefficients
    second = i > 0
    if ORDER != 2:
        second = i < 0  # first order at every step
    if FINAL_FIRST:
        second = second & (i != last)
    alpha_t, sigma_t, lambda_t = _alpha_sigma(tl.load(sigmas_ptr + i + 1, mask=mask, other=1.0).to(CT))
    alpha, sigma, lambda_s0 = _alpha_sigma(tl.load(sigmas_ptr + i, mask=mask, other=1.0).to(CT))
    h = lambda_t - lambda_s0
    _, _, lambda_s1 = _alpha_sigma(tl.load(sigmas_ptr + tl.maximum(i - 1, 0), mask=mask, other=1.0).to(CT))
    c1 = _div(tl.full(h.shape, 1.0, CT), _div(lambda_s0 - lambda_s1, h))
    if SDE:
        e2 = tl.exp(-2.0 * h)
        ratio = _div(sigma_t, sigma) * tl.exp(-h)
        k0 = alpha_t * (1.0 - e2)
        if SOLVER == MIDPOINT:
            k1 = 0.5 * k0
        else:
            k1 = alpha_t * (_div(1.0 - e2, -2.0 * h) + 1.0)
        kz = sigma_t * _sqrt(1.0 - e2)
    else:
        a = alpha_t * (tl.exp(-h) - 1.0)
        ratio = _div(sigma_t, sigma)
        k0 = -a
        if SOLVER == MIDPOINT:
            k1 = -(0.5 * a)
        else:
            k1 = alpha_t * (_div(tl.exp(-h) - 1.0, h) + 1.0)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(CT)
    if GUIDED:
        cond = tl.load(m_ptr + total + offs, mask=mask, other=0.0).to(CT)
        m = m + (tl.zeros([BLOCK], CT) + scale) * (cond - m)  # gk::diffusion::guide
        if RESCALE:
            m = m * tl.load(rescale_ptr + b, mask=mask, other=1.0).to(CT)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(CT)
    if PREDICTION == EPSILON:
        d0 = _div(x - sigma * m, alpha)
    elif PREDICTION == V_PREDICTION:
        d0 = alpha * x - sigma * m
    else:
        d0 = m
    if THRESHOLDED:
        limit = tl.load(limit_ptr + b, mask=mask, other=1.0).to(CT)
        d0 = _div(tl.where(d0 < -limit, -limit, tl.where(d0 > limit, limit, d0)), limit)  # threshold_x0: NaN stays
    out = ratio * x + k0 * d0
    hist = tl.load(hist_ptr + offs, mask=mask & second, other=0.0).to(CT)
    out = tl.where(second, out + k1 * (c1 * (d0 - hist)), out)
    if SDE:
        if HAS_EPS:
            z = tl.load(eps_ptr + offs, mask=mask, other=0.0).to(CT)
        else:
            z = stream_normals_run(seed_lo, seed_hi, off_lo, off_hi, start, BLOCK).to(CT)
        out = out + kz * z
    tl.store(prev_ptr + offs, to_dtype(out, prev_ptr.dtype.element_ty), mask=mask)
    tl.store(hist_ptr + offs, to_dtype(d0, hist_ptr.dtype.element_ty), mask=mask)


def dpm_step(
    model_output,
    sample,
    noise,
    history,
    sigmas,
    step,
    rescale,
    dynamic_threshold,
    prev_sample,
    prediction,
    solver,
    order,
    sde,
    final_first_order,
    guided,
    guidance_scale,
    seed,
    offset,
):
    """prev_sample of one DPM-Solver++ step, history overwritten with x0_hat, as _C.diffusion.dpm_step:
    prediction 0 epsilon, 1 v_prediction, 2 sample; solver 0 midpoint, 1 heun; order 1 or 2."""
    check(sample.dtype, model_output=model_output, sample=sample, noise=noise, history=history,
          prev_sample=prev_sample)  # fmt: skip
    if sample.dim() < 1:
        raise ValueError("sample must have a batch dimension")
    batch, total = sample.shape[0], sample.numel()
    guided = bool(guided)
    for name, a, numel in (
        ("model_output", model_output, (2 if guided else 1) * total),
        ("history", history, total),
        ("prev_sample", prev_sample, total),
        ("noise", noise, total),
        ("step", step, batch),
        ("rescale", rescale, batch),
        ("dynamic_threshold", dynamic_threshold, batch),
    ):
        if a is not None and a.numel() != numel:
            raise ValueError(f"{name} must have {numel} elements, got {a.numel()}")
    if sigmas.numel() < 2:
        raise ValueError("sigmas must hold at least one step and the final sigma")
    if rescale is not None and not guided:
        raise ValueError("rescale needs guidance")
    prediction, solver, order = int(prediction), int(solver), int(order)
    if prediction not in (0, 1, 2):
        raise ValueError("unknown prediction type")
    if solver not in (0, 1):
        raise ValueError("unknown solver type")
    if order not in (1, 2):
        raise ValueError("solver order must be 1 or 2")
    if total == 0:
        return prev_sample
    launch(
        _dpm_step_kernel,
        (triton.cdiv(total, BLOCK),),
        model_output,
        sample,
        noise if noise is not None else sample,
        history,
        sigmas,
        step,
        rescale if rescale is not None else sigmas,
        dynamic_threshold if dynamic_threshold is not None else sigmas,
        prev_sample,
        total,
        total // batch,
        sigmas.numel(),
        _float32(guidance_scale),
        *key_args(seed, offset),
        PREDICTION=prediction,
        SOLVER=solver,
        ORDER=order,
        SDE=bool(sde),
        FINAL_FIRST=bool(final_first_order),
        GUIDED=guided,
        RESCALE=rescale is not None,
        THRESHOLDED=dynamic_threshold is not None,
        HAS_EPS=noise is not None,
        CT=compute_type(sample),
        BLOCK=BLOCK,
    )
    return prev_sample
