"""The flow-matching Euler step (docs/math.md 5.1) in Triton, as _C.diffusion.flow_step
(gk::diffusion::FlowStepArgs in csrc/diffusion/flow.h, whose comments define it; the per-element formula
is csrc/diffusion/flow_math.h's, in the same operation order). The noising and the loss of flow matching
are the diffusion kernels' q_sample and loss on a flow table (genkern.diffusion.flow).

One program per BLOCK flat elements of the (batch, n) arrays (BLOCK a multiple of 4, so a program's noise
is whole Philox blocks); each element reads its own sample's sigmas. Compute type: float64 for float64
tensors, float32 otherwise; dt = sigma_next - sigma in float32, as diffusers takes it.
"""

import triton
import triton.language as tl

from ..core.launch import check, compute_type, launch
from ..core.philox import KEY_ARGS, key_args, stream_normals_run, to_dtype
from .diffusion import _float32

BLOCK = 1024


@triton.jit(do_not_specialize=["total", "n"] + KEY_ARGS)
def _flow_step_kernel(
    m_ptr,
    x_ptr,
    eps_ptr,
    sigma_ptr,
    next_ptr,
    rescale_ptr,
    prev_ptr,
    x0_ptr,
    total,
    n,
    scale,
    seed_lo,
    seed_hi,
    off_lo,
    off_hi,
    GUIDED: tl.constexpr,
    RESCALE: tl.constexpr,
    STOCHASTIC: tl.constexpr,
    HAS_EPS: tl.constexpr,
    WRITE_X0: tl.constexpr,
    CT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    start = tl.program_id(0).to(tl.int64) * BLOCK
    offs = start + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < total
    b = offs // n
    sigma_f = tl.load(sigma_ptr + b, mask=mask, other=0.0)
    next_f = tl.load(next_ptr + b, mask=mask, other=0.0)
    sigma, nxt, dt = sigma_f.to(CT), next_f.to(CT), (next_f - sigma_f).to(CT)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(CT)
    if GUIDED:
        cond = tl.load(m_ptr + total + offs, mask=mask, other=0.0).to(CT)
        m = m + (tl.zeros([BLOCK], CT) + scale) * (cond - m)  # gk::diffusion::guide
        if RESCALE:
            m = m * tl.load(rescale_ptr + b, mask=mask, other=1.0).to(CT)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(CT)
    x0 = x - sigma * m
    if STOCHASTIC:
        if HAS_EPS:
            z = tl.load(eps_ptr + offs, mask=mask, other=0.0).to(CT)
        else:
            z = stream_normals_run(seed_lo, seed_hi, off_lo, off_hi, start, BLOCK).to(CT)
        out = (1.0 - nxt) * x0 + nxt * z
    else:
        out = x + dt * m
    tl.store(prev_ptr + offs, to_dtype(out, prev_ptr.dtype.element_ty), mask=mask)
    if WRITE_X0:
        tl.store(x0_ptr + offs, to_dtype(x0, x0_ptr.dtype.element_ty), mask=mask)


def flow_step(
    model_output,
    sample,
    noise,
    sigma,
    sigma_next,
    rescale,
    prev_sample,
    pred_original,
    guided,
    guidance_scale,
    stochastic,
    seed,
    offset,
):
    """prev_sample (and pred_original unless None) of one flow-matching Euler step, as _C.diffusion.flow_step."""
    check(sample.dtype, model_output=model_output, sample=sample, noise=noise, prev_sample=prev_sample,
          pred_original=pred_original)  # fmt: skip
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
    ):
        if a is not None and a.numel() != numel:
            raise ValueError(f"{name} must have {numel} elements, got {a.numel()}")
    if rescale is not None and not guided:
        raise ValueError("rescale needs guidance")
    if total == 0:
        return prev_sample, pred_original
    scale = _float32(guidance_scale)  # rounded as FlowStepArgs holds it
    launch(
        _flow_step_kernel,
        (triton.cdiv(total, BLOCK),),
        model_output,
        sample,
        noise if noise is not None else sample,
        sigma,
        sigma_next,
        rescale if rescale is not None else sigma,
        prev_sample,
        pred_original if pred_original is not None else prev_sample,
        total,
        total // batch,
        scale,
        *key_args(seed, offset),
        GUIDED=guided,
        RESCALE=rescale is not None,
        STOCHASTIC=bool(stochastic),
        HAS_EPS=noise is not None,
        WRITE_X0=pred_original is not None,
        CT=compute_type(sample),
        BLOCK=BLOCK,
    )
    return prev_sample, pred_original
