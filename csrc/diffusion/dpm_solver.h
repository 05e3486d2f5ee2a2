// The DPM-Solver++ step's kernel entry points (dpm_solver_math.h). Arrays are contiguous, of one floating dtype
// (fp16/bf16 on CUDA only), viewed as (batch, n).
#pragma once
#include "core/array.h"

namespace gk {
namespace diffusion {

// prev_sample[b, j] = dpm_step_element(m, sample[b, j], history[b, j], z, coefficients of step[b]) with
// m = model_output (b, j), or with guidance u + s (c - u) of its two halves (2 * batch samples, the
// unconditional first) times the sample's rescale factor; z = noise or stream element b * n + j (SDE only).
// history[b, j] is read (second-order steps) and then overwritten with x0_hat, element by element.
struct DpmStepArgs {
  const void* model_output;
  const void* sample;
  const void* noise;     // nullable
  void* history;         // (batch, n)
  const float* sigmas;   // (num_sigmas,): the loop's sigmas, the final one last
  const int64_t* step;   // (batch,): each sample's step index into sigmas
  const float* rescale;  // (batch,) nullable: guidance rescale factors
  const float* limit;    // (batch,) nullable: dynamic thresholds
  void* prev_sample;
  int64_t batch, n, num_sigmas;
  int32_t prediction;  // Prediction
  int32_t solver;      // DpmSolverType
  int32_t order;       // 1 or 2
  int32_t sde;         // 0 or 1
  int32_t final_first_order;
  int32_t guided;
  float guidance_scale;
  uint64_t seed, offset;
  DType dtype;
};

void dpm_step_cpu(const DpmStepArgs& a);
#ifdef GENKERN_WITH_CUDA
void dpm_step_cuda(const DpmStepArgs& a, void* stream);
#endif

}  // namespace diffusion
}  // namespace gk
