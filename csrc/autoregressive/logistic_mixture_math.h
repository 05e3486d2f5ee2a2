// Per-element math of the discretised logistic mixture (PixelCNN++; docs/math.md, section 6.1), for T = float
// or double, shared by the CPU and CUDA kernels. With u = y - mu, e = e^-s, h = 1 / (L - 1):
//   p+ = e (u + h), p- = e (u - h), mid = e u;
//   log P = log sigmoid(p+) (x = 0), log sigmoid(-p-) (x = L - 1), log(max(delta, 1e-12)) if delta > 1e-5,
//   else mid - s - 2 softplus(mid) - log((L - 1) / 2);  delta = sigmoid(p+) - sigmoid(p-).
// Every sigmoid comes from one e^-|z|, so both sigmoid(z) and sigmoid(-z) are accurate in the tails, and delta
// is taken as sigmoid(-p-) - sigmoid(-p+) right of the mean (no cancellation of two numbers near 1; the same
// real number, as the reference evaluates it). Branch-free selects throughout: the CPU loops vectorise.
#pragma once
#include <cmath>
#include <cstdint>

#include "autoregressive/categorical_math.h"
#include "autoregressive/nade_math.h"
#include "core/fastmath.h"

namespace gk {
namespace mixture {

constexpr double kLogScaleMin = -7.0;
constexpr double kCdfFloor = 1e-12;
constexpr double kCdfThreshold = 1e-5;

enum Branch : int { kEdgeLow = 0, kEdgeHigh = 1, kMass = 2, kDensity = 3 };

// sigmoid(z) and sigmoid(-z) from e = e^-|z|.
template <typename T>
struct Sigmoids {
  T pos, neg;
};

template <typename T>
GK_HD Sigmoids<T> sigmoids(T z, T e) {
  const T big = T(1) / (T(1) + e), small = e / (T(1) + e);
  const bool up = z >= T(0);
  return Sigmoids<T>{up ? big : small, up ? small : big};
}

// log(arg) when `plain`, else log(1 + arg) for arg in [0, 1]; float: one Cephes polynomial on the selected
// reduced argument (nade::log1p_unit's trick: tiny arg keeps its relative accuracy).
GK_HD float log_or_log1p(bool plain, float arg) {
  const bool small = (plain ? 1.0f : arg) <= 0.41421356f;  // one compare: no bool logic in a vector loop
  const LogArg r = log_reduce(plain ? arg : 1.0f + arg);
  return log_core(small ? arg : r.f, small ? 0.0f : r.e);
}

GK_HD double log_or_log1p(bool plain, double arg) { return plain ? ::log(arg) : ::log1p(arg); }

// Constants of a call in the compute type.
template <typename T>
struct Levels {
  T scale;       // 2 / (L - 1): y = x scale - 1
  T half_bin;    // 1 / (L - 1)
  T log_width;   // log((L - 1) / 2)
  int64_t last;  // L - 1
  explicit Levels(int64_t levels)
      : scale(static_cast<T>(2.0 / static_cast<double>(levels - 1))),
        half_bin(static_cast<T>(1.0 / static_cast<double>(levels - 1))),
        log_width(static_cast<T>(std::log(static_cast<double>(levels - 1) / 2.0))),
        last(levels - 1) {}
};

template <typename T>
GK_HD T level_to_y(int64_t x, const Levels<T>& lv) {
  return static_cast<T>(x) * lv.scale - T(1);
}

// tanh for the coupling coefficients, branch-free (std::tanh does not vectorise): (1 - e) / (1 + e) with
// e = e^-2|z|, and below |z| = 1/8, where that form cancels, its Taylor series to z^7 (error < 1e-8 relative); double:
// ::tanh.
GK_HD float tanh_of(float z) {
  const float a = z < 0.0f ? -z : z;
  const float e = gk::exp(-2.0f * a);
  const float big = (1.0f - e) / (1.0f + e);
  const float q = a * a;
  const float small = a * (1.0f + q * (-1.0f / 3.0f + q * (2.0f / 15.0f + q * (-17.0f / 315.0f))));
  const float t = a < 0.125f ? small : big;
  return z < 0.0f ? -t : (z != z ? z : t);
}

GK_HD double tanh_of(double z) { return ::tanh(z); }

// s = max(log_scale, -7), and whether the gradient passes (log_scale >= -7, torch.clamp's rule).
template <typename T>
GK_HD T clamp_log_scale(T log_scale) {
  return log_scale < T(kLogScaleMin) ? T(kLogScaleMin) : log_scale;
}

// One channel's log P_k(x_c), and (for the backward) d log P / du and d log P / ds.
template <typename T>
struct Term {
  T log_p, d_u, d_s;
};

// Which case a level is: 0 (kEdgeLow) x = 0, 1 (kEdgeHigh) x = L - 1, 2 interior. A 32-bit int, so that a
// CPU loop over float terms keeps one lane width (mixed 64-bit compares stop it vectorising).
GK_HD int edge_of(int64_t x, int64_t last) { return x == 0 ? kEdgeLow : x == last ? kEdgeHigh : kMass; }

template <typename T, bool Grad>
GK_HD Term<T> channel_term(int edge, T y, T mu, T s, const Levels<T>& lv) {
  const T e = gk::exp(-s);
  const T u = y - mu;
  const T plus = e * (u + lv.half_bin), minus = e * (u - lv.half_bin), mid = e * u;
  const T e_plus = gk::exp(-(plus < T(0) ? -plus : plus));
  const T e_minus = gk::exp(-(minus < T(0) ? -minus : minus));
  const T e_mid = gk::exp(-(mid < T(0) ? -mid : mid));
  const Sigmoids<T> sp = sigmoids(plus, e_plus), sm = sigmoids(minus, e_minus), sc = sigmoids(mid, e_mid);
  const T delta = mid > T(0) ? sm.neg - sp.neg : sp.pos - sm.pos;
  // int arithmetic, not bool logic (which stops the CPU loops vectorising): interior 2 becomes 3 where the
  // bin's mass is below the threshold (or NaN).
  const int interior = edge == kMass ? 1 : 0;
  const int tiny = delta > T(kCdfThreshold) ? 0 : 1;
  const int branch = edge + interior * tiny;
  // The one logarithm this branch needs: log(1 + e^-|z|) of its argument z, or log delta.
  const T floored = delta > T(kCdfFloor) ? delta : T(kCdfFloor);
  const T e_arg = branch == kEdgeLow ? e_plus : branch == kEdgeHigh ? e_minus : e_mid;
  const T l = log_or_log1p(branch == kMass, branch == kMass ? floored : e_arg);
  const T zero = T(0);
  const T low = -((plus < zero ? -plus : zero) + l);    // log sigmoid(p+)
  const T high = -((minus > zero ? minus : zero) + l);  // log sigmoid(-p-)
  const T mass = delta != delta ? delta : l;
  const T density = mid - s - T(2) * ((mid > zero ? mid : zero) + l) - lv.log_width;
  T log_p = branch == kEdgeLow ? low : branch == kEdgeHigh ? high : branch == kMass ? mass : density;
  // A NaN anywhere stays NaN (the float log has no NaN check of its own).
  // (One compare of plus + s, NaN iff either is: a || of two would stop the CPU loops vectorising.)
  const T poison = plus + s;
  log_p = poison != poison ? poison : log_p;
  Term<T> t{log_p, zero, zero};
  if constexpr (Grad) {
    // d log P / d p per argument, then through p = e (u +- h): dp/du = e, dp/ds = -p.
    const T dp = branch == kEdgeLow ? sp.neg : branch == kMass ? sp.pos * sp.neg / delta : zero;
    const T dm = branch == kEdgeHigh ? -sm.pos : branch == kMass ? -(sm.pos * sm.neg) / delta : zero;
    const T dc = branch == kDensity ? T(1) - T(2) * sc.pos : zero;
    t.d_u = e * (dp + dm + dc);
    t.d_s = -plus * dp - minus * dm - mid * dc - (branch == kDensity ? T(1) : zero);
  }
  return t;
}

// Running logsumexp: max m and sum of e^(a - m); the first term starts it. -inf terms add nothing (all -inf
// gives -inf), a NaN term makes the result NaN.
template <typename T>
struct LogSumExp {
  T m, sum;
  GK_HD void first(T a) {
    m = a;
    sum = T(1);
  }
  GK_HD void add(T a) {
    const T next = a > m ? a : m;
    const bool none = next == -INFINITY;  // every term so far is -inf
    const T shift = none ? T(0) : next;
    sum = sum * gk::exp(m - shift) + gk::exp(a - shift);
    m = a != a ? a : next;
  }
  GK_HD T value() const {
    if (sum != sum || m != m) return m + sum;
    return sum > T(0) && m != -INFINITY ? m + gk::log(sum) : m;
  }
};

// Draw t of (sample, pixel) in the stream: element base + t with base = (sample H W + pixel)(K + C).
// The logistic noise log u - log(1 - u) of a genkern uniform u, on the exact u and 1 - u.
GK_HD float logistic_noise(uint32_t bits, float) {
  const uint32_t k = bits >> 8;
  return log_uniform24(k) - log_uniform24(0xFFFFFFu - k);
}

GK_HD double logistic_noise(uint32_t bits, double) {
  const double u = (static_cast<double>(bits >> 8) + 0.5) * 0x1p-24;
  return ::log(u) - ::log1p(-u);
}

// The level of a drawn y in [-1, 1]: (y + 1)(L - 1) / 2 rounded half to even.
template <typename T>
GK_HD int64_t y_to_level(T y, int64_t levels) {
  // Rounded in double: the value is exact there, and ::nearbyint(double) exists on host and device alike.
  return static_cast<int64_t>(::nearbyint(static_cast<double>((y + T(1)) * static_cast<T>(levels - 1) * T(0.5))));
}

template <typename T>
GK_HD T clamp_unit(T y) {
  return y < T(-1) ? T(-1) : (y > T(1) ? T(1) : y);
}

// The stream elements of one (sample, pixel)'s draws, each Philox block computed once for its four elements
// (the values of nade::stream_element).
struct PixelStream {
  uint64_t seed, offset, block;
  Philox4 bits;
  GK_HD PixelStream(uint64_t seed_, uint64_t offset_, uint64_t base)
      : seed(seed_), offset(offset_), block(base >> 2), bits(stream_block(seed_, offset_, base >> 2)) {}
  GK_HD uint32_t at(uint64_t element) {
    if ((element >> 2) != block) {
      block = element >> 2;
      bits = stream_block(seed, offset, block);
    }
    const uint32_t lane = static_cast<uint32_t>(element & 3u);
    return lane == 0 ? bits.x[0] : lane == 1 ? bits.x[1] : lane == 2 ? bits.x[2] : bits.x[3];
  }
};

// Where parameter (component k, channel c) of a pixel lives among its P params (PixelCNN++'s order).
struct ParamLayout {
  int64_t mixtures, per_channel;  // K; 3 coupled, else 2
  GK_HD int64_t mean(int64_t c, int64_t k) const { return mixtures + per_channel * mixtures * c + k; }
  GK_HD int64_t log_scale(int64_t c, int64_t k) const { return mean(c, k) + mixtures; }
  // coefficient j (a0: R -> G, a1: R -> B, a2: G -> B), stored in colour j's third slot
  GK_HD int64_t coeff(int64_t j, int64_t k) const { return mean(j, k) + 2 * mixtures; }
};

// One (sample, pixel)'s draw (docs/math.md, section 6.1), in the compute type T: the component k by
// Gumbel-max over the K logits (float64 scores under categorical::score_beats, categorical::gumbel_argmax's
// rule), then channel c = 0 .. colors - 1 in turn the logistic draw y_c = clamp(mu_c + e^s_c (log u - log(1 - u)))
// with mu_G, mu_B coupled to the drawn (unrounded) y_R, y_G, and its level written to out[c * out_stride].
// param(ch) is the pixel's parameter channel ch in T; base is the stream element of draw 0,
// (sample H W + pixel)(K + C). Every sampler of the mixture (the op on each backend, the cached PixelCNN
// sampler) draws through this function, so they give the same levels from the same params.
template <typename T, typename Param>
GK_HD void draw_pixel(const Param& param, int64_t mixtures, int64_t colors, bool coupled, int64_t levels, uint64_t seed,
                      uint64_t offset, uint64_t base, int64_t* out, int64_t out_stride) {
  const ParamLayout at{mixtures, coupled ? 3 : 2};
  PixelStream stream(seed, offset, base);
  int64_t k = 0;
  double best_score = 0.0;
  for (int64_t j = 0; j < mixtures; ++j) {
    const double score = static_cast<double>(param(j)) +
                         static_cast<double>(categorical::gumbel(stream.at(base + static_cast<uint64_t>(j))));
    if (j == 0 || categorical::score_beats(score, best_score)) {
      k = j;
      best_score = score;
    }
  }
  T y_r = T(0), y_g = T(0);
  for (int64_t c = 0; c < colors; ++c) {
    T mu = param(at.mean(c, k));
    if (coupled && c == 1) mu = mu + tanh_of(param(at.coeff(0, k))) * y_r;
    if (coupled && c == 2) mu = mu + tanh_of(param(at.coeff(1, k))) * y_r + tanh_of(param(at.coeff(2, k))) * y_g;
    const uint32_t bits = stream.at(base + static_cast<uint64_t>(mixtures + c));
    const T y = clamp_unit(mu + gk::exp(clamp_log_scale(param(at.log_scale(c, k)))) * logistic_noise(bits, T(0)));
    if (c == 0) y_r = y;
    if (c == 1) y_g = y;
    out[c * out_stride] = y_to_level(y, levels);
  }
}

}  // namespace mixture
}  // namespace gk
