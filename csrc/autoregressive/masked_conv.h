// The masked_conv family's kernel entry points: a stride-1, 'same'-size 2-d convolution whose k x k
// weight is masked as common/masked_conv.h says. Every pointer is to contiguous memory the bindings have
// checked; x (B, C_in, H, W), weight (C_out, C_in, k, k), y (B, C_out, H, W). Masked weight entries are
// never read, whatever they hold.
#pragma once
#include "core/array.h"

namespace gk {
namespace masked_conv {

struct ConvShape {
  int64_t batch, in_channels, out_channels, height, width;
  int64_t kernel_size, dilation, groups;
  bool mask_b;
};

// y = bias + sum over kept taps and channels of weight * x (zero outside the image).
struct ForwardArgs {
  const void* x;
  const void* weight;
  const void* bias;  // nullable
  void* y;
  ConvShape s;
  DType dtype;
};

// grad_x: the transposed convolution of grad_y over the kept taps.
struct GradInputArgs {
  const void* grad_y;
  const void* weight;
  void* grad_x;
  ConvShape s;
  DType dtype;
};

// grad_weight (zero at masked entries) and grad_bias (nullable), each summed in a fixed order.
struct GradWeightArgs {
  const void* grad_y;
  const void* x;
  void* grad_weight;
  void* grad_bias;  // nullable
  ConvShape s;
  DType dtype;
};

void forward_cpu(const ForwardArgs& a);
void grad_input_cpu(const GradInputArgs& a);
void grad_weight_cpu(const GradWeightArgs& a);

#ifdef GENKERN_WITH_CUDA
void forward_cuda(const ForwardArgs& a, void* stream);
void grad_input_cuda(const GradInputArgs& a, void* stream);
void grad_weight_cuda(const GradWeightArgs& a, void* stream);
#endif

}  // namespace masked_conv
}  // namespace gk
