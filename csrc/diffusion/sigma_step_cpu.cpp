// CPU kernel of the sigma-space steps: chunking and threading around csrc/diffusion/sigma_step_math.h.
// Element (b, j) of the (batch, n) arrays is flat element b * n + j, also its index in the noise stream.
#include <algorithm>
#include <type_traits>

#include "core/parallel.h"
#include "diffusion/sigma_step.h"
#include "diffusion/sigma_step_math.h"

namespace gk {
namespace diffusion {
namespace {

using cpu::kChunk;

template <typename T>
struct SigmaStepKernel {
  static void run(const SigmaStepArgs& a) {
    const T* mo = static_cast<const T*>(a.model_output);
    const T* sample = static_cast<const T*>(a.sample);
    const T* noise = static_cast<const T*>(a.noise);
    T* prev = static_cast<T*>(a.prev_sample);
    T* pred_original = static_cast<T*>(a.pred_original);
    T* derivative = static_cast<T*>(a.derivative);
    const T* origin = static_cast<const T*>(a.origin);
    T* model_input = static_cast<T*>(a.model_input);
    const T* model_scale = static_cast<const T*>(a.model_scale);
    const int64_t B = a.batch, n = a.n, total = B * n;
    if (total == 0) return;
    const T scale = T(a.guidance_scale);
    const bool stochastic = a.stochastic != 0;
    const bool noisy = a.kind == kEulerAncestral || (a.kind == kFlowEuler && stochastic);
    // Work per chunk as the DDPM/DDIM step counts it: the noise, drawn in the kernel, costs more than the rest.
    const int64_t work = kChunk * (noisy && !noise ? cpu::kRandomWork : 2);
    cpu::parallel_for((total + kChunk - 1) / kChunk, work, [&](int64_t chunk) {
      alignas(64) T z[kChunk], guided_m[kChunk], x0_scratch[kChunk];
      const int64_t start = chunk * kChunk, len = std::min(kChunk, total - start);
      if (noisy) cpu::load_eps(noise, a.seed, a.offset, start, len, z);
      cpu::for_each_periodic(start, len, n, [&](int64_t t0, int64_t j0, int64_t cnt) {
        const int64_t b = (start + t0) / n;
        const SigmaCoefficients<T> c = sigma_coefficients<T>(a.kind, a.sigma[b], a.sigma_next[b]);
        const T* m = mo + b * n + j0;
        if (a.guided) {
          const T* cond = mo + (B + b) * n + j0;
          const T k = a.rescale ? T(a.rescale[b]) : T(1);
#pragma omp simd
          for (int64_t i = 0; i < cnt; ++i) guided_m[i] = guide(m[i], cond[i], scale, k);
          m = guided_m;
        }
        const T* x = sample + start + t0;
        const T* zr = z + t0;
        T* out = prev + start + t0;
        T* x0 = pred_original ? pred_original + start + t0 : x0_scratch;
        // The kind and prediction as constants, so that sigma_step_element's branches fold in the loop.
        auto loop = [&](auto kind_c, auto prediction_c) {
          constexpr int32_t K = decltype(kind_c)::value, P = decltype(prediction_c)::value;
#pragma omp simd
          for (int64_t i = 0; i < cnt; ++i)
            out[i] = sigma_step_element(m[i], x[i], noisy ? zr[i] : T(0), c, K, P, stochastic, x0[i]);
        };
        auto with_prediction = [&](auto kind_c) {
          if (a.prediction == kEpsilon)
            loop(kind_c, std::integral_constant<int32_t, kEpsilon>{});
          else if (a.prediction == kVPrediction)
            loop(kind_c, std::integral_constant<int32_t, kVPrediction>{});
          else
            loop(kind_c, std::integral_constant<int32_t, kSample>{});
        };
        // Heun's halves: the derivative in and out of its own buffer.
        T* d = derivative ? derivative + start + t0 : nullptr;
        const T* o = origin ? origin + start + t0 : nullptr;
        auto heun = [&](auto prediction_c) {
          constexpr int32_t P = decltype(prediction_c)::value;
          if (a.kind == kHeunFirst) {
#pragma omp simd
            for (int64_t i = 0; i < cnt; ++i) out[i] = heun_first_element(m[i], x[i], c, P, x0[i], d[i]);
          } else {
#pragma omp simd
            for (int64_t i = 0; i < cnt; ++i) out[i] = heun_second_element(m[i], x[i], o[i], d[i], c, P, x0[i]);
          }
        };
        if (a.kind == kHeunFirst || a.kind == kHeunSecond) {
          if (a.prediction == kEpsilon)
            heun(std::integral_constant<int32_t, kEpsilon>{});
          else if (a.prediction == kVPrediction)
            heun(std::integral_constant<int32_t, kVPrediction>{});
          else
            heun(std::integral_constant<int32_t, kSample>{});
        } else if (a.kind == kFlowEuler)
          loop(std::integral_constant<int32_t, kFlowEuler>{}, std::integral_constant<int32_t, kEpsilon>{});
        else if (a.kind == kEuler)
          with_prediction(std::integral_constant<int32_t, kEuler>{});
        else
          with_prediction(std::integral_constant<int32_t, kEulerAncestral>{});
        if (model_input) {
          T* mi = model_input + start + t0;
          const T s = model_scale[b];
#pragma omp simd
          for (int64_t i = 0; i < cnt; ++i) mi[i] = out[i] / s;
        }
      });
    });
  }
};

}  // namespace

void sigma_step_cpu(const SigmaStepArgs& a) { cpu::dispatch_float<SigmaStepKernel>(a.dtype, a); }

}  // namespace diffusion
}  // namespace gk
