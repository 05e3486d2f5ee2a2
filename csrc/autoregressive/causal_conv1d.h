// The causal_conv1d family's kernel entry points. Every pointer is to contiguous memory the bindings have
// checked; `dtype` is the one floating dtype shared by all arrays of a call.
//
// y[b, o, l] = act(bias[o] + sum_i sum_k w[o, i, k] * x[b, i, l - (K - 1 - k) * dilation]), x = 0 left of 0.
// Depthwise weights (C, K) pair output o with input o only (i ranges over {o}).
#pragma once
#include "core/array.h"

namespace gk {
namespace causal_conv1d {

struct ConvShape {
  int64_t batch, c_in, c_out, length, k, dilation;
  bool depthwise;  // w is (c_out, k) and c_in == c_out
  int64_t w_row(int64_t o, int64_t i) const { return (depthwise ? o : o * c_in + i) * k; }
  int64_t inputs_per_output() const { return depthwise ? 1 : c_in; }
  int64_t input_of(int64_t o, int64_t j) const { return depthwise ? o : j; }  // j < inputs_per_output()
};

struct ConvArgs {
  const void* x;     // (B, C_in, L)
  const void* w;     // (C_out, C_in, K) or (C, K)
  const void* bias;  // (C_out,), nullable
  void* y;           // (B, C_out, L)
  ConvShape shape;
  int activation;
  DType dtype;
};

// The activation's derivative needs the pre-activation, which backward recomputes rather than forward saving.
struct ConvBackwardArgs {
  const void* grad_y;
  const void* x;
  const void* w;
  const void* bias;  // nullable
  void* grad_x;
  void* grad_w;
  void* grad_bias;  // nullable
  ConvShape shape;
  int activation;
  DType dtype;
};

// One step: x (B, C_in) is input l; state (B, C_in, W), W >= (K - 1) * dilation, holds inputs l - W .. l - 1
// (oldest first). y (B, C_out) is output l; then state shifts left by one and takes x as its newest entry.
struct UpdateArgs {
  const void* x;
  void* state;
  const void* w;
  const void* bias;  // nullable
  void* y;
  ConvShape shape;  // length unused (1)
  int64_t state_len;
  int activation;
  DType dtype;
};

// x viewed as (outer, 2, inner): y[o, j] = tanh(x[o, 0, j]) * sigmoid(x[o, 1, j]).
struct GatedArgs {
  const void* x;
  void* y;
  int64_t outer, inner;
  DType dtype;
};

struct GatedBackwardArgs {
  const void* grad_y;
  const void* x;
  void* grad_x;
  int64_t outer, inner;
  DType dtype;
};

void conv_cpu(const ConvArgs& a);
void conv_backward_cpu(const ConvBackwardArgs& a);
void update_cpu(const UpdateArgs& a);
void gated_cpu(const GatedArgs& a);
void gated_backward_cpu(const GatedBackwardArgs& a);

// CUDA versions (kernels/autoregressive/causal_conv1d.cu): device pointers, launched on `stream`.
void conv_cuda(const ConvArgs& a, void* stream);
void conv_backward_cuda(const ConvBackwardArgs& a, void* stream);
void update_cuda(const UpdateArgs& a, void* stream);
void gated_cuda(const GatedArgs& a, void* stream);
void gated_backward_cuda(const GatedBackwardArgs& a, void* stream);

}  // namespace causal_conv1d
}  // namespace gk
