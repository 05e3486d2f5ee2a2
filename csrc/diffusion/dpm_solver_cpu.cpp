// CPU kernel of the DPM-Solver++ step: chunking and threading around csrc/diffusion/dpm_solver_math.h.
// Element (b, j) of the (batch, n) arrays is flat element b * n + j, also its index in the noise stream.
#include <algorithm>
#include <limits>
#include <type_traits>

#include "core/parallel.h"
#include "diffusion/dpm_solver.h"
#include "diffusion/dpm_solver_math.h"

namespace gk {
namespace diffusion {
namespace {

using cpu::kChunk;

template <typename T>
struct DpmStepKernel {
  static void run(const DpmStepArgs& a) {
    const T* mo = static_cast<const T*>(a.model_output);
    const T* sample = static_cast<const T*>(a.sample);
    const T* noise = static_cast<const T*>(a.noise);
    T* history = static_cast<T*>(a.history);
    T* prev = static_cast<T*>(a.prev_sample);
    const int64_t B = a.batch, n = a.n, total = B * n;
    if (total == 0) return;
    const T scale = T(a.guidance_scale);
    const bool sde = a.sde != 0, thresholded = a.limit != nullptr;
    const int64_t work = kChunk * (sde && !noise ? cpu::kRandomWork : 3);
    cpu::parallel_for((total + kChunk - 1) / kChunk, work, [&](int64_t chunk) {
      alignas(64) T z[kChunk], guided_m[kChunk];
      const int64_t start = chunk * kChunk, len = std::min(kChunk, total - start);
      if (sde) cpu::load_eps(noise, a.seed, a.offset, start, len, z);
      cpu::for_each_periodic(start, len, n, [&](int64_t t0, int64_t j0, int64_t cnt) {
        const int64_t b = (start + t0) / n;
        const DpmCoefficients<T> c =
            dpm_coefficients<T>(a.sigmas, a.num_sigmas, a.step[b], a.order, a.final_first_order != 0, a.solver, sde);
        const T limit = thresholded ? T(a.limit[b]) : std::numeric_limits<T>::infinity();
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
        T* hist = history + start + t0;
        T* out = prev + start + t0;
        // The prediction as a constant, so that dpm_predict_x0's branch folds in the loop. The history is read
        // before it is written, element by element (out may be the sample itself).
        auto loop = [&](auto prediction_c) {
          constexpr int32_t P = decltype(prediction_c)::value;
#pragma omp simd
          for (int64_t i = 0; i < cnt; ++i) {
            T x0;
            out[i] = dpm_step_element(m[i], x[i], hist[i], sde ? zr[i] : T(0), c, P, sde, thresholded, limit, x0);
            hist[i] = x0;
          }
        };
        if (a.prediction == kEpsilon)
          loop(std::integral_constant<int32_t, kEpsilon>{});
        else if (a.prediction == kVPrediction)
          loop(std::integral_constant<int32_t, kVPrediction>{});
        else
          loop(std::integral_constant<int32_t, kSample>{});
      });
    });
  }
};

}  // namespace

void dpm_step_cpu(const DpmStepArgs& a) { cpu::dispatch_float<DpmStepKernel>(a.dtype, a); }

}  // namespace diffusion
}  // namespace gk
