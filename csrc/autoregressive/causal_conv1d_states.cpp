// Entry points of causal conv1d with states (csrc/autoregressive/causal_conv1d_states.h): shape, layout,
// dtype and device checks, then the CPU or CUDA kernels. Bound into genkern._C.causal_conv1d.
#include "autoregressive/causal_conv1d_states.h"

#include <pybind11/stl.h>

#include <limits>
#include <string>

#include "autoregressive/causal_conv1d_math.h"
#include "core/entry.h"

namespace gk {

using namespace causal_conv1d;

namespace {

// The (B, C, n) array `a` in the call's layout: channel-first contiguous, or channel-last (a (B, n, C)
// contiguous array transposed), same dtype and device as `ref`.
void check_layout(const Array& a, const Array& ref, const StatesShape& s, int64_t n, const char* name) {
  check_same(a, ref, name, "x");
  if (a.ndim() != 3 || a.shape[0] != s.batch || a.shape[1] != s.channels || a.shape[2] != n)
    throw ValueError(std::string(name) + " must have shape (" + std::to_string(s.batch) + ", " +
                     std::to_string(s.channels) + ", " + std::to_string(n) + ")");
  if (a.numel() == 0) return;
  const int64_t expected[3] = {s.channels * n, s.channel_last ? 1 : n, s.channel_last ? s.channels : 1};
  for (int d = 0; d < 3; ++d)
    if (a.shape[d] != 1 && a.strides[d] != expected[d])
      throw ValueError(std::string(name) + (s.channel_last ? " must be channel-last like x" : " must be contiguous"));
  if (a.data == 0) throw ValueError(std::string(name) + " has a null data pointer");
}

void check_index(const OptArray& a, const Array& ref, int64_t numel, const char* name) {
  if (!a) return;
  check_contiguous(*a, name);
  check_dtype(*a, DType::int64, name);
  check_numel(*a, numel, name);
  if (a->device != ref.device || a->device_index != ref.device_index)
    throw ValueError(std::string(name) + " must be on the device of x");
}

int check_activation(int64_t activation) {
  if (activation < kNone || activation > kTanh) throw ValueError("activation must be 0 (none), 1 (silu) or 2 (tanh)");
  return static_cast<int>(activation);
}

// x (B, C, L) in either layout and a depthwise weight (C, K).
StatesShape states_shape(const Array& x, const Array& w, const OptArray& bias, int64_t dilation, bool channel_last) {
  check_float(x, "x");
  if (x.ndim() != 3) throw ValueError("x must have shape (B, C, L)");
  if (w.ndim() != 2 || w.shape[0] != x.shape[1])
    throw ValueError("weight must have shape (C, K) with C the channels of x");
  check_contiguous(w, "weight");
  check_same(w, x, "weight", "x");
  if (w.shape[1] < 1) throw ValueError("weight must have at least one tap (K >= 1)");
  if (dilation < 1) throw ValueError("dilation must be >= 1");
  if (w.shape[1] - 1 > (std::numeric_limits<int64_t>::max() / 4) / dilation)
    throw ValueError("dilation * K is too large");
  StatesShape s{x.shape[0], x.shape[1], x.shape[2], w.shape[1], dilation, channel_last};
  check_layout(x, x, s, s.length, "x");
  if (bias) {
    check_contiguous(*bias, "bias");
    check_same(*bias, x, "bias", "x");
    check_numel(*bias, s.channels, "bias");
  }
  return s;
}

void forward_entry(const Array& x, const Array& w, const OptArray& bias, const OptArray& initial_states,
                   const OptArray& seq_idx, const Array& y, const OptArray& final_states, int64_t dilation,
                   int64_t activation, bool channel_last, uintptr_t stream) {
  const StatesShape s = states_shape(x, w, bias, dilation, channel_last);
  if (initial_states) check_layout(*initial_states, x, s, s.past(), "initial_states");
  check_index(seq_idx, x, s.batch * s.length, "seq_idx");
  check_layout(y, x, s, s.length, "y");
  if (final_states) check_layout(*final_states, x, s, s.past(), "final_states");
  const StatesArgs args{x.raw(),
                        w.raw(),
                        data_or_null(bias),
                        data_or_null(initial_states),
                        seq_idx ? seq_idx->ptr<const int64_t>() : nullptr,
                        y.raw(),
                        data_or_null(final_states),
                        s,
                        check_activation(activation),
                        x.dtype};
  if (s.batch * s.channels == 0) return;
  prepare_output(y);
  run_on_device(x, args, stream, states_forward_cpu, GK_CUDA(states_forward_cuda));
}

void backward_entry(const Array& grad_y, const OptArray& grad_final, const Array& x, const Array& w,
                    const OptArray& bias, const OptArray& initial_states, const OptArray& seq_idx, const Array& grad_x,
                    const Array& grad_w, const OptArray& grad_bias, const OptArray& grad_initial, int64_t dilation,
                    int64_t activation, bool channel_last, uintptr_t stream) {
  const StatesShape s = states_shape(x, w, bias, dilation, channel_last);
  check_layout(grad_y, x, s, s.length, "grad_y");
  if (grad_final) check_layout(*grad_final, x, s, s.past(), "grad_final_states");
  if (initial_states) check_layout(*initial_states, x, s, s.past(), "initial_states");
  if (grad_initial && !initial_states) throw ValueError("grad_initial_states needs initial_states");
  if (grad_initial) check_layout(*grad_initial, x, s, s.past(), "grad_initial_states");
  check_index(seq_idx, x, s.batch * s.length, "seq_idx");
  check_layout(grad_x, x, s, s.length, "grad_x");
  check_contiguous(grad_w, "grad_weight");
  check_same(grad_w, x, "grad_weight", "x");
  check_numel(grad_w, w.numel(), "grad_weight");
  if (grad_bias) {
    check_contiguous(*grad_bias, "grad_bias");
    check_same(*grad_bias, x, "grad_bias", "x");
    check_numel(*grad_bias, s.channels, "grad_bias");
  }
  const StatesBackwardArgs args{grad_y.raw(),
                                data_or_null(grad_final),
                                x.raw(),
                                w.raw(),
                                data_or_null(bias),
                                data_or_null(initial_states),
                                seq_idx ? seq_idx->ptr<const int64_t>() : nullptr,
                                grad_x.raw(),
                                grad_w.raw(),
                                data_or_null(grad_bias),
                                data_or_null(grad_initial),
                                s,
                                check_activation(activation),
                                x.dtype};
  prepare_output(grad_x);
  // An empty batch still owes zero weight and bias gradients: the kernels write them.
  run_on_device(x, args, stream, states_backward_cpu, GK_CUDA(states_backward_cuda));
}

void update_entry(const Array& x, const Array& state, const Array& w, const OptArray& bias,
                  const OptArray& cache_seqlens, const OptArray& conv_state_indices, const Array& y, int64_t dilation,
                  int64_t activation, bool channel_last, uintptr_t stream) {
  const StatesShape s = states_shape(x, w, bias, dilation, channel_last);
  check_contiguous(state, "conv_state");
  check_same(state, x, "conv_state", "x");
  if (state.ndim() != 3 || state.shape[1] != s.channels)
    throw ValueError("conv_state must have shape (R, C, S) with C the channels of x");
  if (state.shape[2] < s.past()) throw ValueError("conv_state must hold at least (K - 1) * dilation past inputs");
  if (!conv_state_indices && state.shape[0] != s.batch)
    throw ValueError("conv_state must have x's batch size without conv_state_indices");
  if (cache_seqlens && state.shape[2] == 0) throw ValueError("cache_seqlens needs a conv_state of length >= 1");
  check_index(cache_seqlens, x, s.batch, "cache_seqlens");
  check_index(conv_state_indices, x, s.batch, "conv_state_indices");
  check_layout(y, x, s, s.length, "y");
  const StatesUpdateArgs args{x.raw(),
                              state.raw(),
                              w.raw(),
                              data_or_null(bias),
                              cache_seqlens ? cache_seqlens->ptr<const int64_t>() : nullptr,
                              conv_state_indices ? conv_state_indices->ptr<const int64_t>() : nullptr,
                              y.raw(),
                              s,
                              state.shape[0],
                              state.shape[2],
                              check_activation(activation),
                              x.dtype};
  if (s.batch * s.channels == 0) return;
  run_on_device(x, args, stream, states_update_cpu, GK_CUDA(states_update_cuda));
}

void varlen_states_entry(const Array& x, const Array& cu_seqlens, const Array& states, uintptr_t stream) {
  check_contiguous(x, "x");
  check_float(x, "x");
  if (x.ndim() != 2) throw ValueError("x must have shape (total_tokens, C)");
  check_index(cu_seqlens, x, cu_seqlens.numel(), "cu_seqlens");
  if (cu_seqlens.numel() < 1) throw ValueError("cu_seqlens must have B + 1 >= 1 entries");
  check_contiguous(states, "states");
  check_same(states, x, "states", "x");
  const int64_t batch = cu_seqlens.numel() - 1, C = x.shape[1];
  if (states.ndim() != 3 || states.shape[0] != batch || states.shape[2] != C)
    throw ValueError("states must have shape (B, S, C): the channel-last storage of (B, C, S)");
  const VarlenStatesArgs args{
      x.raw(), cu_seqlens.ptr<const int64_t>(), states.raw(), batch, C, x.shape[0], states.shape[1], x.dtype};
  if (states.numel() == 0) return;
  run_on_device(x, args, stream, varlen_states_cpu, GK_CUDA(varlen_states_cuda));
}

}  // namespace

void bind_causal_conv1d_states(py::module_& m) {
  using py::arg;
  m.def("forward_states", &forward_entry, arg("x"), arg("weight"), arg("bias"), arg("initial_states"), arg("seq_idx"),
        arg("y"), arg("final_states"), arg("dilation"), arg("activation"), arg("channel_last"), arg("stream") = 0);
  m.def("backward_states", &backward_entry, arg("grad_y"), arg("grad_final_states"), arg("x"), arg("weight"),
        arg("bias"), arg("initial_states"), arg("seq_idx"), arg("grad_x"), arg("grad_weight"), arg("grad_bias"),
        arg("grad_initial_states"), arg("dilation"), arg("activation"), arg("channel_last"), arg("stream") = 0);
  m.def("update_states", &update_entry, arg("x"), arg("conv_state"), arg("weight"), arg("bias"), arg("cache_seqlens"),
        arg("conv_state_indices"), arg("y"), arg("dilation"), arg("activation"), arg("channel_last"),
        arg("stream") = 0);
  m.def("varlen_states", &varlen_states_entry, arg("x"), arg("cu_seqlens"), arg("states"), arg("stream") = 0);
}

}  // namespace gk
