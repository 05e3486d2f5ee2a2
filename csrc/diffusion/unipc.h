// The UniPC step's kernel entry points (unipc_math.h). Arrays are contiguous, of one floating dtype (fp16/bf16
// on CUDA only), viewed as (batch, n); the history is (slots, batch, n).
#pragma once
#include "core/array.h"

namespace gk {
namespace diffusion {

// prev_sample[b, j] = unipc_step_element(m, sample[b, j], history[:, b, j], coefficients of step[b]) with
// m = model_output (b, j), or with guidance u + s (c - u) of its two halves (2 * batch samples, the
// unconditional first) times the sample's rescale factor. history[0] is the previous corrected sample,
// history[1] the previous x0_hat, history[2] (slots 3) the one before; each is read and then overwritten
// with this step's, element by element.
struct UniPcStepArgs {
  const void* model_output;
  const void* sample;
  void* history;         // (slots, batch, n)
  const float* sigmas;   // (num_sigmas,): the loop's sigmas, the final one last
  const int64_t* step;   // (batch,): each sample's step index into sigmas
  const float* rescale;  // (batch,) nullable: guidance rescale factors
  const float* limit;    // (batch,) nullable: dynamic thresholds
  void* prev_sample;
  int64_t batch, n, num_sigmas;
  int32_t slots;                             // 2 or 3
  int32_t prediction;                        // Prediction, or kFlowPrediction
  int32_t solver;                            // UniPcSolverType
  int32_t predictor_order, corrector_order;  // 1 or 2
  int32_t final_first_order;
  int32_t corrector;
  int32_t flow_sigmas;  // alpha = 1 - sigma, sigma_vp = sigma (diffusers' use_flow_sigmas)
  int32_t guided;
  float guidance_scale;
  DType dtype;
};

void unipc_step_cpu(const UniPcStepArgs& a);
#ifdef GENKERN_WITH_CUDA
void unipc_step_cuda(const UniPcStepArgs& a, void* stream);
#endif

}  // namespace diffusion
}  // namespace gk
