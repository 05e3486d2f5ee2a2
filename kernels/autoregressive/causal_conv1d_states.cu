// Causal conv1d with carried states on CUDA (csrc/autoregressive/causal_conv1d_states.h defines each
// kernel). Work per thread:
//   forward, dL/dz         an element of (B, C, L) in storage order (coalesced in either layout), taps
//                          ascending from the bias;
//   final states           an element of (B, C, P);
//   input gradient         an element of the extended input (B, C, P + L) (or (B, C, L) without initial
//                          states), taps ascending, plus grad_final_states;
//   weight, bias grads     a block per channel: each thread sums a fixed stride of the B * L positions,
//                          then a block tree sum. No atomics: the same bits on every run;
//   update                 a (batch row, channel) pair: its outputs, then its state row's writes in order;
//   varlen states          an element of the (B, S, C) states.
// Half types load and store in their storage type and compute in float32; dL/dz is kept in the compute type.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "autoregressive/causal_conv1d_math.h"
#include "autoregressive/causal_conv1d_states.h"
#include "core/launch.cuh"
#include "core/reduce.cuh"

namespace gk {
namespace causal_conv1d {
namespace {

using namespace gpu::common;

constexpr int kThreads = 256;

// (b, c, m) of flat storage index idx of a (B, C, n) array in s's layout.
__device__ __forceinline__ void split(const StatesShape& s, int64_t idx, int64_t n, int64_t& b, int64_t& c,
                                      int64_t& m) {
  if (s.channel_last) {
    c = idx % s.channels;
    m = (idx / s.channels) % n;
  } else {
    m = idx % n;
    c = (idx / n) % s.channels;
  }
  b = idx / (s.channels * n);
}

// Whether tap source m (< 0: the initial states) counts for output l of sample b.
__device__ __forceinline__ bool reads(const int64_t* seq, bool has_init, int64_t L, int64_t b, int64_t m, int64_t l) {
  if (m < 0 && !has_init) return false;
  return !seq || seq[b * L + (m < 0 ? 0 : m)] == seq[b * L + l];
}

template <typename S>
__device__ __forceinline__ compute_t<S> extended(const StatesShape& s, const S* x, const S* init, int64_t b, int64_t c,
                                                 int64_t m) {
  return m >= 0 ? load(x, s.at(b, c, m, s.length)) : load(init, s.at(b, c, s.past() + m, s.past()));
}

template <typename S>
__device__ compute_t<S> pre_activation(const StatesShape& s, const S* x, const S* w, const S* bias, const S* init,
                                       const int64_t* seq, int64_t b, int64_t c, int64_t l) {
  using C = compute_t<S>;
  C acc = bias ? load(bias, c) : C(0);
  for (int64_t k = 0; k < s.k; ++k) {
    const int64_t m = l - tap_shift(k, s.k, s.dilation);
    if (reads(seq, init != nullptr, s.length, b, m, l)) acc += load(w, c * s.k + k) * extended(s, x, init, b, c, m);
  }
  return acc;
}

// Grad false: out = act(z); true: gz = grad_y * act'(z). Both 0 where seq_idx < 0.
template <typename S, typename Out, int Act, bool Grad>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(StatesShape s, const S* x, const S* w, const S* bias, const S* init, const int64_t* seq,
                   const S* grad_y, Out* out) {
  using C = compute_t<S>;
  const int64_t total = s.batch * s.channels * s.length;
  for (int64_t idx = gpu::thread_index(); idx < total; idx += gpu::thread_count()) {
    int64_t b, c, l;
    split(s, idx, s.length, b, c, l);
    const C z = pre_activation(s, x, w, bias, init, seq, b, c, l);
    C v = Grad ? C(load(grad_y, idx)) * activate_grad<Act>(z) : activate<Act>(z);
    if (seq && seq[b * s.length + l] < 0) v = C(0);
    if constexpr (Grad)
      out[idx] = v;
    else
      store(out, idx, v);
  }
}

template <typename S>
__global__ void __launch_bounds__(kThreads) final_states_kernel(StatesShape s, const S* x, const S* init, S* fs) {
  using C = compute_t<S>;
  const int64_t P = s.past(), total = s.batch * s.channels * P;
  for (int64_t idx = gpu::thread_index(); idx < total; idx += gpu::thread_count()) {
    int64_t b, c, j;
    split(s, idx, P, b, c, j);
    const int64_t m = s.length - P + j;
    store(fs, idx, m >= 0 || init ? extended(s, x, init, b, c, m) : C(0));
  }
}

// Extended-input element (b, c, m), m in [first, L), in (b, c, m) order.
template <typename S, typename G>
__global__ void __launch_bounds__(kThreads)
    grad_input_kernel(StatesShape s, const G* gz, const S* grad_final, const S* w, const int64_t* seq, S* grad_x,
                      S* grad_init, int64_t first) {
  using C = compute_t<S>;
  const int64_t L = s.length, P = s.past(), n = L - first, total = s.batch * s.channels * n;
  for (int64_t idx = gpu::thread_index(); idx < total; idx += gpu::thread_count()) {
    const int64_t m = idx % n + first, c = (idx / n) % s.channels, b = idx / (s.channels * n);
    C acc = 0;
    for (int64_t k = 0; k < s.k; ++k) {
      const int64_t l = m + tap_shift(k, s.k, s.dilation);
      if (l < 0 || l >= L || !reads(seq, grad_init != nullptr, L, b, m, l)) continue;
      acc += load(w, c * s.k + k) * C(gz[s.at(b, c, l, L)]);
    }
    if (grad_final && m >= L - P) acc += load(grad_final, s.at(b, c, m - (L - P), P));
    if (m >= 0)
      store(grad_x, s.at(b, c, m, L), acc);
    else
      store(grad_init, s.at(b, c, P + m, P), acc);
  }
}

// A block per channel (grid-stride): thread t sums positions t, t + blockDim, ... of the B * L, then the block
// adds the threads' sums in a fixed tree.
template <typename S, typename G>
__global__ void __launch_bounds__(kThreads) grad_weight_kernel(StatesShape s, const G* gz, const S* x, const S* init,
                                                               const int64_t* seq, S* grad_w, S* grad_bias) {
  using C = compute_t<S>;
  const int64_t L = s.length, n = s.batch * L;
  for (int64_t c = blockIdx.x; c < s.channels; c += gridDim.x) {
    if (grad_bias) {
      C acc = 0;
      for (int64_t q = threadIdx.x; q < n; q += blockDim.x) acc += C(gz[s.at(q / L, c, q % L, L)]);
      acc = block_sum(acc);
      if (threadIdx.x == 0) store(grad_bias, c, acc);
    }
    for (int64_t k = 0; k < s.k; ++k) {
      const int64_t shift = tap_shift(k, s.k, s.dilation);
      C acc = 0;
      for (int64_t q = threadIdx.x; q < n; q += blockDim.x) {
        const int64_t b = q / L, l = q % L, m = l - shift;
        if (reads(seq, init != nullptr, L, b, m, l)) acc += C(gz[s.at(b, c, l, L)]) * extended(s, x, init, b, c, m);
      }
      acc = block_sum(acc);
      if (threadIdx.x == 0) store(grad_w, c * s.k + k, acc);
    }
  }
}

__device__ __forceinline__ int64_t wrap(int64_t i, int64_t n) { return ((i % n) + n) % n; }

template <typename S, int Act>
__global__ void __launch_bounds__(kThreads) update_kernel(StatesUpdateArgs a) {
  using C = compute_t<S>;
  const StatesShape& s = a.shape;
  const S* x = static_cast<const S*>(a.x);
  const S* w = static_cast<const S*>(a.w);
  const S* bias = static_cast<const S*>(a.bias);
  S* y = static_cast<S*>(a.y);
  const int64_t P = s.past(), L = s.length, S_len = a.state_len, items = s.batch * s.channels;
  for (int64_t item = gpu::thread_index(); item < items; item += gpu::thread_count()) {
    const int64_t b = item / s.channels, c = item % s.channels;
    const int64_t row = a.conv_state_indices ? a.conv_state_indices[b] : b;
    if (row < 0) {  // a padding slot
      for (int64_t l = 0; l < L; ++l) store(y, s.at(b, c, l, L), C(0));
      continue;
    }
    S* st = static_cast<S*>(a.state) + (row * s.channels + c) * S_len;
    const int64_t n = a.cache_seqlens ? a.cache_seqlens[b] : S_len;  // the past: the P slots before n
    for (int64_t l = 0; l < L; ++l) {
      C acc = bias ? load(bias, c) : C(0);
      for (int64_t k = 0; k < s.k; ++k) {
        const int64_t j = P + l - tap_shift(k, s.k, s.dilation);  // window index
        const C v = j < P ? C(load(st, a.cache_seqlens ? wrap(n - P + j, S_len) : S_len - P + j))
                          : C(load(x, s.at(b, c, j - P, L)));
        acc += load(w, c * s.k + k) * v;
      }
      store(y, s.at(b, c, l, L), activate<Act>(acc));
    }
    if (a.cache_seqlens) {
      for (int64_t l = 0; l < L; ++l) st[wrap(n + l, S_len)] = x[s.at(b, c, l, L)];
    } else {
      // The last S of [state, x]: entry j comes from index L + j, at or right of j, so ascending copies read
      // every old entry before it is overwritten.
      for (int64_t j = 0; j < S_len; ++j) st[j] = L + j < S_len ? st[L + j] : x[s.at(b, c, L + j - S_len, L)];
    }
  }
}

template <typename S>
__global__ void __launch_bounds__(kThreads) varlen_states_kernel(VarlenStatesArgs a) {
  const S* x = static_cast<const S*>(a.x);
  S* out = static_cast<S*>(a.states);
  const int64_t C = a.channels, S_len = a.state_len, total = a.batch * S_len * C;
  for (int64_t idx = gpu::thread_index(); idx < total; idx += gpu::thread_count()) {
    const int64_t c = idx % C, j = (idx / C) % S_len, b = idx / (C * S_len);
    const int64_t start = a.cu_seqlens[b], t = a.cu_seqlens[b + 1] - S_len + j;
    out[idx] = t >= start ? x[t * C + c] : S(0.0f);
  }
}

}  // namespace

void states_forward_cuda(const StatesArgs& a, void* stream) {
  const StatesShape& s = a.shape;
  const cudaStream_t st = gpu::as_stream(stream);
  gpu::dispatch_float(a.dtype, "causal_conv1d.forward_states", [&](auto type) {
    using S = typename decltype(type)::type;
    const S* x = static_cast<const S*>(a.x);
    const S* init = static_cast<const S*>(a.initial_states);
    const int64_t total = s.batch * s.channels * s.length;
    if (total > 0) {
      with_activation(a.activation, [&](auto act) {
        gpu::launch_items("causal_conv1d.forward_states", forward_kernel<S, S, decltype(act)::value, false>, total,
                          kThreads, st, s, x, static_cast<const S*>(a.w), static_cast<const S*>(a.bias), init,
                          a.seq_idx, static_cast<const S*>(nullptr), static_cast<S*>(a.y));
      });
    }
    if (a.final_states && s.batch * s.channels * s.past() > 0)
      gpu::launch_items("causal_conv1d.forward_states (final states)", final_states_kernel<S>,
                        s.batch * s.channels * s.past(), kThreads, st, s, x, init, static_cast<S*>(a.final_states));
  });
}

template <typename S, typename G>
void states_input_weight_grads(const StatesBackwardArgs& a, const G* gz, cudaStream_t st) {
  const StatesShape& s = a.shape;
  const int64_t first = a.grad_initial ? -s.past() : 0;
  gpu::launch_items("causal_conv1d.backward_states (input)", grad_input_kernel<S, G>,
                    s.batch * s.channels * (s.length - first), kThreads, st, s, gz, static_cast<const S*>(a.grad_final),
                    static_cast<const S*>(a.w), a.seq_idx, static_cast<S*>(a.grad_x), static_cast<S*>(a.grad_initial),
                    first);
  if (s.channels > 0)
    gpu::launch("causal_conv1d.backward_states (weight)", grad_weight_kernel<S, G>, gpu::grid_for(s.channels), kThreads,
                0, st, s, gz, static_cast<const S*>(a.x), static_cast<const S*>(a.initial_states), a.seq_idx,
                static_cast<S*>(a.grad_w), static_cast<S*>(a.grad_bias));
}

void states_backward_cuda(const StatesBackwardArgs& a, void* stream) {
  const StatesShape& s = a.shape;
  const cudaStream_t st = gpu::as_stream(stream);
  gpu::dispatch_float(a.dtype, "causal_conv1d.backward_states", [&](auto type) {
    using S = typename decltype(type)::type;
    using C = compute_t<S>;
    const int64_t total = s.batch * s.channels * s.length;
    if ((a.activation == kNone && !a.seq_idx) || total == 0) {
      states_input_weight_grads<S, S>(a, static_cast<const S*>(a.grad_y), st);
      return;
    }
    gpu::AsyncBuffer<C> gz(total, st, "causal_conv1d.backward_states: cudaMallocAsync");
    with_activation(a.activation, [&](auto act) {
      gpu::launch_items("causal_conv1d.backward_states (dL/dz)", forward_kernel<S, C, decltype(act)::value, true>,
                        total, kThreads, st, s, static_cast<const S*>(a.x), static_cast<const S*>(a.w),
                        static_cast<const S*>(a.bias), static_cast<const S*>(a.initial_states), a.seq_idx,
                        static_cast<const S*>(a.grad_y), gz.data);
    });
    states_input_weight_grads<S, C>(a, gz.data, st);
  });
}

void states_update_cuda(const StatesUpdateArgs& a, void* stream) {
  gpu::dispatch_float(a.dtype, "causal_conv1d.update_states", [&](auto type) {
    using S = typename decltype(type)::type;
    with_activation(a.activation, [&](auto act) {
      gpu::launch_items("causal_conv1d.update_states", update_kernel<S, decltype(act)::value>,
                        a.shape.batch * a.shape.channels, kThreads, gpu::as_stream(stream), a);
    });
  });
}

void varlen_states_cuda(const VarlenStatesArgs& a, void* stream) {
  gpu::launch_typed(
      a.dtype, "causal_conv1d.varlen_states",
      [](auto type) { return varlen_states_kernel<typename decltype(type)::type>; }, a.batch * a.state_len * a.channels,
      kThreads, stream, a);
}

}  // namespace causal_conv1d
}  // namespace gk
