"""The genkern random stream (docs/math.md, section 1) in Triton, plus the float32 math it needs.

Everything here reproduces csrc/core/{philox,fastmath,normal}.h operation for operation, so the
Triton, CPU and CUDA backends give the same bits:

* Philox4x32-10 with counter = (lo32(block), hi32(block), lo32(offset), hi32(offset)),
  key = (lo32(seed), hi32(seed)); element i of a stream is lane i % 4 of block i // 4.
* Normals by Box-Muller on lane pairs (0, 1) and (2, 3), with gk::log_uniform24 and
  gk::sincos_2pi_uniform24 ported exactly (same integer reductions, same polynomials, explicit fma).
* exp_f32 / log_f32 are gk::exp / gk::log (Cephes), not tl.exp / tl.log, so all backends agree to the ulp.
  (float64 has no port: gk::exp(double) is libm's exp, here tl.exp, i.e. libdevice on GPUs and numpy under
  the interpreter, which differs from glibc by an ulp now and then.)

Kernels are launched with enable_fp_fusion=False: the C++ side compiles with FP contraction off, and a
fused multiply-add that the C++ does not do would change the last bit.

Seeds and offsets are Python ints in [0, 2^64). They travel to the kernels as four int32 arguments
(the two 32-bit halves of each, reinterpreted as signed) that are never specialised, so every seed uses
the same compiled kernel and no 64-bit value meets Triton's int64/uint64 argument typing.
"""

import triton
import triton.language as tl

# Philox4x32 round constants (Salmon et al., SC'11).
PHILOX_M0 = tl.constexpr(0xD2511F53)
PHILOX_M1 = tl.constexpr(0xCD9E8D57)
PHILOX_W0 = tl.constexpr(0x9E3779B9)
PHILOX_W1 = tl.constexpr(0xBB67AE85)

TWO_M24 = tl.constexpr(2.0**-24)  # 0x1p-24f
TWO_M25 = tl.constexpr(2.0**-25)  # 0x1p-25f

# Elements per program of the elementwise stream kernels (a multiple of 4: whole Philox blocks).
BLOCK = 1024
NUM_WARPS = 4

# The kernels' key arguments, int32 halves of seed and offset (see key_args): never specialised.
KEY_ARGS = ["seed_lo", "seed_hi", "off_lo", "off_hi"]


# --------------------------------------------------------------------------------------------------
# Philox4x32-10 and the stream layout (csrc/core/philox.h)


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on uint32 counters (c0..c3) and key (k0, k1); returns the four uint32 outputs."""
    for _ in tl.static_range(10):
        # mulhilo: the 64-bit product's halves; uint32 multiply wraps to the low half.
        hi0 = tl.umulhi(c0, PHILOX_M0)
        lo0 = c0 * PHILOX_M0
        hi1 = tl.umulhi(c2, PHILOX_M1)
        lo1 = c2 * PHILOX_M1
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = k0 + PHILOX_W0
        k1 = k1 + PHILOX_W1
    return c0, c1, c2, c3


@triton.jit
def stream_block(seed_lo, seed_hi, off_lo, off_hi, block):
    """The four uint32 values of stream block `block` (an int64 tensor) for (seed, offset).

    seed_lo .. off_hi are the int32 halves passed by the wrappers (see key_args)."""
    c0 = block.to(tl.uint32)  # truncation: lo32(block)
    c1 = (block >> 32).to(tl.uint32)  # block >= 0, so the arithmetic shift is the logical one
    zero = tl.zeros(block.shape, tl.uint32)
    c2 = zero + off_lo.to(tl.uint32, bitcast=True)
    c3 = zero + off_hi.to(tl.uint32, bitcast=True)
    k0 = seed_lo.to(tl.uint32, bitcast=True)
    k1 = seed_hi.to(tl.uint32, bitcast=True)
    return philox4x32_10(c0, c1, c2, c3, k0, k1)


@triton.jit
def interleave4(x0, x1, x2, x3):
    """[x0[0], x1[0], x2[0], x3[0], x0[1], ...]: the four lanes of N blocks as 4N consecutive elements."""
    # join(a, b)[..., 0] = a: join(x0, x2)[b, j] = x_{2j}, so the outer join gives [b, j, i] = x_{2j+i}.
    t = tl.join(tl.join(x0, x2), tl.join(x1, x3))
    return tl.reshape(t, [4 * x0.shape[0]])


# --------------------------------------------------------------------------------------------------
# float32 elementary functions (csrc/core/fastmath.h)


@triton.jit
def log_core(f, e):
    """log(1 + f) + e*ln2 for f in [sqrt(1/2) - 1, sqrt(2) - 1] (Cephes logf polynomial), gk::log_core."""
    z = f * f
    p = tl.fma(7.0376836292e-2, f, -1.1514610310e-1)
    p = tl.fma(p, f, 1.1676998740e-1)
    p = tl.fma(p, f, -1.2420140846e-1)
    p = tl.fma(p, f, 1.4249322787e-1)
    p = tl.fma(p, f, -1.6668057665e-1)
    p = tl.fma(p, f, 2.0000714765e-1)
    p = tl.fma(p, f, -2.4999993993e-1)
    p = tl.fma(p, f, 3.3333331174e-1)
    y = p * f * z
    y = tl.fma(e, -2.12194440e-4, y)
    y = tl.fma(z, -0.5, y)
    return tl.fma(e, 0.693359375, f + y)


@triton.jit
def log_reduce(x):
    """(f, e) with log x = log(1 + f) + e*ln2 and 1 + f in [sqrt(1/2), sqrt(2)), for a positive normal
    float32 x (gk::log_reduce)."""
    bits = x.to(tl.uint32, bitcast=True)
    m = ((bits & 0x007FFFFF) | 0x3F800000).to(tl.float32, bitcast=True)  # [1, 2)
    big = m > 1.41421356
    m_reduced = tl.where(big, 0.5 * m, m)  # exact
    e = (bits >> 23).to(tl.int32) - 127 + big.to(tl.int32)
    return m_reduced - 1.0, e.to(tl.float32)


@triton.jit
def log_f32(x):
    """Natural log of a positive, normal, finite float32 (gk::log)."""
    f, e = log_reduce(x)
    return log_core(f, e)


@triton.jit
def log_uniform24(k):
    """log((k + 0.5) * 2^-24) for a 24-bit uint32 k, the log of a genkern uniform (gk::log_uniform24)."""
    ki = k.to(tl.int32, bitcast=True)  # < 2^24: every integer below stays in int32
    upper = ki >= (1 << 23)
    # Above 1/2 the uniform has no float32 representation but 1 - u does: log1p(-(1 - u)) there.
    w = ((1 << 25) - 2 * ki - 1).to(tl.float32) * TWO_M25  # 1 - u, exact (upper only)
    near_one = w <= 0.29289321881
    f_upper = tl.where(near_one, -w, 1.0 - 2.0 * w)  # exact either way
    e_upper = tl.where(near_one, 0.0, -1.0)
    f_lower, e_lower = log_reduce((2 * ki + 1).to(tl.float32) * TWO_M25)  # u exact below 1/2
    # One polynomial for both halves: select its arguments, not two results.
    return log_core(tl.where(upper, f_upper, f_lower), tl.where(upper, e_upper, e_lower))


@triton.jit
def sincos_2pi_uniform24(k):
    """(sin, cos) of 2*pi*u for the uniform u = (k + 0.5) * 2^-24 of a 24-bit uint32 k.

    gk::sincos_2pi_uniform24: quadrant and reduced argument come from k in exact integer arithmetic."""
    ki = k.to(tl.int32, bitcast=True)
    q = (ki + (1 << 21)) >> 22  # nearest multiple of pi/2, 0..4 (ki >= 0: arithmetic = logical shift)
    j = ki - (q << 22)
    r = (2 * j + 1).to(tl.float32) * TWO_M24  # angle = pi * (r + q/2), |r| <= 1/4
    s = r * r
    ps = tl.fma(8.099576830863953e-2, s, -5.992013216018677e-1)
    ps = tl.fma(ps, s, 2.5501625537872314)
    ps = tl.fma(ps, s, -5.167712688446045)
    ps = tl.fma(ps, s, 3.1415927410125732)
    sin_r = ps * r
    pc = tl.fma(-2.5447407737374306e-2, s, 2.3530541360378265e-1)
    pc = tl.fma(pc, s, -1.3352619409561157)
    pc = tl.fma(pc, s, 4.058712005615234)
    pc = tl.fma(pc, s, -4.934802055358887)
    cos_r = tl.fma(pc, s, 1.0)
    quadrant = q & 3
    swap = (quadrant & 1) != 0
    s0 = tl.where(swap, cos_r, sin_r)
    c0 = tl.where(swap, sin_r, cos_r)
    neg_sin = quadrant >= 2
    neg_cos = (quadrant == 1) | (quadrant == 2)
    return tl.where(neg_sin, -s0, s0), tl.where(neg_cos, -c0, c0)


@triton.jit
def exp_f32(x):
    """e^x for float32 (gk::exp, Cephes expf): overflow to inf, gradual underflow, NaN preserved."""
    xc = tl.where(x > 88.8, 88.8, x)
    xc = tl.where(xc < -104.0, -104.0, xc)
    n = tl.floor(tl.fma(xc, 1.44269504088896341, 0.5))
    r = tl.fma(n, -0.693359375, xc)
    r = tl.fma(n, 2.12194440e-4, r)
    p = tl.fma(1.9875691500e-4, r, 1.3981999507e-3)
    p = tl.fma(p, r, 8.3334519073e-3)
    p = tl.fma(p, r, 4.1665795894e-2)
    p = tl.fma(p, r, 1.6666665459e-1)
    p = tl.fma(p, r, 5.0000001201e-1)
    y = tl.fma(p, r * r, r) + 1.0
    # 2^n in two factors so that n in [-150, 128] needs no special cases. A NaN x would make n NaN, whose
    # int conversion LLVM leaves undefined: use 0 there (the final select returns x anyway).
    n = tl.where(x != x, 0.0, n)
    n1 = (n * 0.5).to(tl.int32)  # truncates toward zero, as the C++ cast
    n2 = n.to(tl.int32) - n1
    s1 = ((n1 + 127) << 23).to(tl.float32, bitcast=True)
    s2 = ((n2 + 127) << 23).to(tl.float32, bitcast=True)
    result = y * s1 * s2
    return tl.where(x != x, x, result)


@triton.jit
def exp_t(x):
    """gk::exp for the compute type: the Cephes port for float32, the libm/libdevice exp for float64."""
    if x.dtype == tl.float64:
        y = tl.exp(x)
    else:
        y = exp_f32(x)
    return y


@triton.jit
def log_t(x):
    """gk::log for the compute type (positive, finite x)."""
    if x.dtype == tl.float64:
        y = tl.log(x)
    else:
        y = log_f32(x)
    return y


@triton.jit
def to_dtype(x, dtype: tl.constexpr):
    """x (float32 or float64) rounded to nearest-even in `dtype`, for stores (float64 reaches bfloat16
    through float32; the reparam kernels never ask for that, computing in float64 only for float64 outputs).

    bfloat16 is rounded by hand: the same result as the GPU's cvt.rn.bf16.f32, but also right under
    TRITON_INTERPRET=1, whose float32 -> bfloat16 cast truncates."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16  # carries into the exponent: inf on overflow
        nan = x != x
        y = tl.where(nan, 0x7FC0, rounded).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        y = x.to(dtype)
    return y


# --------------------------------------------------------------------------------------------------
# Normals (csrc/core/normal.h)


@triton.jit
def box_muller(bits_a, bits_b):
    """Box-Muller on one lane pair: a gives the radius, b the angle. Returns (z_cos, z_sin)."""
    # sqrt_rn: the correctly rounded sqrtf of the C++ (tl.sqrt may be the approximate one on GPUs).
    radius = tl.sqrt_rn(-2.0 * log_uniform24(bits_a >> 8))
    sin_b, cos_b = sincos_2pi_uniform24(bits_b >> 8)
    return radius * cos_b, radius * sin_b


@triton.jit
def stream_normals(seed_lo, seed_hi, off_lo, off_hi, block):
    """The four float32 normals of stream blocks `block` (elements 4*block .. 4*block + 3)."""
    x0, x1, x2, x3 = stream_block(seed_lo, seed_hi, off_lo, off_hi, block)
    z0, z1 = box_muller(x0, x1)
    z2, z3 = box_muller(x2, x3)
    return z0, z1, z2, z3


@triton.jit
def stream_normal(seed_lo, seed_hi, off_lo, off_hi, idx):
    """Element idx (an int64 tensor, any layout) of the normal stream, one Box-Muller per element.

    For tiles whose elements are not runs of whole Philox blocks (gk::stream_normal)."""
    x0, x1, x2, x3 = stream_block(seed_lo, seed_hi, off_lo, off_hi, idx >> 2)
    lane = idx & 3
    first = lane < 2
    z_cos, z_sin = box_muller(tl.where(first, x0, x2), tl.where(first, x1, x3))
    return tl.where((lane & 1) != 0, z_sin, z_cos)


@triton.jit
def stream_normals_run(seed_lo, seed_hi, off_lo, off_hi, start, N: tl.constexpr):
    """Normals of stream elements start .. start + N - 1 as an [N] tensor; start % 4 == 0, N % 4 == 0.

    One Philox call and two Box-Mullers per four elements, against four of each for stream_normal."""
    block = start // 4 + tl.arange(0, N // 4).to(tl.int64)
    z0, z1, z2, z3 = stream_normals(seed_lo, seed_hi, off_lo, off_hi, block)
    return interleave4(z0, z1, z2, z3)


# --------------------------------------------------------------------------------------------------
# Host side: the key arguments


def key_args(seed, offset):
    """(seed_lo, seed_hi, offset_lo, offset_hi) as int32 values for the kernels' key arguments."""
    out = []
    for name, v in (("seed", seed), ("offset", offset)):
        v = int(v)
        if not 0 <= v < 1 << 64:
            raise ValueError(f"{name} must be in [0, 2^64), got {v}")
        for half in (v & 0xFFFFFFFF, v >> 32):
            out.append(half - (1 << 32) if half >= 1 << 31 else half)  # same bits, as int32
    return out
