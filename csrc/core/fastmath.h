// Branch-free float32 elementary functions shared by the CPU and CUDA kernels.
//
// Why our own: the CPU kernels must auto-vectorise (libm calls block that without -ffast-math), and CPU and
// GPU must produce the same bits. Every polynomial uses explicit fmaf and both sides compile with FP
// contraction off, so the CPU tests check exactly what the GPU computes. Accuracy: a few ulp.
#pragma once
#include <cmath>
#include "core/macros.h"

namespace gk {

GK_HD float fma32(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return fmaf(a, b, c);
#else
  return __builtin_fmaf(a, b, c);
#endif
}

// log(1 + f) + e*ln2 for f in [sqrt(1/2) - 1, sqrt(2) - 1] (Cephes logf polynomial, ~1 ulp).
GK_HD float log_core(float f, float e) {
  const float z = f * f;
  float p = 7.0376836292e-2f;
  p = fma32(p, f, -1.1514610310e-1f);
  p = fma32(p, f, 1.1676998740e-1f);
  p = fma32(p, f, -1.2420140846e-1f);
  p = fma32(p, f, 1.4249322787e-1f);
  p = fma32(p, f, -1.6668057665e-1f);
  p = fma32(p, f, 2.0000714765e-1f);
  p = fma32(p, f, -2.4999993993e-1f);
  p = fma32(p, f, 3.3333331174e-1f);
  float y = p * f * z;
  y = fma32(e, -2.12194440e-4f, y);
  y = fma32(z, -0.5f, y);
  return fma32(e, 0.693359375f, f + y);
}

// log x = log(1 + f) + e ln2 with 1 + f in [sqrt(1/2), sqrt(2)): the reduction of a positive, normal float.
struct LogArg {
  float f, e;
};

GK_HD LogArg log_reduce(float x) {
  const uint32_t bits = float_to_bits(x);
  const float m = bits_to_float((bits & 0x007fffffu) | 0x3f800000u);  // [1, 2)
  const bool big = m > 1.41421356f;
  // Selects of plain values only (no calls in either arm), so the vectoriser can if-convert.
  const float m_reduced = big ? 0.5f * m : m;  // exact
  const int32_t e = static_cast<int32_t>(bits >> 23) - 127 + (big ? 1 : 0);
  return LogArg{m_reduced - 1.0f, static_cast<float>(e)};
}

// Natural log of a positive, normal, finite float.
GK_HD float log(float x) {
  const LogArg a = log_reduce(x);
  return log_core(a.f, a.e);
}

// log(((k + 0.5) * 2^-24)) for a 24-bit k: the log of a genkern uniform, evaluated on the exact value.
// Above 1/2 the uniform has no float32 representation, but 1 - u does, so log1p(-(1 - u)) is used there.
GK_HD float log_uniform24(uint32_t k) {
  const bool upper = k >= (1u << 23);
  const float w = static_cast<float>(2u * ((1u << 24) - k) - 1u) * 0x1p-25f;  // 1 - u, exact (upper only)
  const bool near_one = w <= 0.29289321881f;
  const float f_upper = near_one ? -w : 1.0f - 2.0f * w;  // exact either way
  const float e_upper = near_one ? 0.0f : -1.0f;
  const LogArg lower = log_reduce(static_cast<float>(2u * k + 1u) * 0x1p-25f);  // u exact below 1/2
  return log_core(upper ? f_upper : lower.f, upper ? e_upper : lower.e);
}

// e^x for float32, correct overflow to inf, gradual underflow, NaN preserved (Cephes expf polynomial).
GK_HD float exp(float x) {
  float xc = x > 88.8f ? 88.8f : x;
  xc = xc < -104.0f ? -104.0f : xc;
  const float n = floorf(fma32(xc, 1.44269504088896341f, 0.5f));
  float r = fma32(n, -0.693359375f, xc);
  r = fma32(n, 2.12194440e-4f, r);
  float p = 1.9875691500e-4f;
  p = fma32(p, r, 1.3981999507e-3f);
  p = fma32(p, r, 8.3334519073e-3f);
  p = fma32(p, r, 4.1665795894e-2f);
  p = fma32(p, r, 1.6666665459e-1f);
  p = fma32(p, r, 5.0000001201e-1f);
  const float y = fma32(p, r * r, r) + 1.0f;
  // 2^n in two factors so that n in [-150, 128] needs no special cases.
  const int32_t n1 = static_cast<int32_t>(n * 0.5f);
  const int32_t n2 = static_cast<int32_t>(n) - n1;
  const float s1 = bits_to_float(static_cast<uint32_t>(n1 + 127) << 23);
  const float s2 = bits_to_float(static_cast<uint32_t>(n2 + 127) << 23);
  const float result = y * s1 * s2;
  return x != x ? x : result;
}

GK_HD double exp(double x) { return ::exp(x); }
GK_HD double log(double x) { return ::log(x); }

struct SinCos {
  float sin, cos;
};

// sin(2*pi*u) and cos(2*pi*u) for the genkern uniform u = (k + 0.5) * 2^-24, k a 24-bit integer.
// The quadrant and the reduced argument come from k in exact integer arithmetic.
GK_HD SinCos sincos_2pi_uniform24(uint32_t k) {
  const uint32_t q = (k + (1u << 21)) >> 22;  // nearest multiple of pi/2, 0..4
  const int32_t j = static_cast<int32_t>(k) - static_cast<int32_t>(q << 22);
  const float r = static_cast<float>(2 * j + 1) * 0x1p-24f;  // angle = pi * (r + q/2), |r| <= 1/4
  const float s = r * r;
  float ps = 8.099576830863953e-2f;
  ps = fma32(ps, s, -5.992013216018677e-1f);
  ps = fma32(ps, s, 2.5501625537872314f);
  ps = fma32(ps, s, -5.167712688446045f);
  ps = fma32(ps, s, 3.1415927410125732f);
  const float sin_r = ps * r;
  float pc = -2.5447407737374306e-2f;
  pc = fma32(pc, s, 2.3530541360378265e-1f);
  pc = fma32(pc, s, -1.3352619409561157f);
  pc = fma32(pc, s, 4.058712005615234f);
  pc = fma32(pc, s, -4.934802055358887f);
  const float cos_r = fma32(pc, s, 1.0f);
  const uint32_t quadrant = q & 3u;
  const bool swap = quadrant & 1u;
  const float s0 = swap ? cos_r : sin_r;
  const float c0 = swap ? sin_r : cos_r;
  const bool neg_sin = quadrant >= 2u;
  const bool neg_cos = quadrant == 1u || quadrant == 2u;
  return SinCos{neg_sin ? -s0 : s0, neg_cos ? -c0 : c0};
}

}  // namespace gk
