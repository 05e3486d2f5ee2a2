"""The diffusion family (docs/math.md, section 3) in Triton: q_sample, the loss and its backward
(training), and the DDPM / DDIM denoising step (sampling).

The wrappers mirror the Args structs of csrc/diffusion/diffusion.h (whose comments define each op): every tensor is
contiguous, outputs are preallocated by the caller, and all floating tensors of a call share one dtype.
x0 (and model_output, noise, x_t, grad_model_output) are viewed as (batch, n) with batch = x0.shape[0];
`t` is an int64 (batch,) tensor and `table` the float32 (T + 1, 4) NoiseSchedule.table, both on the data's
device, so no timestep or coefficient passes through the host. The per-element terms are those of
csrc/diffusion/diffusion_math.h, written in the same operation order: the schedule coefficients are the float32
table entries (widened to float64 for float64 data), and the min-SNR weight is always computed in float32.

Compute type: float64 for float64 tensors, float32 otherwise (as reparam.py). Noise element (b, j) is
stream element b * n + j (the flat index), unless `noise` is given.

Tiling: (batch, n) is cut into [BLOCK_D, BLOCK_R] tiles, j along axis 0 (the contiguous one) and rows b
along axis 1, so per-row values (t, the table row, the weight, grad_loss) are loaded once per row of a tile.
The elementwise kernels (q_sample, loss_backward) run one program per tile; the loss runs one program per
BLOCK_R rows, walking n. Grids are 1-D. Divisions are tl.div_rn in float32 (Triton's `/` is the
approximate div.full.f32 on NVIDIA GPUs; the C++ divides correctly rounded), square roots tl.sqrt_rn.

The step computes each sample's coefficients (gk::diffusion::step_coefficients) once per row of a tile, in
the compute type from the float32 table rows of t[b] and prev_t[b]; the float arguments (guidance_scale,
clip, eta) are rounded to float32 first, as StepArgs holds them. The learned_range logs are tl.log (per-sample
values), the per-element exp is gk::exp (random.exp_t).
"""

import torch
import triton
import triton.language as tl

from ..core.launch import check, compute_type, launch
from ..core.philox import KEY_ARGS, exp_t, key_args, stream_normal, stream_normals, to_dtype

EPSILON = tl.constexpr(0)  # gk::diffusion::kEpsilon
V_PREDICTION = tl.constexpr(1)  # kVPrediction
SAMPLE = tl.constexpr(2)  # kSample
PREDICTIONS = (0, 1, 2)
TABLE_COLUMNS = 4  # gk::diffusion::kTableColumns

BLOCK = 1024  # elements per tile of the elementwise kernels (a power of 2, at least 4)
TILE = 2048  # elements per [BLOCK_D, BLOCK_R] tile of the loss kernel
RANDOM_SHRINK = 2  # tiles that draw normals are half-size (register pressure, as in reparam.py)


# --------------------------------------------------------------------------------------------------
# Per-element terms (csrc/diffusion/diffusion_math.h)


@triton.jit
def _div(a, b):
    """a / b correctly rounded: tl.div_rn for float32, the (IEEE) float64 division otherwise."""
    if a.dtype == tl.float64:
        q = a / b
    else:
        q = tl.div_rn(a, b)
    return q


@triton.jit
def _level(table_ptr, t_ptr, b, bmask, rows):
    """The table row of t[b] (gk::diffusion::level_at), row index t + 1 clamped into [0, rows) for memory
    safety: (alpha_bar, one_minus_alpha_bar, signal, noise), float32, each shaped like b."""
    t = tl.load(t_ptr + b, mask=bmask, other=0)
    r = t + 1
    r = tl.where(r < 0, 0, r)
    r = tl.where(r >= rows, rows - 1, r)
    row = table_ptr + r * 4
    ab = tl.load(row, mask=bmask, other=1.0)
    omab = tl.load(row + 1, mask=bmask, other=0.0)
    signal = tl.load(row + 2, mask=bmask, other=1.0)
    noise = tl.load(row + 3, mask=bmask, other=0.0)
    return ab, omab, signal, noise


@triton.jit
def _min_snr_weight(ab, omab, gamma, PREDICTION: tl.constexpr, WEIGHTED: tl.constexpr):
    """gk::diffusion::min_snr_weight in float32 (WEIGHTED: gamma > 0; otherwise 1)."""
    if WEIGHTED:
        if PREDICTION == EPSILON:
            ratio = _div(gamma * omab, ab)  # gamma / snr
            w = tl.where((ab > 0.0) & (ratio < 1.0), ratio, 1.0)
        else:
            snr = _div(ab, omab)
            clipped = tl.where(snr < gamma, snr, gamma)
            if PREDICTION == V_PREDICTION:
                w = _div(clipped, snr + 1.0)
            else:
                w = clipped
    else:
        w = tl.full(ab.shape, 1.0, tl.float32)
    return w


@triton.jit
def _loss_target(x0, eps, signal, noise, PREDICTION: tl.constexpr):
    """gk::diffusion::loss_target: eps, signal * eps - noise * x0, or x0."""
    if PREDICTION == EPSILON:
        y = eps
    elif PREDICTION == V_PREDICTION:
        y = signal * eps - noise * x0
    else:
        y = x0
    return y


# --------------------------------------------------------------------------------------------------
# Tiling and noise


@triton.jit
def _tile_offsets(b, d, n):
    """Flat offsets b * n + d of a [BLOCK_D, BLOCK_R] tile (d along axis 0, b along axis 1). They are also
    the stream indices of the tile's noise."""
    return (b * n)[None, :] + d[:, None]


@triton.jit
def _noise_tile(
    eps_ptr,
    offs,
    mask,
    b,
    d0,
    n,
    seed_lo,
    seed_hi,
    off_lo,
    off_hi,
    HAS_EPS: tl.constexpr,
    RUNS: tl.constexpr,
    CT: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """The tile's noise in CT: loaded, or stream elements `offs`.

    RUNS (n % 4 == 0, BLOCK_D % 4 == 0, d0 % BLOCK_D == 0): each row's part of the tile is a run of whole
    Philox blocks, so one Philox call and two Box-Mullers give four elements; otherwise one of each per
    element (gk::stream_normal)."""
    if HAS_EPS:
        eps = tl.load(eps_ptr + offs, mask=mask).to(CT)
    elif RUNS:
        q = tl.arange(0, BLOCK_D // 4).to(tl.int64)
        block = ((b * n + d0) // 4)[None, :] + q[:, None]  # [BLOCK_D / 4, BLOCK_R]
        z0, z1, z2, z3 = stream_normals(seed_lo, seed_hi, off_lo, off_hi, block)
        # [q, r, k, l] = z_{2k + l}[q, r] (see random.interleave4); element 4q + 2k + l of the row's run
        z = tl.join(tl.join(z0, z2), tl.join(z1, z3))
        z = tl.reshape(tl.permute(z, (0, 2, 3, 1)), [BLOCK_D, BLOCK_R])
        eps = z.to(CT)
    else:
        eps = stream_normal(seed_lo, seed_hi, off_lo, off_hi, offs).to(CT)
    return eps


def _check_schedule(t, table, batch):
    if not t.is_contiguous() or t.dtype != torch.int64 or t.numel() != batch:
        raise ValueError(f"t must be a contiguous int64 tensor of {batch} elements")
    if (
        not table.is_contiguous()
        or table.dtype != torch.float32
        or table.dim() != 2
        or table.shape[1] != TABLE_COLUMNS
        or table.shape[0] < 1
    ):
        raise ValueError("table must be a contiguous float32 (T + 1, 4) tensor, as NoiseSchedule.table gives")


def _check_prediction(prediction):
    prediction = int(prediction)
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction type {prediction}")
    return prediction


def _shape(x0):
    if x0.dim() < 1:
        raise ValueError("x0 must have a batch dimension")
    batch = x0.shape[0]
    return batch, (x0.numel() // batch if batch else 0)


def _elementwise_config(batch, n, random):
    """(grid, BLOCK_R, BLOCK_D, d_blocks): one program per [BLOCK_D, BLOCK_R] tile of (batch, n)."""
    block = BLOCK // RANDOM_SHRINK if random else BLOCK
    block_d = min(triton.next_power_of_2(n), block)
    block_r = min(triton.next_power_of_2(batch), max(1, block // block_d))
    d_blocks = triton.cdiv(n, block_d)
    return (triton.cdiv(batch, block_r) * d_blocks,), block_r, block_d, d_blocks


def _runs(n, block_d, has_noise):
    return not has_noise and n % 4 == 0 and block_d % 4 == 0


# --------------------------------------------------------------------------------------------------
# q_sample: x_t[b, j] = signal(t[b]) x0[b, j] + noise(t[b]) eps[b, j]


@triton.jit
def _tile_coords(batch, n, d_blocks, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr):
    """This program's tile of an elementwise kernel: (b, bmask, d0, d, offs, mask)."""
    pid = tl.program_id(0).to(tl.int64)
    pid_r = pid // d_blocks
    d0 = (pid % d_blocks) * BLOCK_D
    b = pid_r * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    d = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
    bmask = b < batch
    mask = bmask[None, :] & (d < n)[:, None]
    return b, bmask, d0, d, _tile_offsets(b, d, n), mask


@triton.jit(do_not_specialize=KEY_ARGS)
def _q_sample_kernel(
    x0_ptr,
    eps_ptr,
    t_ptr,
    table_ptr,
    xt_ptr,
    batch,
    n,
    rows,
    d_blocks,
    seed_lo,
    seed_hi,
    off_lo,
    off_hi,
    HAS_EPS: tl.constexpr,
    RUNS: tl.constexpr,
    CT: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    b, bmask, d0, d, offs, mask = _tile_coords(batch, n, d_blocks, BLOCK_D, BLOCK_R)
    _, _, signal, noise = _level(table_ptr, t_ptr, b, bmask, rows)
    x0 = tl.load(x0_ptr + offs, mask=mask).to(CT)
    eps = _noise_tile(
        eps_ptr, offs, mask, b, d0, n, seed_lo, seed_hi, off_lo, off_hi, HAS_EPS, RUNS, CT, BLOCK_D, BLOCK_R
    )
    xt = signal.to(CT)[None, :] * x0 + noise.to(CT)[None, :] * eps
    tl.store(xt_ptr + offs, to_dtype(xt, xt_ptr.dtype.element_ty), mask=mask)


def q_sample(x0, noise, t, table, x_t, seed, offset):
    """x_t[b, j] = sqrt(ab) x0[b, j] + sqrt(1 - ab) eps[b, j], ab = alpha-bar at t[b] (table row t[b] + 1);
    eps = noise, or stream element b * n + j when noise is None."""
    check(x0.dtype, x0=x0, noise=noise, x_t=x_t)
    batch, n = _shape(x0)
    _check_schedule(t, table, batch)
    if x0.numel() == 0:
        return x_t
    grid, block_r, block_d, d_blocks = _elementwise_config(batch, n, random=noise is None)
    launch(
        _q_sample_kernel,
        grid,
        x0,
        noise if noise is not None else x0,
        t,
        table,
        x_t,
        batch,
        n,
        table.shape[0],
        d_blocks,
        *key_args(seed, offset),
        HAS_EPS=noise is not None,
        RUNS=_runs(n, block_d, noise is not None),
        CT=compute_type(x0),
        BLOCK_D=block_d,
        BLOCK_R=block_r,
    )
    return x_t


# --------------------------------------------------------------------------------------------------
# loss[b] = w(b) * mean_j (target - model_output)^2


@triton.jit(do_not_specialize=["n"] + KEY_ARGS)
def _loss_kernel(
    m_ptr,
    x0_ptr,
    eps_ptr,
    t_ptr,
    table_ptr,
    loss_ptr,
    batch,
    n,
    rows,
    snr_gamma,
    seed_lo,
    seed_hi,
    off_lo,
    off_hi,
    PREDICTION: tl.constexpr,
    WEIGHTED: tl.constexpr,
    HAS_EPS: tl.constexpr,
    RUNS: tl.constexpr,
    CT: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    b = pid * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    bmask = b < batch
    ab, omab, signal, noise = _level(table_ptr, t_ptr, b, bmask, rows)
    signal = signal.to(CT)[None, :]
    noise = noise.to(CT)[None, :]
    acc = tl.zeros([BLOCK_D, BLOCK_R], CT)
    for d0 in range(0, n, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
        offs = _tile_offsets(b, d, n)
        mask = bmask[None, :] & (d < n)[:, None]
        m = tl.load(m_ptr + offs, mask=mask).to(CT)
        x0 = tl.load(x0_ptr + offs, mask=mask).to(CT)
        eps = _noise_tile(
            eps_ptr, offs, mask, b, d0, n, seed_lo, seed_hi, off_lo, off_hi, HAS_EPS, RUNS, CT, BLOCK_D, BLOCK_R
        )
        diff = _loss_target(x0, eps, signal, noise, PREDICTION) - m
        acc += tl.where(mask, diff * diff, 0.0)
    mean = _div(tl.sum(acc, axis=0), tl.zeros([BLOCK_R], CT) + n.to(CT))
    w = _min_snr_weight(ab, omab, snr_gamma, PREDICTION, WEIGHTED).to(CT)
    tl.store(loss_ptr + b, to_dtype(mean * w, loss_ptr.dtype.element_ty), mask=bmask)  # (sum / n) * w


def loss(model_output, x0, noise, t, table, loss, prediction, snr_gamma, seed, offset):
    """loss[b] = min_snr_weight(b) * mean_j (loss_target(x0, eps, level) - model_output)^2 (0 when n == 0);
    eps as in q_sample, so the same (seed, offset) regenerate the noise of the x_t the model saw.

    prediction: 0 epsilon, 1 v_prediction, 2 sample; snr_gamma <= 0: unweighted."""
    check(x0.dtype, model_output=model_output, x0=x0, noise=noise, loss=loss)
    prediction = _check_prediction(prediction)
    batch, n = _shape(x0)
    _check_schedule(t, table, batch)
    if batch == 0:
        return loss
    if n == 0:
        return loss.zero_()
    random = noise is None
    block_d = min(triton.next_power_of_2(n), 512)
    tile = TILE // RANDOM_SHRINK if random else TILE
    block_r = min(triton.next_power_of_2(batch), max(1, tile // block_d))
    grid = (triton.cdiv(batch, block_r),)
    gamma = float(snr_gamma)
    launch(
        _loss_kernel,
        grid,
        model_output,
        x0,
        noise if noise is not None else x0,
        t,
        table,
        loss,
        batch,
        n,
        table.shape[0],
        gamma,
        *key_args(seed, offset),
        PREDICTION=prediction,
        WEIGHTED=gamma > 0.0,
        HAS_EPS=not random,
        RUNS=_runs(n, block_d, not random),
        CT=compute_type(x0),
        BLOCK_D=block_d,
        BLOCK_R=block_r,
    )
    return loss


# --------------------------------------------------------------------------------------------------
# grad_model_output[b, j] = grad_loss[b] * w(b) * 2 (model_output - target) / n


@triton.jit(do_not_specialize=["n"] + KEY_ARGS)
def _loss_backward_kernel(
    g_ptr,
    m_ptr,
    x0_ptr,
    eps_ptr,
    t_ptr,
    table_ptr,
    gm_ptr,
    batch,
    n,
    rows,
    d_blocks,
    snr_gamma,
    seed_lo,
    seed_hi,
    off_lo,
    off_hi,
    PREDICTION: tl.constexpr,
    WEIGHTED: tl.constexpr,
    HAS_EPS: tl.constexpr,
    RUNS: tl.constexpr,
    CT: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    b, bmask, d0, d, offs, mask = _tile_coords(batch, n, d_blocks, BLOCK_D, BLOCK_R)
    ab, omab, signal, noise = _level(table_ptr, t_ptr, b, bmask, rows)
    w = _min_snr_weight(ab, omab, snr_gamma, PREDICTION, WEIGHTED).to(CT)
    g = tl.load(g_ptr + b, mask=bmask).to(CT)
    # (grad_loss * weight) / n, then times 2 (m - target): the order of the C++ kernels (and of the
    # reference's autograd)
    coef = _div(g * w, tl.zeros([BLOCK_R], CT) + n.to(CT))[None, :]
    m = tl.load(m_ptr + offs, mask=mask).to(CT)
    x0 = tl.load(x0_ptr + offs, mask=mask).to(CT)
    eps = _noise_tile(
        eps_ptr, offs, mask, b, d0, n, seed_lo, seed_hi, off_lo, off_hi, HAS_EPS, RUNS, CT, BLOCK_D, BLOCK_R
    )
    target = _loss_target(x0, eps, signal.to(CT)[None, :], noise.to(CT)[None, :], PREDICTION)
    grad = coef * (2.0 * (m - target))
    tl.store(gm_ptr + offs, to_dtype(grad, gm_ptr.dtype.element_ty), mask=mask)


def loss_backward(grad_loss, model_output, x0, noise, t, table, grad_model_output, prediction, snr_gamma, seed, offset):
    """grad_model_output[b, j] = grad_loss[b] * weight(b) * 2 (model_output - target) / n, evaluated as
    ((grad_loss * weight) / n) * (2 (model_output - target)); eps regenerated as loss() drew it."""
    check(
        x0.dtype,
        grad_loss=grad_loss,
        model_output=model_output,
        x0=x0,
        noise=noise,
        grad_model_output=grad_model_output,
    )
    prediction = _check_prediction(prediction)
    batch, n = _shape(x0)
    _check_schedule(t, table, batch)
    if x0.numel() == 0:
        return grad_model_output
    grid, block_r, block_d, d_blocks = _elementwise_config(batch, n, random=noise is None)
    gamma = float(snr_gamma)
    launch(
        _loss_backward_kernel,
        grid,
        grad_loss,
        model_output,
        x0,
        noise if noise is not None else x0,
        t,
        table,
        grad_model_output,
        batch,
        n,
        table.shape[0],
        d_blocks,
        gamma,
        *key_args(seed, offset),
        PREDICTION=prediction,
        WEIGHTED=gamma > 0.0,
        HAS_EPS=noise is not None,
        RUNS=_runs(n, block_d, noise is not None),
        CT=compute_type(x0),
        BLOCK_D=block_d,
        BLOCK_R=block_r,
    )
    return grad_model_output


# --------------------------------------------------------------------------------------------------
# step: one denoising step t -> prev_t (DDPM or DDIM), csrc/diffusion/diffusion_math.h step_coefficients, guide,
# step_element; indexing as gk::diffusion::StepArgs and the CPU StepKernel.

DDPM = tl.constexpr(0)  # gk::diffusion::kDdpm
DDIM = tl.constexpr(1)  # kDdim
FIXED_LARGE = tl.constexpr(1)  # gk::diffusion::kFixedLarge
VARIANCES = (0, 1, 2)  # kFixedSmall, kFixedLarge, kLearnedRange
LEARNED_RANGE = 2
# gk::diffusion::kMinVariance, 1e-20f: the float32 value, also where it is widened to float64
MIN_VARIANCE = tl.constexpr(float(torch.tensor(1e-20, dtype=torch.float32).item()))
CLIP = tl.constexpr(1)  # the THRESHOLD modes of the step kernel: 0 none, CLIP (clip > 0), DYNAMIC
DYNAMIC = tl.constexpr(2)


@triton.jit
def _sqrt(x):
    """Correctly rounded sqrt (sqrtf / sqrt): tl.sqrt_rn for float32 (tl.sqrt may be approximate on GPUs);
    float64's tl.sqrt is the IEEE sqrt.rn.f64."""
    if x.dtype == tl.float64:
        y = tl.sqrt(x)
    else:
        y = tl.sqrt_rn(x)
    return y


@triton.jit
def _level_of(table_ptr, t, rows):
    """gk::diffusion::level_clamped: the table row of timesteps t (any shape), t clamped into [-1, rows - 2]
    (row t + 1 into [0, rows)), so every lane reads inside the table. float32 (alpha_bar,
    one_minus_alpha_bar, signal, noise)."""
    r = t + 1
    r = tl.where(r < 0, 0, r)
    r = tl.where(r >= rows, rows - 1, r)
    row = table_ptr + r * 4
    return tl.load(row), tl.load(row + 1), tl.load(row + 2), tl.load(row + 3)


@triton.jit
def _step_beta(ab_t, omab_t, ab_p, omab_p, CT: tl.constexpr):
    """gk::diffusion::step_beta: (ab_prev - ab_t) / ab_prev, the difference from 1 - ab where ab_t > 1/2."""
    diff = tl.where(ab_t > 0.5, omab_t.to(CT) - omab_p.to(CT), ab_p.to(CT) - ab_t.to(CT))
    return _div(diff, ab_p.to(CT))


@triton.jit
def _step_coefficients(
    table_ptr,
    t_ptr,
    pt_ptr,
    b,
    bmask,
    rows,
    eta,
    KIND: tl.constexpr,
    VARIANCE: tl.constexpr,
    LEARNED: tl.constexpr,
    HAS_PREV_T: tl.constexpr,
    CT: tl.constexpr,
):
    """gk::diffusion::step_coefficients for rows b ([BLOCK_R]), in CT: (signal, noise, x0_coef, other_coef,
    sigma, log_var_large, log_var_small, noisy); the logs are 0 unless LEARNED, noisy is DDPM's t > 0 (DDIM's
    eta > 0 is the kernel's NOISY). Masked lanes read the rows of t = 0, prev_t = -1 (finite values)."""
    t = tl.load(t_ptr + b, mask=bmask, other=0)
    if HAS_PREV_T:
        pt = tl.load(pt_ptr + b, mask=bmask, other=-1)
    else:
        pt = t - 1
    ab_t, omab_t, signal_t, noise_t = _level_of(table_ptr, t, rows)
    ab_p, omab_p, signal_p, noise_p = _level_of(table_ptr, pt, rows)
    beta = _step_beta(ab_t, omab_t, ab_p, omab_p, CT)
    beta_t = omab_t.to(CT)
    beta_prev = omab_p.to(CT)
    zero = tl.zeros(beta.shape, CT)
    log_var_large = zero
    log_var_small = zero
    if KIND == DDPM:
        # ddpm_coefficients
        alpha = _div(ab_t.to(CT), ab_p.to(CT))
        var_small = _div(beta_prev, beta_t) * beta
        var_small = tl.where(var_small > MIN_VARIANCE, var_small, MIN_VARIANCE)
        x0_coef = _div(signal_p.to(CT) * beta, beta_t)
        other_coef = _div(_sqrt(alpha) * beta_prev, beta_t)
        if VARIANCE == FIXED_LARGE:
            sigma = _sqrt(beta)
        else:
            sigma = _sqrt(var_small)
        if LEARNED:
            log_var_large = tl.log(beta)
            log_var_small = tl.log(var_small)
        noisy = t > 0
    else:
        # ddim_coefficients
        variance = _div(beta_prev, beta_t) * beta
        sigma = eta * _sqrt(variance)
        direction = beta_prev - sigma * sigma
        x0_coef = signal_p.to(CT)
        other_coef = _sqrt(tl.where(direction > 0.0, direction, zero))
        noisy = t == t  # unused: DDIM's noise depends on eta alone
    return signal_t.to(CT), noise_t.to(CT), x0_coef, other_coef, sigma, log_var_large, log_var_small, noisy


@triton.jit
def _predict_x0(m, x, signal, noise, PREDICTION: tl.constexpr):
    """gk::diffusion::predict_x0: (x - noise m) / signal, m, or signal x - noise m."""
    if PREDICTION == EPSILON:
        y = _div(x - noise * m, signal)
    elif PREDICTION == SAMPLE:
        y = m
    else:
        y = signal * x - noise * m
    return y


@triton.jit
def _predict_eps(m, x, signal, noise, PREDICTION: tl.constexpr):
    """gk::diffusion::predict_eps: m, (x - signal m) / noise, or signal m + noise x."""
    if PREDICTION == EPSILON:
        y = m
    elif PREDICTION == SAMPLE:
        y = _div(x - signal * m, noise)
    else:
        y = signal * m + noise * x
    return y


@triton.jit
def _threshold_x0(x0, limit, DIVIDE: tl.constexpr):
    """gk::diffusion::threshold_x0: clamp to [-limit, limit] (NaN passes), then / limit if DIVIDE."""
    y = tl.where(x0 < -limit, -limit, tl.where(x0 > limit, limit, x0))
    if DIVIDE:
        y = _div(y, limit)
    return y


@triton.jit(do_not_specialize=KEY_ARGS)
def _step_kernel(
    m_ptr,
    x_ptr,
    eps_ptr,
    t_ptr,
    pt_ptr,
    table_ptr,
    k_ptr,
    q_ptr,
    prev_ptr,
    x0_ptr,
    batch,
    n,
    stride,
    rows,
    d_blocks,
    scale,
    clip,
    eta,
    seed_lo,
    seed_hi,
    off_lo,
    off_hi,
    KIND: tl.constexpr,
    PREDICTION: tl.constexpr,
    VARIANCE: tl.constexpr,
    LEARNED: tl.constexpr,
    GUIDED: tl.constexpr,
    RESCALE: tl.constexpr,
    THRESHOLD: tl.constexpr,
    HAS_PREV_T: tl.constexpr,
    NOISY: tl.constexpr,
    HAS_EPS: tl.constexpr,
    RUNS: tl.constexpr,
    CLIPPED_EPS: tl.constexpr,
    WRITE_X0: tl.constexpr,
    CT: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    b, bmask, d0, d, offs, mask = _tile_coords(batch, n, d_blocks, BLOCK_D, BLOCK_R)
    signal, noise, x0_coef, other_coef, sigma, lv_large, lv_small, noisy = _step_coefficients(
        table_ptr, t_ptr, pt_ptr, b, bmask, rows, tl.zeros([BLOCK_R], CT) + eta, KIND, VARIANCE, LEARNED, HAS_PREV_T, CT
    )
    signal = signal[None, :]
    noise = noise[None, :]
    x0_coef = x0_coef[None, :]
    other_coef = other_coef[None, :]
    sigma = sigma[None, :]

    # The model output: sample b's prediction at b * stride + j; guided: u + s (c - u) (times k), the
    # unconditional half first, the conditional sample b at (batch + b) * stride (int64: b is).
    m_offs = (b * stride)[None, :] + d[:, None]
    m = tl.load(m_ptr + m_offs, mask=mask).to(CT)
    if GUIDED:
        cond_offs = ((b + batch) * stride)[None, :] + d[:, None]
        cond = tl.load(m_ptr + cond_offs, mask=mask).to(CT)
        m = m + (tl.zeros([1, BLOCK_R], CT) + scale) * (cond - m)  # guide(uncond, cond, scale, k)
        if RESCALE:
            k = tl.load(k_ptr + b, mask=bmask, other=1.0).to(CT)
            m = m * k[None, :]  # (without rescale k = 1: the product is m itself)
    x = tl.load(x_ptr + offs, mask=mask).to(CT)

    x0 = _predict_x0(m, x, signal, noise, PREDICTION)
    if THRESHOLD == DYNAMIC:
        q = tl.load(q_ptr + b, mask=bmask, other=1.0).to(CT)
        x0 = _threshold_x0(x0, q[None, :], True)
    elif THRESHOLD == CLIP:
        x0 = _threshold_x0(x0, tl.zeros([1, BLOCK_R], CT) + clip, False)
    if WRITE_X0:
        tl.store(x0_ptr + offs, to_dtype(x0, x0_ptr.dtype.element_ty), mask=mask)

    if KIND == DDPM:
        out = x0_coef * x0 + other_coef * x
        # Noise only for the rows with t > 0 (its values elsewhere are never used).
        row_noisy = noisy[None, :]
        z = _noise_tile(
            eps_ptr,
            offs,
            mask & row_noisy,
            b,
            d0,
            n,
            seed_lo,
            seed_hi,
            off_lo,
            off_hi,
            HAS_EPS,
            RUNS,
            CT,
            BLOCK_D,
            BLOCK_R,
        )
        if LEARNED:
            # the variance output: the second n elements of the sample's stride (of the conditional half
            # under guidance)
            if GUIDED:
                v_offs = cond_offs + n
            else:
                v_offs = m_offs + n
            v = tl.load(m_ptr + v_offs, mask=mask & row_noisy, other=0.0).to(CT)
            f = (v + 1.0) * 0.5  # (v + 1) / 2: exact either way
            log_var = f * lv_large[None, :] + (1.0 - f) * lv_small[None, :]
            std = exp_t(0.5 * log_var)
            out = tl.where(row_noisy, out + std * z, out)
        else:
            out = tl.where(row_noisy, out + sigma * z, out)
    else:
        if CLIPPED_EPS:
            eps = _div(x - signal * x0, noise)
        else:
            eps = _predict_eps(m, x, signal, noise, PREDICTION)
        out = x0_coef * x0 + other_coef * eps
        if NOISY:
            z = _noise_tile(
                eps_ptr, offs, mask, b, d0, n, seed_lo, seed_hi, off_lo, off_hi, HAS_EPS, RUNS, CT, BLOCK_D, BLOCK_R
            )
            out = out + sigma * z
    tl.store(prev_ptr + offs, to_dtype(out, prev_ptr.dtype.element_ty), mask=mask)


def _float32(x):
    """x rounded to float32 (static_cast<float>: out-of-range values become +-inf), as a Python float: the
    kernels widen the scalar arguments as tl.zeros(..., CT) + x, exact for float32 values whether the launch
    passes them as float32 (compiled) or as Python floats (interpreter)."""
    return float(torch.tensor(float(x), dtype=torch.float64).to(torch.float32).item())


def _check_per_sample(name, a, ref, batch):
    if a is None:
        return
    if a.dtype != torch.float32:
        raise TypeError(f"{name} has dtype {a.dtype}, expected torch.float32")
    if not a.is_contiguous() or a.numel() != batch or a.device != ref.device:
        raise ValueError(f"{name} must be a contiguous tensor of {batch} elements on the data's device")


def _check_numel(name, a, numel):
    if a.numel() != numel:
        raise ValueError(f"{name} must have {numel} elements, got {a.numel()}")


def step(
    model_output,
    sample,
    noise,
    t,
    prev_t,
    table,
    guidance_rescale,
    dynamic_threshold,
    prev_sample,
    pred_original,
    kind,
    prediction,
    variance,
    guided,
    guidance_scale,
    clip,
    eta,
    use_clipped_model_output,
    seed,
    offset,
):
    """One denoising step t[b] -> prev_t[b] (t[b] - 1 when prev_t is None) of every sample b, as
    _C.diffusion_step (gk::diffusion::StepArgs): writes prev_sample and, unless it is None, pred_original.

    kind: 0 DDPM, 1 DDIM; prediction: 0 epsilon, 1 v_prediction, 2 sample; variance (DDPM): 0 fixed_small,
    1 fixed_large, 2 learned_range (model_output holds 2n elements per sample: the prediction, then the
    variance output). guided: model_output holds 2 * batch samples, the unconditional half first, combined
    as u + s (c - u), times guidance_rescale[b] when given; learned_range's variance comes from the
    conditional half. x0_hat is clamped to +-dynamic_threshold[b] and divided by it when given, else
    clamped to +-clip when clip > 0. Noise (DDPM rows with t[b] > 0, DDIM when eta > 0) is `noise` or
    stream element b * n + j for (seed, offset)."""
    check(
        sample.dtype,
        model_output=model_output,
        sample=sample,
        noise=noise,
        prev_sample=prev_sample,
        pred_original=pred_original,
    )
    kind = int(kind)
    if kind not in (0, 1):
        raise ValueError("kind must be 0 (DDPM) or 1 (DDIM)")
    variance = int(variance)
    if variance not in VARIANCES:
        raise ValueError("unknown variance type")
    prediction = _check_prediction(prediction)
    guided = bool(guided)
    batch, n = _shape(sample)
    stride = 2 * n if variance == LEARNED_RANGE else n  # model_output per sample
    _check_numel("model_output", model_output, (2 if guided else 1) * batch * stride)
    _check_numel("prev_sample", prev_sample, sample.numel())
    if pred_original is not None:
        _check_numel("pred_original", pred_original, sample.numel())
    if noise is not None:
        _check_numel("noise", noise, sample.numel())
    _check_schedule(t, table, batch)
    if prev_t is not None:
        if prev_t.dtype != torch.int64:
            raise TypeError(f"prev_t has dtype {prev_t.dtype}, expected torch.int64")
        if not prev_t.is_contiguous() or prev_t.numel() != batch or prev_t.device != sample.device:
            raise ValueError(f"prev_t must be a contiguous tensor of {batch} elements on the data's device")
    _check_per_sample("guidance_rescale", guidance_rescale, sample, batch)
    _check_per_sample("dynamic_threshold", dynamic_threshold, sample, batch)
    if guidance_rescale is not None and not guided:
        raise ValueError("guidance_rescale needs guidance")
    if not float(eta) >= 0.0:
        raise ValueError("eta must be non-negative")
    if sample.numel() == 0:
        return prev_sample, pred_original
    scale, clip, eta = _float32(guidance_scale), _float32(clip), _float32(eta)
    # thresholding: dynamic (clamp to +-q, divide by q), clip, or none (limit +inf: skipped)
    threshold = 2 if dynamic_threshold is not None else (1 if clip > 0.0 else 0)
    noisy = kind == 0 or eta > 0.0  # DDPM: per row (t > 0), in the kernel
    random = noisy and noise is None
    grid, block_r, block_d, d_blocks = _elementwise_config(batch, n, random=random)
    launch(
        _step_kernel,
        grid,
        model_output,
        sample,
        noise if noise is not None else sample,
        t,
        prev_t if prev_t is not None else t,
        table,
        guidance_rescale if guidance_rescale is not None else table,
        dynamic_threshold if dynamic_threshold is not None else table,
        prev_sample,
        pred_original if pred_original is not None else prev_sample,
        batch,
        n,
        stride,
        table.shape[0],
        d_blocks,
        scale,
        clip,
        eta,
        *key_args(seed, offset),
        KIND=kind,
        PREDICTION=prediction,
        VARIANCE=variance,
        LEARNED=kind == 0 and variance == LEARNED_RANGE,
        GUIDED=guided,
        RESCALE=guidance_rescale is not None,
        THRESHOLD=threshold,
        HAS_PREV_T=prev_t is not None,
        NOISY=noisy,
        HAS_EPS=noise is not None,
        RUNS=_runs(n, block_d, noise is not None),
        CLIPPED_EPS=bool(use_clipped_model_output),
        WRITE_X0=pred_original is not None,
        CT=compute_type(sample),
        BLOCK_D=block_d,
        BLOCK_R=block_r,
    )
    return prev_sample, pred_original


from .dpm_solver import dpm_step  # noqa: E402, F401 - the DPM-Solver++ step: its own file, this group's module
from .sigma_step import sigma_step  # noqa: E402, F401 - the sigma-space steps: their own file, this group's module
from .unipc import unipc_step  # noqa: E402, F401 - the UniPC step, likewise
