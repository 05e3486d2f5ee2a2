// CPU kernel of the UniPC step: chunking and threading around csrc/diffusion/unipc_math.h.
#include <algorithm>
#include <limits>
#include <type_traits>

#include "core/parallel.h"
#include "diffusion/unipc.h"
#include "diffusion/unipc_math.h"

namespace gk {
namespace diffusion {
namespace {

using cpu::kChunk;

template <typename T>
struct UniPcStepKernel {
  static void run(const UniPcStepArgs& a) {
    const T* mo = static_cast<const T*>(a.model_output);
    const T* sample = static_cast<const T*>(a.sample);
    T* history = static_cast<T*>(a.history);
    T* prev = static_cast<T*>(a.prev_sample);
    const int64_t B = a.batch, n = a.n, total = B * n;
    if (total == 0) return;
    const T scale = T(a.guidance_scale);
    const bool thresholded = a.limit != nullptr, three = a.slots == 3;
    // Three to five arrays read and as many written per element: about twice the DPM step's traffic.
    const int64_t work = kChunk * 6;
    cpu::parallel_for((total + kChunk - 1) / kChunk, work, [&](int64_t chunk) {
      alignas(64) T guided_m[kChunk];
      const int64_t start = chunk * kChunk, len = std::min(kChunk, total - start);
      cpu::for_each_periodic(start, len, n, [&](int64_t t0, int64_t j0, int64_t cnt) {
        const int64_t b = (start + t0) / n;
        const UniPcCoefficients<T> k =
            unipc_coefficients<T>(a.sigmas, a.num_sigmas, a.step[b], a.predictor_order, a.corrector_order,
                                  a.final_first_order != 0, a.corrector != 0, a.solver, a.flow_sigmas != 0);
        const T limit = thresholded ? T(a.limit[b]) : std::numeric_limits<T>::infinity();
        const T* m = mo + b * n + j0;
        if (a.guided) {
          const T* cond = mo + (B + b) * n + j0;
          const T r = a.rescale ? T(a.rescale[b]) : T(1);
#pragma omp simd
          for (int64_t i = 0; i < cnt; ++i) guided_m[i] = guide(m[i], cond[i], scale, r);
          m = guided_m;
        }
        const T* x = sample + start + t0;
        T* last = history + start + t0;
        T* h1 = last + total;
        // With two slots h2 aliases h1: it is neither read (first-order corrector) nor written.
        T* h2 = three ? h1 + total : h1;
        T* out = prev + start + t0;
        // The prediction as a constant, so that the element's branch folds in the loop. Each history element
        // is read before it is written (out may be the sample itself).
        auto loop = [&](auto prediction_c) {
          constexpr int32_t P = decltype(prediction_c)::value;
#pragma omp simd
          for (int64_t i = 0; i < cnt; ++i) {
            T l = last[i], p1 = h1[i], p2 = three ? h2[i] : T(0);
            out[i] = unipc_step_element(m[i], x[i], l, p1, p2, k, P, thresholded, limit, three);
            last[i] = l;
            h1[i] = p1;
            if (three) h2[i] = p2;
          }
        };
        if (a.prediction == kEpsilon)
          loop(std::integral_constant<int32_t, kEpsilon>{});
        else if (a.prediction == kVPrediction)
          loop(std::integral_constant<int32_t, kVPrediction>{});
        else if (a.prediction == kSample)
          loop(std::integral_constant<int32_t, kSample>{});
        else
          loop(std::integral_constant<int32_t, kFlowPrediction>{});
      });
    });
  }
};

}  // namespace

void unipc_step_cpu(const UniPcStepArgs& a) { cpu::dispatch_float<UniPcStepKernel>(a.dtype, a); }

}  // namespace diffusion
}  // namespace gk
