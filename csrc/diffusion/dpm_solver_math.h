// Per-element math of the DPM-Solver++ steps (docs/math.md 5.3; diffusers' DPMSolverMultistepScheduler with
// algorithm_type "dpmsolver++" or "sde-dpmsolver++", solver_order 1 or 2), shared by the CPU and CUDA kernels.
// A step of sample b reads the loop's float32 sigma table at its step index i: s0 = sigmas[i] (now),
// t = sigmas[i + 1] (next), s1 = sigmas[i - 1] (the step before, whose data prediction is the history). The
// coefficients follow diffusers' operation order on its float32 sigmas: alpha = 1 / sqrt(sigma^2 + 1),
// sigma_vp = sigma alpha, lambda = log alpha - log sigma_vp (+inf at sigma = 0, where the step returns x0_hat).
#pragma once
#include <cmath>

#include "core/macros.h"
#include "diffusion/diffusion_math.h"

namespace gk {
namespace diffusion {

enum DpmSolverType : int32_t { kMidpoint = 0, kHeunSolver = 1 };

// expf / exp, not fastmath's: h is +inf at a final sigma of 0 (exp(-inf) = 0 is needed exactly).
GK_HD float exp_of(float x) { return expf(x); }
GK_HD double exp_of(double x) { return ::exp(x); }

// Sample b's step in the compute type C. The step is
//   x_t = ratio x + k0 D0 + k1 D1 + kz z,  D0 = x0_hat(s0),  D1 = c1 (D0 - x0_hat(s1))  (second order only),
// with the signs of diffusers' formulas folded into k0, k1 (a negation is exact):
//   ODE:  ratio = sigma_t / sigma_s0,            k0 = -alpha_t (e^-h - 1),
//         midpoint k1 = -(1/2) alpha_t (e^-h - 1),  heun k1 = alpha_t ((e^-h - 1) / h + 1);
//   SDE:  ratio = sigma_t / sigma_s0 e^-h,      k0 = alpha_t (1 - e^-2h),
//         midpoint k1 = (1/2) alpha_t (1 - e^-2h), heun k1 = alpha_t ((1 - e^-2h) / (-2h) + 1),
//         kz = sigma_t sqrt(1 - e^-2h);
//   h = lambda_t - lambda_s0, r0 = (lambda_s0 - lambda_s1) / h, c1 = 1 / r0.
template <typename C>
struct DpmCoefficients {
  C alpha, sigma;  // alpha_s0, sigma_s0: x0_hat from the model output
  C ratio, k0, k1, kz, c1;
  bool second;  // a second-order step (reads the history)
};

template <typename C>
GK_HD void dpm_alpha_sigma(float s, C& alpha, C& sigma) {
  const C sc = C(s);
  alpha = C(1) / sqrt_of(sc * sc + C(1));
  sigma = sc * alpha;
}

template <typename C>
GK_HD C dpm_lambda(C alpha, C sigma) {
  return log_of(alpha) - log_of(sigma);
}

// The step index is clamped into the table (the Python layer checks it where it can read it without a host
// synchronisation), so no value reads outside it. second: order 2, not the first step, and not the last one
// when final_first_order (diffusers' lower_order_final, euler_at_final or a final sigma of 0).
template <typename C>
GK_HD DpmCoefficients<C> dpm_coefficients(const float* sigmas, int64_t num_sigmas, int64_t step, int32_t order,
                                          bool final_first_order, int32_t solver, bool sde) {
  const int64_t last = num_sigmas - 2;  // the last step index
  const int64_t i = step < 0 ? int64_t(0) : (step > last ? last : step);
  DpmCoefficients<C> c{};
  c.second = order == 2 && i > 0 && !(final_first_order && i == last);
  C alpha_t, sigma_t;
  dpm_alpha_sigma<C>(sigmas[i + 1], alpha_t, sigma_t);
  dpm_alpha_sigma<C>(sigmas[i], c.alpha, c.sigma);
  const C lambda_s0 = dpm_lambda(c.alpha, c.sigma);
  const C h = dpm_lambda(alpha_t, sigma_t) - lambda_s0;
  if (c.second) {
    C alpha_s1, sigma_s1;
    dpm_alpha_sigma<C>(sigmas[i - 1], alpha_s1, sigma_s1);
    const C r0 = (lambda_s0 - dpm_lambda(alpha_s1, sigma_s1)) / h;
    c.c1 = C(1) / r0;
  }
  if (sde) {
    const C e2 = exp_of(C(-2) * h);
    c.ratio = sigma_t / c.sigma * exp_of(-h);
    c.k0 = alpha_t * (C(1) - e2);
    c.k1 = solver == kMidpoint ? C(0.5) * c.k0 : alpha_t * ((C(1) - e2) / (C(-2) * h) + C(1));
    c.kz = sigma_t * sqrt_of(C(1) - e2);
  } else {
    const C a = alpha_t * (exp_of(-h) - C(1));
    c.ratio = sigma_t / c.sigma;
    c.k0 = -a;
    c.k1 = solver == kMidpoint ? -(C(0.5) * a) : alpha_t * ((exp_of(-h) - C(1)) / h + C(1));
  }
  return c;
}

// x0_hat from m at x (DPMSolverMultistepScheduler.convert_model_output, dpmsolver++): epsilon
// (x - sigma m) / alpha, v_prediction alpha x - sigma m, sample m.
template <typename C>
GK_HD C dpm_predict_x0(C m, C x, const DpmCoefficients<C>& c, int32_t prediction) {
  if (prediction == kEpsilon) return (x - c.sigma * m) / c.alpha;
  if (prediction == kVPrediction) return c.alpha * x - c.sigma * m;
  return m;
}

// One element: m the (guided) model output, x the sample, history x0_hat(s1) (read on second-order steps
// only), z the noise (SDE), limit the dynamic threshold (+inf: none). Writes x0_hat(s0), the next step's
// history, and returns x_t.
template <typename C>
GK_HD C dpm_step_element(C m, C x, C history, C z, const DpmCoefficients<C>& c, int32_t prediction, bool sde,
                         bool thresholded, C limit, C& x0_out) {
  C d0 = dpm_predict_x0(m, x, c, prediction);
  if (thresholded) d0 = threshold_x0(d0, limit, true);
  x0_out = d0;
  C out = c.ratio * x + c.k0 * d0;
  if (c.second) out = out + c.k1 * (c.c1 * (d0 - history));
  return sde ? out + c.kz * z : out;
}

}  // namespace diffusion
}  // namespace gk
