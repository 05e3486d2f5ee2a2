// The flow-matching Euler step's kernel entry points (the noising and the loss are diffusion.h's q_sample and
// loss on a flow table, see flow_math.h). Arrays are contiguous, of one floating dtype (fp16/bf16 on CUDA
// only), viewed as (batch, n).
#pragma once
#include "core/array.h"

namespace gk {
namespace diffusion {

// prev_sample[b, j] = flow_euler(v, sample[b, j], z, sigma[b], sigma_next[b]) with v = model_output (b, j),
// or with guidance u + s (c - u) of its two halves (2 * batch samples, the unconditional first) times the
// sample's rescale factor; z = noise or stream element b * n + j (stochastic only). pred_original nullable.
struct FlowStepArgs {
  const void* model_output;
  const void* sample;
  const void* noise;        // nullable
  const float* sigma;       // (batch,)
  const float* sigma_next;  // (batch,)
  const float* rescale;     // (batch,) nullable: guidance rescale factors
  void* prev_sample;
  void* pred_original;  // nullable
  int64_t batch, n;
  int32_t guided;      // 0 or 1
  int32_t stochastic;  // 0 or 1
  float guidance_scale;
  uint64_t seed, offset;
  DType dtype;
};

void flow_step_cpu(const FlowStepArgs& a);
#ifdef GENKERN_WITH_CUDA
void flow_step_cuda(const FlowStepArgs& a, void* stream);
#endif

}  // namespace diffusion
}  // namespace gk
