// CPU kernel of the sampling_head group: a row per task, in a few passes over the row and no sort.
//
// Pass 1 finds the first maximum (and a NaN, drawn as gumbel_argmax draws it). The top_k threshold is the
// k-th largest scaled logit by selection (std::nth_element on a copy: linear on average). The top_p threshold
// is a selection by mass over the tokens top_k kept: a three-way quickselect whose pivot steps down while the
// mass above it stays below top_p times the kept mass. The last pass draws by Gumbel-max over the kept tokens,
// generating the noise of kept tokens only (about k Philox blocks after a top_k).
#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <utility>
#include <vector>

#include "autoregressive/sampling_head.h"
#include "autoregressive/sampling_head_math.h"
#include "core/parallel.h"

namespace gk {
namespace sampling_head {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

struct Candidate {
  double z, e;  // scaled logit, relative mass
};

struct Scratch {
  std::vector<double> z;
  std::vector<Candidate> kept;
};

double kth_largest(std::vector<double>& z, int64_t k) {
  std::nth_element(z.begin(), z.begin() + (k - 1), z.end(), std::greater<double>());
  return z[k - 1];
}

double median_of_three(double a, double b, double c) { return std::max(std::min(a, b), std::min(std::max(a, b), c)); }

// The smallest z among the candidates whose mass strictly above it is < target (target > 0, so the largest
// candidate qualifies). Each round partitions the range into greater | equal | less than a pivot: if the mass
// above the pivot is below target the pivot qualifies and the search goes on below it, else above it.
double top_p_threshold(Candidate* c, int64_t n, double target) {
  double above = 0.0, threshold = kInf;
  int64_t lo = 0, hi = n;
  while (lo < hi && above < target) {
    const double pivot = median_of_three(c[lo].z, c[lo + (hi - lo) / 2].z, c[hi - 1].z);
    int64_t gt = lo, i = lo, lt = hi;
    while (i < lt) {
      if (c[i].z > pivot)
        std::swap(c[i++], c[gt++]);
      else if (c[i].z < pivot)
        std::swap(c[i], c[--lt]);
      else
        ++i;
    }
    double greater = 0.0, equal = 0.0;
    for (int64_t j = lo; j < gt; ++j) greater += c[j].e;
    for (int64_t j = gt; j < lt; ++j) equal += c[j].e;
    if (above + greater < target) {
      threshold = pivot;
      above += greater + equal;
      lo = lt;
    } else {
      hi = gt;
    }
  }
  return threshold;
}

template <typename T>
int64_t sample_row(const T* logits, int64_t vocab, const RowFilter& f, uint64_t seed, uint64_t offset, uint64_t base,
                   Scratch& s) {
  int64_t first_max = 0;
  double l_max = static_cast<double>(logits[0]);
  for (int64_t k = 0; k < vocab; ++k) {
    const double v = static_cast<double>(logits[k]);
    if (v != v) return k;
    if (v > l_max) l_max = v, first_max = k;
  }
  if (f.temperature == 0.0 || std::isinf(l_max)) return first_max;
  const double z_max = scaled(l_max, f.temperature);
  auto z_at = [&](int64_t k) { return scaled(static_cast<double>(logits[k]), f.temperature); };
  if (std::isinf(z_max))  // the scaled logits overflow: the first of them at z_max, as for +inf logits
    for (int64_t k = 0;; ++k)
      if (z_at(k) == z_max) return k;

  double threshold = -kInf;
  if (top_k_active(f, vocab)) {
    s.z.resize(vocab);
    for (int64_t k = 0; k < vocab; ++k) s.z[k] = z_at(k);
    threshold = kth_largest(s.z, f.top_k);
  }
  if (top_p_active(f)) {
    s.kept.clear();
    double mass = 0.0;
    for (int64_t k = 0; k < vocab; ++k) {
      const double z = z_at(k);
      if (z < threshold) continue;
      const double e = relative_mass(z, z_max);
      s.kept.push_back({z, e});
      mass += e;
    }
    threshold =
        std::max(threshold, top_p_threshold(s.kept.data(), static_cast<int64_t>(s.kept.size()), f.top_p * mass));
  }

  int64_t best = -1;
  double best_score = 0.0;
  uint64_t block = ~uint64_t{0};
  Philox4 bits{};
  for (int64_t k = 0; k < vocab; ++k) {
    const double z = z_at(k);
    if (z < threshold || !min_p_keeps(f, z, z_max)) continue;
    const uint64_t element = base + static_cast<uint64_t>(k);
    if ((element >> 2) != block) {
      block = element >> 2;
      bits = stream_block(seed, offset, block);
    }
    const double sc = score(z, bits.x[element & 3u]);
    if (best < 0 || categorical::score_beats(sc, best_score)) best = k, best_score = sc;
  }
  return best;
}

}  // namespace

void sample_logits_cpu(const SampleLogitsArgs& a) {
  auto run = [&](auto* logits) {
    cpu::parallel_for(a.rows, a.vocab * cpu::kRandomWork, [&](int64_t n) {
      thread_local Scratch scratch;
      const RowFilter f{a.temperature[n], a.top_k[n], a.top_p[n], a.min_p[n]};
      a.out[n] =
          sample_row(logits + n * a.vocab, a.vocab, f, a.seed, a.offset, static_cast<uint64_t>(a.base[n]), scratch);
    });
  };
  if (a.dtype == DType::float64)
    run(static_cast<const double*>(a.logits));
  else
    run(static_cast<const float*>(a.logits));
}

}  // namespace sampling_head
}  // namespace gk
