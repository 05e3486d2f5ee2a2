// Categorical sampling by Gumbel-max on the genkern stream (docs/math.md, section 4):
//   x = argmax_k (logit_k - log(-log u_k)),  u_k the uniform of stream element base + k,
// where base = ((sample * D) + position) * levels for an autoregressive model with D dimensions, so a draw
// depends only on (seed, offset, sample, position, level): never on the batch it was drawn in.
#pragma once
#include "core/fastmath.h"
#include "core/philox.h"

namespace gk {
namespace categorical {

// Gumbel noise of one stream element: -log(-log u) with u the genkern uniform of its top 24 bits.
GK_HD float gumbel(uint32_t bits) { return -log(-log_uniform24(bits >> 8)); }

// The reference's rule (torch.argmax over float64 scores): does `score` replace the running best? NaN is the
// maximum and the first NaN is drawn (a NaN logit is reported, never skipped); otherwise the first of equal
// maxima. Scores are float64 whatever the logits' dtype: a float32 score rounds [1e8, 1e8 + 4] to one value
// (always drawing level 0) and float32 logits would break float64 near-ties differently from the reference.
GK_HD bool score_beats(double score, double best) { return best == best && (score > best || score != score); }

// argmax over k < levels of logits[k * stride] + gumbel(stream element base + k) under score_beats.
template <typename T>
GK_HD int64_t gumbel_argmax(const T* logits, int64_t stride, int64_t levels, uint64_t seed, uint64_t offset,
                            uint64_t base) {
  int64_t best = 0;
  double best_score = 0.0;
  uint64_t block = base >> 2;
  Philox4 bits = stream_block(seed, offset, block);
  for (int64_t k = 0; k < levels; ++k) {
    const uint64_t element = base + static_cast<uint64_t>(k);
    if ((element >> 2) != block) {
      block = element >> 2;
      bits = stream_block(seed, offset, block);
    }
    const double score = static_cast<double>(logits[k * stride]) + static_cast<double>(gumbel(bits.x[element & 3u]));
    if (k == 0 || score_beats(score, best_score)) {
      best = k;
      best_score = score;
    }
  }
  return best;
}

}  // namespace categorical
}  // namespace gk
