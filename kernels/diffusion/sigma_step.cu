// The sigma-space steps on CUDA (flow Euler, k-diffusion Euler and Euler ancestral): a thread per group of 4
// flat elements of the (batch, n) arrays, i.e. per Philox block of the noise; each element takes its own
// sample's coefficients, so a sample boundary inside a group (n % 4 != 0) needs no special case. The math is
// csrc/diffusion/sigma_step_math.h.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "core/launch.cuh"
#include "core/normal.h"
#include "diffusion/sigma_step.h"
#include "diffusion/sigma_step_math.h"

namespace gk {
namespace diffusion {
namespace {

using namespace gpu::common;

constexpr int kThreads = 256;

template <typename S>
__global__ void __launch_bounds__(kThreads) sigma_step_kernel(SigmaStepArgs a) {
  using C = compute_t<S>;
  const S* mo = static_cast<const S*>(a.model_output);
  const S* sample = static_cast<const S*>(a.sample);
  const S* noise = static_cast<const S*>(a.noise);
  S* prev = static_cast<S*>(a.prev_sample);
  S* pred_original = static_cast<S*>(a.pred_original);
  S* derivative = static_cast<S*>(a.derivative);
  const S* origin = static_cast<const S*>(a.origin);
  S* model_input = static_cast<S*>(a.model_input);
  const S* model_scale = static_cast<const S*>(a.model_scale);
  const int64_t n = a.n, total = a.batch * n, groups = ceil_div(total, 4);
  const bool stochastic = a.stochastic != 0;
  const bool noisy = a.kind == kEulerAncestral || (a.kind == kFlowEuler && stochastic);
  for (int64_t g = gpu::thread_index(); g < groups; g += gpu::thread_count()) {
    const int64_t base = 4 * g;
    const int count = static_cast<int>(min(int64_t(4), total - base));
    float z4[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (noisy && !noise) {
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
        const SigmaCoefficients<C> c = sigma_coefficients<C>(a.kind, a.sigma[b], a.sigma_next[b]);
        C m = load(mo, b * n + j);
        if (a.guided) {
          const C k = a.rescale ? C(a.rescale[b]) : C(1);
          m = guide(m, load(mo, (a.batch + b) * n + j), C(a.guidance_scale), k);
        }
        const C z = noisy ? (noise ? load(noise, e) : C(z4[l])) : C(0);
        C x0, out;
        if (a.kind == kHeunFirst) {
          C d;
          out = heun_first_element(m, load(sample, e), c, a.prediction, x0, d);
          store(derivative, e, d);
        } else if (a.kind == kHeunSecond) {
          out = heun_second_element(m, load(sample, e), load(origin, e), load(derivative, e), c, a.prediction, x0);
        } else {
          out = sigma_step_element(m, load(sample, e), z, c, a.kind, a.prediction, stochastic, x0);
        }
        store(prev, e, out);
        if (pred_original) store(pred_original, e, x0);
        // From prev as stored (rounded to S), as the division done afterwards in S would see it.
        if (model_input) store(model_input, e, load(prev, e) / load(model_scale, b));
      }
      if (++j == n) {
        j = 0;
        ++b;
      }
    }
  }
}

}  // namespace

void sigma_step_cuda(const SigmaStepArgs& a, void* stream) {
  gpu::launch_typed(
      a.dtype, "diffusion.sigma_step", [](auto type) { return sigma_step_kernel<typename decltype(type)::type>; },
      ceil_div(a.batch * a.n, 4), kThreads, stream, a);
}

}  // namespace diffusion
}  // namespace gk
