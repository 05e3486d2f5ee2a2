// Entry points of the causal_conv1d family: shape, dtype and device checks, then the CPU or CUDA kernels
// of causal_conv1d.h.
#include "autoregressive/causal_conv1d.h"

#include <pybind11/stl.h>

#include <limits>
#include <string>

#include "core/entry.h"
#include "autoregressive/causal_conv1d_math.h"

namespace gk {

using namespace causal_conv1d;

namespace {

int check_activation(int64_t activation) {
  if (activation < kNone || activation > kTanh) throw ValueError("activation must be 0 (none), 1 (silu) or 2 (tanh)");
  return static_cast<int>(activation);
}

// x (B, C_in, L) or, for a step, (B, C_in) with L = 1; w (C_out, C_in, K) or depthwise (C_in, K).
ConvShape conv_shape(const Array& x, const Array& w, int64_t dilation, bool step) {
  if (x.ndim() != (step ? 2 : 3)) throw ValueError(step ? "x must have shape (B, C)" : "x must have shape (B, C, L)");
  ConvShape s{x.shape[0], x.shape[1], 0, step ? 1 : x.shape[2], 0, dilation, w.ndim() == 2};
  if (w.ndim() == 2) {
    if (w.shape[0] != s.c_in) throw ValueError("depthwise weight must have shape (C, K) with C the channels of x");
    s.c_out = s.c_in;
    s.k = w.shape[1];
  } else if (w.ndim() == 3) {
    if (w.shape[1] != s.c_in) throw ValueError("weight must have shape (C_out, C_in, K) with C_in the channels of x");
    s.c_out = w.shape[0];
    s.k = w.shape[2];
  } else {
    throw ValueError("weight must have shape (C, K) or (C_out, C_in, K)");
  }
  if (s.k < 1) throw ValueError("weight must have at least one tap (K >= 1)");
  if (dilation < 1) throw ValueError("dilation must be >= 1");
  // The receptive field (K - 1) * dilation must fit int64 with room to spare for index arithmetic.
  if (s.k - 1 > (std::numeric_limits<int64_t>::max() / 4) / dilation) throw ValueError("dilation * K is too large");
  return s;
}

void conv_entry(const Array& x, const Array& w, const OptArray& bias, const Array& y, int64_t dilation,
                int64_t activation, uintptr_t stream) {
  Checked(x, "x")(w, "weight")(bias, "bias")(y, "y");
  const ConvShape s = conv_shape(x, w, dilation, false);
  if (bias) check_numel(*bias, s.c_out, "bias");
  check_numel(y, s.batch * s.c_out * s.length, "y");
  const ConvArgs args{x.raw(), w.raw(), data_or_null(bias), y.raw(), s, check_activation(activation), x.dtype};
  if (y.numel() == 0) return;
  prepare_output(y);
  run_on_device(x, args, stream, conv_cpu, GK_CUDA(conv_cuda));
}

void conv_backward_entry(const Array& grad_y, const Array& x, const Array& w, const OptArray& bias, const Array& grad_x,
                         const Array& grad_w, const OptArray& grad_bias, int64_t dilation, int64_t activation,
                         uintptr_t stream) {
  Checked(x, "x")(grad_y, "grad_y")(w, "weight")(bias, "bias")(grad_x, "grad_x")(grad_w, "grad_weight")(grad_bias,
                                                                                                        "grad_bias");
  const ConvShape s = conv_shape(x, w, dilation, false);
  if (bias) check_numel(*bias, s.c_out, "bias");
  if (grad_bias) check_numel(*grad_bias, s.c_out, "grad_bias");
  check_numel(grad_y, s.batch * s.c_out * s.length, "grad_y");
  check_numel(grad_x, x.numel(), "grad_x");
  check_numel(grad_w, w.numel(), "grad_weight");
  const ConvBackwardArgs args{grad_y.raw(),
                              x.raw(),
                              w.raw(),
                              data_or_null(bias),
                              grad_x.raw(),
                              grad_w.raw(),
                              data_or_null(grad_bias),
                              s,
                              check_activation(activation),
                              x.dtype};
  prepare_output(grad_x);
  // Empty batch or length still owes zero weight and bias gradients: the kernels write them.
  run_on_device(x, args, stream, conv_backward_cpu, GK_CUDA(conv_backward_cuda));
}

void update_entry(const Array& x, const Array& state, const Array& w, const OptArray& bias, const Array& y,
                  int64_t dilation, int64_t activation, uintptr_t stream) {
  Checked(x, "x")(state, "state")(w, "weight")(bias, "bias")(y, "y");
  const ConvShape s = conv_shape(x, w, dilation, true);
  if (state.ndim() != 3 || state.shape[0] != s.batch || state.shape[1] != s.c_in)
    throw ValueError("state must have shape (B, C, W) with B and C those of x");
  const int64_t state_len = state.shape[2];
  if (state_len < (s.k - 1) * dilation) throw ValueError("state must hold at least (K - 1) * dilation past inputs");
  if (bias) check_numel(*bias, s.c_out, "bias");
  check_numel(y, s.batch * s.c_out, "y");
  const UpdateArgs args{
      x.raw(), state.raw(), w.raw(), data_or_null(bias), y.raw(), s, state_len, check_activation(activation), x.dtype};
  if (s.batch == 0) return;
  run_on_device(x, args, stream, update_cpu, GK_CUDA(update_cuda));
}

void check_gated_shape(int64_t outer, int64_t inner) {
  if (outer < 0 || inner < 0) throw ValueError("gated shape must be non-negative");
}

void gated_entry(const Array& x, const Array& y, int64_t outer, int64_t inner, uintptr_t stream) {
  Checked(x, "x")(y, "y");
  check_gated_shape(outer, inner);
  check_numel(x, outer * 2 * inner, "x");
  check_numel(y, outer * inner, "y");
  if (y.numel() == 0) return;
  prepare_output(y);
  run_on_device(x, GatedArgs{x.raw(), y.raw(), outer, inner, x.dtype}, stream, gated_cpu, GK_CUDA(gated_cuda));
}

void gated_backward_entry(const Array& grad_y, const Array& x, const Array& grad_x, int64_t outer, int64_t inner,
                          uintptr_t stream) {
  Checked(x, "x")(grad_y, "grad_y")(grad_x, "grad_x");
  check_gated_shape(outer, inner);
  check_numel(x, outer * 2 * inner, "x");
  check_numel(grad_x, outer * 2 * inner, "grad_x");
  check_numel(grad_y, outer * inner, "grad_y");
  if (x.numel() == 0) return;
  prepare_output(grad_x);
  const GatedBackwardArgs args{grad_y.raw(), x.raw(), grad_x.raw(), outer, inner, x.dtype};
  run_on_device(x, args, stream, gated_backward_cpu, GK_CUDA(gated_backward_cuda));
}

}  // namespace

void bind_causal_conv1d_states(py::module_& m);  // causal_conv1d_states.cpp: the causal-conv1d API's kernels

void bind_causal_conv1d(py::module_& parent) {
  py::module_ m = parent.def_submodule("causal_conv1d", "genkern._C.causal_conv1d: causal 1-D convolution kernels");
  using py::arg;
  m.def("forward", &conv_entry, arg("x"), arg("weight"), arg("bias"), arg("y"), arg("dilation"), arg("activation"),
        arg("stream") = 0);
  m.def("backward", &conv_backward_entry, arg("grad_y"), arg("x"), arg("weight"), arg("bias"), arg("grad_x"),
        arg("grad_weight"), arg("grad_bias"), arg("dilation"), arg("activation"), arg("stream") = 0);
  m.def("update", &update_entry, arg("x"), arg("state"), arg("weight"), arg("bias"), arg("y"), arg("dilation"),
        arg("activation"), arg("stream") = 0);
  m.def("gated", &gated_entry, arg("x"), arg("y"), arg("outer"), arg("inner"), arg("stream") = 0);
  m.def("gated_backward", &gated_backward_entry, arg("grad_y"), arg("x"), arg("grad_x"), arg("outer"), arg("inner"),
        arg("stream") = 0);
  bind_causal_conv1d_states(m);
}

}  // namespace gk
