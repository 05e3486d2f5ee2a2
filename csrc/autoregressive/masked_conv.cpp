// Entry points of the masked_conv family: shape, dtype and device checks, then the kernels of masked_conv.h.
#include "autoregressive/masked_conv.h"

#include <pybind11/stl.h>

#include <algorithm>
#include <string>

#include "core/entry.h"

namespace gk {

using namespace masked_conv;

namespace {

int64_t product(int64_t a, int64_t b) {
  int64_t r;
  if (__builtin_mul_overflow(a, b, &r))
    throw ValueError("dilation: the padded copy of the input (sized by dilation * (k // 2)) overflows int64");
  return r;
}

int64_t sum(int64_t a, int64_t b) {
  int64_t r;
  if (__builtin_add_overflow(a, b, &r))
    throw ValueError("dilation: the padded copy of the input (sized by dilation * (k // 2)) overflows int64");
  return r;
}

// The CPU kernels' Geometry (masked_conv_cpu.cpp) stages every image plane with a border of dilation * (k / 2)
// rows above and columns both sides, rows rounded up to whole tiles, and indexes it with offsets up to a
// plane; the CUDA kernels index halos of the same extent. Each of those sizes and offsets, in bytes, must
// fit in int64 (a wrapped product would size a small buffer and index far past it).
void check_geometry(const ConvShape& s) {
  constexpr int64_t kMaxTile = 64, kMaxValueBytes = 8;
  const int64_t pad = product(s.dilation, s.kernel_size / 2);
  const int64_t padded_width = sum(sum(s.width, kMaxTile), product(2, pad));
  const int64_t plane = product(sum(s.height, pad), padded_width);
  const int64_t planes = product(s.batch, std::max(s.in_channels, s.out_channels));
  product(product(planes, plane), kMaxValueBytes);
  product(product(s.kernel_size, s.kernel_size), product(s.in_channels, s.out_channels));
}

// The convolution's shape from x (B, C_in, H, W) and weight (C_out, C_in, k, k); throws on anything the
// kernels could misread.
ConvShape conv_shape(const Array& x, const Array& weight, bool mask_b, int64_t groups, int64_t dilation) {
  if (x.ndim() != 4) throw ValueError("x must have shape (B, C_in, H, W)");
  if (weight.ndim() != 4) throw ValueError("weight must have shape (C_out, C_in, k, k)");
  const ConvShape s{x.shape[0],      x.shape[1], weight.shape[0], x.shape[2], x.shape[3],
                    weight.shape[2], dilation,   groups,          mask_b};
  if (weight.shape[1] != s.in_channels) throw ValueError("weight's C_in differs from x's channels");
  if (weight.shape[3] != s.kernel_size || s.kernel_size % 2 == 0)
    throw ValueError("weight must be a square kernel of odd size k x k");
  if (s.in_channels < 1 || s.out_channels < 1) throw ValueError("weight needs at least one input and output channel");
  if (groups < 1 || s.in_channels % groups != 0 || s.out_channels % groups != 0)
    throw ValueError("color_groups must be >= 1 and divide both channel counts");
  if (dilation < 1) throw ValueError("dilation must be >= 1");
  // The padded copies the kernels stage are sized from dilation * (k / 2): keep that product far from overflow.
  if (dilation > (int64_t{1} << 31)) throw ValueError("dilation must be <= 2^31");
  check_geometry(s);
  return s;
}

void check_output(const Array& y, const ConvShape& s, int64_t channels, const char* name) {
  if (y.ndim() != 4 || y.shape[0] != s.batch || y.shape[1] != channels || y.shape[2] != s.height ||
      y.shape[3] != s.width)
    throw ValueError(std::string(name) + " has the wrong shape");
}

void forward(const Array& x, const Array& weight, const OptArray& bias, const Array& y, bool mask_b, int64_t groups,
             int64_t dilation, uintptr_t stream) {
  Checked(x, "x")(weight, "weight")(bias, "bias")(y, "y");
  const ConvShape s = conv_shape(x, weight, mask_b, groups, dilation);
  if (bias) check_numel(*bias, s.out_channels, "bias");
  check_output(y, s, s.out_channels, "y");
  if (y.numel() == 0) return;
  prepare_output(y);
  run_on_device(x, ForwardArgs{x.raw(), weight.raw(), data_or_null(bias), y.raw(), s, x.dtype}, stream, forward_cpu,
                GK_CUDA(forward_cuda));
}

void grad_input(const Array& grad_y, const Array& weight, const Array& grad_x, bool mask_b, int64_t groups,
                int64_t dilation, uintptr_t stream) {
  Checked(grad_x, "grad_x")(weight, "weight")(grad_y, "grad_y");
  const ConvShape s = conv_shape(grad_x, weight, mask_b, groups, dilation);
  check_output(grad_y, s, s.out_channels, "grad_y");
  if (grad_x.numel() == 0) return;
  prepare_output(grad_x);
  run_on_device(grad_x, GradInputArgs{grad_y.raw(), weight.raw(), grad_x.raw(), s, grad_x.dtype}, stream,
                grad_input_cpu, GK_CUDA(grad_input_cuda));
}

void grad_weight(const Array& grad_y, const Array& x, const Array& grad_weight_out, const OptArray& grad_bias,
                 bool mask_b, int64_t groups, int64_t dilation, uintptr_t stream) {
  Checked(x, "x")(grad_y, "grad_y")(grad_weight_out, "grad_weight")(grad_bias, "grad_bias");
  const ConvShape s = conv_shape(x, grad_weight_out, mask_b, groups, dilation);
  check_output(grad_y, s, s.out_channels, "grad_y");
  if (grad_bias) check_numel(*grad_bias, s.out_channels, "grad_bias");
  // No early return on an empty batch: the gradients are then zeros, and the kernel writes them.
  run_on_device(x, GradWeightArgs{grad_y.raw(), x.raw(), grad_weight_out.raw(), data_or_null(grad_bias), s, x.dtype},
                stream, grad_weight_cpu, GK_CUDA(grad_weight_cuda));
}

}  // namespace

void bind_masked_conv(py::module_& parent) {
  py::module_ m = parent.def_submodule("masked_conv", "genkern._C.masked_conv: masked (PixelCNN) convolution kernels");
  using py::arg;
  m.def("forward", &forward, arg("x"), arg("weight"), arg("bias"), arg("y"), arg("mask_b"), arg("groups"),
        arg("dilation"), arg("stream") = 0);
  m.def("grad_input", &grad_input, arg("grad_y"), arg("weight"), arg("grad_x"), arg("mask_b"), arg("groups"),
        arg("dilation"), arg("stream") = 0);
  m.def("grad_weight", &grad_weight, arg("grad_y"), arg("x"), arg("grad_weight"), arg("grad_bias"), arg("mask_b"),
        arg("groups"), arg("dilation"), arg("stream") = 0);
}

}  // namespace gk
