// The DPM-Solver++ step on CUDA: a thread per group of 4 flat elements of the (batch, n) arrays, i.e. per
// Philox block of the SDE noise; each element takes its own sample's coefficients, so a sample boundary inside
// a group (n % 4 != 0) needs no special case. The math is csrc/diffusion/dpm_solver_math.h.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "core/launch.cuh"
#include "core/normal.h"
#include "diffusion/dpm_solver.h"
#include "diffusion/dpm_solver_math.h"

namespace gk {
namespace diffusion {
namespace {

using namespace gpu::common;

constexpr int kThreads = 256;

template <typename S>
__global__ void __launch_bounds__(kThreads) dpm_step_kernel(DpmStepArgs a) {
  using C = compute_t<S>;
  const S* mo = static_cast<const S*>(a.model_output);
  const S* sample = static_cast<const S*>(a.sample);
  const S* noise = static_cast<const S*>(a.noise);
  S* history = static_cast<S*>(a.history);
  S* prev = static_cast<S*>(a.prev_sample);
  const int64_t n = a.n, total = a.batch * n, groups = ceil_div(total, 4);
  const bool sde = a.sde != 0, thresholded = a.limit != nullptr;
  for (int64_t g = gpu::thread_index(); g < groups; g += gpu::thread_count()) {
    const int64_t base = 4 * g;
    const int count = static_cast<int>(min(int64_t(4), total - base));
    float z4[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (sde && !noise) {
      const Normal4 z = stream_normals(a.seed, a.offset, static_cast<uint64_t>(g));
#pragma unroll
      for (int l = 0; l < 4; ++l) z4[l] = z.z[l];
    }
    int64_t b, j;
    divmod(base, n, b, j);
#pragma unroll
    for (int l = 0; l < 4; ++l) {
      if (l < count) {
        const int64_t e = base + l;
        const DpmCoefficients<C> c =
            dpm_coefficients<C>(a.sigmas, a.num_sigmas, a.step[b], a.order, a.final_first_order != 0, a.solver, sde);
        C m = load(mo, b * n + j);
        if (a.guided) {
          const C k = a.rescale ? C(a.rescale[b]) : C(1);
          m = guide(m, load(mo, (a.batch + b) * n + j), C(a.guidance_scale), k);
        }
        const C z = sde ? (noise ? load(noise, e) : C(z4[l])) : C(0);
        const C limit = thresholded ? C(a.limit[b]) : C(INFINITY);
        // The history is read only on second-order steps: a first step's buffer may hold anything.
        const C hist = c.second ? load(history, e) : C(0);
        C x0;
        const C out = dpm_step_element(m, load(sample, e), hist, z, c, a.prediction, sde, thresholded, limit, x0);
        store(prev, e, out);
        store(history, e, x0);
      }
      if (++j == n) {
        j = 0;
        ++b;
      }
    }
  }
}

}  // namespace

void dpm_step_cuda(const DpmStepArgs& a, void* stream) {
  gpu::launch_typed(
      a.dtype, "diffusion.dpm_step", [](auto type) { return dpm_step_kernel<typename decltype(type)::type>; },
      ceil_div(a.batch * a.n, 4), kThreads, stream, a);
}

}  // namespace diffusion
}  // namespace gk
