// Per-element math of the causal_conv1d family (docs/math.md, section 4), for T = float or double:
// the output activations and the gated unit tanh(a) * sigmoid(b) of WaveNet / Gated PixelCNN, and where
// each tap reads. The convolution sums are the kernels' job; these are what they apply to each sum.
#pragma once
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "core/fastmath.h"

namespace gk {
namespace causal_conv1d {

enum Activation : int { kNone = 0, kSilu = 1, kTanh = 2 };

// How far back tap k of `taps` reads: output l sees input l - tap_shift(k) (zero before position 0).
GK_HD int64_t tap_shift(int64_t k, int64_t taps, int64_t dilation) { return (taps - 1 - k) * dilation; }

// 1 / (1 + e^-z): e^-z overflows to inf for very negative z, and 1 / inf is the right limit 0.
template <typename T>
GK_HD T sigmoid(T z) {
  return T(1) / (T(1) + gk::exp(-z));
}

// float: from gk::exp so that the loop vectorises; absolute error a few float32 ulp of 1 near 0.
GK_HD float tanh(float z) {
  const float e = gk::exp(-2.0f * (z < 0.0f ? -z : z));  // in (0, 1]: no overflow
  const float t = (1.0f - e) / (1.0f + e);
  return z < 0.0f ? -t : t;
}

GK_HD double tanh(double z) { return ::tanh(z); }

// The activation as a template argument: a runtime switch inside a vector loop would make every lane
// evaluate every activation's exp and divisions and blend the results.
template <int Act, typename T>
GK_HD T activate(T z) {
  if constexpr (Act == kSilu) return z * sigmoid(z);
  if constexpr (Act == kTanh) return causal_conv1d::tanh(z);
  return z;
}

// d activate / dz at the pre-activation z.
template <int Act, typename T>
GK_HD T activate_grad(T z) {
  if constexpr (Act == kSilu) {
    const T s = sigmoid(z);
    return s * (T(1) + z * (T(1) - s));
  }
  if constexpr (Act == kTanh) {
    const T t = causal_conv1d::tanh(z);
    return T(1) - t * t;
  }
  return T(1);
}

// fn(std::integral_constant<int, Act>{}) for the runtime activation code (checked by the bindings).
template <typename Fn>
void with_activation(int activation, Fn fn) {
  if (activation == kSilu) return fn(std::integral_constant<int, kSilu>{});
  if (activation == kTanh) return fn(std::integral_constant<int, kTanh>{});
  return fn(std::integral_constant<int, kNone>{});
}

template <typename T>
GK_HD T gated(T a, T b) {
  return causal_conv1d::tanh(a) * sigmoid(b);
}

template <typename T>
struct GatedGrad {
  T da, db;
};

// d/da = (1 - tanh^2 a) sigmoid b;  d/db = tanh a * sigmoid b (1 - sigmoid b)
template <typename T>
GK_HD GatedGrad<T> gated_grad(T a, T b) {
  const T t = causal_conv1d::tanh(a), s = sigmoid(b);
  return GatedGrad<T>{(T(1) - t * t) * s, t * s * (T(1) - s)};
}

}  // namespace causal_conv1d
}  // namespace gk
