// Per-element math of the diffusion family (shared/math.md, section 3), shared by the CPU and CUDA kernels.
// Coefficients come from a schedule table row (NoiseSchedule.table: alpha_bar, 1 - alpha_bar, their square
// roots, each rounded from float64), never from differences of rounded alpha-bars.
#pragma once
#include "macros.h"

namespace gk {
namespace diffusion {

enum Prediction : int32_t { kEpsilon = 0, kVPrediction = 1, kSample = 2 };

constexpr int kTableColumns = 4;

// One row of the schedule table: alpha-bar at a timestep t in [-1, T), stored at row t + 1.
struct Level {
  float alpha_bar, one_minus_alpha_bar, signal, noise;  // signal = sqrt(alpha_bar), noise = sqrt(1 - alpha_bar)
};

GK_HD Level level_at(const float* table, int64_t t) {
  const float* row = table + (t + 1) * kTableColumns;
  return Level{row[0], row[1], row[2], row[3]};
}

// The row of timestep t, clamped into the table: the Python layer validates timesteps where it can read
// them without a host synchronisation; the clamp keeps any other value from reading outside the table.
GK_HD Level level_clamped(const float* table, int64_t rows, int64_t t) {
  const int64_t last = rows - 2;  // the largest valid t
  return level_at(table, t < -1 ? int64_t(-1) : (t > last ? last : t));
}

// x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps
template <typename T>
GK_HD T q_sample(T x0, T eps, const Level& l) {
  return T(l.signal) * x0 + T(l.noise) * eps;
}

// What the model learns to predict: eps, v = sqrt(ab) eps - sqrt(1 - ab) x0, or x0.
template <typename T>
GK_HD T loss_target(T x0, T eps, const Level& l, int32_t prediction) {
  if (prediction == kEpsilon) return eps;
  if (prediction == kVPrediction) return T(l.signal) * eps - T(l.noise) * x0;
  return x0;
}

// min-SNR-gamma weight (Hang et al. 2023) with snr = ab / (1 - ab); gamma <= 0 means no weighting.
// epsilon: min(snr, gamma) / snr, written min(1, gamma / snr) so that snr = 0 gives its limit 1;
// v_prediction: min(snr, gamma) / (snr + 1); sample: min(snr, gamma).
GK_HD float min_snr_weight(const Level& l, float gamma, int32_t prediction) {
  if (!(gamma > 0.0f)) return 1.0f;
  if (prediction == kEpsilon) {
    const float ratio = gamma * l.one_minus_alpha_bar / l.alpha_bar;  // gamma / snr
    return l.alpha_bar > 0.0f && ratio < 1.0f ? ratio : 1.0f;
  }
  const float snr = l.alpha_bar / l.one_minus_alpha_bar;
  const float clipped = snr < gamma ? snr : gamma;
  return prediction == kVPrediction ? clipped / (snr + 1.0f) : clipped;
}

}  // namespace diffusion
}  // namespace gk
