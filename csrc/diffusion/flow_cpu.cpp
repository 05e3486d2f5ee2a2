// CPU kernel of the flow-matching Euler step: chunking and threading around csrc/diffusion/flow_math.h.
// Element (b, j) of the (batch, n) arrays is flat element b * n + j, also its index in the noise stream.
#include <algorithm>

#include "core/parallel.h"
#include "diffusion/diffusion_math.h"
#include "diffusion/flow.h"
#include "diffusion/flow_math.h"

namespace gk {
namespace diffusion {
namespace {

using cpu::kChunk;

template <typename T>
struct FlowStepKernel {
  static void run(const FlowStepArgs& a) {
    const T* mo = static_cast<const T*>(a.model_output);
    const T* sample = static_cast<const T*>(a.sample);
    const T* noise = static_cast<const T*>(a.noise);
    T* prev = static_cast<T*>(a.prev_sample);
    T* pred_original = static_cast<T*>(a.pred_original);
    const int64_t B = a.batch, n = a.n, total = B * n;
    if (total == 0) return;
    const T scale = T(a.guidance_scale);
    const bool stochastic = a.stochastic != 0;
    cpu::parallel_for((total + kChunk - 1) / kChunk, [&](int64_t chunk) {
      alignas(64) T z[kChunk], guided_m[kChunk], x0_scratch[kChunk];
      const int64_t start = chunk * kChunk, len = std::min(kChunk, total - start);
      if (stochastic) cpu::load_eps(noise, a.seed, a.offset, start, len, z);
      cpu::for_each_periodic(start, len, n, [&](int64_t t0, int64_t j0, int64_t cnt) {
        const int64_t b = (start + t0) / n;
        const float sigma_f = a.sigma[b], next_f = a.sigma_next[b];
        const T sigma = T(sigma_f), next = T(next_f), dt = T(next_f - sigma_f);
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
        if (stochastic) {
#pragma omp simd
          for (int64_t i = 0; i < cnt; ++i) out[i] = flow_euler(m[i], x[i], zr[i], sigma, next, dt, true, x0[i]);
        } else {
#pragma omp simd
          for (int64_t i = 0; i < cnt; ++i) out[i] = flow_euler(m[i], x[i], T(0), sigma, next, dt, false, x0[i]);
        }
      });
    });
  }
};

}  // namespace

void flow_step_cpu(const FlowStepArgs& a) { cpu::dispatch_float<FlowStepKernel>(a.dtype, a); }

}  // namespace diffusion
}  // namespace gk
