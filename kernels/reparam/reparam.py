"""The reparam family (docs/math.md, section 2) in Triton.

The wrappers mirror the Args structs of csrc/reparam/reparam.h (whose comments define each op): every tensor is
contiguous, outputs are preallocated by the caller, and all floating tensors of a call share one dtype.
The per-element terms are those of csrc/reparam/reparam_math.h, written in the same operation order.

Compute type: float64 for float64 tensors, float32 otherwise (fp16/bf16 are loaded, widened, and the
result rounded once on store). Random normals are always the float32 stream values (random.py), widened
for float64. Reductions accumulate in the compute type.

Reductions view their input as (outer, dim, inner) and reduce over dim. A program owns a set of rows
(o, i) and walks dim in tiles of shape [BLOCK_D, BLOCK_R] (d along axis 0, rows along axis 1):
* inner == 1 ("INNER_ONE"): rows are consecutive o, and the reduced dim is the contiguous one;
* inner > 1: a program owns BLOCK_R consecutive i of one o, so rows are the contiguous axis.
Either way the pointer arithmetic tells the compiler which axis is contiguous, and the whole grid is 1-D
(a 2-D grid's second axis is limited to 65535 programs).
"""

import triton
import triton.language as tl

from ..core.launch import check, compute_type, launch
from ..core.philox import KEY_ARGS, exp_t, key_args, log_t, stream_normal, stream_normals_run, to_dtype

LOG_2PI = tl.constexpr(1.8378770664093454835606594728112)  # gk::reparam::kLog2Pi

BLOCK = 1024  # elements per program of the elementwise kernels (a multiple of 4)
TILE = 2048  # elements per [BLOCK_D, BLOCK_R] tile of the reduction kernels
# Kernels that draw a normal per element (a Philox call and a Box-Muller each) use half-size blocks/tiles:
# at 16 elements a thread they needed over 200 registers on sm_90, at 8 under 100 (no spills either way).
RANDOM_SHRINK = 2


# --------------------------------------------------------------------------------------------------
# Per-element terms (csrc/reparam/reparam_math.h); x, mu, logvar are already in the compute type.


@triton.jit
def _kl_term(mu, logvar):
    return 0.5 * (mu * mu + exp_t(logvar) - 1.0 - logvar)


@triton.jit
def _log_prob_term(z, mu, logvar, HAS_MU: tl.constexpr, HAS_LV: tl.constexpr):
    """log N(z; mu, exp(logvar)); a missing mu or logvar is 0 (log N(z; 0, 1) when both are)."""
    if HAS_MU:
        d = z - mu
    else:
        d = z
    if HAS_LV:
        t = -0.5 * (LOG_2PI + logvar + d * d * exp_t(-logvar))
    else:
        t = -0.5 * (LOG_2PI + d * d)
    return t


@triton.jit
def _log_prob_grad(z, mu, logvar, HAS_MU: tl.constexpr, HAS_LV: tl.constexpr):
    """(d/dz, d/dlogvar) of _log_prob_term: -(z - mu) e^-logvar and ((z - mu)^2 e^-logvar - 1) / 2."""
    if HAS_MU:
        d = z - mu
    else:
        d = z
    if HAS_LV:
        precision = exp_t(-logvar)
        dz = -d * precision
        dlogvar = 0.5 * (d * d * precision - 1.0)
    else:
        dz = -d
        dlogvar = 0.5 * (d * d - 1.0)
    return dz, dlogvar


@triton.jit
def _iwae_latent_term(z, mu, logvar):
    """log p(z) - log q(z | x) of one element; the log(2 pi) terms cancel."""
    d = z - mu
    return 0.5 * (logvar + d * d * exp_t(-logvar) - z * z)


@triton.jit
def _iwae_latent_grad(z, mu, logvar):
    d = z - mu
    precision = exp_t(-logvar)
    return d * precision - z, -d * precision, 0.5 * (1.0 - d * d * precision)


# --------------------------------------------------------------------------------------------------
# Tiling helpers


@triton.jit
def _rows(outer, inner, BLOCK_R: tl.constexpr, INNER_ONE: tl.constexpr):
    """This program's rows (o, i) of an (outer, dim, inner) reduction: (o, i, mask), all [BLOCK_R]."""
    pid = tl.program_id(0).to(tl.int64)
    lanes = tl.arange(0, BLOCK_R).to(tl.int64)
    if INNER_ONE:
        o = pid * BLOCK_R + lanes
        i = tl.zeros([BLOCK_R], tl.int64)
        mask = o < outer
    else:
        blocks_per_o = tl.cdiv(inner, BLOCK_R)
        o = tl.zeros([BLOCK_R], tl.int64) + pid // blocks_per_o
        i = (pid % blocks_per_o) * BLOCK_R + lanes
        mask = i < inner
    return o, i, mask


@triton.jit
def _tile(base, rmask, d0, dim, inner, BLOCK_D: tl.constexpr, INNER_ONE: tl.constexpr):
    """Offsets and mask of the [BLOCK_D, BLOCK_R] tile d0 .. d0 + BLOCK_D - 1 of rows at `base`."""
    d = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
    if INNER_ONE:
        offs = base[None, :] + d[:, None]  # stride 1 along d, spelled out for the compiler
    else:
        offs = base[None, :] + d[:, None] * inner
    return offs, rmask[None, :] & (d < dim)[:, None]


def _reduce_config(outer, dim, inner, random=False):
    """(grid, BLOCK_R, BLOCK_D, INNER_ONE) for an (outer, dim, inner) reduction tiled as in the docstring.

    random: the kernel draws normals per element (smaller tiles)."""
    tile = TILE // RANDOM_SHRINK if random else TILE
    if inner == 1:
        block_d = min(triton.next_power_of_2(max(dim, 1)), 512)
        block_r = min(triton.next_power_of_2(outer), max(1, tile // block_d))
        grid = (triton.cdiv(outer, block_r),)
    else:
        block_r = min(triton.next_power_of_2(inner), 256)
        block_d = min(triton.next_power_of_2(max(dim, 1)), max(1, tile // block_r))
        grid = (outer * triton.cdiv(inner, block_r),)
    return grid, block_r, block_d, inner == 1


# --------------------------------------------------------------------------------------------------
# sample: z[k, j] = mu[j] + exp(logvar[j] / 2) * eps[k, j]


@triton.jit(do_not_specialize=KEY_ARGS)
def _sample_kernel(
    mu_ptr,
    lv_ptr,
    eps_ptr,
    z_ptr,
    n,
    total,
    seed_lo,
    seed_hi,
    off_lo,
    off_hi,
    ONE_SAMPLE: tl.constexpr,
    HAS_EPS: tl.constexpr,
    CT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    start = pid * BLOCK  # flat index k * n + j of z, which is also its stream index
    offs = start + tl.arange(0, BLOCK)
    mask = offs < total
    if ONE_SAMPLE:
        j = offs  # skip the 64-bit modulo (a slow software sequence on GPUs)
    else:
        j = offs % n
    mu = tl.load(mu_ptr + j, mask=mask).to(CT)
    lv = tl.load(lv_ptr + j, mask=mask).to(CT)
    if HAS_EPS:
        eps = tl.load(eps_ptr + offs, mask=mask).to(CT)
    else:
        eps = stream_normals_run(seed_lo, seed_hi, off_lo, off_hi, start, BLOCK).to(CT)
    z = mu + exp_t(0.5 * lv) * eps
    tl.store(z_ptr + offs, to_dtype(z, z_ptr.dtype.element_ty), mask=mask)


def sample(mu, logvar, eps, z, seed, offset):
    """z[k, j] = mu[j] + exp(logvar[j] / 2) * eps[k, j]; eps (z's shape) from the stream when None.

    n = mu.numel(), samples = z.numel() // n; element (k, j) uses stream element k * n + j."""
    check(mu.dtype, mu=mu, logvar=logvar, eps=eps, z=z)
    n, total = mu.numel(), z.numel()
    if n == 0 or total == 0:
        return z
    grid = (triton.cdiv(total, BLOCK),)
    launch(
        _sample_kernel,
        grid,
        mu,
        logvar,
        eps if eps is not None else z,
        z,
        n,
        total,
        *key_args(seed, offset),
        ONE_SAMPLE=total == n,
        HAS_EPS=eps is not None,
        CT=compute_type(mu),
        BLOCK=BLOCK,
    )
    return z


@triton.jit(do_not_specialize=KEY_ARGS)
def _sample_backward_kernel(
    gz_ptr,
    lv_ptr,
    eps_ptr,
    gmu_ptr,
    glv_ptr,
    n,
    samples,
    seed_lo,
    seed_hi,
    off_lo,
    off_hi,
    HAS_EPS: tl.constexpr,
    CT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    j = pid * BLOCK + tl.arange(0, BLOCK)
    mask = j < n
    lv = tl.load(lv_ptr + j, mask=mask).to(CT)
    half_sigma = 0.5 * exp_t(0.5 * lv)  # the first two factors of gk::reparam::sample_dlogvar
    acc_mu = tl.zeros([BLOCK], CT)
    acc_lv = tl.zeros([BLOCK], CT)
    idx = j  # k * n + j, advanced by n per sample
    for _ in range(samples):
        g = tl.load(gz_ptr + idx, mask=mask).to(CT)
        if HAS_EPS:
            eps = tl.load(eps_ptr + idx, mask=mask).to(CT)
        else:
            # idx is not a run of whole Philox blocks unless n % 4 == 0: regenerate per element
            eps = stream_normal(seed_lo, seed_hi, off_lo, off_hi, idx).to(CT)
        acc_mu += g
        acc_lv += g * (half_sigma * eps)
        idx += n
    tl.store(gmu_ptr + j, to_dtype(acc_mu, gmu_ptr.dtype.element_ty), mask=mask)
    tl.store(glv_ptr + j, to_dtype(acc_lv, glv_ptr.dtype.element_ty), mask=mask)


def sample_backward(grad_z, mu, logvar, eps, grad_mu, grad_logvar, seed, offset):
    """grad_mu[j] = sum_k grad_z[k, j]; grad_logvar[j] = sum_k grad_z[k, j] * exp(logvar[j] / 2) * eps[k, j] / 2.

    eps None: regenerated from (seed, offset) exactly as sample() drew it."""
    check(mu.dtype, grad_z=grad_z, mu=mu, logvar=logvar, eps=eps, grad_mu=grad_mu, grad_logvar=grad_logvar)
    n = mu.numel()
    if n == 0:
        return grad_mu, grad_logvar
    samples = grad_z.numel() // n
    block = BLOCK // RANDOM_SHRINK if eps is None else BLOCK
    grid = (triton.cdiv(n, block),)
    launch(
        _sample_backward_kernel,
        grid,
        grad_z,
        logvar,
        eps if eps is not None else grad_z,
        grad_mu,
        grad_logvar,
        n,
        samples,
        *key_args(seed, offset),
        HAS_EPS=eps is not None,
        CT=compute_type(mu),
        BLOCK=block,
    )
    return grad_mu, grad_logvar


# --------------------------------------------------------------------------------------------------
# kl[o, i] = sum_d 0.5 * (mu^2 + exp(logvar) - 1 - logvar), and the fused sample + kl


@triton.jit(do_not_specialize=KEY_ARGS)
def _sample_kl_kernel(
    mu_ptr,
    lv_ptr,
    eps_ptr,
    z_ptr,
    kl_ptr,
    outer,
    dim,
    inner,
    seed_lo,
    seed_hi,
    off_lo,
    off_hi,
    WRITE_Z: tl.constexpr,
    HAS_EPS: tl.constexpr,
    CT: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    INNER_ONE: tl.constexpr,
):
    """kl over dim for this program's rows, and (WRITE_Z) z = sample with one draw at the same time."""
    o, i, rmask = _rows(outer, inner, BLOCK_R, INNER_ONE)
    base = o * dim * inner + i
    acc = tl.zeros([BLOCK_D, BLOCK_R], CT)
    for d0 in range(0, dim, BLOCK_D):
        offs, mask = _tile(base, rmask, d0, dim, inner, BLOCK_D, INNER_ONE)
        mu = tl.load(mu_ptr + offs, mask=mask).to(CT)
        lv = tl.load(lv_ptr + offs, mask=mask).to(CT)
        if WRITE_Z:
            if HAS_EPS:
                eps = tl.load(eps_ptr + offs, mask=mask).to(CT)
            else:
                # the flat offset is the stream index; a tile row is not whole Philox blocks in general
                eps = stream_normal(seed_lo, seed_hi, off_lo, off_hi, offs).to(CT)
            # gk::reparam::sample_and_kl: one exp serves z and the KL term (sigma^2 for exp(logvar))
            sigma = exp_t(0.5 * lv)
            z = mu + sigma * eps
            tl.store(z_ptr + offs, to_dtype(z, z_ptr.dtype.element_ty), mask=mask)
            term = 0.5 * (mu * mu + sigma * sigma - 1.0 - lv)
        else:
            term = _kl_term(mu, lv)
        acc += tl.where(mask, term, 0.0)
    tl.store(kl_ptr + o * inner + i, to_dtype(tl.sum(acc, axis=0), kl_ptr.dtype.element_ty), mask=rmask)


def kl(mu, logvar, kl, outer, dim, inner):
    """kl[o, i] = sum_d KL(N(mu, exp(logvar)) || N(0, 1)) of element (o, d, i). dim == 0 writes zeros."""
    check(mu.dtype, mu=mu, logvar=logvar, kl=kl)
    if outer * inner == 0:
        return kl
    grid, block_r, block_d, inner_one = _reduce_config(outer, dim, inner)
    launch(
        _sample_kl_kernel,
        grid,
        mu,
        logvar,
        mu,
        kl,
        kl,
        outer,
        dim,
        inner,
        *key_args(0, 0),
        WRITE_Z=False,
        HAS_EPS=False,
        CT=compute_type(mu),
        BLOCK_R=block_r,
        BLOCK_D=block_d,
        INNER_ONE=inner_one,
    )
    return kl


def sample_kl(mu, logvar, eps, z, kl, outer, dim, inner, seed, offset):
    """z as sample() with one draw (stream index = flat index o*dim*inner + d*inner + i) and kl as kl()."""
    check(mu.dtype, mu=mu, logvar=logvar, eps=eps, z=z, kl=kl)
    if outer * inner == 0:
        return z, kl
    grid, block_r, block_d, inner_one = _reduce_config(outer, dim, inner, random=eps is None)
    launch(
        _sample_kl_kernel,
        grid,
        mu,
        logvar,
        eps if eps is not None else mu,
        z,
        kl,
        outer,
        dim,
        inner,
        *key_args(seed, offset),
        WRITE_Z=True,
        HAS_EPS=eps is not None,
        CT=compute_type(mu),
        BLOCK_R=block_r,
        BLOCK_D=block_d,
        INNER_ONE=inner_one,
    )
    return z, kl


@triton.jit(do_not_specialize=KEY_ARGS)
def _sample_kl_backward_kernel(
    gz_ptr,
    gkl_ptr,
    mu_ptr,
    lv_ptr,
    eps_ptr,
    gmu_ptr,
    glv_ptr,
    outer,
    dim,
    inner,
    seed_lo,
    seed_hi,
    off_lo,
    off_hi,
    HAS_GZ: tl.constexpr,
    HAS_GKL: tl.constexpr,
    HAS_EPS: tl.constexpr,
    CT: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    INNER_ONE: tl.constexpr,
):
    """grad_mu = grad_z + grad_kl * mu; grad_logvar = grad_z * sample_dlogvar + grad_kl * kl_dlogvar."""
    o, i, rmask = _rows(outer, inner, BLOCK_R, INNER_ONE)
    base = o * dim * inner + i
    if HAS_GKL:
        gkl = tl.load(gkl_ptr + o * inner + i, mask=rmask).to(CT)[None, :]
    for d0 in range(0, dim, BLOCK_D):
        offs, mask = _tile(base, rmask, d0, dim, inner, BLOCK_D, INNER_ONE)
        lv = tl.load(lv_ptr + offs, mask=mask).to(CT)
        gmu = tl.zeros([BLOCK_D, BLOCK_R], CT)
        glv = tl.zeros([BLOCK_D, BLOCK_R], CT)
        if HAS_GZ:
            gz = tl.load(gz_ptr + offs, mask=mask).to(CT)
            if HAS_EPS:
                eps = tl.load(eps_ptr + offs, mask=mask).to(CT)
            else:
                eps = stream_normal(seed_lo, seed_hi, off_lo, off_hi, offs).to(CT)
            gmu += gz
            glv += gz * (0.5 * exp_t(0.5 * lv) * eps)
        if HAS_GKL:
            mu = tl.load(mu_ptr + offs, mask=mask).to(CT)
            gmu += gkl * mu
            glv += gkl * (0.5 * (exp_t(lv) - 1.0))
        tl.store(gmu_ptr + offs, to_dtype(gmu, gmu_ptr.dtype.element_ty), mask=mask)
        tl.store(glv_ptr + offs, to_dtype(glv, glv_ptr.dtype.element_ty), mask=mask)


def kl_backward(grad_kl, mu, logvar, grad_mu, grad_logvar, outer, dim, inner):
    """grad_mu = grad_kl[o, i] * mu; grad_logvar = grad_kl[o, i] * (exp(logvar) - 1) / 2, at mu's shape."""
    check(mu.dtype, grad_kl=grad_kl, mu=mu, logvar=logvar, grad_mu=grad_mu, grad_logvar=grad_logvar)
    return _sample_kl_backward(None, grad_kl, mu, logvar, None, grad_mu, grad_logvar, outer, dim, inner, 0, 0)


def sample_kl_backward(grad_z, grad_kl, mu, logvar, eps, grad_mu, grad_logvar, outer, dim, inner, seed, offset):
    """Gradients of sample_kl: grad_z / grad_kl None mean that output was unused (zero gradient)."""
    check(
        mu.dtype,
        grad_z=grad_z,
        grad_kl=grad_kl,
        mu=mu,
        logvar=logvar,
        eps=eps,
        grad_mu=grad_mu,
        grad_logvar=grad_logvar,
    )
    return _sample_kl_backward(grad_z, grad_kl, mu, logvar, eps, grad_mu, grad_logvar, outer, dim, inner, seed, offset)


def _sample_kl_backward(grad_z, grad_kl, mu, logvar, eps, grad_mu, grad_logvar, outer, dim, inner, seed, offset):
    if outer * dim * inner == 0:
        return grad_mu, grad_logvar
    random = grad_z is not None and eps is None
    grid, block_r, block_d, inner_one = _reduce_config(outer, dim, inner, random=random)
    launch(
        _sample_kl_backward_kernel,
        grid,
        grad_z if grad_z is not None else mu,
        grad_kl if grad_kl is not None else mu,
        mu,
        logvar,
        eps if eps is not None else mu,
        grad_mu,
        grad_logvar,
        outer,
        dim,
        inner,
        *key_args(seed, offset),
        HAS_GZ=grad_z is not None,
        HAS_GKL=grad_kl is not None,
        HAS_EPS=eps is not None,
        CT=compute_type(mu),
        BLOCK_R=block_r,
        BLOCK_D=block_d,
        INNER_ONE=inner_one,
    )
    return grad_mu, grad_logvar


# --------------------------------------------------------------------------------------------------
# log_prob: out[o, i] = sum_d log N(z[o, d, i]; mu, exp(logvar)), parameters at [o % param_outer, d, i]


@triton.jit
def _log_prob_kernel(
    z_ptr,
    mu_ptr,
    lv_ptr,
    out_ptr,
    outer,
    dim,
    inner,
    param_outer,
    HAS_MU: tl.constexpr,
    HAS_LV: tl.constexpr,
    CT: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    INNER_ONE: tl.constexpr,
):
    o, i, rmask = _rows(outer, inner, BLOCK_R, INNER_ONE)
    base = o * dim * inner + i
    pbase = (o % param_outer) * dim * inner + i
    acc = tl.zeros([BLOCK_D, BLOCK_R], CT)
    for d0 in range(0, dim, BLOCK_D):
        offs, mask = _tile(base, rmask, d0, dim, inner, BLOCK_D, INNER_ONE)
        poffs, _ = _tile(pbase, rmask, d0, dim, inner, BLOCK_D, INNER_ONE)
        z = tl.load(z_ptr + offs, mask=mask).to(CT)
        mu = z  # a value of the right type; the term ignores it when the parameter is absent
        lv = z
        if HAS_MU:
            mu = tl.load(mu_ptr + poffs, mask=mask).to(CT)
        if HAS_LV:
            lv = tl.load(lv_ptr + poffs, mask=mask).to(CT)
        acc += tl.where(mask, _log_prob_term(z, mu, lv, HAS_MU, HAS_LV), 0.0)
    tl.store(out_ptr + o * inner + i, to_dtype(tl.sum(acc, axis=0), out_ptr.dtype.element_ty), mask=rmask)


def log_prob(z, mu, logvar, out, outer, dim, inner, param_outer):
    """out[o, i] = sum_d log N(z[o, d, i]; mu, exp(logvar)); mu, logvar (None: 0) at [o % param_outer, d, i]."""
    check(z.dtype, z=z, mu=mu, logvar=logvar, out=out)
    if outer * inner == 0:
        return out
    grid, block_r, block_d, inner_one = _reduce_config(outer, dim, inner)
    launch(
        _log_prob_kernel,
        grid,
        z,
        mu if mu is not None else z,
        logvar if logvar is not None else z,
        out,
        outer,
        dim,
        inner,
        max(int(param_outer), 1),
        HAS_MU=mu is not None,
        HAS_LV=logvar is not None,
        CT=compute_type(z),
        BLOCK_R=block_r,
        BLOCK_D=block_d,
        INNER_ONE=inner_one,
    )
    return out


@triton.jit
def _log_prob_backward_kernel(
    g_ptr,
    z_ptr,
    mu_ptr,
    lv_ptr,
    gz_ptr,
    glv_ptr,
    outer,
    dim,
    inner,
    param_outer,
    HAS_MU: tl.constexpr,
    HAS_LV: tl.constexpr,
    HAS_GLV: tl.constexpr,
    CT: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    INNER_ONE: tl.constexpr,
):
    o, i, rmask = _rows(outer, inner, BLOCK_R, INNER_ONE)
    base = o * dim * inner + i
    pbase = (o % param_outer) * dim * inner + i
    g = tl.load(g_ptr + o * inner + i, mask=rmask).to(CT)[None, :]
    for d0 in range(0, dim, BLOCK_D):
        offs, mask = _tile(base, rmask, d0, dim, inner, BLOCK_D, INNER_ONE)
        poffs, _ = _tile(pbase, rmask, d0, dim, inner, BLOCK_D, INNER_ONE)
        z = tl.load(z_ptr + offs, mask=mask).to(CT)
        mu = z
        lv = z
        if HAS_MU:
            mu = tl.load(mu_ptr + poffs, mask=mask).to(CT)
        if HAS_LV:
            lv = tl.load(lv_ptr + poffs, mask=mask).to(CT)
        dz, dlv = _log_prob_grad(z, mu, lv, HAS_MU, HAS_LV)
        tl.store(gz_ptr + offs, to_dtype(g * dz, gz_ptr.dtype.element_ty), mask=mask)
        if HAS_GLV:
            tl.store(glv_ptr + offs, to_dtype(g * dlv, glv_ptr.dtype.element_ty), mask=mask)


def log_prob_backward(grad_out, z, mu, logvar, grad_z, grad_logvar, outer, dim, inner, param_outer):
    """Per-element gradients at z's shape: grad_z = g * d/dz and (when not None) grad_logvar = g * d/dlogvar.

    d/dmu = -grad_z; the caller sums over broadcast dimensions."""
    check(z.dtype, grad_out=grad_out, z=z, mu=mu, logvar=logvar, grad_z=grad_z, grad_logvar=grad_logvar)
    if outer * dim * inner == 0:
        return grad_z, grad_logvar
    grid, block_r, block_d, inner_one = _reduce_config(outer, dim, inner)
    launch(
        _log_prob_backward_kernel,
        grid,
        grad_out,
        z,
        mu if mu is not None else z,
        logvar if logvar is not None else z,
        grad_z,
        grad_logvar if grad_logvar is not None else grad_z,
        outer,
        dim,
        inner,
        max(int(param_outer), 1),
        HAS_MU=mu is not None,
        HAS_LV=logvar is not None,
        HAS_GLV=grad_logvar is not None,
        CT=compute_type(z),
        BLOCK_R=block_r,
        BLOCK_D=block_d,
        INNER_ONE=inner_one,
    )
    return grad_z, grad_logvar


# --------------------------------------------------------------------------------------------------
# IWAE: log_w[k, b] = log_px_z[k, b] + sum_d latent(z[k, b, d]); bound[b] = logsumexp_k log_w - log K


@triton.jit(do_not_specialize=["samples"])
def _iwae_kernel(
    lpx_ptr,
    z_ptr,
    mu_ptr,
    lv_ptr,
    bound_ptr,
    lw_ptr,
    samples,
    batch,
    dim,
    CT: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    b = pid * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    bmask = b < batch
    m = tl.full([BLOCK_B], float("-inf"), CT)  # running max of log_w over k
    s = tl.zeros([BLOCK_B], CT)  # running sum of exp(log_w - m)
    row = b  # k * batch + b, advanced by batch per sample
    for _ in range(samples):
        acc = tl.zeros([BLOCK_D, BLOCK_B], CT)
        for d0 in range(0, dim, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
            mask = bmask[None, :] & (d < dim)[:, None]
            poffs = b[None, :] * dim + d[:, None]
            z = tl.load(z_ptr + row[None, :] * dim + d[:, None], mask=mask).to(CT)
            mu = tl.load(mu_ptr + poffs, mask=mask).to(CT)
            lv = tl.load(lv_ptr + poffs, mask=mask).to(CT)
            acc += tl.where(mask, _iwae_latent_term(z, mu, lv), 0.0)
        lw = tl.load(lpx_ptr + row, mask=bmask).to(CT) + tl.sum(acc, axis=0)
        tl.store(lw_ptr + row, to_dtype(lw, lw_ptr.dtype.element_ty), mask=bmask)
        # Streaming logsumexp. NaN poisons the max (and so the bound), as in torch.logsumexp; while the max
        # is -inf, shift by 0 so that no inf - inf appears.
        m_new = tl.maximum(m, lw, propagate_nan=tl.PropagateNan.ALL)
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * exp_t(m - shift) + exp_t(lw - shift)
        m = m_new
        row += batch
    # A max of -inf (all weights -inf), +inf or NaN is the bound itself, as logsumexp gives.
    finite = tl.abs(m) < float("inf")
    log_s = log_t(tl.where(finite, s, 1.0))  # s >= 1 when finite; log_t needs a positive argument
    bound = tl.where(finite, m + log_s - log_t(samples.to(CT)), m)
    tl.store(bound_ptr + b, to_dtype(bound, bound_ptr.dtype.element_ty), mask=bmask)


def _iwae_shape(z):
    if z.dim() != 3:
        raise ValueError(f"z must be (K, B, D), got {tuple(z.shape)}")
    return z.shape


def iwae(log_px_z, z, mu, logvar, bound, log_w):
    """IWAE bound: log_px_z (K, B), z (K, B, D), mu and logvar (B, D) -> bound (B,), log_w (K, B)."""
    check(z.dtype, log_px_z=log_px_z, z=z, mu=mu, logvar=logvar, bound=bound, log_w=log_w)
    samples, batch, dim = _iwae_shape(z)
    if batch == 0:
        return bound, log_w
    if samples == 0:
        raise ValueError("iwae needs at least one sample")
    block_d = min(triton.next_power_of_2(max(dim, 1)), 512)
    block_b = min(triton.next_power_of_2(batch), max(1, TILE // block_d))
    grid = (triton.cdiv(batch, block_b),)
    launch(
        _iwae_kernel,
        grid,
        log_px_z,
        z,
        mu,
        logvar,
        bound,
        log_w,
        samples,
        batch,
        dim,
        CT=compute_type(z),
        BLOCK_B=block_b,
        BLOCK_D=block_d,
    )
    return bound, log_w


@triton.jit(do_not_specialize=["samples"])
def _iwae_backward_kernel(
    gb_ptr,
    lw_ptr,
    bound_ptr,
    z_ptr,
    mu_ptr,
    lv_ptr,
    glpx_ptr,
    gz_ptr,
    gmu_ptr,
    glv_ptr,
    samples,
    batch,
    dim,
    d_blocks,
    CT: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """A program owns a [BLOCK_D, BLOCK_B] tile of (b, d) and walks k; the d-tile 0 programs write
    grad_log_px_z (with dim == 0 there is one, empty, d-tile per b-tile)."""
    pid = tl.program_id(0).to(tl.int64)
    pid_b = pid // d_blocks
    pid_d = pid % d_blocks
    b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
    bmask = b < batch
    first_d = bmask & (tl.zeros([BLOCK_B], tl.int64) + pid_d == 0)  # these programs write grad_log_px_z
    mask = bmask[None, :] & (d < dim)[:, None]
    poffs = b[None, :] * dim + d[:, None]
    mu = tl.load(mu_ptr + poffs, mask=mask).to(CT)
    lv = tl.load(lv_ptr + poffs, mask=mask).to(CT)
    gb = tl.load(gb_ptr + b, mask=bmask).to(CT)
    # w = softmax_k log_w, shifted by its maximum and normalised by its own sum (as gk::reparam::softmax_weight:
    # exp(log_w - bound - log K) from the rounded bound does not sum to 1 at |log w| ~ 1e7 in float32)
    w_max = tl.full([BLOCK_B], float("-inf"), CT)
    row = b
    for _ in range(samples):
        lw = tl.load(lw_ptr + row, mask=bmask, other=0.0).to(CT)
        w_max = tl.where((lw > w_max) | (lw != lw), lw, w_max)
        row += batch
    w_sum = tl.zeros([BLOCK_B], CT)
    row = b
    for _ in range(samples):
        lw = tl.load(lw_ptr + row, mask=bmask, other=0.0).to(CT)
        w_sum += exp_t(lw - w_max)
        row += batch
    acc_mu = tl.zeros([BLOCK_D, BLOCK_B], CT)
    acc_lv = tl.zeros([BLOCK_D, BLOCK_B], CT)
    row = b
    for _ in range(samples):
        lw = tl.load(lw_ptr + row, mask=bmask).to(CT)
        gw = gb * (exp_t(lw - w_max) / w_sum)
        tl.store(glpx_ptr + row, to_dtype(gw, glpx_ptr.dtype.element_ty), mask=first_d)
        offs = row[None, :] * dim + d[:, None]
        z = tl.load(z_ptr + offs, mask=mask).to(CT)
        dz, dmu, dlv = _iwae_latent_grad(z, mu, lv)
        gw2 = gw[None, :]
        tl.store(gz_ptr + offs, to_dtype(gw2 * dz, gz_ptr.dtype.element_ty), mask=mask)
        acc_mu += gw2 * dmu
        acc_lv += gw2 * dlv
        row += batch
    tl.store(gmu_ptr + poffs, to_dtype(acc_mu, gmu_ptr.dtype.element_ty), mask=mask)
    tl.store(glv_ptr + poffs, to_dtype(acc_lv, glv_ptr.dtype.element_ty), mask=mask)


def iwae_backward(grad_bound, log_w, bound, z, mu, logvar, grad_log_px_z, grad_z, grad_mu, grad_logvar):
    """With w[k, b] = softmax_k log_w (bound is not needed): grad_log_px_z = g_b w, grad_z = g_b w d(latent)/dz,
    grad_mu and grad_logvar = sum_k g_b w d(latent)/d(mu, logvar)."""
    check(
        z.dtype,
        grad_bound=grad_bound,
        log_w=log_w,
        bound=bound,
        z=z,
        mu=mu,
        logvar=logvar,
        grad_log_px_z=grad_log_px_z,
        grad_z=grad_z,
        grad_mu=grad_mu,
        grad_logvar=grad_logvar,
    )
    samples, batch, dim = _iwae_shape(z)
    if batch == 0 or samples == 0:
        return grad_log_px_z, grad_z, grad_mu, grad_logvar
    # half-size tiles: mu, logvar and two accumulators stay live across the k loop (~175 registers at
    # 16 elements a thread on sm_90, ~96 at 8)
    block_d = min(triton.next_power_of_2(max(dim, 1)), 256)
    block_b = min(triton.next_power_of_2(batch), max(1, TILE // 2 // block_d))
    d_blocks = max(1, triton.cdiv(dim, block_d))
    grid = (triton.cdiv(batch, block_b) * d_blocks,)
    launch(
        _iwae_backward_kernel,
        grid,
        grad_bound,
        log_w,
        bound,
        z,
        mu,
        logvar,
        grad_log_px_z,
        grad_z,
        grad_mu,
        grad_logvar,
        samples,
        batch,
        dim,
        d_blocks,
        CT=compute_type(z),
        BLOCK_B=block_b,
        BLOCK_D=block_d,
    )
    return grad_log_px_z, grad_z, grad_mu, grad_logvar
