"""The sigma-space steps (docs/math.md 5.1, 5.2: flow matching's Euler step, k-diffusion's Euler and Euler
ancestral steps) in Triton, as _C.diffusion.sigma_step (gk::diffusion::SigmaStepArgs in
csrc/diffusion/sigma_step.h, whose comments define it; the per-element formulas and the per-sample
coefficients are csrc/diffusion/sigma_step_math.h's, in the same operation order). The noising and the loss
of flow matching are the diffusion kernels' q_sample and loss on a flow table (genkern.diffusion.flow).

One program per BLOCK flat elements of the (batch, n) arrays (BLOCK a multiple of 4, so a program's noise
is whole Philox blocks); each element reads its own sample's sigmas. Compute type: float64 for float64
tensors, float32 otherwise; dt = sigma_next - sigma in float32 (flow, Euler), as diffusers takes it; square
roots tl.sqrt_rn and divisions tl.div_rn in float32, as the C++ computes them correctly rounded.
"""

import triton
import triton.language as tl

from ..core.launch import check, compute_type, launch
from ..core.philox import KEY_ARGS, key_args, stream_normals_run, to_dtype
from .diffusion import _div, _float32

BLOCK = 1024
FLOW_EULER = tl.constexpr(0)  # gk::diffusion::kFlowEuler
EULER = tl.constexpr(1)  # kEuler
EULER_ANCESTRAL = tl.constexpr(2)  # kEulerAncestral
HEUN_FIRST = tl.constexpr(3)  # kHeunFirst
HEUN_SECOND = tl.constexpr(4)  # kHeunSecond
EPSILON = tl.constexpr(0)  # gk::diffusion::kEpsilon
V_PREDICTION = tl.constexpr(1)  # kVPrediction


@triton.jit
def _sqrt(x):
    if x.dtype == tl.float64:
        r = tl.sqrt(x)
    else:
        r = tl.sqrt_rn(x)
    return r


@triton.jit(do_not_specialize=["total", "n"] + KEY_ARGS)
def _sigma_step_kernel(
    m_ptr,
    x_ptr,
    eps_ptr,
    sigma_ptr,
    next_ptr,
    rescale_ptr,
    prev_ptr,
    x0_ptr,
    d_ptr,
    origin_ptr,
    mi_ptr,
    ms_ptr,
    total,
    n,
    scale,
    seed_lo,
    seed_hi,
    off_lo,
    off_hi,
    KIND: tl.constexpr,
    PREDICTION: tl.constexpr,
    GUIDED: tl.constexpr,
    RESCALE: tl.constexpr,
    NOISY: tl.constexpr,
    HAS_EPS: tl.constexpr,
    WRITE_X0: tl.constexpr,
    WRITE_MODEL_INPUT: tl.constexpr,
    CT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    start = tl.program_id(0).to(tl.int64) * BLOCK
    offs = start + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < total
    b = offs // n
    sigma_f = tl.load(sigma_ptr + b, mask=mask, other=0.0)
    next_f = tl.load(next_ptr + b, mask=mask, other=0.0)
    sigma, nxt = sigma_f.to(CT), next_f.to(CT)
    if KIND == HEUN_SECOND:
        sigma = nxt  # x0_hat at x' and d' divide by sigma_next (sigma_coefficients)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(CT)
    if GUIDED:
        cond = tl.load(m_ptr + total + offs, mask=mask, other=0.0).to(CT)
        m = m + (tl.zeros([BLOCK], CT) + scale) * (cond - m)  # gk::diffusion::guide
        if RESCALE:
            m = m * tl.load(rescale_ptr + b, mask=mask, other=1.0).to(CT)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(CT)
    if NOISY:
        if HAS_EPS:
            z = tl.load(eps_ptr + offs, mask=mask, other=0.0).to(CT)
        else:
            z = stream_normals_run(seed_lo, seed_hi, off_lo, off_hi, start, BLOCK).to(CT)
    if KIND == FLOW_EULER:
        x0 = x - sigma * m
        if NOISY:
            out = (1.0 - nxt) * x0 + nxt * z
        else:
            out = x + (next_f - sigma_f).to(CT) * m
    else:
        if PREDICTION == EPSILON:
            x0 = x - sigma * m
        elif PREDICTION == V_PREDICTION:
            s2p1 = sigma * sigma + 1.0
            x0 = m * _div(-sigma, _sqrt(s2p1)) + _div(x, s2p1)
        else:
            x0 = m
        if KIND == EULER_ANCESTRAL:
            s2, n2 = sigma * sigma, nxt * nxt
            up = _sqrt(_div(n2 * (s2 - n2), s2))
            dt = _sqrt(n2 - up * up) - sigma
        else:
            dt = (next_f - sigma_f).to(CT)
        d = _div(x - x0, tl.where(mask, sigma, 1.0))
        if KIND == HEUN_SECOND:
            # heun_second_element: origin + (d + d') / 2 dt, x' itself where sigma_next = 0
            d_first = tl.load(d_ptr + offs, mask=mask, other=0.0).to(CT)
            origin = tl.load(origin_ptr + offs, mask=mask, other=0.0).to(CT)
            out = tl.where(nxt == 0.0, x, origin + _div(d_first + d, tl.full([BLOCK], 2.0, CT)) * dt)
        else:
            out = x + d * dt
        if KIND == HEUN_FIRST:
            tl.store(d_ptr + offs, to_dtype(d, d_ptr.dtype.element_ty), mask=mask)
        if KIND == EULER_ANCESTRAL:
            out = out + z * up
    stored = to_dtype(out, prev_ptr.dtype.element_ty)
    tl.store(prev_ptr + offs, stored, mask=mask)
    if WRITE_X0:
        tl.store(x0_ptr + offs, to_dtype(x0, x0_ptr.dtype.element_ty), mask=mask)
    if WRITE_MODEL_INPUT:  # from prev as stored, as the division done afterwards would see it
        s = tl.load(ms_ptr + b, mask=mask, other=1.0).to(CT)
        tl.store(mi_ptr + offs, to_dtype(_div(stored.to(CT), s), mi_ptr.dtype.element_ty), mask=mask)


def sigma_step(
    model_output,
    sample,
    noise,
    sigma,
    sigma_next,
    rescale,
    prev_sample,
    pred_original,
    kind,
    prediction,
    guided,
    guidance_scale,
    stochastic,
    seed,
    offset,
    origin=None,
    derivative=None,
    model_input=None,
    model_scale=None,
):
    """prev_sample (and pred_original, model_input unless None) of one sigma-space step, as
    _C.diffusion.sigma_step: kind 0 flow Euler, 1 Euler, 2 Euler ancestral, 3 and 4 Heun's halves (derivative
    written by 3, read by 4 with origin); prediction 0 epsilon, 1 v_prediction, 2 sample; model_input =
    prev_sample / model_scale[b] (a sampler's next model input)."""
    check(sample.dtype, model_output=model_output, sample=sample, noise=noise, prev_sample=prev_sample,
          pred_original=pred_original, origin=origin, derivative=derivative,
          model_input=model_input, model_scale=model_scale)  # fmt: skip
    if sample.dim() < 1:
        raise ValueError("sample must have a batch dimension")
    batch, total = sample.shape[0], sample.numel()
    guided = bool(guided)
    for name, a, numel in (
        ("model_output", model_output, (2 if guided else 1) * total),
        ("prev_sample", prev_sample, total),
        ("pred_original", pred_original, total),
        ("noise", noise, total),
        ("sigma", sigma, batch),
        ("sigma_next", sigma_next, batch),
        ("rescale", rescale, batch),
        ("origin", origin, total),
        ("derivative", derivative, total),
        ("model_input", model_input, total),
        ("model_scale", model_scale, batch),
    ):
        if a is not None and a.numel() != numel:
            raise ValueError(f"{name} must have {numel} elements, got {a.numel()}")
    if (model_input is None) != (model_scale is None):
        raise ValueError("model_input and model_scale are given together")
    if rescale is not None and not guided:
        raise ValueError("rescale needs guidance")
    kind, prediction = int(kind), int(prediction)
    if kind not in (0, 1, 2, 3, 4):
        raise ValueError("unknown sigma step kind")
    if (kind in (3, 4)) != (derivative is not None):
        raise ValueError("derivative is given exactly for the Heun kinds")
    if (kind == 4) != (origin is not None):
        raise ValueError("origin is given exactly for Heun's second half")
    if prediction not in (0, 1, 2):
        raise ValueError("unknown prediction type")
    if total == 0:
        return prev_sample, pred_original
    scale = _float32(guidance_scale)  # rounded as FlowStepArgs holds it
    launch(
        _sigma_step_kernel,
        (triton.cdiv(total, BLOCK),),
        model_output,
        sample,
        noise if noise is not None else sample,
        sigma,
        sigma_next,
        rescale if rescale is not None else sigma,
        prev_sample,
        pred_original if pred_original is not None else prev_sample,
        derivative if derivative is not None else prev_sample,
        origin if origin is not None else sample,
        model_input if model_input is not None else prev_sample,
        model_scale if model_scale is not None else sample,
        total,
        total // batch,
        scale,
        *key_args(seed, offset),
        KIND=kind,
        PREDICTION=prediction,
        GUIDED=guided,
        RESCALE=rescale is not None,
        NOISY=kind == 2 or (kind == 0 and bool(stochastic)),
        HAS_EPS=noise is not None,
        WRITE_X0=pred_original is not None,
        WRITE_MODEL_INPUT=model_input is not None,
        CT=compute_type(sample),
        BLOCK=BLOCK,
    )
    return prev_sample, pred_original
