"""The UniPC step (docs/math.md 5.5) in Triton, as _C.diffusion.unipc_step (gk::diffusion::UniPcStepArgs in
csrc/diffusion/unipc.h, whose comments define it; the per-element formula and the per-sample coefficients are
csrc/diffusion/unipc_math.h's, in the same operation order).

One program per BLOCK flat elements of the (batch, n) arrays; each element reads its own sample's step index
and sigmas. Compute type: float64 for float64 tensors, float32 otherwise; square roots tl.sqrt_rn and
divisions tl.div_rn in float32; exp and log are Triton's, expm1 from them (lambda is +inf at a final
sigma of 0, outside the range of fastmath's log).
"""

import triton
import triton.language as tl

from ..core.launch import check, compute_type, launch
from ..core.philox import to_dtype
from .diffusion import _div, _float32
from .dpm_solver import _alpha_sigma

BLOCK = 1024
EPSILON = tl.constexpr(0)  # gk::diffusion::kEpsilon
V_PREDICTION = tl.constexpr(1)  # kVPrediction
SAMPLE = tl.constexpr(2)  # kSample (3: kFlowPrediction)
BH1 = tl.constexpr(0)  # gk::diffusion::kBh1


@triton.jit
def _expm1(x):
    """e^x - 1 without exp's cancellation for small x (Kahan's (u - 1) x / log u, within a few ulps of
    expm1f / expm1; libdevice's expm1 has no port in the interpreter); -1 at x = -inf."""
    u = tl.exp(x)
    um1 = u - 1.0
    r = tl.where(um1 == -1.0, um1, _div(um1 * x, tl.log(u)))
    return tl.where(u == 1.0, x, r)


@triton.jit
def _flow_alpha_sigma(s, FLOW: tl.constexpr):
    """(alpha, sigma_vp, lambda) of a table sigma: DPM-Solver++'s, or (FLOW) 1 - s, s (unipc_alpha_sigma)."""
    if FLOW:
        alpha = 1.0 - s
        sigma = s
        lam = tl.log(alpha) - tl.log(sigma)
    else:
        alpha, sigma, lam = _alpha_sigma(s)
    return alpha, sigma, lam


@triton.jit
def _update(
    sigmas_ptr, s, mask, second, SOLVER: tl.constexpr, CORRECTOR: tl.constexpr, FLOW: tl.constexpr, CT: tl.constexpr
):
    """(ratio, ah, aB, rk, rho0, rho1) of the update sigmas[s] -> sigmas[s + 1] (gk::diffusion::unipc_update)."""
    alpha_t, sigma_t, lambda_t = _flow_alpha_sigma(tl.load(sigmas_ptr + s + 1, mask=mask, other=0.5).to(CT), FLOW)
    _, sigma_s0, lambda_s0 = _flow_alpha_sigma(tl.load(sigmas_ptr + s, mask=mask, other=0.5).to(CT), FLOW)
    s1 = tl.load(sigmas_ptr + tl.maximum(s - 1, 0), mask=mask, other=0.5).to(CT)
    _, _, lambda_s1 = _flow_alpha_sigma(s1, FLOW)
    h = lambda_t - lambda_s0
    hh = -h
    h_phi_1 = _expm1(hh)
    if SOLVER == BH1:
        b_h = hh
    else:
        b_h = _expm1(hh)
    ratio = _div(sigma_t, sigma_s0)
    ah = alpha_t * h_phi_1
    aB = alpha_t * b_h
    rk = _div(lambda_s1 - lambda_s0, h)
    one = tl.full(h.shape, 1.0, CT)
    rho0 = tl.zeros(h.shape, CT)
    rho1 = tl.full(h.shape, 0.5, CT)
    if CORRECTOR:
        # R rho = b, R = [[1, 1], [rk, 1]], by LU with partial pivoting (gk::diffusion::unipc_solve2)
        h_phi_k = _div(h_phi_1, hh) - 1.0
        b1 = _div(h_phi_k * 1.0, b_h)
        h_phi_k = _div(h_phi_k, hh) - 0.5
        b2 = _div(h_phi_k * 2.0, b_h)
        swap = tl.abs(rk) > 1.0
        a00 = tl.where(swap, rk, one)
        a10 = tl.where(swap, one, rk)
        y0 = tl.where(swap, b2, b1)
        y1 = tl.where(swap, b1, b2)
        lower = a10 * _div(one, a00)
        u11 = one - lower * one
        second_rho1 = _div(y1 - lower * y0, u11)
        second_rho0 = _div(y0 - second_rho1 * one, a00)
        rho0 = tl.where(second, second_rho0, rho0)
        rho1 = tl.where(second, second_rho1, rho1)
    return ratio, ah, aB, rk, rho0, rho1


@triton.jit(do_not_specialize=["total", "n", "num_sigmas"])
def _unipc_step_kernel(
    m_ptr,
    x_ptr,
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
    PREDICTION: tl.constexpr,
    SOLVER: tl.constexpr,
    P_ORDER: tl.constexpr,
    C_ORDER: tl.constexpr,
    FINAL_FIRST: tl.constexpr,
    CORRECTOR: tl.constexpr,
    FLOW: tl.constexpr,
    THREE: tl.constexpr,
    GUIDED: tl.constexpr,
    RESCALE: tl.constexpr,
    THRESHOLDED: tl.constexpr,
    CT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    start = tl.program_id(0).to(tl.int64) * BLOCK
    offs = start + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < total
    b = offs // n
    last = num_sigmas - 2
    i = tl.load(step_ptr + b, mask=mask, other=0)
    i = tl.minimum(tl.maximum(i, 0), last)  # clamped into the table, as gk::diffusion::unipc_coefficients
    p_second = (i > 0) & (P_ORDER == 2)
    if FINAL_FIRST:
        p_second = p_second & (i != last)
    correct = (i > 0) & CORRECTOR
    c_second = correct & (i > 1) & (C_ORDER == 2)
    s0 = tl.load(sigmas_ptr + i, mask=mask, other=0.5).to(CT)
    alpha, sigma, _ = _flow_alpha_sigma(s0, FLOW)
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
    elif PREDICTION == SAMPLE:
        d0 = m
    else:
        d0 = x - s0 * m
    if THRESHOLDED:
        limit = tl.load(limit_ptr + b, mask=mask, other=1.0).to(CT)
        d0 = _div(tl.where(d0 < -limit, -limit, tl.where(d0 > limit, limit, d0)), limit)  # threshold_x0: NaN stays
    prev_x = tl.load(hist_ptr + offs, mask=mask & correct, other=0.0).to(CT)
    # h1 moves to the third slot whatever the step reads
    h1 = tl.load(hist_ptr + total + offs, mask=mask & (correct | p_second | THREE), other=0.0).to(CT)
    xc = x
    if CORRECTOR:
        ratio, ah, aB, rk, rho0, rho1 = _update(
            sigmas_ptr, tl.maximum(i - 1, 0), mask, c_second, SOLVER, True, FLOW, CT
        )
        d1t = d0 - h1
        res = rho1 * d1t
        if THREE:
            h2 = tl.load(hist_ptr + 2 * total + offs, mask=mask & c_second, other=0.0).to(CT)
            res = tl.where(c_second, rho0 * _div(h2 - h1, rk) + res, res)
        xc = tl.where(correct, ratio * prev_x - ah * h1 - aB * res, x)
    ratio, ah, aB, rk, _, _ = _update(sigmas_ptr, i, mask, p_second, SOLVER, False, FLOW, CT)
    out = ratio * xc - ah * d0
    out = tl.where(p_second, out - aB * (0.5 * _div(h1 - d0, rk)), out)
    tl.store(prev_ptr + offs, to_dtype(out, prev_ptr.dtype.element_ty), mask=mask)
    ht = hist_ptr.dtype.element_ty
    tl.store(hist_ptr + offs, to_dtype(xc, ht), mask=mask)
    tl.store(hist_ptr + total + offs, to_dtype(d0, ht), mask=mask)
    if THREE:
        tl.store(hist_ptr + 2 * total + offs, to_dtype(h1, ht), mask=mask)


def unipc_step(
    model_output,
    sample,
    history,
    sigmas,
    step,
    rescale,
    dynamic_threshold,
    prev_sample,
    prediction,
    solver,
    predictor_order,
    corrector_order,
    final_first_order,
    corrector,
    flow_sigmas,
    guided,
    guidance_scale,
):
    """prev_sample of one UniPC step, history overwritten with this step's state, as _C.diffusion.unipc_step:
    prediction 0 epsilon, 1 v_prediction, 2 sample, 3 flow_prediction; solver 0 bh1, 1 bh2; orders 1 or 2;
    flow_sigmas: alpha = 1 - sigma, sigma_vp = sigma."""
    check(sample.dtype, model_output=model_output, sample=sample, history=history, prev_sample=prev_sample)
    if sample.dim() < 1:
        raise ValueError("sample must have a batch dimension")
    batch, total = sample.shape[0], sample.numel()
    guided = bool(guided)
    prediction, solver = int(prediction), int(solver)
    predictor_order, corrector_order = int(predictor_order), int(corrector_order)
    if prediction not in (0, 1, 2, 3):
        raise ValueError("unknown prediction type")
    if solver not in (0, 1):
        raise ValueError("unknown solver type")
    if predictor_order not in (1, 2) or corrector_order not in (1, 2):
        raise ValueError("predictor and corrector orders must be 1 or 2")
    slots = 3 if 2 in (predictor_order, corrector_order) else 2
    if history.dim() < 1 or history.shape[0] not in (slots, 3):
        raise ValueError("history must have a slot per saved state (2, or 3 for second order)")
    for name, a, numel in (
        ("model_output", model_output, (2 if guided else 1) * total),
        ("history", history, history.shape[0] * total),
        ("prev_sample", prev_sample, total),
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
    if total == 0:
        return prev_sample
    launch(
        _unipc_step_kernel,
        (triton.cdiv(total, BLOCK),),
        model_output,
        sample,
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
        PREDICTION=prediction,
        SOLVER=solver,
        P_ORDER=predictor_order,
        C_ORDER=corrector_order,
        FINAL_FIRST=bool(final_first_order),
        CORRECTOR=bool(corrector),
        FLOW=bool(flow_sigmas),
        THREE=history.shape[0] == 3,
        GUIDED=guided,
        RESCALE=rescale is not None,
        THRESHOLDED=dynamic_threshold is not None,
        CT=compute_type(sample),
        BLOCK=BLOCK,
    )
    return prev_sample
