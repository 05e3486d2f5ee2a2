// Depthwise causal conv1d with carried states (docs/math.md, section 6.3): the kernels behind
// causal-conv1d's API. Weight (C, K), P = (K - 1) * dilation past inputs per (b, c) row.
//
// The extended input of row (b, c) is xe[m] for m in [-P, L): x[b, c, m] for m >= 0, initial_states[b, c, P + m]
// for m < 0 (no tap reads m < 0 without initial states). Tap k of output l reads xe[l - (K - 1 - k) * dilation]
// when seq_idx allows it: the source m and l belong to one sequence (seq[m] == seq[l], or for m < 0 seq[l] ==
// seq[0]); outputs with seq[l] < 0 are 0. final_states[b, c, j] = xe[L - P + j] (0 for L - P + j < 0 without
// initial states).
//
// Layouts: x, y, grad_y, grad_x and the (B, C, P) states are all channel-first ((b, c, m) at (b*C + c)*n + m)
// or all channel-last ((b*n + m)*C + c), n = L or P. seq_idx (B, L), cache_seqlens (B,) and
// conv_state_indices (B,) are int64 (the op widens causal-conv1d's int32).
#pragma once
#include "core/array.h"
#include "core/macros.h"

namespace gk {
namespace causal_conv1d {

struct StatesShape {
  int64_t batch, channels, length, k, dilation;
  bool channel_last;
  GK_HD int64_t past() const { return (k - 1) * dilation; }
  // Offset of (b, c, m) in an array of n positions per row, in this call's layout.
  GK_HD int64_t at(int64_t b, int64_t c, int64_t m, int64_t n) const {
    return channel_last ? (b * n + m) * channels + c : (b * channels + c) * n + m;
  }
};

struct StatesArgs {
  const void* x;               // (B, C, L)
  const void* w;               // (C, K)
  const void* bias;            // (C,), nullable
  const void* initial_states;  // (B, C, P), nullable
  const int64_t* seq_idx;      // (B, L), nullable
  void* y;                     // (B, C, L)
  void* final_states;          // (B, C, P), nullable
  StatesShape shape;
  int activation;
  DType dtype;
};

struct StatesBackwardArgs {
  const void* grad_y;      // (B, C, L)
  const void* grad_final;  // (B, C, P), nullable (no gradient reaches final_states)
  const void* x;
  const void* w;
  const void* bias;            // nullable
  const void* initial_states;  // nullable
  const int64_t* seq_idx;      // nullable
  void* grad_x;
  void* grad_w;        // (C, K)
  void* grad_bias;     // nullable
  void* grad_initial;  // (B, C, P), nullable
  StatesShape shape;
  int activation;
  DType dtype;
};

// Generation with a state per sequence: x (B, C, L) are L new inputs; batch row b uses state row
// r = conv_state_indices[b] (b without indices) of state (R, C, S), S >= P, channel-first and contiguous;
// r < 0 is a padding slot: y[b] = 0, no state touched.
//   without cache_seqlens: the window is [state[r, S - P:], x[b]]; state[r] becomes the last S entries of
//     [state[r], x[b]];
//   with cache_seqlens n = cache_seqlens[b] (a circular buffer): the window is state[r, (n - P + j) mod S]
//     for j < P, then x[b]; x[b, j] is then written at (n + j) mod S, j ascending (a later one wins).
// y[b, c, l] = act(bias[c] + sum_k w[c, k] window[P + l - (K - 1 - k) * dilation]).
struct StatesUpdateArgs {
  const void* x;  // (B, C, L), in `shape`'s layout
  void* state;    // (R, C, S)
  const void* w;
  const void* bias;                   // nullable
  const int64_t* cache_seqlens;       // (B,), nullable
  const int64_t* conv_state_indices;  // (B,), nullable
  void* y;                            // (B, C, L), in `shape`'s layout
  StatesShape shape;
  int64_t state_rows, state_len;
  int activation;
  DType dtype;
};

// states[b, c, j] = x[e - S + j, c] for e - S + j >= s, else 0, with [s, e) = [cu[b], cu[b + 1]): the last S
// inputs of each packed sequence of x (T, C) (row-major) as its state, states channel-last (b, j, c).
struct VarlenStatesArgs {
  const void* x;
  const int64_t* cu_seqlens;  // (B + 1,)
  void* states;
  int64_t batch, channels, tokens, state_len;
  DType dtype;
};

void states_forward_cpu(const StatesArgs& a);
void states_backward_cpu(const StatesBackwardArgs& a);
void states_update_cpu(const StatesUpdateArgs& a);
void varlen_states_cpu(const VarlenStatesArgs& a);

void states_forward_cuda(const StatesArgs& a, void* stream);
void states_backward_cuda(const StatesBackwardArgs& a, void* stream);
void states_update_cuda(const StatesUpdateArgs& a, void* stream);
void varlen_states_cuda(const VarlenStatesArgs& a, void* stream);

}  // namespace causal_conv1d
}  // namespace gk
