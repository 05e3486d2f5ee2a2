// The diffusion family's kernel entry points: noising, the loss and its gradient (training), and the DDPM and
// DDIM steps (sampling). Arrays are
// contiguous, of one floating dtype (fp16/bf16 on CUDA only), viewed as (batch, n); `t` holds one int64
// timestep per sample on the arrays' device, and `table` is NoiseSchedule.table on that device, so no
// timestep or coefficient ever passes through the host.
#pragma once
#include "core/array.h"

namespace gk {
namespace diffusion {

// x_t[b, j] = q_sample(x0[b, j], eps[b, j], level_at(table, t[b])); eps = stream element b*n + j if null.
struct QSampleArgs {
  const void* x0;
  const void* noise;  // nullable
  const int64_t* t;
  const float* table;
  int64_t table_rows;
  void* x_t;
  int64_t batch, n;
  uint64_t seed, offset;
  DType dtype;
};

// loss[b] = min_snr_weight(b) * mean_j (loss_target(x0, eps, level) - model_output)^2, eps as in q_sample
// (so the same seed and offset regenerate the noise of the x_t the model saw).
struct LossArgs {
  const void* model_output;
  const void* x0;
  const void* noise;  // nullable
  const int64_t* t;
  const float* table;
  int64_t table_rows;
  void* loss;  // (batch,)
  int64_t batch, n;
  int32_t prediction;
  float snr_gamma;  // <= 0: unweighted
  uint64_t seed, offset;
  DType dtype;
};

// grad_model_output[b, j] = grad_loss[b] * weight(b) * 2 (model_output - target) / n
struct LossBackwardArgs {
  const void* grad_loss;  // (batch,)
  const void* model_output;
  const void* x0;
  const void* noise;  // nullable
  const int64_t* t;
  const float* table;
  int64_t table_rows;
  void* grad_model_output;
  int64_t batch, n;
  int32_t prediction;
  float snr_gamma;
  uint64_t seed, offset;
  DType dtype;
};

// One denoising step t -> prev_t for every sample (kind kDdpm or kDdim), with each element's math in
// common/diffusion.h (step_coefficients, guide, step_element).
//   model_output: per sample `stride` = n elements (2n for learned_range: prediction, then variance);
//                 with guidance 2 * batch samples, the unconditional half first.
//   sample, noise, prev_sample, pred_original: (batch, n); z of element (b, j) is `noise` or stream element
//                 b * n + j. pred_original is nullable (not written).
struct StepArgs {
  const void* model_output;
  const void* sample;
  const void* noise;  // nullable
  const int64_t* t;
  const int64_t* prev_t;  // nullable: t - 1
  const float* table;
  int64_t table_rows;
  const float* guidance_rescale;   // (batch,) nullable: each sample's rescale factor k (guide)
  const float* dynamic_threshold;  // (batch,) nullable: each sample's threshold q (clamp to +-q, divide by q)
  void* prev_sample;
  void* pred_original;  // nullable
  int64_t batch, n;
  int32_t kind, prediction, variance;
  int32_t guided;  // 0 or 1
  float guidance_scale;
  float clip;  // > 0: clamp x0_hat to [-clip, clip] (when no dynamic_threshold)
  float eta;   // DDIM
  int32_t use_clipped_model_output;
  uint64_t seed, offset;
  DType dtype;
};

void q_sample_cpu(const QSampleArgs& a);
void loss_cpu(const LossArgs& a);
void loss_backward_cpu(const LossBackwardArgs& a);
void step_cpu(const StepArgs& a);

#ifdef GENKERN_WITH_CUDA
void q_sample_cuda(const QSampleArgs& a, void* stream);
void loss_cuda(const LossArgs& a, void* stream);
void loss_backward_cuda(const LossBackwardArgs& a, void* stream);
void step_cuda(const StepArgs& a, void* stream);
#endif

}  // namespace diffusion
}  // namespace gk
