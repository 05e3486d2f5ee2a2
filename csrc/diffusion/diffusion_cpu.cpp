// CPU kernels of the diffusion family (training and sampling): indexing, chunking and threading around
// csrc/diffusion/diffusion_math.h. Arrays are (batch, n); element (b, j) is flat element b * n + j, which is also its
// index in the noise stream.
#include "diffusion/diffusion.h"

#include <algorithm>
#include <limits>
#include <type_traits>
#include <vector>

#include "diffusion/diffusion_math.h"
#include "core/parallel.h"
#include "core/sum.h"

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
    case kEpsilon:
      fn(std::integral_constant<int32_t, kEpsilon>{});
      return;
    case kVPrediction:
      fn(std::integral_constant<int32_t, kVPrediction>{});
      return;
    default:
      fn(std::integral_constant<int32_t, kSample>{});
      return;
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
    cpu::parallel_for((total + kChunk - 1) / kChunk, kChunk * (noise ? 1 : cpu::kRandomWork), [&](int64_t c) {
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
        cpu::parallel_for(spans, per_span * n * (noise ? 1 : cpu::kRandomWork), [&](int64_t sp) {
          alignas(64) T e[kChunk];
          const int64_t b0 = sp * per_span, b1 = std::min(B, b0 + per_span);
          cpu::load_eps(noise, a.seed, a.offset, b0 * n, (b1 - b0) * n, e);
          for (int64_t b = b0; b < b1; ++b)
            finish(b, sse(level_of(a.table, a.table_rows, a.t, b), b * n, n, e + (b - b0) * n));
        });
        return;
      }
      // Long samples: (sample, segment) work items, so that even one sample uses every core.
      const int64_t segments = (n + kSegment - 1) / kSegment;
      std::vector<T> partial(static_cast<size_t>(B * segments));
      cpu::parallel_for(B * segments, kSegment * (noise ? 1 : cpu::kRandomWork), [&](int64_t item) {
        alignas(64) T e[kChunk];
        const int64_t b = item / segments, s0 = (item % segments) * kSegment;
        const int64_t s1 = std::min(n, s0 + kSegment);
        const Level l = level_of(a.table, a.table_rows, a.t, b);
        T chunk_sums[kSegment / kChunk];  // summed pairwise, as the segments are (core/sum.h)
        int64_t chunks = 0;
        for (int64_t j = s0; j < s1; j += kChunk) {
          const int64_t len = std::min(kChunk, s1 - j);
          cpu::load_eps(noise, a.seed, a.offset, b * n + j, len, e);
          chunk_sums[chunks++] = sse(l, b * n + j, len, e);
        }
        partial[static_cast<size_t>(item)] = cpu::pairwise_sum(chunk_sums, chunks);
      });
      cpu::parallel_for(B, segments,
                        [&](int64_t b) { finish(b, cpu::pairwise_sum(partial.data() + b * segments, segments)); });
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
      cpu::parallel_for((total + kChunk - 1) / kChunk, kChunk * (noise ? 1 : cpu::kRandomWork), [&](int64_t c) {
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

// Calls fn(kind constant, prediction constant) so that step_element's branches on them fold.
template <typename Fn>
void with_step_kind(int32_t kind, int32_t prediction, Fn fn) {
  with_prediction(prediction, [&](auto pc) {
    if (kind == kDdpm)
      fn(std::integral_constant<int32_t, kDdpm>{}, pc);
    else
      fn(std::integral_constant<int32_t, kDdim>{}, pc);
  });
}

template <typename T>
struct StepKernel {
  static void run(const StepArgs& a) {
    const T* mo = static_cast<const T*>(a.model_output);
    const T* sample = static_cast<const T*>(a.sample);
    const T* noise = static_cast<const T*>(a.noise);
    T* prev = static_cast<T*>(a.prev_sample);
    T* pred_original = static_cast<T*>(a.pred_original);
    const int64_t B = a.batch, n = a.n, total = B * n;
    if (total == 0) return;
    const int64_t stride = a.variance == kLearnedRange ? 2 * n : n;  // model_output per sample
    const bool guided = a.guided != 0;
    const T scale = T(a.guidance_scale);
    with_step_kind(a.kind, a.prediction, [&](auto kc, auto pc) {
      constexpr int32_t Kind = decltype(kc)::value, P = decltype(pc)::value;
      // A step reads two inputs, writes two outputs and may draw noise: a few units per element.
      cpu::parallel_for((total + kChunk - 1) / kChunk, 2 * kChunk, [&](int64_t chunk) {
        alignas(64) T z[kChunk], guided_m[kChunk], x0_scratch[kChunk];
        const int64_t start = chunk * kChunk, len = std::min(kChunk, total - start);
        // The chunk's noise, drawn once if any of its samples adds noise.
        bool any_noisy = Kind == kDdim ? a.eta > 0.0f : false;
        if (Kind == kDdpm)
          for (int64_t b = start / n; b <= (start + len - 1) / n && !any_noisy; ++b) any_noisy = a.t[b] > 0;
        if (any_noisy) cpu::load_eps(noise, a.seed, a.offset, start, len, z);
        cpu::for_each_periodic(start, len, n, [&](int64_t t0, int64_t j0, int64_t cnt) {
          const int64_t b = (start + t0) / n;
          const StepCoefficients<T> c =
              step_coefficients<T>(a.table, a.table_rows, a.t, a.prev_t, b, Kind, a.variance, T(a.eta));
          // Thresholding: dynamic (clamp to +-q, divide by q), clip, or none (+inf).
          T limit = std::numeric_limits<T>::infinity();
          const bool divide = a.dynamic_threshold != nullptr;
          if (divide)
            limit = T(a.dynamic_threshold[b]);
          else if (a.clip > 0.0f)
            limit = T(a.clip);
          const T* m = mo + b * stride + j0;
          const T* v = mo + ((guided ? B + b : b) * stride + n + j0);  // learned_range only
          if (guided) {
            const T* uncond = m;
            const T* cond = mo + (B + b) * stride + j0;
            const T k = a.guidance_rescale ? T(a.guidance_rescale[b]) : T(1);
#pragma omp simd
            for (int64_t i = 0; i < cnt; ++i) guided_m[i] = guide(uncond[i], cond[i], scale, k);
            m = guided_m;
          }
          const T* x = sample + start + t0;
          const T* zr = z + t0;
          T* out = prev + start + t0;
          T* x0 = pred_original ? pred_original + start + t0 : x0_scratch;
          const bool clipped_eps = a.use_clipped_model_output != 0;
          auto loop = [&](auto noisy_c, auto learned_c, auto divide_c) {
            constexpr bool kNoisy = decltype(noisy_c)::value, kLearned = decltype(learned_c)::value;
            constexpr bool kDivide = decltype(divide_c)::value;
            StepCoefficients<T> cc = c;
            cc.noisy = kNoisy;
#pragma omp simd
            for (int64_t i = 0; i < cnt; ++i)
              out[i] = step_element(m[i], x[i], kLearned ? v[i] : T(0), kNoisy ? zr[i] : T(0), cc, Kind, P,
                                    kLearned ? int32_t(kLearnedRange) : int32_t(kFixedSmall), limit, kDivide,
                                    clipped_eps, x0[i]);
          };
          using yes = std::true_type;
          using no = std::false_type;
          const bool noisy = c.noisy && any_noisy;
          const bool learned = Kind == kDdpm && a.variance == kLearnedRange && noisy;
          if (divide) {
            if (learned)
              loop(yes{}, yes{}, yes{});
            else if (noisy)
              loop(yes{}, no{}, yes{});
            else
              loop(no{}, no{}, yes{});
          } else {
            if (learned)
              loop(yes{}, yes{}, no{});
            else if (noisy)
              loop(yes{}, no{}, no{});
            else
              loop(no{}, no{}, no{});
          }
        });
      });
    });
  }
};

}  // namespace

void q_sample_cpu(const QSampleArgs& a) { cpu::dispatch_float<QSampleKernel>(a.dtype, a); }
void loss_cpu(const LossArgs& a) { cpu::dispatch_float<LossKernel>(a.dtype, a); }
void loss_backward_cpu(const LossBackwardArgs& a) { cpu::dispatch_float<LossBackwardKernel>(a.dtype, a); }
void step_cpu(const StepArgs& a) { cpu::dispatch_float<StepKernel>(a.dtype, a); }

}  // namespace diffusion
}  // namespace gk
