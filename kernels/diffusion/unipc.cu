// The UniPC step on CUDA: a thread per group of 4 flat elements of the (batch, n) arrays; each element takes
// its own sample's coefficients, so a sample boundary inside a group (n % 4 != 0) needs no special case. The
// math is csrc/diffusion/unipc_math.h.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "core/launch.cuh"
#include "diffusion/unipc.h"
#include "diffusion/unipc_math.h"

namespace gk {
namespace diffusion {
namespace {

using namespace gpu::common;

constexpr int kThreads = 256;

template <typename S>
__global__ void __launch_bounds__(kThreads) unipc_step_kernel(UniPcStepArgs a) {
  using C = compute_t<S>;
  const S* mo = static_cast<const S*>(a.model_output);
  const S* sample = static_cast<const S*>(a.sample);
  S* history = static_cast<S*>(a.history);
  S* prev = static_cast<S*>(a.prev_sample);
  const int64_t n = a.n, total = a.batch * n, groups = ceil_div(total, 4);
  const bool thresholded = a.limit != nullptr, three = a.slots == 3;
  for (int64_t g = gpu::thread_index(); g < groups; g += gpu::thread_count()) {
    const int64_t base = 4 * g;
    const int count = static_cast<int>(min(int64_t(4), total - base));
    int64_t b, j;
    divmod(base, n, b, j);
#pragma unroll
    for (int l = 0; l < 4; ++l) {
      if (l < count) {
        const int64_t e = base + l;
        const UniPcCoefficients<C> k =
            unipc_coefficients<C>(a.sigmas, a.num_sigmas, a.step[b], a.predictor_order, a.corrector_order,
                                  a.final_first_order != 0, a.corrector != 0, a.solver, a.flow_sigmas != 0);
        C m = load(mo, b * n + j);
        if (a.guided) {
          const C r = a.rescale ? C(a.rescale[b]) : C(1);
          m = guide(m, load(mo, (a.batch + b) * n + j), C(a.guidance_scale), r);
        }
        const C limit = thresholded ? C(a.limit[b]) : C(INFINITY);
        // Only what the step uses is read (a first step's history may hold anything), and h1, which moves to
        // the third slot.
        C last = k.correct ? load(history, e) : C(0);
        C h1 = k.correct || k.p.second || three ? load(history, total + e) : C(0);
        C h2 = k.correct && k.c.second ? load(history, 2 * total + e) : C(0);
        const C out = unipc_step_element(m, load(sample, e), last, h1, h2, k, a.prediction, thresholded, limit, three);
        store(prev, e, out);
        store(history, e, last);
        store(history, total + e, h1);
        if (three) store(history, 2 * total + e, h2);
      }
      if (++j == n) {
        j = 0;
        ++b;
      }
    }
  }
}

}  // namespace

void unipc_step_cuda(const UniPcStepArgs& a, void* stream) {
  gpu::launch_typed(
      a.dtype, "diffusion.unipc_step", [](auto type) { return unipc_step_kernel<typename decltype(type)::type>; },
      ceil_div(a.batch * a.n, 4), kThreads, stream, a);
}

}  // namespace diffusion
}  // namespace gk
