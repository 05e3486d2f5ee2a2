// The discretised logistic mixture on CUDA (PixelCNN++'s head). The per-element math comes from
// csrc/autoregressive/logistic_mixture_math.h; this file maps it to threads: a thread per pixel (grid-stride
// over B H W), looping over the K components with a running logsumexp, so nothing of size K is held per
// pixel and neighbouring threads read neighbouring pixels of each params channel (coalesced). The backward
// recomputes each component's a_k from params, x and log p, then each channel's derivatives in a second pass
// over the channels, and writes every gradient element once: no atomics, deterministic.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "autoregressive/categorical_math.h"
#include "autoregressive/logistic_mixture.h"
#include "autoregressive/logistic_mixture_math.h"
#include "core/launch.cuh"

namespace gk {
namespace mixture {
namespace {

using namespace gpu::common;

constexpr int kThreads = 128;

// What the kernels need of the Shape, as plain values (Shape's helpers are host functions).
struct Dims {
  int64_t batch, colors, pixels, mixtures, channels, per_channel;  // channels = P
  uint64_t draws;                                                  // K + C
  bool coupled;
};

Dims dims_of(const Shape& s) {
  return Dims{s.batch,
              s.colors,
              s.pixels(),
              s.mixtures,
              (1 + s.per_channel() * s.colors) * s.mixtures,
              s.per_channel(),
              static_cast<uint64_t>(s.draws()),
              s.coupled};
}

// One pixel's params (`plane` = H W between channels), read in the compute type.
template <typename S>
struct Pixel {
  const S* base;
  Dims d;
  __device__ compute_t<S> at(int64_t ch) const { return load(base, ch * d.pixels); }
  __device__ compute_t<S> operator()(int64_t ch) const { return at(ch); }  // draw_pixel's accessor
  __device__ int64_t mean(int64_t c, int64_t k) const { return d.mixtures + d.per_channel * d.mixtures * c + k; }
  __device__ int64_t log_scale(int64_t c, int64_t k) const { return mean(c, k) + d.mixtures; }
  __device__ int64_t coeff(int64_t j, int64_t k) const { return mean(j, k) + 2 * d.mixtures; }
};

template <typename C, typename S>
__device__ C logits_lse(const Pixel<S>& px) {
  LogSumExp<C> acc;
  acc.first(px.at(0));
  for (int64_t k = 1; k < px.d.mixtures; ++k) acc.add(px.at(k));
  return acc.value();
}

// The coupling coefficients of component k (zero without coupling).
template <typename C>
struct Coeffs {
  C a0, a1, a2;
};

template <typename C, typename S>
__device__ Coeffs<C> coeffs_of(const Pixel<S>& px, int64_t k) {
  if (!px.d.coupled) return Coeffs<C>{C(0), C(0), C(0)};
  return Coeffs<C>{tanh_of(px.at(px.coeff(0, k))), tanh_of(px.at(px.coeff(1, k))), tanh_of(px.at(px.coeff(2, k)))};
}

// Channel c of component k, x and y of the pixel's channels at xs (H W apart).
template <typename C, typename S, bool Grad>
__device__ Term<C> channel(const Pixel<S>& px, const int64_t* xs, int64_t c, int64_t k, const Coeffs<C>& a, C y_r,
                           C y_g, const Levels<C>& lv) {
  const int64_t xc = xs[c * px.d.pixels];
  C mu = px.at(px.mean(c, k));
  if (px.d.coupled && c == 1) mu = mu + a.a0 * y_r;
  if (px.d.coupled && c == 2) mu = mu + a.a1 * y_r + a.a2 * y_g;
  return channel_term<C, Grad>(edge_of(xc, lv.last), level_to_y<C>(xc, lv), mu,
                               clamp_log_scale(px.at(px.log_scale(c, k))), lv);
}

// a_k = logit_k - lse(logits) + sum_c log P_k(x_c)
template <typename C, typename S>
__device__ C component(const Pixel<S>& px, const int64_t* xs, int64_t k, C lse_logits, const Coeffs<C>& a, C y_r, C y_g,
                       const Levels<C>& lv) {
  C acc = px.at(k) - lse_logits;
  for (int64_t c = 0; c < px.d.colors; ++c) acc += channel<C, S, false>(px, xs, c, k, a, y_r, y_g, lv).log_p;
  return acc;
}

template <typename C>
__device__ C first_y(const int64_t* xs, int64_t c, const Dims& d, const Levels<C>& lv) {
  return c < d.colors ? level_to_y<C>(xs[c * d.pixels], lv) : C(0);
}

template <typename S>
__global__ void __launch_bounds__(kThreads)
    log_prob_kernel(const S* params, const int64_t* x, compute_t<S>* out, Dims d, Levels<compute_t<S>> lv) {
  using C = compute_t<S>;
  for (int64_t i = gpu::thread_index(); i < d.batch * d.pixels; i += gpu::thread_count()) {
    int64_t b, p;
    divmod(i, d.pixels, b, p);
    const Pixel<S> px{params + b * d.channels * d.pixels + p, d};
    const int64_t* xs = x + b * d.colors * d.pixels + p;
    const C lse_logits = logits_lse<C>(px);
    const C y_r = first_y(xs, 0, d, lv), y_g = first_y(xs, 1, d, lv);
    LogSumExp<C> mix;
    for (int64_t k = 0; k < d.mixtures; ++k) {
      const C a_k = component(px, xs, k, lse_logits, coeffs_of<C>(px, k), y_r, y_g, lv);
      if (k == 0)
        mix.first(a_k);
      else
        mix.add(a_k);
    }
    out[i] = mix.value();
  }
}

template <typename S>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const compute_t<S>* grad, const S* params, const int64_t* x, const compute_t<S>* log_prob,
                    S* grad_params, Dims d, Levels<compute_t<S>> lv) {
  using C = compute_t<S>;
  for (int64_t i = gpu::thread_index(); i < d.batch * d.pixels; i += gpu::thread_count()) {
    int64_t b, p;
    divmod(i, d.pixels, b, p);
    const int64_t offset = b * d.channels * d.pixels + p;
    const Pixel<S> px{params + offset, d};
    S* out = grad_params + offset;
    const int64_t* xs = x + b * d.colors * d.pixels + p;
    const C lse_logits = logits_lse<C>(px);
    const C y_r = first_y(xs, 0, d, lv), y_g = first_y(xs, 1, d, lv);
    const C g = grad[i], lp = log_prob[i];
    for (int64_t k = 0; k < d.mixtures; ++k) {
      const Coeffs<C> a = coeffs_of<C>(px, k);
      const C r = g * gk::exp(component(px, xs, k, lse_logits, a, y_r, y_g, lv) - lp);  // g r_k
      store(out, k * d.pixels, r - g * gk::exp(px.at(k) - lse_logits));
      for (int64_t c = 0; c < d.colors; ++c) {
        const Term<C> t = channel<C, S, true>(px, xs, c, k, a, y_r, y_g, lv);
        const C d_mean = -r * t.d_u;
        store(out, px.mean(c, k) * d.pixels, d_mean);
        const bool passes = px.at(px.log_scale(c, k)) >= C(kLogScaleMin);
        store(out, px.log_scale(c, k) * d.pixels, passes ? r * t.d_s : C(0));
        // a0 enters mu_G (c = 1), a1 and a2 enter mu_B (c = 2)
        if (d.coupled && c == 1) store(out, px.coeff(0, k) * d.pixels, d_mean * y_r * (C(1) - a.a0 * a.a0));
        if (d.coupled && c == 2) {
          store(out, px.coeff(1, k) * d.pixels, d_mean * y_r * (C(1) - a.a1 * a.a1));
          store(out, px.coeff(2, k) * d.pixels, d_mean * y_g * (C(1) - a.a2 * a.a2));
        }
      }
    }
  }
}

template <typename S>
__global__ void __launch_bounds__(kThreads) sample_kernel(const S* params, int64_t* out, Dims d, int64_t levels,
                                                          uint64_t seed, uint64_t offset, uint64_t first) {
  using C = compute_t<S>;
  for (int64_t i = gpu::thread_index(); i < d.batch * d.pixels; i += gpu::thread_count()) {
    int64_t b, p;
    divmod(i, d.pixels, b, p);
    const Pixel<S> px{params + b * d.channels * d.pixels + p, d};
    const uint64_t base =
        ((first + static_cast<uint64_t>(b)) * static_cast<uint64_t>(d.pixels) + static_cast<uint64_t>(p)) * d.draws;
    draw_pixel<C>(px, d.mixtures, d.colors, d.coupled, levels, seed, offset, base, out + b * d.colors * d.pixels + p,
                  d.pixels);
  }
}

}  // namespace

void log_prob_cuda(const LogProbArgs& a, void* stream) {
  const Dims d = dims_of(a.shape);
  gpu::dispatch_float(a.dtype, "logistic_mixture.log_prob", [&](auto type) {
    using S = typename decltype(type)::type;
    using C = compute_t<S>;
    gpu::launch_items("logistic_mixture.log_prob", log_prob_kernel<S>, d.batch * d.pixels, kThreads,
                      gpu::as_stream(stream), gpu::typed<S>(a.params), a.x, gpu::typed<C>(a.out), d,
                      Levels<C>(a.shape.levels));
  });
}

void log_prob_backward_cuda(const LogProbBackwardArgs& a, void* stream) {
  const Dims d = dims_of(a.shape);
  gpu::dispatch_float(a.dtype, "logistic_mixture.log_prob_backward", [&](auto type) {
    using S = typename decltype(type)::type;
    using C = compute_t<S>;
    gpu::launch_items("logistic_mixture.log_prob_backward", backward_kernel<S>, d.batch * d.pixels, kThreads,
                      gpu::as_stream(stream), gpu::typed<C>(a.grad), gpu::typed<S>(a.params), a.x,
                      gpu::typed<C>(a.log_prob), gpu::typed<S>(a.grad_params), d, Levels<C>(a.shape.levels));
  });
}

void sample_cuda(const SampleArgs& a, void* stream) {
  const Dims d = dims_of(a.shape);
  gpu::dispatch_float(a.dtype, "logistic_mixture.sample", [&](auto type) {
    using S = typename decltype(type)::type;
    gpu::launch_items("logistic_mixture.sample", sample_kernel<S>, d.batch * d.pixels, kThreads, gpu::as_stream(stream),
                      gpu::typed<S>(a.params), a.out, d, a.shape.levels, a.seed, a.offset, a.first);
  });
}

}  // namespace mixture
}  // namespace gk
