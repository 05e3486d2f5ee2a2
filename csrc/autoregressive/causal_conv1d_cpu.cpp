// CPU kernels of the causal_conv1d family: tiling, threading and the fixed summation orders around
// csrc/autoregressive/causal_conv1d_math.h. Every output element is summed by one thread in an order that does not
// depend on the thread count (no atomics), so results are deterministic.
#include "autoregressive/causal_conv1d.h"

#include <algorithm>
#include <vector>
#include <memory>

#include "autoregressive/causal_conv1d_math.h"
#include "core/memory.h"
#include "core/parallel.h"

namespace gk {
namespace causal_conv1d {
namespace {

using cpu::kChunk;

int64_t tiles(int64_t length) { return (length + kChunk - 1) / kChunk; }

// acc[0, l1 - l0) = bias[o] + sum_i sum_k w[o, i, k] x[b, i, l - (K-1-k) d] for l in [l0, l1): the
// pre-activation of one tile, k ascending inside i ascending (the order update() repeats for one step).
template <typename T>
void conv_tile(const ConvShape& s, const T* x, const T* w, const T* bias, int64_t b, int64_t o, int64_t l0, int64_t l1,
               T* acc) {
  std::fill(acc, acc + (l1 - l0), bias ? bias[o] : T(0));
  for (int64_t j = 0; j < s.inputs_per_output(); ++j) {
    const T* xrow = x + (b * s.c_in + s.input_of(o, j)) * s.length;
    const T* wrow = w + s.w_row(o, j);
    for (int64_t k = 0; k < s.k; ++k) {
      const int64_t shift = tap_shift(k, s.k, s.dilation);
      const int64_t start = std::max(l0, shift);  // left of `shift` the tap reads the zero padding
      const T wk = wrow[k];
#pragma omp simd
      for (int64_t l = start; l < l1; ++l) acc[l - l0] += wk * xrow[l - shift];
    }
  }
}

template <typename T>
struct ConvKernel {
  static void run(const ConvArgs& a) {
    const ConvShape& s = a.shape;
    const T* x = static_cast<const T*>(a.x);
    const T* w = static_cast<const T*>(a.w);
    const T* bias = static_cast<const T*>(a.bias);
    T* y = static_cast<T*>(a.y);
    const int64_t nt = tiles(s.length);
    cpu::parallel_for(s.batch * s.c_out * nt, kChunk * s.k * s.inputs_per_output(), [&](int64_t item) {
      alignas(64) T acc[kChunk];
      const int64_t row = item / nt, l0 = (item % nt) * kChunk, l1 = std::min(s.length, l0 + kChunk);
      conv_tile(s, x, w, bias, row / s.c_out, row % s.c_out, l0, l1, acc);
      T* out = y + row * s.length;
      with_activation(a.activation, [&](auto act) {
#pragma omp simd
        for (int64_t l = l0; l < l1; ++l) out[l] = activate<decltype(act)::value>(acc[l - l0]);
      });
    });
  }
};

template <typename T>
struct ConvBackwardKernel {
  static void run(const ConvBackwardArgs& a) {
    const ConvShape& s = a.shape;
    const T* x = static_cast<const T*>(a.x);
    const T* w = static_cast<const T*>(a.w);
    const int64_t ny = s.batch * s.c_out * s.length;
    // gz = dL/d(pre-activation); with an activation the pre-activation is recomputed tile by tile.
    std::unique_ptr<T[]> scratch;  // not a vector: zero-filling it first would cost a pass over memory
    const T* gz = static_cast<const T*>(a.grad_y);
    if (a.activation != kNone && ny > 0) {
      scratch.reset(new T[ny]);
      cpu::advise_huge_pages(scratch.get(), ny * static_cast<int64_t>(sizeof(T)));  // fresh memory: fewer faults
      const int64_t nt = tiles(s.length);
      cpu::parallel_for(s.batch * s.c_out * nt, kChunk * s.k * s.inputs_per_output(), [&](int64_t item) {
        alignas(64) T acc[kChunk];
        const int64_t row = item / nt, l0 = (item % nt) * kChunk, l1 = std::min(s.length, l0 + kChunk);
        conv_tile(s, x, w, static_cast<const T*>(a.bias), row / s.c_out, row % s.c_out, l0, l1, acc);
        const T* g = gz + row * s.length;
        T* out = scratch.get() + row * s.length;
        with_activation(a.activation, [&](auto act) {
#pragma omp simd
          for (int64_t l = l0; l < l1; ++l) out[l] = g[l] * activate_grad<decltype(act)::value>(acc[l - l0]);
        });
      });
      gz = scratch.get();
    }
    grad_bias(a, gz);
    grad_weight(a, gz, x);
    grad_input(a, gz, w);
  }

  // grad_bias[o] = sum_b sum_l gz[b, o, l], b ascending.
  static void grad_bias(const ConvBackwardArgs& a, const T* gz) {
    if (!a.grad_bias) return;
    const ConvShape& s = a.shape;
    T* gb = static_cast<T*>(a.grad_bias);
    cpu::parallel_for(s.c_out, s.batch * s.length, [&](int64_t o) {
      T total = 0;
      for (int64_t b = 0; b < s.batch; ++b) {
        const T* g = gz + (b * s.c_out + o) * s.length;
        T acc = 0;
#pragma omp simd reduction(+ : acc)
        for (int64_t l = 0; l < s.length; ++l) acc += g[l];
        total += acc;
      }
      gb[o] = total;
    });
  }

  // grad_w[o, i, k] = sum_b sum_{l >= shift} gz[b, o, l] x[b, i, l - shift]: one thread per weight row.
  static void grad_weight(const ConvBackwardArgs& a, const T* gz, const T* x) {
    const ConvShape& s = a.shape;
    T* gw = static_cast<T*>(a.grad_w);
    const int64_t per = s.inputs_per_output();
    cpu::parallel_for(s.c_out * per, s.k * s.batch * s.length, [&](int64_t item) {
      const int64_t o = item / per, j = item % per, i = s.input_of(o, j);
      T* out = gw + s.w_row(o, j);
      for (int64_t k = 0; k < s.k; ++k) {
        const int64_t shift = tap_shift(k, s.k, s.dilation);
        T total = 0;
        for (int64_t b = 0; b < s.batch && shift < s.length; ++b) {
          const T* g = gz + (b * s.c_out + o) * s.length;
          const T* xrow = x + (b * s.c_in + i) * s.length;
          T acc = 0;
#pragma omp simd reduction(+ : acc)
          for (int64_t l = shift; l < s.length; ++l) acc += g[l] * xrow[l - shift];
          total += acc;
        }
        out[k] = total;
      }
    });
  }

  // grad_x[b, i, m] = sum_o sum_k w[o, i, k] gz[b, o, m + shift] over m + shift < L, o then k ascending.
  static void grad_input(const ConvBackwardArgs& a, const T* gz, const T* w) {
    const ConvShape& s = a.shape;
    T* gx = static_cast<T*>(a.grad_x);
    const int64_t nt = tiles(s.length);
    cpu::parallel_for(s.batch * s.c_in * nt,
                      kChunk * s.k * std::max<int64_t>(1, s.c_out / std::max<int64_t>(1, s.c_in)), [&](int64_t item) {
                        alignas(64) T acc[kChunk];
                        const int64_t row = item / nt, m0 = (item % nt) * kChunk, m1 = std::min(s.length, m0 + kChunk);
                        const int64_t b = row / s.c_in, i = row % s.c_in;
                        std::fill(acc, acc + (m1 - m0), T(0));
                        const int64_t o_begin = s.depthwise ? i : 0, o_end = s.depthwise ? i + 1 : s.c_out;
                        for (int64_t o = o_begin; o < o_end; ++o) {
                          const T* g = gz + (b * s.c_out + o) * s.length;
                          const T* wrow = w + s.w_row(o, s.depthwise ? 0 : i);
                          for (int64_t k = 0; k < s.k; ++k) {
                            const int64_t shift = tap_shift(k, s.k, s.dilation);
                            if (shift >= s.length) continue;
                            const int64_t end =
                                std::min(m1, s.length - shift);  // right of it the tap reads past the output
                            const T wk = wrow[k];
#pragma omp simd
                            for (int64_t m = m0; m < end; ++m) acc[m - m0] += wk * g[m + shift];
                          }
                        }
                        std::copy(acc, acc + (m1 - m0), gx + row * s.length + m0);
                      });
  }
};

template <typename T>
struct UpdateKernel {
  static void run(const UpdateArgs& a) {
    const ConvShape& s = a.shape;
    const T* x = static_cast<const T*>(a.x);
    T* state = static_cast<T*>(a.state);
    const T* w = static_cast<const T*>(a.w);
    const T* bias = static_cast<const T*>(a.bias);
    T* y = static_cast<T*>(a.y);
    const int64_t W = a.state_len;
    if (s.depthwise) {
      // Channel c of image b reads and shifts only its own state row: one pass per image, the activation
      // chosen once and applied in a vectorised loop (a row is a handful of multiply-adds).
      std::vector<int64_t> back(s.k);
      for (int64_t k = 0; k + 1 < s.k; ++k) back[k] = W - tap_shift(k, s.k, s.dilation);
      const int64_t C = s.c_in;
      with_activation(a.activation, [&](auto act) {
        cpu::parallel_for(s.batch, C * (W + 1), [&](int64_t b) {
          T* out = y + b * C;
          for (int64_t c = 0; c < C; ++c) {
            const T* past = state + (b * C + c) * W;
            const T* wrow = w + c * s.k;
            T acc = bias ? bias[c] : T(0);
            for (int64_t k = 0; k + 1 < s.k; ++k) acc += wrow[k] * past[back[k]];
            out[c] = acc + wrow[s.k - 1] * x[b * C + c];
          }
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) out[c] = activate<decltype(act)::value>(out[c]);
          if (W == 0) return;
          for (int64_t c = 0; c < C; ++c) {
            T* past = state + (b * C + c) * W;
            for (int64_t j = 0; j + 1 < W; ++j) past[j] = past[j + 1];
            past[W - 1] = x[b * C + c];
          }
        });
      });
      return;
    }
    // Every output reads the whole old state before any of it shifts: two passes.
    cpu::parallel_for(s.batch * s.c_out, s.inputs_per_output() * (W + 1), [&](int64_t row) {
      const int64_t b = row / s.c_out, o = row % s.c_out;
      T acc = bias ? bias[o] : T(0);
      for (int64_t j = 0; j < s.inputs_per_output(); ++j) {
        const int64_t i = s.input_of(o, j);
        const T* past = state + (b * s.c_in + i) * W;
        const T* wrow = w + s.w_row(o, j);
        for (int64_t k = 0; k + 1 < s.k; ++k) acc += wrow[k] * past[W - tap_shift(k, s.k, s.dilation)];
        acc += wrow[s.k - 1] * x[b * s.c_in + i];
      }
      with_activation(a.activation, [&](auto act) { y[row] = activate<decltype(act)::value>(acc); });
    });
    if (W == 0) return;
    cpu::parallel_for(s.batch * s.c_in, W, [&](int64_t row) {
      T* past = state + row * W;
      std::copy(past + 1, past + W, past);
      past[W - 1] = x[row];
    });
  }
};

// The gate's work items: f(o, j0, j1) for positions j0 .. j1 - 1 (a chunk) of row o, in parallel.
template <typename F>
void for_each_gate_chunk(int64_t outer, int64_t inner, F f) {
  const int64_t nt = tiles(inner);
  cpu::parallel_for(outer * nt, 4 * kChunk, [&](int64_t item) {
    const int64_t o = item / nt, j0 = (item % nt) * kChunk;
    f(o, j0, std::min(inner, j0 + kChunk));
  });
}

template <typename T>
struct GatedKernel {
  static void run(const GatedArgs& a) {
    const T* x = static_cast<const T*>(a.x);
    T* y = static_cast<T*>(a.y);
    for_each_gate_chunk(a.outer, a.inner, [&](int64_t o, int64_t j0, int64_t j1) {
      const T* gate_a = x + o * 2 * a.inner;
      const T* gate_b = gate_a + a.inner;
      T* out = y + o * a.inner;
#pragma omp simd
      for (int64_t j = j0; j < j1; ++j) out[j] = gated(gate_a[j], gate_b[j]);
    });
  }
};

template <typename T>
struct GatedBackwardKernel {
  static void run(const GatedBackwardArgs& a) {
    const T* g = static_cast<const T*>(a.grad_y);
    const T* x = static_cast<const T*>(a.x);
    T* gx = static_cast<T*>(a.grad_x);
    for_each_gate_chunk(a.outer, a.inner, [&](int64_t o, int64_t j0, int64_t j1) {
      const T* xa = x + o * 2 * a.inner;
      const T* xb = xa + a.inner;
      T* ga = gx + o * 2 * a.inner;
      T* gb = ga + a.inner;
      const T* go = g + o * a.inner;
#pragma omp simd
      for (int64_t j = j0; j < j1; ++j) {
        const GatedGrad<T> d = gated_grad(xa[j], xb[j]);
        ga[j] = go[j] * d.da;
        gb[j] = go[j] * d.db;
      }
    });
  }
};

}  // namespace

void conv_cpu(const ConvArgs& a) { cpu::dispatch_float<ConvKernel>(a.dtype, a); }
void conv_backward_cpu(const ConvBackwardArgs& a) { cpu::dispatch_float<ConvBackwardKernel>(a.dtype, a); }
void update_cpu(const UpdateArgs& a) { cpu::dispatch_float<UpdateKernel>(a.dtype, a); }
void gated_cpu(const GatedArgs& a) { cpu::dispatch_float<GatedKernel>(a.dtype, a); }
void gated_backward_cpu(const GatedBackwardArgs& a) { cpu::dispatch_float<GatedBackwardKernel>(a.dtype, a); }

}  // namespace causal_conv1d
}  // namespace gk
