// Per-step math of the NADE family (docs/math.md, section 4), for T = float or double:
//   a_1 = c,  a_{i+1} = a_i + W[:, i] x_i,  h_i = sigmoid(a_i),  l_i = b_i + V_i . h_i,
//   log p(x) = sum_i x_i l_i - softplus(l_i),   p(x_i = 1 | x_<i) = sigmoid(l_i).
// The recurrence and the dot products are the kernels' job; these are the terms they apply per element.
#pragma once
#include <cmath>

#include "core/fastmath.h"
#include "core/philox.h"

namespace gk {
namespace nade {

// 1 / (1 + e^-z): e^-z overflows to inf for very negative z, and 1 / inf is the right limit 0.
template <typename T>
GK_HD T sigmoid(T z) {
  return T(1) / (T(1) + gk::exp(-z));
}

// log(1 + e) for e in [0, 1]. float: below sqrt(2) - 1 the Cephes core takes e itself as its reduced
// argument, so tiny e keeps full relative accuracy (log(1 + e) computed as log of the rounded 1 + e would
// lose it); above, 1 + e is in (sqrt(2), 2] and rounding it costs under an ulp of the result.
GK_HD float log1p_unit(float e) {
  const bool small = e <= 0.41421356f;
  const LogArg big = log_reduce(1.0f + e);
  // Select the arguments, not two results: one polynomial per element, and the loop still vectorises.
  return log_core(small ? e : big.f, small ? 0.0f : big.e);
}

GK_HD double log1p_unit(double e) { return ::log1p(e); }

// softplus(l) = log(1 + e^l) = max(l, 0) + log(1 + e^-|l|): never overflows. NaN gives NaN (the float
// log1p_unit has no NaN check: its bit-level reduction would turn NaN into a number).
template <typename T>
GK_HD T softplus(T l) {
  const T magnitude = l < T(0) ? -l : l;
  const T value = (l > T(0) ? l : T(0)) + log1p_unit(gk::exp(-magnitude));
  return l != l ? l : value;
}

// log p(x | logit l) of one Bernoulli dimension, x = 0 or 1: l - softplus(l) or -softplus(l). The x = 0 term
// has no x l in it (the reference's NaN rule: x l is absent where x = 0), so l = +inf gives -inf, p(0) = 0,
// not 0 * inf - inf = NaN.
template <typename T>
GK_HD T log_bernoulli(T x, T l) {
  return x != T(0) ? x * l - softplus(l) : -softplus(l);
}

// d log_bernoulli / dl = x - sigmoid(l)
template <typename T>
GK_HD T log_bernoulli_dlogit(T x, T l) {
  return x - sigmoid(l);
}

// d sigmoid(a) / da from h = sigmoid(a)
template <typename T>
GK_HD T sigmoid_grad(T h) {
  return h * (T(1) - h);
}

// The backward needs every pre-activation a_i, walking i from D - 1 down. Recovering a_i as a_{i+1} - W[:, i] x_i
// cancels catastrophically (W = [[1e8, 0.5]] in float32 loses d/dc's second digit; an inf in W gives NaN), so
// the kernels keep them instead, in a tape of (checkpoints + steps) H values per example: a_i at every
// checkpoint_steps(D)-th step from the forward pass, then, chunk by chunk from the last, the chunk's a_i
// recomputed from its checkpoint. sqrt(D) steps per chunk: 2 sqrt(D) H values, and one extra forward pass.
// The recomputed a_i repeat the forward's operations in its order, so they are the forward's bits.
GK_HD int64_t checkpoint_steps(int64_t dims) {
  int64_t c = 1;
  while (c * c < dims) ++c;
  return c;
}

GK_HD int64_t checkpoints(int64_t dims) {
  const int64_t c = checkpoint_steps(dims);
  return (dims + c - 1) / c;
}

// Values of one example's tape: the checkpoints, then one chunk of steps.
GK_HD int64_t tape_size(int64_t dims, int64_t hidden) { return (checkpoints(dims) + checkpoint_steps(dims)) * hidden; }

// The draw x = 1 iff u < p, with u = (k + 0.5) 2^-24 the genkern uniform of `bits` (k = bits >> 8), compared
// exactly: u < p  <=>  2k + 1 < p 2^25, both sides exact in double (2k + 1 < 2^25; p 2^25 only rescales p).
// A float comparison would round u for u >= 1/2. NaN p never draws 1.
template <typename T>
GK_HD bool bernoulli(uint32_t bits, T p) {
  return static_cast<double>(2u * (bits >> 8) + 1u) < static_cast<double>(p) * 33554432.0;
}

// Stream element `index` (docs/math.md, section 1): lane index % 4 of block index / 4. The sampler draws
// dimension i of sample s from index s * D + i, so a sample never depends on the batch it is drawn in.
GK_HD uint32_t stream_element(uint64_t seed, uint64_t offset, uint64_t index) {
  const Philox4 block = stream_block(seed, offset, index >> 2);
  const uint32_t lane = static_cast<uint32_t>(index & 3u);
  return lane == 0 ? block.x[0] : lane == 1 ? block.x[1] : lane == 2 ? block.x[2] : block.x[3];
}

}  // namespace nade
}  // namespace gk
