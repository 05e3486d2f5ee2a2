// The discretised logistic mixture's kernel entry points (PixelCNN++'s likelihood head; docs/math.md,
// section 6.1). Every pointer is to contiguous memory the bindings have checked. params (B, P, H, W) hold the
// K logits, then per channel and component the means, log-scales (and, coupled RGB, the pre-tanh
// coefficients): P = 10K coupled (C = 3), (1 + 2C)K otherwise. x (B, C, H, W) int64 levels. `dtype` is params'
// (fp16/bf16 on CUDA only); log p, its incoming gradient and every sum are in the compute type (float32 for
// the half types, else the dtype itself).
#pragma once
#include "core/array.h"

namespace gk {
namespace mixture {

struct Shape {
  int64_t batch, colors, height, width;
  int64_t mixtures;  // K
  int64_t levels;    // L >= 2
  bool coupled;      // C = 3 with PixelCNN++'s R -> G -> B coefficients

  int64_t pixels() const { return height * width; }
  int64_t per_channel() const { return coupled ? 3 : 2; }  // params per channel and component
  // Draws per (sample, pixel): K Gumbel noises, then one uniform per channel.
  int64_t draws() const { return mixtures + colors; }
};

// out (B, H, W) = log p(x) per pixel, in nats. Nothing else is kept: the backward recomputes the terms from
// params, x and this log p (the per-pixel logsumexp).
struct LogProbArgs {
  const void* params;
  const int64_t* x;
  void* out;
  Shape shape;
  DType dtype;
};

// grad_params = d(sum grad * log p) / d params; x gets no gradient.
struct LogProbBackwardArgs {
  const void* grad;  // (B, H, W), compute type
  const void* params;
  const int64_t* x;
  const void* log_prob;  // (B, H, W), compute type: the forward's out
  void* grad_params;     // params' shape and dtype
  Shape shape;
  DType dtype;
};

// The forward and the backward from one evaluation of the terms (the CPU's training path): log_prob (B, H, W)
// as LogProbArgs' out, and grad_params = d(weight * sum log p) / d params, every pixel's incoming gradient
// being `weight`. The same bits as the forward, then the backward with grad = weight everywhere.
struct LogProbWithGradArgs {
  const void* params;
  const int64_t* x;
  void* log_prob;     // (B, H, W), compute type
  void* grad_params;  // params' shape and dtype
  double weight;
  Shape shape;
  DType dtype;
};

// out (B, C, H, W) int64: row b is sample first + b of the mixture params[b]; draw t of pixel p of sample s
// is stream element (s H W + p)(K + C) + t of (seed, offset).
struct SampleArgs {
  const void* params;
  int64_t* out;
  Shape shape;
  uint64_t seed, offset, first;
  DType dtype;
};

void log_prob_cpu(const LogProbArgs& a);
void log_prob_backward_cpu(const LogProbBackwardArgs& a);
void log_prob_with_grad_cpu(const LogProbWithGradArgs& a);
void sample_cpu(const SampleArgs& a);
// One (sample, pixel)'s draw_pixel (logistic_mixture_math.h) from float32 params `stride` apart, its levels
// written `out_stride` apart. Compiled with the op's CPU kernels (no FP contraction), so that the cached
// PixelCNN sampler, whose own file lets its multiply-adds fuse, draws the op's very bits.
void draw_pixel_cpu(const float* params, int64_t stride, int64_t mixtures, int64_t colors, bool coupled, int64_t levels,
                    uint64_t seed, uint64_t offset, uint64_t base, int64_t* out, int64_t out_stride);

#ifdef GENKERN_WITH_CUDA
void log_prob_cuda(const LogProbArgs& a, void* stream);
void log_prob_backward_cuda(const LogProbBackwardArgs& a, void* stream);
void sample_cuda(const SampleArgs& a, void* stream);
#endif

}  // namespace mixture
}  // namespace gk
