// Drivers for kernels that reduce over the middle axis of (outer, dim, inner), or broadcast a per-row
// gradient back over it. A kernel supplies a span function over contiguous flat elements; the drivers
// choose the spans, run them in parallel and do the summing, so results never depend on thread count.
#pragma once
#include <vector>

#include "reparam/reparam.h"
#include "core/parallel.h"
#include "core/sum.h"

namespace gk {
namespace cpu {

// Work per term for the grain (core/parallel.h): a term is a few flops and an exp, or a stream normal.
constexpr int64_t kTermWork = 2;

// Rows of (outer, inner) each sum `dim` terms. term_fn(flat_start, len, Acc* terms) writes the terms of
// flat elements [flat_start, flat_start + len), len <= kChunk; out[o * inner + i] receives the sums.
template <typename Acc, typename Out, typename TermFn>
void reduce_spans(const reparam::ReduceShape& s, Out* out, TermFn term_fn) {
  const int64_t outer = s.outer, dim = s.dim, inner = s.inner;
  if (outer * inner == 0) return;
  if (dim == 0) {
    parallel_for(outer * inner, 1, [&](int64_t r) { out[r] = Out(0); });
    return;
  }
  if (inner == 1 && dim <= kChunk) {
    // Short rows: one span covers several whole rows.
    const int64_t rows_per_span = kChunk / dim;
    const int64_t spans = (outer + rows_per_span - 1) / rows_per_span;
    parallel_for(spans, kChunk * kTermWork, [&](int64_t sp) {
      alignas(64) Acc terms[kChunk];
      const int64_t r0 = sp * rows_per_span, r1 = std::min(outer, r0 + rows_per_span);
      term_fn(r0 * dim, (r1 - r0) * dim, terms);
      for (int64_t r = r0; r < r1; ++r) {
        const Acc* t = terms + (r - r0) * dim;
        Acc acc = 0;
#pragma omp simd reduction(+ : acc)
        for (int64_t d = 0; d < dim; ++d) acc += t[d];
        out[r] = Out(acc);
      }
    });
    return;
  }
  if (inner == 1) {
    // Long rows: a sum per chunk (simd lanes of 64 terms each), chunks summed pairwise into fixed-size
    // segments, segments pairwise into the row. Sequential partials drifted by ~n eps: 3.3e-5 relative
    // error over 2.7e8 float32 terms, where torch.sum has 3.9e-7.
    constexpr int64_t kChunksPerSegment = 16;
    constexpr int64_t kSegment = kChunksPerSegment * kChunk;
    const int64_t segments = (dim + kSegment - 1) / kSegment;
    std::vector<Acc> partial(outer * segments);
    parallel_for(outer * segments, kSegment * kTermWork, [&](int64_t item) {
      alignas(64) Acc terms[kChunk];
      Acc chunk_sums[kChunksPerSegment];
      const int64_t o = item / segments, d0 = (item % segments) * kSegment;
      const int64_t d1 = std::min(dim, d0 + kSegment);
      int64_t chunks = 0;
      for (int64_t d = d0; d < d1; d += kChunk) {
        const int64_t len = std::min(kChunk, d1 - d);
        term_fn(o * dim + d, len, terms);
        Acc acc = 0;
#pragma omp simd reduction(+ : acc)
        for (int64_t t = 0; t < len; ++t) acc += terms[t];
        chunk_sums[chunks++] = acc;
      }
      partial[item] = pairwise_sum(chunk_sums, chunks);
    });
    parallel_for(outer, segments,
                 [&](int64_t o) { out[o] = Out(pairwise_sum(partial.data() + o * segments, segments)); });
    return;
  }
  // inner > 1: a span is a run of the inner axis; accumulate element-wise over dim, in blocks of kBlock
  // steps added in order, the blocks merged pairwise (a binary counter of partial sums: level l holds the sum
  // of 2^l blocks), so the error grows with log(dim) rather than dim.
  constexpr int64_t kBlock = 64;
  const int64_t inner_chunks = (inner + kChunk - 1) / kChunk;
  int levels_needed = 1;
  while ((kBlock << (levels_needed - 1)) < dim) ++levels_needed;
  parallel_for(outer * inner_chunks, std::min(kChunk, inner) * dim * kTermWork, [&](int64_t item) {
    alignas(64) Acc terms[kChunk];
    alignas(64) Acc acc[kChunk];
    const int64_t o = item / inner_chunks, i0 = (item % inner_chunks) * kChunk;
    const int64_t len = std::min(kChunk, inner - i0);
    std::vector<Acc> level(dim > kBlock ? levels_needed * len : 0);
    int64_t blocks = 0;
    for (int64_t d0 = 0; d0 < dim; d0 += kBlock) {
      std::fill(acc, acc + len, Acc(0));
      for (int64_t d = d0; d < std::min(dim, d0 + kBlock); ++d) {
        term_fn((o * dim + d) * inner + i0, len, terms);
#pragma omp simd
        for (int64_t t = 0; t < len; ++t) acc[t] += terms[t];
      }
      if (dim <= kBlock) break;
      int l = 0;
      for (int64_t carry = blocks; carry & 1; carry >>= 1, ++l) {
        const Acc* older = &level[l * len];
#pragma omp simd
        for (int64_t t = 0; t < len; ++t) acc[t] = older[t] + acc[t];
      }
      std::copy(acc, acc + len, &level[l * len]);
      ++blocks;
    }
    if (dim > kBlock) {
      // The levels left standing, the smallest (the most recent blocks) first.
      std::fill(acc, acc + len, Acc(0));
      bool first = true;
      for (int l = 0; l < levels_needed; ++l) {
        if (!((blocks >> l) & 1)) continue;
        const Acc* part = &level[l * len];
        for (int64_t t = 0; t < len; ++t) acc[t] = first ? part[t] : part[t] + acc[t];
        first = false;
      }
    }
    for (int64_t t = 0; t < len; ++t) out[o * inner + i0 + t] = Out(acc[t]);
  });
}

// For element-wise kernels whose gradient arrives per row of (outer, inner): span_fn(flat_start, len,
// const Acc* grad) sees, for each flat element, the gradient of its row, or a null `grad` when `grad_rows`
// is null (an unused output: the kernel skips its term, since 0 * inf would be NaN).
template <typename Acc, typename G, typename SpanFn>
void broadcast_spans(const reparam::ReduceShape& s, const G* grad_rows, SpanFn span_fn) {
  const int64_t total = s.numel();
  const int64_t chunks = (total + kChunk - 1) / kChunk;
  parallel_for(chunks, kChunk * kTermWork, [&](int64_t c) {
    alignas(64) Acc grad[kChunk];
    const int64_t start = c * kChunk, len = std::min(kChunk, total - start);
    if (grad_rows) {
      int64_t i = start % s.inner, d = (start / s.inner) % s.dim, o = start / (s.inner * s.dim);
      for (int64_t t = 0; t < len; ++t) {
        grad[t] = Acc(grad_rows[o * s.inner + i]);
        if (++i == s.inner) {
          i = 0;
          if (++d == s.dim) d = 0, ++o;
        }
      }
    }
    span_fn(start, len, grad_rows ? static_cast<const Acc*>(grad) : nullptr);
  });
}

}  // namespace cpu
}  // namespace gk
