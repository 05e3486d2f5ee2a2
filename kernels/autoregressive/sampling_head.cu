// The sampling_head group on CUDA: a block per row, filtered Gumbel-max draws with no sort.
//
// The thresholds are found by bisection over sampling_head::order_key (whose unsigned order is the scaled
// logits'), one pass over the row per key bit, each pass a block reduction in a fixed tree order (no
// atomics, so a draw is the same on every run):
//   top_k: the largest key v with count(key >= v) >= k, i.e. the k-th largest scaled logit;
//   top_p: the largest key v with mass(top_k-kept, key > v) >= top_p * mass(top_k-kept); the threshold is
//          the next key, the smallest whose mass strictly above is below the target (the CPU kernel's
//          quickselect finds the same token up to the rounding of those sums).
// The row stays in L1/L2 across the passes. The draw is Gumbel-max over the kept tokens, the first maximum
// on ties, as categorical::gumbel_argmax.
#include <cuda_runtime.h>

#include <climits>
#include <cmath>

#include "autoregressive/sampling_head.h"
#include "autoregressive/sampling_head_math.h"
#include "core/launch.cuh"
#include "core/reduce.cuh"

namespace gk {
namespace sampling_head {
namespace {

using namespace gpu::common;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

__device__ __forceinline__ int64_t block_min(int64_t v) {
  __shared__ int64_t totals[kWarps];
  for (int off = 16; off > 0; off >>= 1) v = min(v, static_cast<int64_t>(__shfl_xor_sync(0xffffffffu, v, off)));
  __syncthreads();
  if ((threadIdx.x & 31) == 0) totals[threadIdx.x >> 5] = v;
  __syncthreads();
  v = totals[0];
  for (int w = 1; w < kWarps; ++w) v = min(v, totals[w]);
  return v;
}

__device__ __forceinline__ double block_max(double v) {
  __shared__ double totals[kWarps];
  for (int off = 16; off > 0; off >>= 1) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, off));
  __syncthreads();
  if ((threadIdx.x & 31) == 0) totals[threadIdx.x >> 5] = v;
  __syncthreads();
  v = totals[0];
  for (int w = 1; w < kWarps; ++w) v = fmax(v, totals[w]);
  return v;
}

// (score, k) beats (other, other_k): the larger score, the lower token on equal scores (no NaN scores reach
// the draw: a row with a NaN logit is drawn before). A total order, so the reduction gives the first maximum.
__device__ __forceinline__ bool beats(double score, int64_t k, double other, int64_t other_k) {
  return score > other || (score == other && k < other_k);
}

// The block's best (score, k); every thread gets the token.
__device__ __forceinline__ int64_t block_argmax(double score, int64_t k) {
  __shared__ double scores[kWarps];
  __shared__ int64_t tokens[kWarps];
  for (int off = 16; off > 0; off >>= 1) {
    const double other = __shfl_xor_sync(0xffffffffu, score, off);
    const int64_t other_k = __shfl_xor_sync(0xffffffffu, k, off);
    if (beats(other, other_k, score, k)) score = other, k = other_k;
  }
  __syncthreads();
  if ((threadIdx.x & 31) == 0) scores[threadIdx.x >> 5] = score, tokens[threadIdx.x >> 5] = k;
  __syncthreads();
  score = scores[0];
  k = tokens[0];
  for (int w = 1; w < kWarps; ++w)
    if (beats(scores[w], tokens[w], score, k)) score = scores[w], k = tokens[w];
  return k;
}

template <typename T>
__device__ __forceinline__ double logit_at(const T* row, int64_t k) {
  return static_cast<double>(gpu::to_compute(row[k]));
}

// The first token whose (scaled) logit equals `value`.
template <typename T>
__device__ int64_t first_equal(const T* row, int64_t vocab, double divisor, double value) {
  int64_t first = vocab;
  for (int64_t k = threadIdx.x; k < vocab; k += kThreads)
    if (scaled(logit_at(row, k), divisor) == value) first = min(first, k);
  return block_min(first);
}

template <typename T>
__device__ int64_t sample_row(const T* row, int64_t vocab, const RowFilter& f, uint64_t seed, uint64_t offset,
                              uint64_t base) {
  int64_t first_nan = vocab;
  double l_max = -INFINITY;
  for (int64_t k = threadIdx.x; k < vocab; k += kThreads) {
    const double v = logit_at(row, k);
    if (v != v)
      first_nan = min(first_nan, k);
    else
      l_max = fmax(l_max, v);
  }
  first_nan = block_min(first_nan);
  l_max = block_max(l_max);
  if (first_nan < vocab) return first_nan;
  if (f.temperature == 0.0 || isinf(l_max)) return first_equal(row, vocab, 1.0, l_max);
  const double z_max = scaled(l_max, f.temperature);
  if (isinf(z_max)) return first_equal(row, vocab, f.temperature, z_max);

  uint64_t top_k_key = 0;
  if (top_k_active(f, vocab)) {
    for (int bit = 63; bit >= 0; --bit) {
      const uint64_t candidate = top_k_key | (uint64_t{1} << bit);
      int64_t count = 0;
      for (int64_t k = threadIdx.x; k < vocab; k += kThreads)
        count += order_key(scaled(logit_at(row, k), f.temperature)) >= candidate;
      if (block_sum(count) >= f.top_k) top_k_key = candidate;
    }
  }
  uint64_t threshold = top_k_key;
  if (top_p_active(f)) {
    double mass = 0.0;
    for (int64_t k = threadIdx.x; k < vocab; k += kThreads) {
      const double z = scaled(logit_at(row, k), f.temperature);
      if (order_key(z) >= top_k_key) mass += relative_mass(z, z_max);
    }
    const double target = f.top_p * block_sum(mass);
    uint64_t below = 0;
    for (int bit = 63; bit >= 0; --bit) {
      const uint64_t candidate = below | (uint64_t{1} << bit);
      double above = 0.0;
      for (int64_t k = threadIdx.x; k < vocab; k += kThreads) {
        const double z = scaled(logit_at(row, k), f.temperature);
        const uint64_t key = order_key(z);
        if (key >= top_k_key && key > candidate) above += relative_mass(z, z_max);
      }
      if (block_sum(above) >= target) below = candidate;
    }
    threshold = below + 1 > top_k_key ? below + 1 : top_k_key;
  }

  double best = -INFINITY;
  int64_t best_k = INT64_MAX;
  for (int64_t k = threadIdx.x; k < vocab; k += kThreads) {
    const double z = scaled(logit_at(row, k), f.temperature);
    if (order_key(z) < threshold || !min_p_keeps(f, z, z_max)) continue;
    const uint64_t element = base + static_cast<uint64_t>(k);
    const double s = score(z, stream_block(seed, offset, element >> 2).x[element & 3u]);
    if (beats(s, k, best, best_k)) best = s, best_k = k;
  }
  return block_argmax(best, best_k);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) sample_kernel(const T* logits, SampleLogitsArgs a) {
  for (int64_t n = blockIdx.x; n < a.rows; n += gridDim.x) {
    const RowFilter f{a.temperature[n], a.top_k[n], a.top_p[n], a.min_p[n]};
    const int64_t token =
        sample_row(logits + n * a.vocab, a.vocab, f, a.seed, a.offset, static_cast<uint64_t>(a.base[n]));
    if (threadIdx.x == 0) a.out[n] = token;
    __syncthreads();  // the reductions' shared memory is free again
  }
}

}  // namespace

void sample_logits_cuda(const SampleLogitsArgs& a, void* stream) {
  gpu::dispatch_float(a.dtype, "sample_logits", [&](auto tag) {
    using T = typename decltype(tag)::type;
    gpu::launch("sample_logits", sample_kernel<T>, gpu::grid_for(a.rows), kThreads, 0, gpu::as_stream(stream),
                static_cast<const T*>(a.logits), a);
  });
}

}  // namespace sampling_head
}  // namespace gk
