// Per-element math of the UniPC step (docs/math.md 5.5; diffusers' UniPCMultistepScheduler with predict_x0,
// solver_type "bh1" or "bh2", solver_order 1 or 2), shared by the CPU and CUDA kernels. The step at index i
// of the loop's float32 sigma table first corrects the previous step's result (UniC, from sigmas[i - 1] to
// sigmas[i]) with the data prediction of this step's model output, then predicts the next sample from the
// corrected one (UniP, from sigmas[i] to sigmas[i + 1]). alpha, sigma_vp and lambda are DPM-Solver++'s
// (dpm_solver_math.h), or on a flow-matching table (diffusers' use_flow_sigmas) alpha = 1 - sigma and
// sigma_vp = sigma, in diffusers' operation order on its float32 sigmas.
#pragma once
#include <cmath>

#include "core/macros.h"
#include "diffusion/diffusion_math.h"
#include "diffusion/dpm_solver_math.h"

namespace gk {
namespace diffusion {

enum UniPcSolverType : int32_t { kBh1 = 0, kBh2 = 1 };

// UniPC's prediction codes: the Prediction codes and diffusers' flow_prediction, x0_hat = x - sigma m with the
// table's sigma.
constexpr int32_t kFlowPrediction = 3;

template <typename C>
GK_HD void unipc_alpha_sigma(float s, bool flow, C& alpha, C& sigma) {
  if (flow) {
    alpha = C(1) - C(s);
    sigma = C(s);
  } else {
    dpm_alpha_sigma<C>(s, alpha, sigma);
  }
}

// expm1f / expm1, as diffusers' torch.expm1: e^-h - 1 through exp loses its digits to cancellation on small steps.
GK_HD float expm1_of(float x) { return expm1f(x); }
GK_HD double expm1_of(double x) { return ::expm1(x); }

// One UniPC update s0 -> t of order 1 or 2 (both the corrector's and the predictor's, which differ only in
// their weights): base = ratio x - ah m0, then minus aB times the weighted differences of data predictions.
//   h = lambda_t - lambda_s0, hh = -h, ah = alpha_t (e^hh - 1), aB = alpha_t B(h) with B(h) = hh (bh1) or
//   e^hh - 1 (bh2), ratio = sigma_t / sigma_s0, rk = (lambda_s1 - lambda_s0) / h (second order only).
template <typename C>
struct UniPcUpdate {
  C ratio, ah, aB, rk;
  C rho0, rho1;  // the corrector's weights of D1 = (m1 - m0) / rk and of D1_t = x0_hat - m0
  bool second;
};

template <typename C>
GK_HD C unipc_lambda_at(const float* sigmas, int64_t i, bool flow) {
  C alpha, sigma;
  unipc_alpha_sigma<C>(sigmas[i], flow, alpha, sigma);
  return dpm_lambda(alpha, sigma);
}

// rho = R^-1 b for R = [[1, 1], [rk, 1]], by LU with partial pivoting, as torch.linalg.solve (LAPACK gesv)
// computes diffusers' second-order corrector weights: the pivot choice changes the rounding.
template <typename C>
GK_HD void unipc_solve2(C rk, C b1, C b2, C& rho0, C& rho1) {
  C a00 = C(1), a01 = C(1), a10 = rk, a11 = C(1), y0 = b1, y1 = b2;
  if ((rk < C(0) ? -rk : rk) > C(1)) {
    a00 = rk;
    a10 = C(1);
    y0 = b2;
    y1 = b1;
  }
  const C l = a10 * (C(1) / a00);
  const C u11 = a11 - l * a01;
  rho1 = (y1 - l * y0) / u11;
  rho0 = (y0 - rho1 * a01) / a00;
}

// The update from sigmas[s] to sigmas[s + 1] with the history's step s - 1. corrector: the weights of UniC
// (order 1: rho1 = 1/2; order 2: the solve above with diffusers' b_k = k! h phi_{k+1}(hh) / B(h) terms).
template <typename C>
GK_HD UniPcUpdate<C> unipc_update(const float* sigmas, int64_t s, bool second, int32_t solver, bool corrector,
                                  bool flow) {
  UniPcUpdate<C> u{};
  u.second = second;
  C alpha_t, sigma_t, alpha_s0, sigma_s0;
  unipc_alpha_sigma<C>(sigmas[s + 1], flow, alpha_t, sigma_t);
  unipc_alpha_sigma<C>(sigmas[s], flow, alpha_s0, sigma_s0);
  const C lambda_s0 = dpm_lambda(alpha_s0, sigma_s0);
  const C h = dpm_lambda(alpha_t, sigma_t) - lambda_s0;
  const C hh = -h;
  const C h_phi_1 = expm1_of(hh);
  const C B_h = solver == kBh1 ? hh : expm1_of(hh);
  u.ratio = sigma_t / sigma_s0;
  u.ah = alpha_t * h_phi_1;
  u.aB = alpha_t * B_h;
  if (second) u.rk = (unipc_lambda_at<C>(sigmas, s - 1, flow) - lambda_s0) / h;
  if (corrector) {
    if (second) {
      C h_phi_k = h_phi_1 / hh - C(1);
      const C b1 = h_phi_k * C(1) / B_h;
      h_phi_k = h_phi_k / hh - C(1) / C(2);
      const C b2 = h_phi_k * C(2) / B_h;
      unipc_solve2(u.rk, b1, b2, u.rho0, u.rho1);
    } else {
      u.rho1 = C(0.5);
    }
  }
  return u;
}

// Sample b's step at index step (clamped into the table; the Python layer checks it where it can read it
// without a host synchronisation). The predictor is second order when predictor_order is 2, past step 0 and
// not the last step with final_first_order (diffusers' lower_order_final); the corrector runs past step 0
// when `corrector`, second order when corrector_order is 2 and past step 1 (the previous step's order).
template <typename C>
struct UniPcCoefficients {
  C alpha, sigma;  // alpha_s0, sigma_s0 of sigmas[i]: x0_hat from the model output
  C s;             // sigmas[i] itself (flow_prediction)
  UniPcUpdate<C> c, p;
  bool correct;
};

template <typename C>
GK_HD UniPcCoefficients<C> unipc_coefficients(const float* sigmas, int64_t num_sigmas, int64_t step,
                                              int32_t predictor_order, int32_t corrector_order, bool final_first_order,
                                              bool corrector, int32_t solver, bool flow) {
  const int64_t last = num_sigmas - 2;
  const int64_t i = step < 0 ? int64_t(0) : (step > last ? last : step);
  UniPcCoefficients<C> k{};
  unipc_alpha_sigma<C>(sigmas[i], flow, k.alpha, k.sigma);
  k.s = C(sigmas[i]);
  const bool p_second = predictor_order == 2 && i > 0 && !(final_first_order && i == last);
  k.p = unipc_update<C>(sigmas, i, p_second, solver, false, flow);
  k.correct = corrector && i > 0;
  if (k.correct) k.c = unipc_update<C>(sigmas, i - 1, corrector_order == 2 && i > 1, solver, true, flow);
  return k;
}

// One element: m the (guided) model output, x the sample (the previous step's prediction), and the history
// last = the previous step's corrected sample, h1 = its x0_hat, h2 = x0_hat of the step before (read on
// second-order corrector steps only; written when three_slots). Overwrites the history with this step's
// (corrected sample, x0_hat, the previous x0_hat) and returns the next sample.
template <typename C>
GK_HD C unipc_step_element(C m, C x, C& last, C& h1, C& h2, const UniPcCoefficients<C>& k, int32_t prediction,
                           bool thresholded, C limit, bool three_slots) {
  C d0 = prediction == kEpsilon       ? (x - k.sigma * m) / k.alpha
         : prediction == kVPrediction ? k.alpha * x - k.sigma * m
         : prediction == kSample      ? m
                                      : x - k.s * m;
  if (thresholded) d0 = threshold_x0(d0, limit, true);
  C xc = x;
  if (k.correct) {
    const UniPcUpdate<C>& c = k.c;
    const C d1t = d0 - h1;
    const C res = c.second ? c.rho0 * ((h2 - h1) / c.rk) + c.rho1 * d1t : c.rho1 * d1t;
    xc = c.ratio * last - c.ah * h1 - c.aB * res;
  }
  C out = k.p.ratio * xc - k.p.ah * d0;
  if (k.p.second) out = out - k.p.aB * (C(0.5) * ((h1 - d0) / k.p.rk));
  if (three_slots) h2 = h1;
  h1 = d0;
  last = xc;
  return out;
}

}  // namespace diffusion
}  // namespace gk
