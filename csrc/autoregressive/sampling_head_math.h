// The sampling head's per-token math (docs/math.md, sections 4 and 6.2), shared by the CPU and CUDA kernels.
//
// A row's scaled logits z_k = logit_k / temperature are scored in float64; the filters keep an upper set of
// them (every token at least as large as some threshold), and the draw is categorical::gumbel_argmax's
// Gumbel-max over the kept tokens with the same per-token noise: an exact draw from the renormalised
// distribution, and a token's noise is stream element base + k whatever was kept.
//   top_k: keep z_k >= the k-th largest z (with multiplicity, so ties at the k-th value are kept).
//   top_p: with e_k = exp(z_k - z_max) and E the sum of e over the top_k-kept tokens, keep z_k iff the mass
//          of kept tokens with z strictly above z_k is < top_p * E (ties at the threshold kept; the largest
//          token always kept).
//   min_p: keep e_k >= min_p (p_k >= min_p * p_max, as e_max = 1).
#pragma once
#include <cmath>
#include <cstring>

#include "autoregressive/categorical_math.h"

namespace gk {
namespace sampling_head {

// The filters of one row, normalised: temperature > 0 (0 is argmax), top_k in [0, inf) (0 or >= vocab: off),
// top_p in (0, 1] (1: off), min_p in [0, 1] (0: off).
struct RowFilter {
  double temperature;
  int64_t top_k;
  double top_p, min_p;
};

GK_HD bool top_k_active(const RowFilter& f, int64_t vocab) { return f.top_k > 0 && f.top_k < vocab; }
GK_HD bool top_p_active(const RowFilter& f) { return f.top_p < 1.0; }
GK_HD bool min_p_active(const RowFilter& f) { return f.min_p > 0.0; }
GK_HD bool any_filter(const RowFilter& f, int64_t vocab) {
  return top_k_active(f, vocab) || top_p_active(f) || min_p_active(f);
}

// Division, not a multiply by 1 / temperature: temperature 1 leaves the logit's bits (gumbel_argmax's scores).
GK_HD double scaled(double logit, double temperature) { return logit / temperature; }

// Unnormalised probability relative to the row's largest token.
GK_HD double relative_mass(double z, double z_max) { return exp(z - z_max); }

GK_HD bool min_p_keeps(const RowFilter& f, double z, double z_max) {
  return !min_p_active(f) || relative_mass(z, z_max) >= f.min_p;
}

// A uint64 whose unsigned order is z's numeric order (-0.0 and +0.0 share the key of +0.0): thresholds are
// found by bisection over these keys.
GK_HD uint64_t order_key(double z) {
  z += 0.0;
  uint64_t bits;
  memcpy(&bits, &z, sizeof bits);
  return (bits >> 63) ? ~bits : bits | (uint64_t{1} << 63);
}

// The Gumbel-max score of a kept token (categorical::gumbel_argmax's, at the scaled logit).
GK_HD double score(double z, uint32_t bits) { return z + static_cast<double>(categorical::gumbel(bits)); }

}  // namespace sampling_head
}  // namespace gk
