"""The discretised logistic mixture (PixelCNN++'s head; docs/math.md, section 6.1) in Triton.

The wrappers mirror the Args structs of csrc/autoregressive/logistic_mixture.h (whose comments define each op):
params (B, P, H, W) and x (B, C, H, W) int64 contiguous, log p / grad (B, H, W) in the compute type, outputs
preallocated. The per-element terms are those of csrc/autoregressive/logistic_mixture_math.h in the same
operation order (gk::exp, one Cephes log per term on the selected argument, the running logsumexp, the
Taylor/exp tanh): float32 agrees with the CPU kernels to the ulp, float64 to libm's last bits.

A program owns BLOCK pixels of one image and loops over the K components (and, inside, the C channels),
with a running logsumexp: nothing of size K is held per pixel. The backward recomputes the terms from
params, x and log p and writes every gradient element once (no atomics). Compute type: float64 for float64
params, float32 otherwise.
"""

import torch
import triton
import triton.language as tl

from ..core.launch import check, compute_type, launch
from ..core.philox import (
    KEY_ARGS,
    exp_t,
    key_args,
    log_core,
    log_f32,
    log_reduce,
    log_uniform24,
    stream_block,
    to_dtype,
)

BLOCK = 128
LOG_SCALE_MIN = -7.0
CDF_FLOOR = 1e-12
CDF_THRESHOLD = 1e-5


# --------------------------------------------------------------------------------------------------
# Per-element terms (csrc/autoregressive/logistic_mixture_math.h)


@triton.jit
def _sigmoids(z, e):
    """(sigmoid(z), sigmoid(-z)) from e = e^-|z|."""
    big = 1.0 / (1.0 + e)
    small = e / (1.0 + e)
    up = z >= 0.0
    return tl.where(up, big, small), tl.where(up, small, big)


@triton.jit
def _log_or_log1p(plain, arg):
    """log(arg) where `plain`, else log(1 + arg) for arg in [0, 1] (gk::mixture::log_or_log1p)."""
    if arg.dtype == tl.float64:
        u = 1.0 + arg
        log1p = tl.where(u == 1.0, arg, tl.log(u) * (arg / tl.where(u == 1.0, 1.0, u - 1.0)))
        y = tl.where(plain, tl.log(tl.where(plain, arg, 1.0)), log1p)
    else:
        small = (plain == 0) & (arg <= 0.41421356)
        f, e = log_reduce(tl.where(plain, arg, 1.0 + arg))
        y = log_core(tl.where(small, arg, f), tl.where(small, 0.0, e))
    return y


@triton.jit
def _tanh(z):
    """gk::mixture::tanh_of: (1 - e) / (1 + e), e = e^-2|z|, and its Taylor series below |z| = 1/8 (float64:
    below 1e-3, where the cancellation stays under 1e-13)."""
    a = tl.abs(z)
    e = exp_t(-2.0 * a)
    big = (1.0 - e) / (1.0 + e)
    q = a * a
    small = a * (1.0 + q * (-1.0 / 3.0 + q * (2.0 / 15.0 + q * (-17.0 / 315.0))))
    if z.dtype == tl.float64:
        t = tl.where(a < 1e-3, small, big)
    else:
        t = tl.where(a < 0.125, small, big)
    return tl.where(z < 0.0, -t, tl.where(z != z, z, t))


@triton.jit
def _channel_term(x, y, mu, s, last, half_bin, log_width, GRAD: tl.constexpr):
    """(log P_k(x_c), d log P / du, d log P / ds) of one channel (gk::mixture::channel_term)."""
    e = exp_t(-s)
    u = y - mu
    plus = e * (u + half_bin)
    minus = e * (u - half_bin)
    mid = e * u
    e_plus = exp_t(-tl.abs(plus))
    e_minus = exp_t(-tl.abs(minus))
    e_mid = exp_t(-tl.abs(mid))
    sp_pos, sp_neg = _sigmoids(plus, e_plus)
    sm_pos, sm_neg = _sigmoids(minus, e_minus)
    sc_pos, sc_neg = _sigmoids(mid, e_mid)
    delta = tl.where(mid > 0.0, sm_neg - sp_neg, sp_pos - sm_pos)
    low_edge = x == 0
    high_edge = (x == last) & (x != 0)
    interior = (x != 0) & (x != last)
    mass = interior & (delta > CDF_THRESHOLD)
    density = interior & (mass == 0)
    floored = tl.where(delta > CDF_FLOOR, delta, CDF_FLOOR)
    e_arg = tl.where(low_edge, e_plus, tl.where(high_edge, e_minus, e_mid))
    lg = _log_or_log1p(mass, tl.where(mass, floored, e_arg))
    low = -(tl.where(plus < 0.0, -plus, 0.0) + lg)
    high = -(tl.where(minus > 0.0, minus, 0.0) + lg)
    mass_value = tl.where(delta != delta, delta, lg)
    density_value = mid - s - 2.0 * (tl.where(mid > 0.0, mid, 0.0) + lg) - log_width
    log_p = tl.where(low_edge, low, tl.where(high_edge, high, tl.where(mass, mass_value, density_value)))
    log_p = tl.where((plus != plus) | (s != s), plus + s, log_p)
    d_u = log_p * 0.0
    d_s = log_p * 0.0
    if GRAD:
        dp = tl.where(low_edge, sp_neg, tl.where(mass, sp_pos * sp_neg / delta, 0.0))
        dm = tl.where(high_edge, -sm_pos, tl.where(mass, -(sm_pos * sm_neg) / delta, 0.0))
        dc = tl.where(density, 1.0 - 2.0 * sc_pos, 0.0)
        d_u = e * (dp + dm + dc)
        d_s = -plus * dp - minus * dm - mid * dc - tl.where(density, 1.0, 0.0)
    return log_p, d_u, d_s


@triton.jit
def _lse_add(m, total, a):
    """One term into a running logsumexp (gk::mixture::LogSumExp::add)."""
    nxt = tl.where(a > m, a, m)
    shift = tl.where(nxt == -float("inf"), 0.0, nxt)
    total = total * exp_t(m - shift) + exp_t(a - shift)
    return tl.where(a != a, a, nxt), total


@triton.jit
def _lse_value(m, total):
    log_total = tl.where(total > 0.0, total, 1.0)
    if total.dtype == tl.float64:
        lg = tl.log(log_total)
    else:
        lg = log_f32(log_total)
    value = tl.where((total > 0.0) & (m != -float("inf")), m + lg, m)
    return tl.where((total != total) | (m != m), m + total, value)


@triton.jit
def _clamp_log_scale(ls):
    return tl.where(ls < LOG_SCALE_MIN, LOG_SCALE_MIN, ls)


# --------------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _logits_lse(img, pix, mask, HW, K, CT: tl.constexpr):
    m = tl.load(img + pix, mask=mask, other=0.0).to(CT)
    total = m * 0.0 + 1.0
    for k in range(1, K):
        m, total = _lse_add(m, total, tl.load(img + k * HW + pix, mask=mask, other=0.0).to(CT))
    return _lse_value(m, total)


@triton.jit
def _level(x_img, c, HW, pix, mask, scale):
    """(x, y) of channel c: the level and y = x scale - 1."""
    x = tl.load(x_img + c * HW + pix, mask=mask, other=0)
    return x, x.to(scale.dtype) * scale - 1.0


@triton.jit
def _channel(
    img,
    x_img,
    pix,
    mask,
    HW64,
    K,
    k,
    c,
    t0,
    t1,
    t2,
    y_r,
    y_g,
    scale,
    last,
    half_bin,
    log_width,
    PER: tl.constexpr,
    COUPLED: tl.constexpr,
    GRAD: tl.constexpr,
    CT: tl.constexpr,
):
    """Channel c of component k: (log P, d log P / du, d log P / ds, log_scale before the clamp)."""
    mean_ch = K + PER * K * c + k
    x, y = _level(x_img, c, HW64, pix, mask, scale)
    mu = tl.load(img + mean_ch * HW64 + pix, mask=mask, other=0.0).to(CT)
    if COUPLED:
        if c == 1:
            mu = mu + t0 * y_r
        if c == 2:
            mu = mu + t1 * y_r + t2 * y_g
    ls = tl.load(img + (mean_ch + K) * HW64 + pix, mask=mask, other=0.0).to(CT)
    log_p, d_u, d_s = _channel_term(x, y, mu, _clamp_log_scale(ls), last, half_bin, log_width, GRAD)
    return log_p, d_u, d_s, ls


@triton.jit(do_not_specialize=["HW", "P", "K", "levels"])
def _mixture_kernel(
    params_ptr,
    x_ptr,
    log_prob_ptr,
    grad_ptr,
    out_ptr,
    HW,
    P,
    K,
    levels,
    C: tl.constexpr,
    COUPLED: tl.constexpr,
    GRAD: tl.constexpr,
    CT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Forward (GRAD False): out = log p per pixel. Backward: out = grad params, from log_prob and grad; per
    component, one pass over the channels for a_k (so r_k), then a second that recomputes each channel's
    derivatives and writes its gradients (every one local to its channel, the coupling's included)."""
    b = tl.program_id(0).to(tl.int64)
    pix = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    HW64 = HW.to(tl.int64)
    mask = pix < HW64
    img = params_ptr + b * P * HW64
    out_img = out_ptr + b * P * HW64
    x_img = x_ptr + b * C * HW64
    last = levels - 1
    scale = (2.0 / last.to(tl.float64)).to(CT)
    half_bin = (1.0 / last.to(tl.float64)).to(CT)
    log_width = tl.log(last.to(tl.float64) / 2.0).to(CT)
    PER: tl.constexpr = 3 if COUPLED else 2
    OUT: tl.constexpr = out_ptr.dtype.element_ty
    lse_logits = _logits_lse(img, pix, mask, HW64, K, CT)
    _, y_r = _level(x_img, 0, HW64, pix, mask, scale)
    y_g = y_r
    if C > 1:
        _, y_g = _level(x_img, 1, HW64, pix, mask, scale)
    g = lse_logits * 0.0
    lp = g
    if GRAD:
        g = tl.load(grad_ptr + b * HW64 + pix, mask=mask, other=0.0).to(CT)
        lp = tl.load(log_prob_ptr + b * HW64 + pix, mask=mask, other=0.0).to(CT)
    m = lse_logits
    total = lse_logits * 0.0
    for k in range(K):
        logit = tl.load(img + k * HW64 + pix, mask=mask, other=0.0).to(CT)
        acc = logit - lse_logits
        t0 = acc * 0.0
        t1 = t0
        t2 = t0
        if COUPLED:
            t0 = _tanh(tl.load(img + (K + 2 * K + k) * HW64 + pix, mask=mask, other=0.0).to(CT))
            t1 = _tanh(tl.load(img + (K + 3 * K + 2 * K + k) * HW64 + pix, mask=mask, other=0.0).to(CT))
            t2 = _tanh(tl.load(img + (K + 6 * K + 2 * K + k) * HW64 + pix, mask=mask, other=0.0).to(CT))
        for c in tl.static_range(C):
            log_p, _, _, _ = _channel(
                img,
                x_img,
                pix,
                mask,
                HW64,
                K,
                k,
                c,
                t0,
                t1,
                t2,
                y_r,
                y_g,
                scale,
                last,
                half_bin,
                log_width,
                PER,
                COUPLED,
                False,
                CT,
            )
            acc += log_p
        if GRAD:
            r = g * exp_t(acc - lp)  # g r_k
            tl.store(out_img + k * HW64 + pix, to_dtype(r - g * exp_t(logit - lse_logits), OUT), mask=mask)
            for c in tl.static_range(C):
                _, d_u, d_s, ls = _channel(
                    img,
                    x_img,
                    pix,
                    mask,
                    HW64,
                    K,
                    k,
                    c,
                    t0,
                    t1,
                    t2,
                    y_r,
                    y_g,
                    scale,
                    last,
                    half_bin,
                    log_width,
                    PER,
                    COUPLED,
                    True,
                    CT,
                )
                mean_ch = K + PER * K * c + k
                d_mean = -r * d_u
                tl.store(out_img + mean_ch * HW64 + pix, to_dtype(d_mean, OUT), mask=mask)
                gs = tl.where(ls >= LOG_SCALE_MIN, r * d_s, 0.0)
                tl.store(out_img + (mean_ch + K) * HW64 + pix, to_dtype(gs, OUT), mask=mask)
                if COUPLED:
                    # a0 = tanh(coeff 0) enters mu_G (c = 1), a1 and a2 enter mu_B (c = 2)
                    if c == 1:
                        ga0 = d_mean * y_r * (1.0 - t0 * t0)
                        tl.store(out_img + (K + 2 * K + k) * HW64 + pix, to_dtype(ga0, OUT), mask=mask)
                    if c == 2:
                        ga1 = d_mean * y_r * (1.0 - t1 * t1)
                        ga2 = d_mean * y_g * (1.0 - t2 * t2)
                        tl.store(out_img + (K + 3 * K + 2 * K + k) * HW64 + pix, to_dtype(ga1, OUT), mask=mask)
                        tl.store(out_img + (K + 6 * K + 2 * K + k) * HW64 + pix, to_dtype(ga2, OUT), mask=mask)
        else:
            if k == 0:
                m = acc
                total = acc * 0.0 + 1.0
            else:
                m, total = _lse_add(m, total, acc)
    if not GRAD:
        tl.store(out_ptr + b * HW64 + pix, _lse_value(m, total), mask=mask)


@triton.jit
def _stream_bits(seed_lo, seed_hi, off_lo, off_hi, index):
    x0, x1, x2, x3 = stream_block(seed_lo, seed_hi, off_lo, off_hi, index >> 2)
    lane = index & 3
    return tl.where(lane == 0, x0, tl.where(lane == 1, x1, tl.where(lane == 2, x2, x3)))


@triton.jit
def _logistic_noise(bits, CT: tl.constexpr):
    """log u - log(1 - u) of a genkern uniform (gk::mixture::logistic_noise): float32 on the exact u and
    1 - u through log_uniform24, float64 from the exact float64 u."""
    k = bits >> 8
    if CT == tl.float64:
        u = (k.to(tl.float64) + 0.5) * (2.0**-24)
        noise = tl.log(u) - tl.log(1.0 - u)
    else:
        noise = log_uniform24(k) - log_uniform24(0xFFFFFF - k)
    return noise


@triton.jit(do_not_specialize=KEY_ARGS + ["HW", "P", "K", "levels", "first"])
def _sample_kernel(
    params_ptr,
    out_ptr,
    HW,
    P,
    K,
    levels,
    seed_lo,
    seed_hi,
    off_lo,
    off_hi,
    first,
    C: tl.constexpr,
    COUPLED: tl.constexpr,
    CT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    pix = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    HW64 = HW.to(tl.int64)
    mask = pix < HW64
    img = params_ptr + b * P * HW64
    PER: tl.constexpr = 3 if COUPLED else 2
    base = ((first + b) * HW64 + pix) * (K + C)
    # Gumbel-max over the logits, scored in float64 (categorical::gumbel_argmax): NaN is the maximum, the
    # first of equal maxima wins.
    best = tl.zeros([BLOCK], tl.int64)
    best_score = tl.zeros([BLOCK], tl.float64)
    for k in range(K):
        bits = _stream_bits(seed_lo, seed_hi, off_lo, off_hi, base + k)
        noise = -log_f32(-log_uniform24(bits >> 8))
        logit = tl.load(img + k * HW64 + pix, mask=mask, other=0.0)
        score = logit.to(tl.float64) + noise.to(tl.float64)
        beats = (best_score == best_score) & ((score > best_score) | (score != score))
        take = (k == 0) | beats
        best = tl.where(take, k, best)
        best_score = tl.where(take, score, best_score)
    last = levels - 1
    y_r = tl.zeros([BLOCK], CT)
    y_g = y_r
    for c in tl.static_range(C):
        mean_ch = K + PER * K * c + best
        mu = tl.load(img + mean_ch * HW64 + pix, mask=mask, other=0.0).to(CT)
        if COUPLED:
            if c == 1:
                a0 = tl.load(img + (K + 2 * K + best) * HW64 + pix, mask=mask, other=0.0).to(CT)
                mu = mu + _tanh(a0) * y_r
            if c == 2:
                a1 = tl.load(img + (K + 3 * K + 2 * K + best) * HW64 + pix, mask=mask, other=0.0).to(CT)
                a2 = tl.load(img + (K + 6 * K + 2 * K + best) * HW64 + pix, mask=mask, other=0.0).to(CT)
                mu = mu + _tanh(a1) * y_r + _tanh(a2) * y_g
        ls = tl.load(img + (mean_ch + K) * HW64 + pix, mask=mask, other=0.0).to(CT)
        bits = _stream_bits(seed_lo, seed_hi, off_lo, off_hi, base + K + c)
        y = mu + exp_t(_clamp_log_scale(ls)) * _logistic_noise(bits, CT)
        y = tl.where(y < -1.0, -1.0, tl.where(y > 1.0, 1.0, y))
        if c == 0:
            y_r = y
        if c == 1:
            y_g = y
        v = ((y + 1.0) * last.to(CT) * 0.5).to(tl.float64)
        # half to even: floor(v + 1/2), less one where v + 1/2 is an odd integer
        r = tl.floor(v + 0.5)
        r = tl.where((r - v == 0.5) & (r - 2.0 * tl.floor(r * 0.5) == 1.0), r - 1.0, r)
        tl.store(out_ptr + (b * C + c) * HW64 + pix, r.to(tl.int64), mask=mask)


# --------------------------------------------------------------------------------------------------
# Wrappers (the signatures of genkern._C.logistic_mixture's entry points)


def _grid(params):
    b, _, h, w = params.shape
    return (b, triton.cdiv(h * w, BLOCK))


def _pixel_dtype(params):
    return torch.float64 if params.dtype == torch.float64 else torch.float32


def _check(params, x, levels, num_mixtures, coupled, name="x"):
    check(params.dtype, params=params)
    if not x.is_contiguous() or x.dtype != torch.int64:
        raise ValueError(f"{name} must be a contiguous int64 tensor")
    colors = x.shape[1]
    per = 3 * colors + 1 if coupled else 2 * colors + 1
    if params.dim() != 4 or params.shape[1] != per * num_mixtures or (coupled and colors != 3):
        raise ValueError("params must have 10K (coupled, C = 3) or (1 + 2C)K channels")
    if levels < 2:
        raise ValueError("levels must be >= 2")
    return colors


def _pixels(name, t, params):
    b, _, h, w = params.shape
    if not t.is_contiguous() or t.dtype != _pixel_dtype(params) or t.numel() != b * h * w:
        raise ValueError(f"{name} must be a contiguous (B, H, W) tensor in the compute dtype")


def _run(params, x, log_prob, grad, out, levels, num_mixtures, coupled, is_grad):
    colors = _check(params, x, levels, num_mixtures, coupled)
    if params.numel() == 0:
        return out
    launch(
        _mixture_kernel,
        _grid(params),
        params,
        x,
        log_prob,
        grad,
        out,
        params.shape[2] * params.shape[3],
        params.shape[1],
        num_mixtures,
        levels,
        C=colors,
        COUPLED=bool(coupled),
        GRAD=is_grad,
        CT=compute_type(params),
        BLOCK=BLOCK,
    )
    return out


def log_prob(params, x, out, levels, num_mixtures, coupled):
    """out (B, H, W) = log p(x) per pixel."""
    _pixels("out", out, params)
    return _run(params, x, out, out, out, levels, num_mixtures, coupled, False)


def log_prob_backward(grad, params, x, log_prob, grad_params, levels, num_mixtures, coupled):
    """grad_params = d(sum grad * log p) / d params."""
    _pixels("grad", grad, params)
    _pixels("log_prob", log_prob, params)
    check(params.dtype, params=params, grad_params=grad_params)
    return _run(params, x, log_prob, grad, grad_params, levels, num_mixtures, coupled, True)


def sample(params, out, levels, num_mixtures, coupled, seed, offset, first):
    """out (B, C, H, W) int64: row b the sample first + b of params[b]."""
    colors = _check(params, out, levels, num_mixtures, coupled, name="out")
    if out.numel() == 0:
        return out
    launch(
        _sample_kernel,
        _grid(params),
        params,
        out,
        params.shape[2] * params.shape[3],
        params.shape[1],
        num_mixtures,
        levels,
        *key_args(seed, offset),
        int(first),
        C=colors,
        COUPLED=bool(coupled),
        CT=compute_type(params),
        BLOCK=BLOCK,
    )
    return out
