// The diffusion family's kernel entry points (training side: noising and the loss). Arrays are
// contiguous, of one floating dtype (fp16/bf16 on CUDA only), viewed as (batch, n); `t` holds one int64
// timestep per sample on the arrays' device, and `table` is NoiseSchedule.table on that device, so no
// timestep or coefficient ever passes through the host.
#pragma once
#include "array.h"

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

void q_sample_cpu(const QSampleArgs& a);
void loss_cpu(const LossArgs& a);
void loss_backward_cpu(const LossBackwardArgs& a);

#ifdef GENKERN_WITH_CUDA
void q_sample_cuda(const QSampleArgs& a, void* stream);
void loss_cuda(const LossArgs& a, void* stream);
void loss_backward_cuda(const LossBackwardArgs& a, void* stream);
#endif

}  // namespace diffusion
}  // namespace gk
