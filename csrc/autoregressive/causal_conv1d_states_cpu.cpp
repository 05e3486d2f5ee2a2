// CPU kernels of causal conv1d with states (csrc/autoregressive/causal_conv1d_states.h). Channel-first calls
// vectorise along positions (a tile of one (b, c) row per work item), channel-last calls along channels (a
// chunk of channels at one position per item), so both read x in place. Every sum is owned by one item and
// runs in a fixed order: results do not depend on the thread count, and there are no atomics.
#include <algorithm>
#include <memory>
#include <vector>

#include "autoregressive/causal_conv1d_math.h"
#include "autoregressive/causal_conv1d_states.h"
#include "core/memory.h"
#include "core/parallel.h"

namespace gk {
namespace causal_conv1d {
namespace {

using cpu::kChunk;

int64_t chunks(int64_t n) { return (n + kChunk - 1) / kChunk; }

// i mod n in [0, n) for any sign of i (n > 0): circular-buffer slots.
int64_t wrap(int64_t i, int64_t n) { return ((i % n) + n) % n; }

// The tensors of a call, typed, with the reads every kernel shares.
template <typename T>
struct Rows {
  const StatesShape& s;
  const T* x;
  const T* init;       // nullable
  const int64_t* seq;  // nullable
  int64_t P;

  Rows(const StatesShape& shape, const void* x_, const void* init_, const int64_t* seq_)
      : s(shape), x(static_cast<const T*>(x_)), init(static_cast<const T*>(init_)), seq(seq_), P(shape.past()) {}

  const int64_t* seq_row(int64_t b) const { return seq ? seq + b * s.length : nullptr; }

  // Whether tap source m (< 0: the initial states) counts for output l of a row with sequence ids srow.
  bool reads(const int64_t* srow, int64_t m, int64_t l) const {
    if (m < 0 && !init) return false;
    return !srow || srow[m < 0 ? 0 : m] == srow[l];
  }

  // Channel-last: the C inputs of position m of sample b (m < 0 in the initial states); reads() said yes.
  const T* position(int64_t b, int64_t m) const {
    return m >= 0 ? x + s.at(b, 0, m, s.length) : init + s.at(b, 0, P + m, P);
  }
};

// w transposed to (K, C): channel-last loops read a tap's weights contiguously.
template <typename T>
std::vector<T> taps_major(const T* w, int64_t C, int64_t K) {
  std::vector<T> wt(C * K);
  for (int64_t c = 0; c < C; ++c)
    for (int64_t k = 0; k < K; ++k) wt[k * C + c] = w[c * K + k];
  return wt;
}

// Channel-first pre-activation of positions [l0, l1) of row (b, c): bias, then taps ascending.
template <typename T>
void pre_activation_cf(const Rows<T>& r, const T* w, const T* bias, int64_t b, int64_t c, int64_t l0, int64_t l1,
                       T* acc) {
  const StatesShape& s = r.s;
  std::fill(acc, acc + (l1 - l0), bias ? bias[c] : T(0));
  const T* xrow = r.x + s.at(b, c, 0, s.length);
  const T* irow = r.init ? r.init + s.at(b, c, 0, r.P) + r.P : nullptr;  // irow[m] for m in [-P, 0)
  const int64_t* srow = r.seq_row(b);
  for (int64_t k = 0; k < s.k; ++k) {
    const int64_t shift = tap_shift(k, s.k, s.dilation);
    const T wk = w[c * s.k + k];
    const int64_t split = std::min(l1, std::max(l0, shift));  // left of it the tap reads the initial states
    if (srow) {
#pragma omp simd
      for (int64_t l = split; l < l1; ++l) acc[l - l0] += srow[l - shift] == srow[l] ? wk * xrow[l - shift] : T(0);
    } else {
#pragma omp simd
      for (int64_t l = split; l < l1; ++l) acc[l - l0] += wk * xrow[l - shift];
    }
    if (!irow) continue;
    for (int64_t l = l0; l < split; ++l)
      if (!srow || srow[l] == srow[0]) acc[l - l0] += wk * irow[l - shift];
  }
}

// Channel-last pre-activation of channels [c0, c1) at position l of sample b; wt is taps_major(w).
template <typename T>
void pre_activation_cl(const Rows<T>& r, const T* wt, const T* bias, int64_t b, int64_t l, int64_t c0, int64_t c1,
                       T* acc) {
  const StatesShape& s = r.s;
  for (int64_t c = c0; c < c1; ++c) acc[c - c0] = bias ? bias[c] : T(0);
  const int64_t* srow = r.seq_row(b);
  for (int64_t k = 0; k < s.k; ++k) {
    const int64_t m = l - tap_shift(k, s.k, s.dilation);
    if (!r.reads(srow, m, l)) continue;
    const T* src = r.position(b, m);
    const T* wk = wt + k * s.channels;
#pragma omp simd
    for (int64_t c = c0; c < c1; ++c) acc[c - c0] += wk[c] * src[c];
  }
}

// fn(b, c, l0, l1) over channel-first tiles, or fn(b, l, c0, c1) over channel-last chunks, of (B, C, n).
template <typename Fn>
void for_each_tile(const StatesShape& s, int64_t n, int64_t work, Fn fn) {
  if (s.channel_last) {
    const int64_t nc = chunks(s.channels);
    cpu::parallel_for(s.batch * n * nc, kChunk * work, [&](int64_t item) {
      const int64_t row = item / nc, c0 = (item % nc) * kChunk;
      fn(row / n, row % n, c0, std::min(s.channels, c0 + kChunk));
    });
  } else {
    const int64_t nt = chunks(n);
    cpu::parallel_for(s.batch * s.channels * nt, kChunk * work, [&](int64_t item) {
      const int64_t row = item / nt, l0 = (item % nt) * kChunk;
      fn(row / s.channels, row % s.channels, l0, std::min(n, l0 + kChunk));
    });
  }
}

// out[(b, c, l)] = epilogue(z, l-index) over the whole (B, C, L) output: z the pre-activation, `at` its offset.
template <typename T, typename Epilogue>
void map_pre_activation(const Rows<T>& r, const T* w, const T* bias, Epilogue epilogue) {
  const StatesShape& s = r.s;
  std::vector<T> wt = s.channel_last ? taps_major(w, s.channels, s.k) : std::vector<T>();
  for_each_tile(s, s.length, s.k, [&](int64_t b, int64_t i, int64_t j0, int64_t j1) {
    alignas(64) T acc[kChunk];
    const int64_t* srow = r.seq_row(b);
    if (s.channel_last) {  // i = l, [j0, j1) channels
      pre_activation_cl(r, wt.data(), bias, b, i, j0, j1, acc);
      const int64_t base = s.at(b, 0, i, s.length);
      const bool dead = srow && srow[i] < 0;
      epilogue(base + j0, acc, j1 - j0, [&](int64_t) { return dead; });
    } else {  // i = c, [j0, j1) positions
      pre_activation_cf(r, w, bias, b, i, j0, j1, acc);
      epilogue(s.at(b, i, j0, s.length), acc, j1 - j0, [&](int64_t t) { return srow && srow[j0 + t] < 0; });
    }
  });
}

template <typename T>
void write_final_states(const Rows<T>& r, T* fs) {
  const StatesShape& s = r.s;
  const int64_t P = r.P, L = s.length;
  cpu::parallel_for(s.batch * s.channels, P, [&](int64_t row) {
    const int64_t b = row / s.channels, c = row % s.channels;
    for (int64_t j = 0; j < P; ++j) {
      const int64_t m = L - P + j;
      fs[s.at(b, c, j, P)] = m >= 0 ? r.x[s.at(b, c, m, L)] : r.init ? r.init[s.at(b, c, P + m, P)] : T(0);
    }
  });
}

template <typename T>
struct ForwardKernel {
  static void run(const StatesArgs& a) {
    const Rows<T> r(a.shape, a.x, a.initial_states, a.seq_idx);
    T* y = static_cast<T*>(a.y);
    with_activation(a.activation, [&](auto act) {
      map_pre_activation(r, static_cast<const T*>(a.w), static_cast<const T*>(a.bias),
                         [&](int64_t at, const T* acc, int64_t n, auto dead) {
                           for (int64_t t = 0; t < n; ++t)
                             y[at + t] = dead(t) ? T(0) : activate<decltype(act)::value>(acc[t]);
                         });
    });
    if (a.final_states) write_final_states(r, static_cast<T*>(a.final_states));
  }
};

template <typename T>
struct BackwardKernel {
  static void run(const StatesBackwardArgs& a) {
    const StatesShape& s = a.shape;
    const Rows<T> r(s, a.x, a.initial_states, a.seq_idx);
    const T* w = static_cast<const T*>(a.w);
    const int64_t n = s.batch * s.channels * s.length;
    // gz = dL/dz, zero at the outputs seq_idx zeroes; the pre-activation is recomputed.
    const T* gy = static_cast<const T*>(a.grad_y);
    const T* gz = gy;
    std::unique_ptr<T[]> scratch;
    if ((a.activation != kNone || a.seq_idx) && n > 0) {
      scratch.reset(new T[n]);
      cpu::advise_huge_pages(scratch.get(), n * static_cast<int64_t>(sizeof(T)));
      T* out = scratch.get();
      with_activation(a.activation, [&](auto act) {
        map_pre_activation(r, w, static_cast<const T*>(a.bias), [&](int64_t at, const T* acc, int64_t m, auto dead) {
          for (int64_t t = 0; t < m; ++t)
            out[at + t] = dead(t) ? T(0) : gy[at + t] * activate_grad<decltype(act)::value>(acc[t]);
        });
      });
      gz = scratch.get();
    }
    grad_extended_input(a, r, gz, w);
    grad_weight_bias(a, r, gz);
  }

  // ge[m] = sum_k w[c, k] gz[m + shift_k] over the outputs that read m, plus grad_final at m >= L - P;
  // m >= 0 goes to grad_x, m < 0 to grad_initial.
  static void grad_extended_input(const StatesBackwardArgs& a, const Rows<T>& r, const T* gz, const T* w) {
    const StatesShape& s = a.shape;
    const int64_t P = r.P, L = s.length, first = a.grad_initial ? -P : 0;
    const T* gf = static_cast<const T*>(a.grad_final);
    T* gx = static_cast<T*>(a.grad_x);
    T* gi = static_cast<T*>(a.grad_initial);
    auto store = [&](int64_t b, int64_t c, int64_t m, T v) {
      if (gf && m >= L - P) v += gf[s.at(b, c, m - (L - P), P)];
      if (m >= 0)
        gx[s.at(b, c, m, L)] = v;
      else
        gi[s.at(b, c, P + m, P)] = v;
    };
    if (s.channel_last) {
      std::vector<T> wt = taps_major(w, s.channels, s.k);
      for_each_tile(s, L - first, s.k, [&](int64_t b, int64_t q, int64_t c0, int64_t c1) {
        alignas(64) T acc[kChunk];
        const int64_t m = q + first;
        const int64_t* srow = r.seq_row(b);
        std::fill(acc, acc + (c1 - c0), T(0));
        for (int64_t k = 0; k < s.k; ++k) {
          const int64_t l = m + tap_shift(k, s.k, s.dilation);
          if (l < 0 || l >= L || !r.reads(srow, m, l)) continue;
          const T* g = gz + s.at(b, 0, l, L);
          const T* wk = wt.data() + k * s.channels;
#pragma omp simd
          for (int64_t c = c0; c < c1; ++c) acc[c - c0] += wk[c] * g[c];
        }
        for (int64_t c = c0; c < c1; ++c) store(b, c, m, acc[c - c0]);
      });
      return;
    }
    for_each_tile(s, L - first, s.k, [&](int64_t b, int64_t c, int64_t q0, int64_t q1) {
      alignas(64) T acc[kChunk];
      const int64_t m0 = q0 + first, m1 = q1 + first;
      const int64_t* srow = r.seq_row(b);
      const T* g = gz + s.at(b, c, 0, L);
      std::fill(acc, acc + (m1 - m0), T(0));
      for (int64_t k = 0; k < s.k; ++k) {
        const int64_t shift = tap_shift(k, s.k, s.dilation);
        const T wk = w[c * s.k + k];
        const int64_t end = std::min(m1, L - shift);  // outputs from L on do not exist
        const int64_t split = std::min(end, std::max<int64_t>(m0, 0));
        for (int64_t m = std::max(m0, -shift); m < split; ++m)  // sources in the initial states (output m + shift >= 0)
          if (!srow || srow[m + shift] == srow[0]) acc[m - m0] += wk * g[m + shift];
        if (srow) {
#pragma omp simd
          for (int64_t m = split; m < end; ++m) acc[m - m0] += srow[m] == srow[m + shift] ? wk * g[m + shift] : T(0);
        } else {
#pragma omp simd
          for (int64_t m = split; m < end; ++m) acc[m - m0] += wk * g[m + shift];
        }
      }
      for (int64_t m = m0; m < m1; ++m) store(b, c, m, acc[m - m0]);
    });
  }

  // grad_w[c, k] = sum_b sum_l gz[b, c, l] xe[b, c, l - shift_k] over the taps that count; grad_bias[c] =
  // sum_b sum_l gz[b, c, l]. One item per channel (channel-first) or chunk of channels (channel-last), b then l
  // ascending.
  static void grad_weight_bias(const StatesBackwardArgs& a, const Rows<T>& r, const T* gz) {
    const StatesShape& s = a.shape;
    const int64_t L = s.length, K = s.k;
    T* gw = static_cast<T*>(a.grad_w);
    T* gb = static_cast<T*>(a.grad_bias);
    if (s.channel_last) {
      const int64_t nc = chunks(s.channels);
      cpu::parallel_for(nc, kChunk * (K + 1) * s.batch * L, [&](int64_t item) {
        const int64_t c0 = item * kChunk, c1 = std::min(s.channels, c0 + kChunk), n = c1 - c0;
        std::vector<T> acc((K + 1) * n, T(0));  // K tap rows, then the bias row
        T* accb = acc.data() + K * n;
        for (int64_t b = 0; b < s.batch; ++b) {
          const int64_t* srow = r.seq_row(b);
          for (int64_t l = 0; l < L; ++l) {
            const T* g = gz + s.at(b, c0, l, L);
#pragma omp simd
            for (int64_t c = 0; c < n; ++c) accb[c] += g[c];
            for (int64_t k = 0; k < K; ++k) {
              const int64_t m = l - tap_shift(k, K, s.dilation);
              if (!r.reads(srow, m, l)) continue;
              const T* src = r.position(b, m) + c0;
              T* ak = acc.data() + k * n;
#pragma omp simd
              for (int64_t c = 0; c < n; ++c) ak[c] += g[c] * src[c];
            }
          }
        }
        for (int64_t c = 0; c < n; ++c) {
          for (int64_t k = 0; k < K; ++k) gw[(c0 + c) * K + k] = acc[k * n + c];
          if (gb) gb[c0 + c] = accb[c];
        }
      });
      return;
    }
    cpu::parallel_for(s.channels, (K + 1) * s.batch * L, [&](int64_t c) {
      T bias_total = 0;
      for (int64_t b = 0; b < s.batch; ++b) {
        const T* g = gz + s.at(b, c, 0, L);
        T acc = 0;
#pragma omp simd reduction(+ : acc)
        for (int64_t l = 0; l < L; ++l) acc += g[l];
        bias_total += acc;
      }
      if (gb) gb[c] = bias_total;
      for (int64_t k = 0; k < K; ++k) {
        const int64_t shift = tap_shift(k, K, s.dilation);
        T total = 0;
        for (int64_t b = 0; b < s.batch; ++b) {
          const T* g = gz + s.at(b, c, 0, L);
          const T* xrow = r.x + s.at(b, c, 0, L);
          const T* irow = r.init ? r.init + s.at(b, c, 0, r.P) + r.P : nullptr;
          const int64_t* srow = r.seq_row(b);
          const int64_t split = std::min(L, shift);
          T acc = 0;
          if (irow)
            for (int64_t l = 0; l < split; ++l)
              if (!srow || srow[l] == srow[0]) acc += g[l] * irow[l - shift];
          T part = 0;
          if (srow) {
#pragma omp simd reduction(+ : part)
            for (int64_t l = split; l < L; ++l) part += srow[l - shift] == srow[l] ? g[l] * xrow[l - shift] : T(0);
          } else {
#pragma omp simd reduction(+ : part)
            for (int64_t l = split; l < L; ++l) part += g[l] * xrow[l - shift];
          }
          total += acc + part;
        }
        gw[c * K + k] = total;
      }
    });
  }
};

template <typename T>
struct UpdateKernel {
  // The decode step (one new input, the state shifting by one) of batch row b on its state rows `rows`:
  // a pass over the channels with the activation vectorised, then the shifts.
  static void one_step(const StatesUpdateArgs& a, int64_t b, T* rows) {
    const StatesShape& s = a.shape;
    const int64_t C = s.channels, S = a.state_len, K = s.k;
    const T* w = static_cast<const T*>(a.w);
    const T* bias = static_cast<const T*>(a.bias);
    const T* xb = static_cast<const T*>(a.x) + b * C;  // L = 1: (b, c) at b * C + c in either layout
    T* out = static_cast<T*>(a.y) + b * C;
    for (int64_t c = 0; c < C; ++c) {
      const T* past = rows + c * S;
      const T* wc = w + c * K;
      T acc = bias ? bias[c] : T(0);
      for (int64_t k = 0; k + 1 < K; ++k) acc += wc[k] * past[S - tap_shift(k, K, s.dilation)];
      out[c] = acc + wc[K - 1] * xb[c];
    }
    with_activation(a.activation, [&](auto act) {
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) out[c] = activate<decltype(act)::value>(out[c]);
    });
    if (S == 0) return;
    for (int64_t c = 0; c < C; ++c) {
      T* past = rows + c * S;
      std::copy(past + 1, past + S, past);
      past[S - 1] = xb[c];
    }
  }

  // The decode step at causal-conv1d's usual shape (width K <= 4, dilation 1, a state of exactly K - 1): the taps
  // and the shift unrolled, so the pass over the channels keeps the window in registers (0.77 ms against the
  // generic loop's 2.05 ms on a 4-entry state, 256 rows x 2048 channels, 2 threads). The same sums in the same
  // order as one_step.
  template <int K>
  static void one_step_k(const StatesUpdateArgs& a, int64_t b, T* rows) {
    constexpr int P = K - 1;
    const int64_t C = a.shape.channels;
    const T* w = static_cast<const T*>(a.w);
    const T* bias = static_cast<const T*>(a.bias);
    const T* xb = static_cast<const T*>(a.x) + b * C;
    T* out = static_cast<T*>(a.y) + b * C;
    for (int64_t c = 0; c < C; ++c) {
      T* past = rows + c * P;
      const T* wc = w + c * K;
      T v[K];
      for (int j = 0; j < P; ++j) v[j] = past[j];
      v[P] = xb[c];
      T acc = bias ? bias[c] : T(0);
      for (int k = 0; k < P; ++k) acc += wc[k] * v[k];
      out[c] = acc + wc[P] * v[P];
      for (int j = 0; j < P; ++j) past[j] = v[j + 1];
    }
    with_activation(a.activation, [&](auto act) {
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) out[c] = activate<decltype(act)::value>(out[c]);
    });
  }

  static void decode_step(const StatesUpdateArgs& a, int64_t b, T* rows) {
    const StatesShape& s = a.shape;
    if (s.dilation == 1 && a.state_len == s.k - 1) {
      switch (s.k) {
        case 2:
          return one_step_k<2>(a, b, rows);
        case 3:
          return one_step_k<3>(a, b, rows);
        case 4:
          return one_step_k<4>(a, b, rows);
        default:
          break;
      }
    }
    one_step(a, b, rows);
  }

  static void run(const StatesUpdateArgs& a) {
    const StatesShape& s = a.shape;
    const T* x = static_cast<const T*>(a.x);
    const T* w = static_cast<const T*>(a.w);
    const T* bias = static_cast<const T*>(a.bias);
    T* state = static_cast<T*>(a.state);
    T* y = static_cast<T*>(a.y);
    const int64_t P = s.past(), L = s.length, S = a.state_len, C = s.channels;
    with_activation(a.activation, [&](auto act) {
      cpu::parallel_for(s.batch, C * (P + L) * s.k, [&](int64_t b) {
        const int64_t row = a.conv_state_indices ? a.conv_state_indices[b] : b;
        if (row < 0) {  // a padding slot
          for (int64_t c = 0; c < C; ++c)
            for (int64_t l = 0; l < L; ++l) y[s.at(b, c, l, L)] = T(0);
          return;
        }
        if (L == 1 && !a.cache_seqlens) {
          decode_step(a, b, state + row * C * S);
          return;
        }
        const int64_t n = a.cache_seqlens ? a.cache_seqlens[b] : 0;
        std::vector<T> window(P + L);
        for (int64_t c = 0; c < C; ++c) {
          T* st = state + (row * C + c) * S;
          for (int64_t j = 0; j < P; ++j) window[j] = a.cache_seqlens ? st[wrap(n - P + j, S)] : st[S - P + j];
          for (int64_t l = 0; l < L; ++l) window[P + l] = x[s.at(b, c, l, L)];
          for (int64_t l = 0; l < L; ++l) {
            T acc = bias ? bias[c] : T(0);
            for (int64_t k = 0; k < s.k; ++k) acc += w[c * s.k + k] * window[P + l - tap_shift(k, s.k, s.dilation)];
            y[s.at(b, c, l, L)] = activate<decltype(act)::value>(acc);
          }
          if (S == 0) continue;
          if (a.cache_seqlens) {
            for (int64_t l = 0; l < L; ++l) st[wrap(n + l, S)] = window[P + l];
          } else {
            // The last S of [state, x]: entry j comes from index L + j of the concatenation, at or right of j,
            // so an ascending in-place copy reads each old entry before overwriting it.
            for (int64_t j = 0; j < S; ++j) st[j] = L + j < S ? st[L + j] : window[P + L + j - S];
          }
        }
      });
    });
  }
};

template <typename T>
struct VarlenStatesKernel {
  static void run(const VarlenStatesArgs& a) {
    const T* x = static_cast<const T*>(a.x);
    T* out = static_cast<T*>(a.states);
    const int64_t S = a.state_len, C = a.channels;
    cpu::parallel_for(a.batch, S * C, [&](int64_t b) {
      const int64_t start = a.cu_seqlens[b], end = a.cu_seqlens[b + 1];
      for (int64_t j = 0; j < S; ++j) {
        const int64_t t = end - S + j;
        T* dst = out + (b * S + j) * C;
        if (t >= start)
          std::copy(x + t * C, x + (t + 1) * C, dst);
        else
          std::fill(dst, dst + C, T(0));
      }
    });
  }
};

}  // namespace

void states_forward_cpu(const StatesArgs& a) { cpu::dispatch_float<ForwardKernel>(a.dtype, a); }
void states_backward_cpu(const StatesBackwardArgs& a) { cpu::dispatch_float<BackwardKernel>(a.dtype, a); }
void states_update_cpu(const StatesUpdateArgs& a) { cpu::dispatch_float<UpdateKernel>(a.dtype, a); }
void varlen_states_cpu(const VarlenStatesArgs& a) { cpu::dispatch_float<VarlenStatesKernel>(a.dtype, a); }

}  // namespace causal_conv1d
}  // namespace gk
