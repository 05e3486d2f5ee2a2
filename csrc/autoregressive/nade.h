// The NADE family's kernel entry points. Every pointer is to contiguous memory the bindings have checked;
// `dtype` is the one floating dtype shared by all arrays of a call (fp16/bf16 on CUDA only, computing in
// float32). Parameters: W (H, D), c (H), V (D, H), b (D); the model of docs/math.md, section 4.
#pragma once
#include "core/array.h"

namespace gk {
namespace nade {

struct Shape {
  int64_t batch;   // examples (log_prob) or samples (sample)
  int64_t dims;    // D
  int64_t hidden;  // H
};

// The model's parameters; their gradients (LogProbBackwardArgs) have the same shapes.
struct Params {
  const void* w;  // (H, D)
  const void* c;  // (H)
  const void* v;  // (D, H)
  const void* b;  // (D)
};

// out[n] = log p(x[n]) in nats, x (B, D) with entries 0 or 1 (the formula is evaluated for any values).
// Nothing is saved: backward recomputes the recurrence.
struct LogProbArgs {
  const void* x;
  Params params;
  void* out;
  Shape shape;
  DType dtype;
};

// grad_* = sum_n grad_out[n] d log p(x[n]) / d(param). x gets no gradient. The steps run backwards from D,
// with each a_i recomputed forwards from a checkpoint (nade_math.h, tape_size): O(sqrt(D) H) memory per
// example instead of O(D H), and no cancelling a_{i+1} - W[:, i] x_i.
struct LogProbBackwardArgs {
  const void* grad_out;
  const void* x;
  Params params;
  void* grad_w;
  void* grad_c;
  void* grad_v;
  void* grad_b;
  Shape shape;
  DType dtype;
};

// out (n, D): samples first .. first + n - 1 of the model, dimension i of sample s drawn from stream
// element s * D + i of (seed, offset) as x_i = 1 iff u < p(x_i = 1 | x_<i).
struct SampleArgs {
  Params params;
  void* out;
  Shape shape;
  uint64_t seed, offset, first;
  DType dtype;
};

void log_prob_cpu(const LogProbArgs& a);
void log_prob_backward_cpu(const LogProbBackwardArgs& a);
void sample_cpu(const SampleArgs& a);

#ifdef GENKERN_WITH_CUDA
void log_prob_cuda(const LogProbArgs& a, void* stream);
void log_prob_backward_cuda(const LogProbBackwardArgs& a, void* stream);
void sample_cuda(const SampleArgs& a, void* stream);
#endif

}  // namespace nade
}  // namespace gk
