// CPU kernels of the reparam family: indexing, chunking and threading around csrc/reparam/reparam_math.h.
#include "reparam/reparam.h"

#include <cmath>
#include <limits>

#include "reparam/reparam_math.h"
#include "reparam/reparam_reduce.h"

namespace gk {
namespace reparam {
namespace {

using cpu::kChunk;

template <typename T>
struct SampleKernel {
  static void run(const SampleArgs& a) {
    const T* mu = static_cast<const T*>(a.mu);
    const T* logvar = static_cast<const T*>(a.logvar);
    const T* eps = static_cast<const T*>(a.eps);
    T* z = static_cast<T*>(a.z);
    const int64_t total = a.n * a.samples;
    cpu::parallel_for((total + kChunk - 1) / kChunk, kChunk * (eps ? 1 : cpu::kRandomWork), [&](int64_t c) {
      alignas(64) T e[kChunk];
      const int64_t start = c * kChunk, len = std::min(kChunk, total - start);
      cpu::load_eps(eps, a.seed, a.offset, start, len, e);
      cpu::for_each_periodic(start, len, a.n, [&](int64_t t0, int64_t j0, int64_t n) {
#pragma omp simd
        for (int64_t t = 0; t < n; ++t) z[start + t0 + t] = sample(mu[j0 + t], logvar[j0 + t], e[t0 + t]);
      });
    });
  }
};

template <typename T>
struct SampleBackwardKernel {
  static void run(const SampleBackwardArgs& a) {
    const T* grad_z = static_cast<const T*>(a.grad_z);
    const T* logvar = static_cast<const T*>(a.logvar);
    const T* eps = static_cast<const T*>(a.eps);
    T* grad_mu = static_cast<T*>(a.grad_mu);
    T* grad_logvar = static_cast<T*>(a.grad_logvar);
    cpu::parallel_for((a.n + kChunk - 1) / kChunk, kChunk * a.samples * (eps ? 1 : cpu::kRandomWork), [&](int64_t c) {
      alignas(64) T e[kChunk];
      alignas(64) T gm[kChunk];
      alignas(64) T gl[kChunk];
      const int64_t j0 = c * kChunk, len = std::min(kChunk, a.n - j0);
      std::fill(gm, gm + len, T(0));
      std::fill(gl, gl + len, T(0));
      for (int64_t k = 0; k < a.samples; ++k) {
        const int64_t flat = k * a.n + j0;
        cpu::load_eps(eps, a.seed, a.offset, flat, len, e);
#pragma omp simd
        for (int64_t t = 0; t < len; ++t) {
          const T g = grad_z[flat + t];
          gm[t] += g;
          gl[t] += g * sample_dlogvar(logvar[j0 + t], e[t]);
        }
      }
      std::copy(gm, gm + len, grad_mu + j0);
      std::copy(gl, gl + len, grad_logvar + j0);
    });
  }
};

template <typename T>
struct KlKernel {
  static void run(const KlArgs& a) {
    const T* mu = static_cast<const T*>(a.mu);
    const T* logvar = static_cast<const T*>(a.logvar);
    cpu::reduce_spans<T>(a.shape, static_cast<T*>(a.kl), [&](int64_t start, int64_t len, T* terms) {
#pragma omp simd
      for (int64_t t = 0; t < len; ++t) terms[t] = kl(mu[start + t], logvar[start + t]);
    });
  }
};

template <typename T>
struct KlBackwardKernel {
  static void run(const KlBackwardArgs& a) {
    const T* mu = static_cast<const T*>(a.mu);
    const T* logvar = static_cast<const T*>(a.logvar);
    T* grad_mu = static_cast<T*>(a.grad_mu);
    T* grad_logvar = static_cast<T*>(a.grad_logvar);
    cpu::broadcast_spans<T>(a.shape, static_cast<const T*>(a.grad_kl), [&](int64_t start, int64_t len, const T* g) {
#pragma omp simd
      for (int64_t t = 0; t < len; ++t) {
        grad_mu[start + t] = g[t] * kl_dmu(mu[start + t]);
        grad_logvar[start + t] = g[t] * kl_dlogvar(logvar[start + t]);
      }
    });
  }
};

template <typename T>
struct SampleKlKernel {
  static void run(const SampleKlArgs& a) {
    const T* mu = static_cast<const T*>(a.mu);
    const T* logvar = static_cast<const T*>(a.logvar);
    const T* eps = static_cast<const T*>(a.eps);
    T* z = static_cast<T*>(a.z);
    cpu::reduce_spans<T>(a.shape, static_cast<T*>(a.kl), [&](int64_t start, int64_t len, T* terms) {
      alignas(64) T e[kChunk];
      cpu::load_eps(eps, a.seed, a.offset, start, len, e);
#pragma omp simd
      for (int64_t t = 0; t < len; ++t) {
        const SampleKl<T> r = sample_and_kl(mu[start + t], logvar[start + t], e[t]);
        z[start + t] = r.z;
        terms[t] = r.kl;
      }
    });
  }
};

template <typename T>
struct SampleKlBackwardKernel {
  static void run(const SampleKlBackwardArgs& a) {
    const T* grad_z = static_cast<const T*>(a.grad_z);
    const T* mu = static_cast<const T*>(a.mu);
    const T* logvar = static_cast<const T*>(a.logvar);
    const T* eps = static_cast<const T*>(a.eps);
    T* grad_mu = static_cast<T*>(a.grad_mu);
    T* grad_logvar = static_cast<T*>(a.grad_logvar);
    // An absent gradient (an unused output) adds no term at all: multiplying zeros in would turn an
    // overflowed exp(logvar) into NaN (0 * inf), where the reference's gradient is finite.
    cpu::broadcast_spans<T>(a.shape, static_cast<const T*>(a.grad_kl),
                            [&](int64_t start, int64_t len, const T* grad_kl) {
                              alignas(64) T e[kChunk];
                              T* gm = grad_mu + start;
                              T* gl = grad_logvar + start;
                              const T* m = mu + start;
                              const T* lv = logvar + start;
                              if (grad_z) {
                                const T* gz = grad_z + start;
                                cpu::load_eps(eps, a.seed, a.offset, start, len, e);
                                if (grad_kl) {
#pragma omp simd
                                  for (int64_t t = 0; t < len; ++t) {
                                    gm[t] = gz[t] + grad_kl[t] * kl_dmu(m[t]);
                                    gl[t] = gz[t] * sample_dlogvar(lv[t], e[t]) + grad_kl[t] * kl_dlogvar(lv[t]);
                                  }
                                } else {
#pragma omp simd
                                  for (int64_t t = 0; t < len; ++t) {
                                    gm[t] = gz[t];
                                    gl[t] = gz[t] * sample_dlogvar(lv[t], e[t]);
                                  }
                                }
                              } else if (grad_kl) {
#pragma omp simd
                                for (int64_t t = 0; t < len; ++t) {
                                  gm[t] = grad_kl[t] * kl_dmu(m[t]);
                                  gl[t] = grad_kl[t] * kl_dlogvar(lv[t]);
                                }
                              } else {
                                std::fill(gm, gm + len, T(0));
                                std::fill(gl, gl + len, T(0));
                              }
                            });
  }
};

template <typename T>
struct LogProbKernel {
  static void run(const LogProbArgs& a) {
    const T* z = static_cast<const T*>(a.z);
    const T* mu = static_cast<const T*>(a.mu);
    const T* logvar = static_cast<const T*>(a.logvar);
    const int64_t period = a.param_outer * a.shape.dim * a.shape.inner;
    cpu::reduce_spans<T>(a.shape, static_cast<T*>(a.out), [&](int64_t start, int64_t len, T* terms) {
      if (!mu && !logvar) {
#pragma omp simd
        for (int64_t t = 0; t < len; ++t) terms[t] = std_normal_log_prob(z[start + t]);
        return;
      }
      cpu::for_each_periodic(start, len, period, [&](int64_t t0, int64_t j0, int64_t n) {
#pragma omp simd
        for (int64_t t = 0; t < n; ++t)
          terms[t0 + t] = normal_log_prob(z[start + t0 + t], mu ? mu[j0 + t] : T(0), logvar ? logvar[j0 + t] : T(0));
      });
    });
  }
};

template <typename T>
struct LogProbBackwardKernel {
  static void run(const LogProbBackwardArgs& a) {
    const T* z = static_cast<const T*>(a.z);
    const T* mu = static_cast<const T*>(a.mu);
    const T* logvar = static_cast<const T*>(a.logvar);
    T* grad_z = static_cast<T*>(a.grad_z);
    T* grad_logvar = static_cast<T*>(a.grad_logvar);
    const int64_t period = std::max<int64_t>(1, a.param_outer * a.shape.dim * a.shape.inner);
    cpu::broadcast_spans<T>(a.shape, static_cast<const T*>(a.grad_out), [&](int64_t start, int64_t len, const T* g) {
      cpu::for_each_periodic(start, len, period, [&](int64_t t0, int64_t j0, int64_t n) {
#pragma omp simd
        for (int64_t t = 0; t < n; ++t) {
          const int64_t f = start + t0 + t;
          const LogProbGrad<T> d = normal_log_prob_grad(z[f], mu ? mu[j0 + t] : T(0), logvar ? logvar[j0 + t] : T(0));
          grad_z[f] = g[t0 + t] * d.dz;
          if (grad_logvar) grad_logvar[f] = g[t0 + t] * d.dlogvar;
        }
      });
    });
  }
};

template <typename T>
struct IwaeKernel {
  static void run(const IwaeArgs& a) {
    const T* log_px_z = static_cast<const T*>(a.log_px_z);
    const T* z = static_cast<const T*>(a.z);
    const T* mu = static_cast<const T*>(a.mu);
    const T* logvar = static_cast<const T*>(a.logvar);
    T* bound = static_cast<T*>(a.bound);
    T* log_w = static_cast<T*>(a.log_w);
    const int64_t K = a.samples, B = a.batch, D = a.dim;
    const T log_k = std::log(T(K));
    cpu::parallel_for(B, K * D * 3 + K, [&](int64_t b) {
      // Streaming logsumexp over k: (max, sum of exp(x - max)).
      T running_max = -std::numeric_limits<T>::infinity(), running_sum = 0;
      for (int64_t k = 0; k < K; ++k) {
        const T* zk = z + (k * B + b) * D;
        const T* m = mu + b * D;
        const T* lv = logvar + b * D;
        T latent = 0;
#pragma omp simd reduction(+ : latent)
        for (int64_t d = 0; d < D; ++d) latent += iwae_latent_term(zk[d], m[d], lv[d]);
        const T lw = log_px_z[k * B + b] + latent;
        log_w[k * B + b] = lw;
        if (lw != lw) {  // NaN poisons the bound, as in torch.logsumexp
          running_max = lw;
        } else if (lw == -std::numeric_limits<T>::infinity()) {
          continue;  // a zero weight adds nothing (and -inf - -inf must not reach exp)
        } else if (lw > running_max) {
          running_sum = running_sum * std::exp(running_max - lw) + T(1);
          running_max = lw;
        } else {
          running_sum += std::exp(lw - running_max);
        }
      }
      // All -inf (or NaN) weights: the bound is that value, as logsumexp gives.
      bound[b] = std::isfinite(running_max) ? running_max + std::log(running_sum) - log_k : running_max;
    });
  }
};

template <typename T>
struct IwaeBackwardKernel {
  static void run(const IwaeBackwardArgs& a) {
    const T* grad_bound = static_cast<const T*>(a.grad_bound);
    const T* log_w = static_cast<const T*>(a.log_w);
    const T* z = static_cast<const T*>(a.z);
    const T* mu = static_cast<const T*>(a.mu);
    const T* logvar = static_cast<const T*>(a.logvar);
    T* grad_log_px_z = static_cast<T*>(a.grad_log_px_z);
    T* grad_z = static_cast<T*>(a.grad_z);
    T* grad_mu = static_cast<T*>(a.grad_mu);
    T* grad_logvar = static_cast<T*>(a.grad_logvar);
    const int64_t K = a.samples, B = a.batch, D = a.dim;
    cpu::parallel_for(B, K * D * 3 + K, [&](int64_t b) {
      T w_max = -std::numeric_limits<T>::infinity(), w_sum = 0;
      for (int64_t k = 0; k < K; ++k) w_max = softmax_max(w_max, log_w[k * B + b]);
      for (int64_t k = 0; k < K; ++k) w_sum += gk::exp(log_w[k * B + b] - w_max);
      const T* m = mu + b * D;
      const T* lv = logvar + b * D;
      T* gm = grad_mu + b * D;
      T* gl = grad_logvar + b * D;
      std::fill(gm, gm + D, T(0));
      std::fill(gl, gl + D, T(0));
      for (int64_t k = 0; k < K; ++k) {
        const T gw = grad_bound[b] * softmax_weight(log_w[k * B + b], w_max, w_sum);
        grad_log_px_z[k * B + b] = gw;
        const T* zk = z + (k * B + b) * D;
        T* gz = grad_z + (k * B + b) * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) {
          const LatentGrad<T> g = iwae_latent_grad(zk[d], m[d], lv[d]);
          gz[d] = gw * g.dz;
          gm[d] += gw * g.dmu;
          gl[d] += gw * g.dlogvar;
        }
      }
    });
  }
};

}  // namespace

void sample_cpu(const SampleArgs& a) { cpu::dispatch_float<SampleKernel>(a.dtype, a); }
void sample_backward_cpu(const SampleBackwardArgs& a) { cpu::dispatch_float<SampleBackwardKernel>(a.dtype, a); }
void kl_cpu(const KlArgs& a) { cpu::dispatch_float<KlKernel>(a.dtype, a); }
void kl_backward_cpu(const KlBackwardArgs& a) { cpu::dispatch_float<KlBackwardKernel>(a.dtype, a); }
void sample_kl_cpu(const SampleKlArgs& a) { cpu::dispatch_float<SampleKlKernel>(a.dtype, a); }
void sample_kl_backward_cpu(const SampleKlBackwardArgs& a) { cpu::dispatch_float<SampleKlBackwardKernel>(a.dtype, a); }
void log_prob_cpu(const LogProbArgs& a) { cpu::dispatch_float<LogProbKernel>(a.dtype, a); }
void log_prob_backward_cpu(const LogProbBackwardArgs& a) { cpu::dispatch_float<LogProbBackwardKernel>(a.dtype, a); }
void iwae_cpu(const IwaeArgs& a) { cpu::dispatch_float<IwaeKernel>(a.dtype, a); }
void iwae_backward_cpu(const IwaeBackwardArgs& a) { cpu::dispatch_float<IwaeBackwardKernel>(a.dtype, a); }

}  // namespace reparam
}  // namespace gk
