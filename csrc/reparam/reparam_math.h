// Per-element math of the reparam family (docs/math.md, section 2), for T = float or double.
// Reductions (sums over a dim, the IWAE logsumexp) are the kernels' job; these are the terms they add up.
#pragma once
#include "core/fastmath.h"

namespace gk {
namespace reparam {

constexpr double kLog2Pi = 1.8378770664093454835606594728112;

// z = mu + exp(logvar / 2) * eps
template <typename T>
GK_HD T sample(T mu, T logvar, T eps) {
  return mu + gk::exp(T(0.5) * logvar) * eps;
}

// d/dlogvar of sample(): exp(logvar / 2) * eps / 2
template <typename T>
GK_HD T sample_dlogvar(T logvar, T eps) {
  return T(0.5) * gk::exp(T(0.5) * logvar) * eps;
}

// z and the KL term together, sharing one exp: what the fused reparameterize_kl computes per element.
template <typename T>
struct SampleKl {
  T z, kl;
};

template <typename T>
GK_HD SampleKl<T> sample_and_kl(T mu, T logvar, T eps) {
  const T sigma = gk::exp(T(0.5) * logvar);
  return SampleKl<T>{mu + sigma * eps, T(0.5) * (mu * mu + sigma * sigma - T(1) - logvar)};
}

// KL(N(mu, exp(logvar)) || N(0, 1)) of one element.
template <typename T>
GK_HD T kl(T mu, T logvar) {
  return T(0.5) * (mu * mu + gk::exp(logvar) - T(1) - logvar);
}

template <typename T>
GK_HD T kl_dmu(T mu) {
  return mu;
}

template <typename T>
GK_HD T kl_dlogvar(T logvar) {
  return T(0.5) * (gk::exp(logvar) - T(1));
}

// log N(z; 0, 1)
template <typename T>
GK_HD T std_normal_log_prob(T z) {
  return T(-0.5) * (T(kLog2Pi) + z * z);
}

// log N(z; mu, exp(logvar))
template <typename T>
GK_HD T normal_log_prob(T z, T mu, T logvar) {
  const T d = z - mu;
  return T(-0.5) * (T(kLog2Pi) + logvar + d * d * gk::exp(-logvar));
}

// Gradient of normal_log_prob: d/dz = -(z - mu) e^-logvar = -d/dmu;  d/dlogvar = ((z - mu)^2 e^-logvar - 1) / 2
template <typename T>
struct LogProbGrad {
  T dz, dlogvar;
};

template <typename T>
GK_HD LogProbGrad<T> normal_log_prob_grad(T z, T mu, T logvar) {
  const T d = z - mu;
  const T precision = gk::exp(-logvar);
  return LogProbGrad<T>{-d * precision, T(0.5) * (d * d * precision - T(1))};
}

// The latent part of an IWAE log-weight: log p(z) - log q(z | x) for one element.
template <typename T>
GK_HD T iwae_latent_term(T z, T mu, T logvar) {
  const T d = z - mu;
  return T(0.5) * (logvar + d * d * gk::exp(-logvar) - z * z);  // the log(2 pi) terms cancel
}

// d/dz, d/dmu, d/dlogvar of iwae_latent_term
template <typename T>
struct LatentGrad {
  T dz, dmu, dlogvar;
};

template <typename T>
GK_HD LatentGrad<T> iwae_latent_grad(T z, T mu, T logvar) {
  const T d = z - mu;
  const T precision = gk::exp(-logvar);
  return LatentGrad<T>{d * precision - z, -d * precision, T(0.5) * (T(1) - d * d * precision)};
}

// The softmax over k of the IWAE log-weights, formed as torch.softmax forms it: shifted by their maximum and
// normalised by their own sum. (exp(log w - bound - log K) from the stored bound is not a softmax: the bound
// is rounded, ulp(1e7) = 1 in float32, and the weights then sum to anything from 0.95 to 1.56.) A NaN weight
// makes the maximum NaN, and all -inf (or a +inf) weights make exp(lw - max) NaN: every weight is then NaN.
template <typename T>
GK_HD T softmax_max(T running, T lw) {
  return (lw > running || lw != lw) ? lw : running;
}

template <typename T>
GK_HD T softmax_weight(T lw, T max, T sum) {
  return gk::exp(lw - max) / sum;
}

}  // namespace reparam
}  // namespace gk
