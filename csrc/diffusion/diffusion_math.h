// Per-element math of the diffusion family (docs/math.md, section 3), shared by the CPU and CUDA kernels.
// Coefficients come from a schedule table row (NoiseSchedule.table: alpha_bar, 1 - alpha_bar, their square
// roots, each rounded from float64), never from differences of rounded alpha-bars.
#pragma once
#include <cmath>

#include "core/fastmath.h"
#include "core/macros.h"

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

// ============================================================================ denoising steps (t -> prev)

enum StepKind : int32_t { kDdpm = 0, kDdim = 1 };
enum Variance : int32_t { kFixedSmall = 0, kFixedLarge = 1, kLearnedRange = 2 };

constexpr float kMinVariance = 1e-20f;  // fixed_small's floor (diffusers' clamp), also under learned_range's log

GK_HD float sqrt_of(float x) { return sqrtf(x); }
GK_HD double sqrt_of(double x) { return ::sqrt(x); }
// Per-sample logs (learned_range) may see 0 or subnormals, which fastmath's log does not take. libm's and
// CUDA's logf may differ in the last bit: learned_range is the one step result not bit-identical across them.
GK_HD float log_of(float x) { return logf(x); }
GK_HD double log_of(double x) { return ::log(x); }

// A step's per-sample coefficients in the compute type C (float, or double for float64 data), from the
// float32 table rows of t and prev. The element formulas (step_element) only multiply and add these.
template <typename C>
struct StepCoefficients {
  C signal, noise;        // sqrt(ab_t), sqrt(1 - ab_t): x0_hat and eps_hat from the model output
  C x0_coef, other_coef;  // DDPM: mean = x0_coef x0_hat + other_coef x_t;  DDIM: x0_coef x0_hat + other_coef eps_hat
  C sigma;                // the noise's std (DDPM fixed variances, DDIM); used only where `noisy`
  C log_var_large, log_var_small;  // learned_range: log sigma^2 = f log_var_large + (1 - f) log_var_small
  bool noisy;                      // whether z is added: DDPM t > 0, DDIM eta > 0
};

// beta' = 1 - ab_t / ab_prev, written (ab_prev - ab_t) / ab_prev with the difference taken from the columns
// that hold its digits: 1 - ab near t = 0 (where ab rounds towards 1), ab itself further on.
template <typename C>
GK_HD C step_beta(const Level& lt, const Level& lp) {
  const C diff =
      lt.alpha_bar > 0.5f ? C(lt.one_minus_alpha_bar) - C(lp.one_minus_alpha_bar) : C(lp.alpha_bar) - C(lt.alpha_bar);
  return diff / C(lp.alpha_bar);
}

// The DDPM posterior q(x_prev | x_t, x0_hat) of a (possibly strided) step: alpha' = ab_t / ab_prev,
//   x0_coef = sqrt(ab_prev) beta' / (1 - ab_t),  xt_coef = sqrt(alpha') (1 - ab_prev) / (1 - ab_t),
//   var_small = max((1 - ab_prev) / (1 - ab_t) beta', 1e-20),  var_large = beta'.
template <typename C>
GK_HD StepCoefficients<C> ddpm_coefficients(const Level& lt, const Level& lp, bool noisy, int32_t variance) {
  const C beta = step_beta<C>(lt, lp);
  const C alpha = C(lt.alpha_bar) / C(lp.alpha_bar);
  const C beta_t = C(lt.one_minus_alpha_bar), beta_prev = C(lp.one_minus_alpha_bar);
  C var_small = beta_prev / beta_t * beta;
  var_small = var_small > C(kMinVariance) ? var_small : C(kMinVariance);
  StepCoefficients<C> c{};
  c.signal = C(lt.signal);
  c.noise = C(lt.noise);
  c.x0_coef = C(lp.signal) * beta / beta_t;
  c.other_coef = sqrt_of(alpha) * beta_prev / beta_t;
  c.sigma = sqrt_of(variance == kFixedLarge ? beta : var_small);
  if (variance == kLearnedRange) {
    c.log_var_large = log_of(beta);
    c.log_var_small = log_of(var_small);
  }
  c.noisy = noisy;
  return c;
}

// DDIM (Song et al. 2021, eq. 12 and 16): sigma = eta sqrt((1 - ab_prev) / (1 - ab_t)) sqrt(beta'),
// x0_coef = sqrt(ab_prev), eps_coef = sqrt(max(1 - ab_prev - sigma^2, 0)) (the radicand can round below 0).
template <typename C>
GK_HD StepCoefficients<C> ddim_coefficients(const Level& lt, const Level& lp, C eta) {
  const C variance = C(lp.one_minus_alpha_bar) / C(lt.one_minus_alpha_bar) * step_beta<C>(lt, lp);
  const C sigma = eta * sqrt_of(variance);
  const C direction = C(lp.one_minus_alpha_bar) - sigma * sigma;
  StepCoefficients<C> c{};
  c.signal = C(lt.signal);
  c.noise = C(lt.noise);
  c.x0_coef = C(lp.signal);
  c.other_coef = sqrt_of(direction > C(0) ? direction : C(0));
  c.sigma = sigma;
  c.noisy = eta > C(0);
  return c;
}

// The coefficients of sample b's step: t[b] -> prev_t[b] (t[b] - 1 when prev_t is null), rows clamped into
// the table as in level_clamped.
template <typename C>
GK_HD StepCoefficients<C> step_coefficients(const float* table, int64_t rows, const int64_t* t, const int64_t* prev_t,
                                            int64_t b, int32_t kind, int32_t variance, C eta) {
  const int64_t tb = t[b];
  const Level lt = level_clamped(table, rows, tb);
  const Level lp = level_clamped(table, rows, prev_t ? prev_t[b] : tb - 1);
  return kind == kDdpm ? ddpm_coefficients<C>(lt, lp, tb > 0, variance) : ddim_coefficients<C>(lt, lp, eta);
}

// Classifier-free guidance of one element: u + s (c - u), times the sample's rescale factor k
// (phi std(c)/std(m) + 1 - phi; 1 without rescale).
template <typename C>
GK_HD C guide(C uncond, C cond, C scale, C rescale) {
  return (uncond + scale * (cond - uncond)) * rescale;
}

// x0_hat from a model output m at x_t (docs/math.md 3): epsilon (x_t - sqrt(1 - ab) m) / sqrt(ab),
// sample m, v_prediction sqrt(ab) x_t - sqrt(1 - ab) m.
template <typename C>
GK_HD C predict_x0(C m, C x, const StepCoefficients<C>& c, int32_t prediction) {
  if (prediction == kEpsilon) return (x - c.noise * m) / c.signal;
  if (prediction == kSample) return m;
  return c.signal * x - c.noise * m;
}

// eps_hat from m: epsilon m, sample (x_t - sqrt(ab) m) / sqrt(1 - ab), v_prediction sqrt(ab) m + sqrt(1 - ab) x_t.
template <typename C>
GK_HD C predict_eps(C m, C x, const StepCoefficients<C>& c, int32_t prediction) {
  if (prediction == kEpsilon) return m;
  if (prediction == kSample) return (x - c.signal * m) / c.noise;
  return c.signal * m + c.noise * x;
}

// Thresholding of x0_hat: clamp to [-limit, limit] (limit = +inf: none), then divide by it (dynamic
// thresholding) or not (clip_sample). NaN passes through, as torch.clamp does.
template <typename C>
GK_HD C threshold_x0(C x0, C limit, bool divide) {
  const C y = x0 < -limit ? -limit : (x0 > limit ? limit : x0);
  return divide ? y / limit : y;
}

// One element of a step: m the (guided) model output, x = x_t, v the learned-range variance output (unused
// otherwise), z the noise. Writes x0_hat and returns x_prev.
template <typename C>
GK_HD C step_element(C m, C x, C v, C z, const StepCoefficients<C>& c, int32_t kind, int32_t prediction,
                     int32_t variance, C limit, bool divide, bool use_clipped_model_output, C& x0_out) {
  const C x0 = threshold_x0(predict_x0(m, x, c, prediction), limit, divide);
  x0_out = x0;
  if (kind == kDdpm) {
    const C mean = c.x0_coef * x0 + c.other_coef * x;
    if (!c.noisy) return mean;
    C sigma = c.sigma;
    if (variance == kLearnedRange) {
      const C f = (v + C(1)) / C(2);
      const C log_var = f * c.log_var_large + (C(1) - f) * c.log_var_small;
      sigma = gk::exp(C(0.5) * log_var);
    }
    return mean + sigma * z;
  }
  const C eps = use_clipped_model_output ? (x - c.signal * x0) / c.noise : predict_eps(m, x, c, prediction);
  const C prev = c.x0_coef * x0 + c.other_coef * eps;
  return c.noisy ? prev + c.sigma * z : prev;
}

}  // namespace diffusion
}  // namespace gk
