// CPU kernels of the discretised logistic mixture: a task per run of kRun consecutive pixels of one image, its
// loops over the pixels innermost (params (B, P, H, W) keep a channel's pixels contiguous), so the per-element
// math of logistic_mixture_math.h vectorises across pixels. Per pixel only a few running values live: the
// logits' and the components' logsumexp, the component's sum over channels, and in the backward each
// channel's two derivatives for the current component. Nothing of size (B, C, H, W, K) is ever formed.
#include "autoregressive/logistic_mixture.h"

#include <algorithm>
#include <vector>

#include "autoregressive/categorical_math.h"
#include "autoregressive/logistic_mixture_math.h"
#include "core/parallel.h"

namespace gk {
namespace mixture {
namespace {

constexpr int64_t kRun = 64;
// Work per pixel and component in element-sized units: a few exps and a log per channel.
constexpr int64_t kTermWork = 24;

// The channels of one image's params, `plane` = H W apart.
// (V = const T for params, T for their gradient, which has params' layout.)
template <typename V>
struct Image {
  V* base;
  int64_t plane, mixtures, per_channel;

  V* channel(int64_t ch) const { return base + ch * plane; }
  V* logit(int64_t k) const { return channel(k); }
  V* mean(int64_t c, int64_t k) const { return channel(mixtures + per_channel * mixtures * c + k); }
  V* log_scale(int64_t c, int64_t k) const { return mean(c, k) + mixtures * plane; }
  // coefficient j (a0: R -> G, a1: R -> B, a2: G -> B), stored in colour j's third slot
  V* coeff(int64_t j, int64_t k) const { return mean(j, k) + 2 * mixtures * plane; }
};

template <typename V, typename P>
Image<V> image_of(P* params, const Shape& s, int64_t b) {
  const int64_t channels = (1 + s.per_channel() * s.colors) * s.mixtures;
  return Image<V>{static_cast<V*>(params) + b * channels * s.pixels(), s.pixels(), s.mixtures, s.per_channel()};
}

template <typename T>
struct Scratch {
  std::vector<int> edge;  // edge_of each level
  std::vector<T> y, mu, d_u, d_s, tanh_a;
  explicit Scratch(int64_t colors)
      : edge(colors * kRun), y(colors * kRun), mu(kRun), d_u(colors * kRun), d_s(colors * kRun), tanh_a(3 * kRun) {}
};

template <typename T>
void load_levels(const int64_t* x, const Shape& s, int64_t b, int64_t p0, int64_t n, const Levels<T>& lv,
                 Scratch<T>& w) {
  for (int64_t c = 0; c < s.colors; ++c) {
    const int64_t* xc = x + (b * s.colors + c) * s.pixels() + p0;
    int* edges = w.edge.data() + c * kRun;
    T* ys = w.y.data() + c * kRun;
    for (int64_t p = 0; p < n; ++p) {
      edges[p] = edge_of(xc[p], lv.last);
      ys[p] = level_to_y<T>(xc[p], lv);
    }
  }
}

// The logits' logsumexp over k, per pixel.
template <typename T>
void logits_lse(const Image<const T>& img, int64_t p0, int64_t n, T* out) {
  LogSumExp<T> acc[kRun];
  for (int64_t k = 0; k < img.mixtures; ++k) {
    const T* l = img.logit(k) + p0;
    if (k == 0) {
      for (int64_t p = 0; p < n; ++p) acc[p].first(l[p]);
    } else {
#pragma omp simd
      for (int64_t p = 0; p < n; ++p) acc[p].add(l[p]);
    }
  }
  for (int64_t p = 0; p < n; ++p) out[p] = acc[p].value();
}

// mu of channel c, component k (coupled on the true y), into w.mu; the tanh of the coefficients of k into
// w.tanh_a once per component (c == 0).
template <typename T>
void channel_means(const Image<const T>& img, const Shape& s, int64_t c, int64_t k, int64_t p0, int64_t n,
                   Scratch<T>& w) {
  const T* m = img.mean(c, k) + p0;
  T* mu = w.mu.data();
  if (!s.coupled || c == 0) {
    std::copy(m, m + n, mu);
    if (s.coupled)
      for (int64_t j = 0; j < 3; ++j) {
        const T* a = img.coeff(j, k) + p0;
        T* t = w.tanh_a.data() + j * kRun;
#pragma omp simd
        for (int64_t p = 0; p < n; ++p) t[p] = tanh_of(a[p]);
      }
    return;
  }
  const T* y_r = w.y.data();
  const T* y_g = w.y.data() + kRun;
  const T* a0 = w.tanh_a.data();
  const T* a1 = a0 + kRun;
  const T* a2 = a1 + kRun;
  if (c == 1) {
#pragma omp simd
    for (int64_t p = 0; p < n; ++p) mu[p] = m[p] + a0[p] * y_r[p];
  } else {
#pragma omp simd
    for (int64_t p = 0; p < n; ++p) mu[p] = m[p] + a1[p] * y_r[p] + a2[p] * y_g[p];
  }
}

// acc[p] += sum over channels of log P_k(x_c), with (Grad) each channel's d log P / du and d log P / ds kept.
template <typename T, bool Grad>
void add_channels(const Image<const T>& img, const Shape& s, const Levels<T>& levels, int64_t k, int64_t p0, int64_t n,
                  Scratch<T>& w, T* acc) {
  const Levels<T> lv = levels;  // a local copy: the stores below cannot alias it, so the loop vectorises
  for (int64_t c = 0; c < s.colors; ++c) {
    channel_means(img, s, c, k, p0, n, w);
    const T* ls = img.log_scale(c, k) + p0;
    const int* edges = w.edge.data() + c * kRun;
    const T* ys = w.y.data() + c * kRun;
    const T* mu = w.mu.data();
    T* du = w.d_u.data() + c * kRun;
    T* ds = w.d_s.data() + c * kRun;
#pragma omp simd
    for (int64_t p = 0; p < n; ++p) {
      const Term<T> t = channel_term<T, Grad>(edges[p], ys[p], mu[p], clamp_log_scale(ls[p]), lv);
      acc[p] += t.log_p;
      if constexpr (Grad) {
        du[p] = t.d_u;
        ds[p] = t.d_s;
      }
    }
  }
}

template <typename T>
int64_t runs_per_image(const Shape& s) {
  return (s.pixels() + kRun - 1) / kRun;
}

// The gradients of component k's means, log-scales (and coefficients) for n pixels from its responsibilities
// r (times the incoming gradient) and each channel's d log P / du, d log P / ds (du, ds: C rows of kRun),
// tanh_a the coefficients' tanh (3 rows of kRun). du is overwritten with d/dmu.
template <typename T>
void component_grads(const Image<const T>& img, const Image<T>& out, const Shape& s, int64_t k, int64_t p0, int64_t n,
                     const T* y, T* du_rows, const T* ds_rows, const T* tanh_a, const T* r) {
  for (int64_t c = 0; c < s.colors; ++c) {
    const T* ls = img.log_scale(c, k) + p0;
    T* du = du_rows + c * kRun;
    const T* ds = ds_rows + c * kRun;
    T* gm = out.mean(c, k) + p0;
    T* gs = out.log_scale(c, k) + p0;
#pragma omp simd
    for (int64_t p = 0; p < n; ++p) {
      du[p] = -r[p] * du[p];  // now d/dmu_c
      gm[p] = du[p];
      gs[p] = ls[p] >= T(kLogScaleMin) ? r[p] * ds[p] : T(0);
    }
  }
  if (s.coupled) {
    // mu_G = m_G + a0 y_R, mu_B = m_B + a1 y_R + a2 y_G, a_j = tanh(coeff_j)
    const T* y_r = y;
    const T* y_g = y + kRun;
    const T* d_g = du_rows + kRun;
    const T* d_b = du_rows + 2 * kRun;
    const T* y_of[3] = {y_r, y_r, y_g};
    const T* d_of[3] = {d_g, d_b, d_b};
    for (int64_t j = 0; j < 3; ++j) {
      const T* t = tanh_a + j * kRun;
      const T* yj = y_of[j];
      const T* dj = d_of[j];
      T* ga = out.coeff(j, k) + p0;
#pragma omp simd
      for (int64_t p = 0; p < n; ++p) ga[p] = dj[p] * yj[p] * (T(1) - t[p] * t[p]);
    }
  }
}

template <typename T>
struct LogProbKernel {
  static void run(const LogProbArgs& a) {
    const Shape& s = a.shape;
    const Levels<T> lv(s.levels);
    T* out = static_cast<T*>(a.out);
    const int64_t runs = runs_per_image<T>(s);
    cpu::parallel_for(s.batch * runs, kRun * s.mixtures * s.colors * kTermWork, [&](int64_t task) {
      const int64_t b = task / runs, p0 = (task % runs) * kRun, n = std::min(kRun, s.pixels() - p0);
      const Image<const T> img = image_of<const T>(a.params, s, b);
      Scratch<T> w(s.colors);
      load_levels(a.x, s, b, p0, n, lv, w);
      T lse_logits[kRun], acc[kRun];
      logits_lse(img, p0, n, lse_logits);
      LogSumExp<T> mix[kRun];
      for (int64_t k = 0; k < s.mixtures; ++k) {
        const T* l = img.logit(k) + p0;
        for (int64_t p = 0; p < n; ++p) acc[p] = l[p] - lse_logits[p];
        add_channels<T, false>(img, s, lv, k, p0, n, w, acc);
        if (k == 0) {
          for (int64_t p = 0; p < n; ++p) mix[p].first(acc[p]);
        } else {
#pragma omp simd
          for (int64_t p = 0; p < n; ++p) mix[p].add(acc[p]);
        }
      }
      T* o = out + b * s.pixels() + p0;
      for (int64_t p = 0; p < n; ++p) o[p] = mix[p].value();
    });
  }
};

template <typename T>
struct LogProbBackwardKernel {
  static void run(const LogProbBackwardArgs& a) {
    const Shape& s = a.shape;
    const Levels<T> lv(s.levels);
    const T* grad = static_cast<const T*>(a.grad);
    const T* log_prob = static_cast<const T*>(a.log_prob);
    const int64_t runs = runs_per_image<T>(s);
    cpu::parallel_for(s.batch * runs, 2 * kRun * s.mixtures * s.colors * kTermWork, [&](int64_t task) {
      const int64_t b = task / runs, p0 = (task % runs) * kRun, n = std::min(kRun, s.pixels() - p0);
      const Image<const T> img = image_of<const T>(a.params, s, b);
      const Image<T> out = image_of<T>(a.grad_params, s, b);
      Scratch<T> w(s.colors);
      load_levels(a.x, s, b, p0, n, lv, w);
      T lse_logits[kRun], acc[kRun], g[kRun], lp[kRun], r[kRun];
      logits_lse(img, p0, n, lse_logits);
      std::copy(grad + b * s.pixels() + p0, grad + b * s.pixels() + p0 + n, g);
      std::copy(log_prob + b * s.pixels() + p0, log_prob + b * s.pixels() + p0 + n, lp);
      for (int64_t k = 0; k < s.mixtures; ++k) {
        const T* l = img.logit(k) + p0;
        for (int64_t p = 0; p < n; ++p) acc[p] = l[p] - lse_logits[p];
        add_channels<T, true>(img, s, lv, k, p0, n, w, acc);
        // g r_k, and d/dlogit_k = g (r_k - softmax_k)
        T* gl = out.logit(k) + p0;
#pragma omp simd
        for (int64_t p = 0; p < n; ++p) {
          r[p] = g[p] * gk::exp(acc[p] - lp[p]);
          gl[p] = r[p] - g[p] * gk::exp(l[p] - lse_logits[p]);
        }
        component_grads(img, out, s, k, p0, n, w.y.data(), w.d_u.data(), w.d_s.data(), w.tanh_a.data(), r);
      }
    });
  }
};

// One evaluation of the terms for both passes: component k's log-sum (acc), channel derivatives and
// coefficient tanh are kept for every k of the run (K (2C + 4) kRun values, a few tens of KB), log p follows
// from them, then the gradients as LogProbBackwardKernel writes them with g = weight. The backward alone
// evaluates every term again, which made forward + backward cost 2.3 forwards.
template <typename T>
struct LogProbWithGradKernel {
  static void run(const LogProbWithGradArgs& a) {
    const Shape& s = a.shape;
    const Levels<T> lv(s.levels);
    T* log_prob = static_cast<T*>(a.log_prob);
    const T weight = static_cast<T>(a.weight);
    const int64_t runs = runs_per_image<T>(s), K = s.mixtures, C = s.colors;
    cpu::parallel_for(s.batch * runs, 2 * kRun * K * C * kTermWork, [&](int64_t task) {
      const int64_t b = task / runs, p0 = (task % runs) * kRun, n = std::min(kRun, s.pixels() - p0);
      const Image<const T> img = image_of<const T>(a.params, s, b);
      const Image<T> out = image_of<T>(a.grad_params, s, b);
      Scratch<T> w(C);
      load_levels(a.x, s, b, p0, n, lv, w);
      std::vector<T> acc_k(K * kRun), du_k(K * C * kRun), ds_k(K * C * kRun), tanh_k(s.coupled ? K * 3 * kRun : 0);
      T lse_logits[kRun], lp[kRun], r[kRun];
      logits_lse(img, p0, n, lse_logits);
      LogSumExp<T> mix[kRun];
      for (int64_t k = 0; k < K; ++k) {
        const T* l = img.logit(k) + p0;
        T* acc = acc_k.data() + k * kRun;
        for (int64_t p = 0; p < n; ++p) acc[p] = l[p] - lse_logits[p];
        add_channels<T, true>(img, s, lv, k, p0, n, w, acc);
        std::copy(w.d_u.begin(), w.d_u.end(), du_k.begin() + k * C * kRun);
        std::copy(w.d_s.begin(), w.d_s.end(), ds_k.begin() + k * C * kRun);
        if (s.coupled) std::copy(w.tanh_a.begin(), w.tanh_a.end(), tanh_k.begin() + k * 3 * kRun);
        if (k == 0) {
          for (int64_t p = 0; p < n; ++p) mix[p].first(acc[p]);
        } else {
#pragma omp simd
          for (int64_t p = 0; p < n; ++p) mix[p].add(acc[p]);
        }
      }
      for (int64_t p = 0; p < n; ++p) lp[p] = mix[p].value();
      std::copy(lp, lp + n, log_prob + b * s.pixels() + p0);
      for (int64_t k = 0; k < K; ++k) {
        const T* l = img.logit(k) + p0;
        const T* acc = acc_k.data() + k * kRun;
        T* gl = out.logit(k) + p0;
#pragma omp simd
        for (int64_t p = 0; p < n; ++p) {
          r[p] = weight * gk::exp(acc[p] - lp[p]);
          gl[p] = r[p] - weight * gk::exp(l[p] - lse_logits[p]);
        }
        const T* tanh_a = s.coupled ? tanh_k.data() + k * 3 * kRun : w.tanh_a.data();
        component_grads(img, out, s, k, p0, n, w.y.data(), du_k.data() + k * C * kRun, ds_k.data() + k * C * kRun,
                        tanh_a, r);
      }
    });
  }
};

// A pixel's params `stride` apart, in the compute type.
template <typename T>
struct Strided {
  const T* p;
  int64_t stride;
  T operator()(int64_t ch) const { return p[ch * stride]; }
};

template <typename T>
struct SampleKernel {
  static void run(const SampleArgs& a) {
    const Shape& s = a.shape;
    const int64_t pixels = s.pixels();
    const uint64_t draws = static_cast<uint64_t>(s.draws());
    cpu::parallel_for(s.batch * pixels, (s.mixtures + s.colors) * kTermWork, [&](int64_t item) {
      const int64_t b = item / pixels, p = item % pixels;
      const Image<const T> img = image_of<const T>(a.params, s, b);
      const uint64_t base =
          ((a.first + static_cast<uint64_t>(b)) * static_cast<uint64_t>(pixels) + static_cast<uint64_t>(p)) * draws;
      draw_pixel<T>(Strided<T>{img.base + p, pixels}, s.mixtures, s.colors, s.coupled, s.levels, a.seed, a.offset, base,
                    a.out + b * s.colors * pixels + p, pixels);
    });
  }
};

}  // namespace

void log_prob_cpu(const LogProbArgs& a) { cpu::dispatch_float<LogProbKernel>(a.dtype, a); }
void log_prob_backward_cpu(const LogProbBackwardArgs& a) { cpu::dispatch_float<LogProbBackwardKernel>(a.dtype, a); }
void log_prob_with_grad_cpu(const LogProbWithGradArgs& a) { cpu::dispatch_float<LogProbWithGradKernel>(a.dtype, a); }
void sample_cpu(const SampleArgs& a) { cpu::dispatch_float<SampleKernel>(a.dtype, a); }

void draw_pixel_cpu(const float* params, int64_t stride, int64_t mixtures, int64_t colors, bool coupled, int64_t levels,
                    uint64_t seed, uint64_t offset, uint64_t base, int64_t* out, int64_t out_stride) {
  draw_pixel<float>(Strided<float>{params, stride}, mixtures, colors, coupled, levels, seed, offset, base, out,
                    out_stride);
}

}  // namespace mixture
}  // namespace gk
