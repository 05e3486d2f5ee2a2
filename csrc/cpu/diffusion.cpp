// CPU kernels of the diffusion family (training side): indexing, chunking and threading around
// csrc/common/diffusion.h. Arrays are (batch, n); element (b, j) is flat element b * n + j, which is also its
// index in the noise stream.
#include "../diffusion.h"

#include <algorithm>
#include <type_traits>
#include <vector>

#include "../common/diffusion.h"
#include "parallel.h"

namespace gk {
namespace diffusion {
namespace {

using cpu::kChunk;

// Long samples of the loss are summed in segments of this many elements (a whole number of chunks), each a
// work item of its own, the segment sums then added in order: the result never depends on the thread count.
constexpr int64_t kSegment = 16 * kChunk;

// The schedule row of sample b (clamped into the table, see level_clamped).
inline Level level_of(const float* table, int64_t rows, const int64_t* t, int64_t b) {
  return level_clamped(table, rows, t[b]);
}

// Calls fn(std::integral_constant<int32_t, P>) so that loss_target's branch folds inside the element loops.
template <typename Fn>
void with_prediction(int32_t prediction, Fn fn) {
  switch (prediction) {
    case kEpsilon: fn(std::integral_constant<int32_t, kEpsilon>{}); return;
    case kVPrediction: fn(std::integral_constant<int32_t, kVPrediction>{}); return;
    default: fn(std::integral_constant<int32_t, kSample>{}); return;
  }
}

template <typename T>
struct QSampleKernel {
  static void run(const QSampleArgs& a) {
    const T* x0 = static_cast<const T*>(a.x0);
    const T* noise = static_cast<const T*>(a.noise);
    T* x_t = static_cast<T*>(a.x_t);
    const int64_t total = a.batch * a.n;
    if (total == 0) return;
    cpu::parallel_for((total + kChunk - 1) / kChunk, [&](int64_t c) {
      alignas(64) T e[kChunk];
      const int64_t start = c * kChunk, len = std::min(kChunk, total - start);
      cpu::load_eps(noise, a.seed, a.offset, start, len, e);
      cpu::for_each_periodic(start, len, a.n, [&](int64_t t0, int64_t, int64_t cnt) {
        const int64_t b = (start + t0) / a.n;  // the sample of this run
        const Level l = level_of(a.table, a.table_rows, a.t, b);
        const T* x = x0 + start + t0;
        const T* ep = e + t0;
        T* out = x_t + start + t0;
#pragma omp simd
        for (int64_t k = 0; k < cnt; ++k) out[k] = q_sample(x[k], ep[k], l);
      });
    });
  }
};

template <typename T>
struct LossKernel {
  static void run(const LossArgs& a) {
    const T* m = static_cast<const T*>(a.model_output);
    const T* x0 = static_cast<const T*>(a.x0);
    const T* noise = static_cast<const T*>(a.noise);
    T* loss = static_cast<T*>(a.loss);
    const int64_t B = a.batch, n = a.n;
    if (B == 0) return;
    if (n == 0) {  // the mean of nothing is taken as 0
      std::fill(loss, loss + B, T(0));
      return;
    }
    // loss[b] = weight * (sum / n), the order the reference uses (mean, then weight).
    auto finish = [&](int64_t b, T sum) {
      const float w = min_snr_weight(level_of(a.table, a.table_rows, a.t, b), a.snr_gamma, a.prediction);
      loss[b] = (sum / T(n)) * T(w);
    };
    with_prediction(a.prediction, [&](auto pc) {
      constexpr int32_t P = decltype(pc)::value;
      // Sum of squared errors of flat elements [f, f + cnt) of one sample at level l, eps in e[0, cnt).
      auto sse = [&](const Level& l, int64_t f, int64_t cnt, const T* e) {
        const T* x = x0 + f;
        const T* mo = m + f;
        T acc = 0;
#pragma omp simd reduction(+ : acc)
        for (int64_t k = 0; k < cnt; ++k) {
          const T d = loss_target(x[k], e[k], l, P) - mo[k];
          acc += d * d;
        }
        return acc;
      };
      if (n <= kChunk) {
        // Short samples: a span of whole samples per work item, one eps load for the span.
        const int64_t per_span = kChunk / n;
        const int64_t spans = (B + per_span - 1) / per_span;
        cpu::parallel_for(spans, [&](int64_t sp) {
          alignas(64) T e[kChunk];
          const int64_t b0 = sp * per_span, b1 = std::min(B, b0 + per_span);
          cpu::load_eps(noise, a.seed, a.offset, b0 * n, (b1 - b0) * n, e);
          for (int64_t b = b0; b < b1; ++b) finish(b, sse(level_of(a.table, a.table_rows, a.t, b), b * n, n, e + (b - b0) * n));
        });
        return;
      }
      // Long samples: (sample, segment) work items, so that even one sample uses every core.
      const int64_t segments = (n + kSegment - 1) / kSegment;
      std::vector<T> partial(static_cast<size_t>(B * segments));
      cpu::parallel_for(B * segments, [&](int64_t item) {
        alignas(64) T e[kChunk];
        const int64_t b = item / segments, s0 = (item % segments) * kSegment;
        const int64_t s1 = std::min(n, s0 + kSegment);
        const Level l = level_of(a.table, a.table_rows, a.t, b);
        T acc = 0;
        for (int64_t j = s0; j < s1; j += kChunk) {
          const int64_t len = std::min(kChunk, s1 - j);
          cpu::load_eps(noise, a.seed, a.offset, b * n + j, len, e);
          acc += sse(l, b * n + j, len, e);
        }
        partial[static_cast<size_t>(item)] = acc;
      });
      cpu::parallel_for(B, [&](int64_t b) {
        T acc = 0;
        for (int64_t g = 0; g < segments; ++g) acc += partial[static_cast<size_t>(b * segments + g)];
        finish(b, acc);
      });
    });
  }
};

template <typename T>
struct LossBackwardKernel {
  static void run(const LossBackwardArgs& a) {
    const T* grad_loss = static_cast<const T*>(a.grad_loss);
    const T* m = static_cast<const T*>(a.model_output);
    const T* x0 = static_cast<const T*>(a.x0);
    const T* noise = static_cast<const T*>(a.noise);
    T* grad = static_cast<T*>(a.grad_model_output);
    const int64_t total = a.batch * a.n;
    if (total == 0) return;
    with_prediction(a.prediction, [&](auto pc) {
      constexpr int32_t P = decltype(pc)::value;
      cpu::parallel_for((total + kChunk - 1) / kChunk, [&](int64_t c) {
        alignas(64) T e[kChunk];
        const int64_t start = c * kChunk, len = std::min(kChunk, total - start);
        cpu::load_eps(noise, a.seed, a.offset, start, len, e);
        cpu::for_each_periodic(start, len, a.n, [&](int64_t t0, int64_t, int64_t cnt) {
        const int64_t b = (start + t0) / a.n;  // the sample of this run
          const Level l = level_of(a.table, a.table_rows, a.t, b);
          const float w = min_snr_weight(l, a.snr_gamma, a.prediction);
          // (grad_loss * weight) / n, then times 2 (m - target): the order of the reference's autograd.
          const T coef = grad_loss[b] * T(w) / T(a.n);
          const T* x = x0 + start + t0;
          const T* mo = m + start + t0;
          const T* ep = e + t0;
          T* out = grad + start + t0;
#pragma omp simd
          for (int64_t k = 0; k < cnt; ++k) out[k] = coef * (T(2) * (mo[k] - loss_target(x[k], ep[k], l, P)));
        });
      });
    });
  }
};

}  // namespace

void q_sample_cpu(const QSampleArgs& a) { cpu::dispatch_float<QSampleKernel>(a.dtype, a); }
void loss_cpu(const LossArgs& a) { cpu::dispatch_float<LossKernel>(a.dtype, a); }
void loss_backward_cpu(const LossBackwardArgs& a) { cpu::dispatch_float<LossBackwardKernel>(a.dtype, a); }

}  // namespace diffusion
}  // namespace gk
