// The sigma-space steps' kernel entry points: flow matching's Euler step and k-diffusion's Euler and Euler
// ancestral steps (sigma_step_math.h). Arrays are contiguous, of one floating dtype (fp16/bf16 on CUDA only),
// viewed as (batch, n).
#pragma once
#include "core/array.h"

namespace gk {
namespace diffusion {

// prev_sample[b, j] = sigma_step_element(m, sample[b, j], z, coefficients of sigma[b] -> sigma_next[b]) with
// m = model_output (b, j), or with guidance u + s (c - u) of its two halves (2 * batch samples, the
// unconditional first) times the sample's rescale factor; z = noise or stream element b * n + j (flow with
// stochastic sampling, Euler ancestral). pred_original nullable. Heun: the first half also writes d into
// `derivative`; the second half reads it and `origin` (the first half's sample), `sample` being x'.
// model_input (nullable) is also written: prev_sample / model_scale[b], the next model call's input of a sampler
// (scale_model_input), from prev_sample as stored, so that it equals that division done afterwards.
struct SigmaStepArgs {
  const void* model_output;
  const void* sample;
  const void* noise;        // nullable
  const float* sigma;       // (batch,)
  const float* sigma_next;  // (batch,)
  const float* rescale;     // (batch,) nullable: guidance rescale factors
  void* prev_sample;
  void* pred_original;      // nullable
  void* derivative;         // Heun (kinds 3, 4): written by the first half, read by the second
  const void* origin;       // Heun's second half: the sample the first half stepped from
  void* model_input;        // nullable: prev_sample / model_scale
  const void* model_scale;  // (batch,) of the dtype: given with model_input
  int64_t batch, n;
  int32_t kind;        // SigmaStepKind
  int32_t prediction;  // k-diffusion: Prediction (flow: velocity)
  int32_t guided;      // 0 or 1
  int32_t stochastic;  // flow: 0 or 1
  float guidance_scale;
  uint64_t seed, offset;
  DType dtype;
};

void sigma_step_cpu(const SigmaStepArgs& a);
#ifdef GENKERN_WITH_CUDA
void sigma_step_cuda(const SigmaStepArgs& a, void* stream);
#endif

}  // namespace diffusion
}  // namespace gk
