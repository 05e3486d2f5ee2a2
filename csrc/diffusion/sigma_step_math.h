// Per-element math of the sigma-space steps (docs/math.md 5.1 and 5.2), shared by the CPU and CUDA kernels:
// flow matching's Euler step (diffusers' FlowMatchEulerDiscreteScheduler) and k-diffusion's Euler and Euler
// ancestral steps (EulerDiscreteScheduler, EulerAncestralDiscreteScheduler). Each follows its diffusers
// scheduler's operation order, sigmas being float32 per-sample values.
// Flow matching's noising and loss need no code of their own: x_sigma = (1 - sigma) x0 + sigma eps and the
// target v = eps - x0 are q_sample and the v-prediction target of diffusion_math.h on a table whose rows hold
// signal = 1 - sigma and noise = sigma (genkern.diffusion.flow builds it).
#pragma once
#include <cmath>

#include "core/macros.h"
#include "diffusion/diffusion_math.h"

namespace gk {
namespace diffusion {

// Heun (HeunDiscreteScheduler) is two kinds: its first half is the Euler step to x' that also writes d, its
// second half combines d with d' of the model output at x' and steps from the first half's sample x.
enum SigmaStepKind : int32_t { kFlowEuler = 0, kEuler = 1, kEulerAncestral = 2, kHeunFirst = 3, kHeunSecond = 4 };

// A step's per-sample coefficients in the compute type C from the float32 sigmas of the step.
template <typename C>
struct SigmaCoefficients {
  C sigma, sigma_next;
  C dt;      // the Euler increment: sigma_next - sigma (flow, Euler) or sigma_down - sigma (ancestral)
  C up;      // ancestral: the std of the added noise, sigma_up
  C vx, vm;  // k-diffusion v_prediction: x0_hat = m vm + x vx, vm = -sigma / sqrt(sigma^2 + 1), vx = 1 / (sigma^2 + 1)
};

template <typename C>
GK_HD SigmaCoefficients<C> sigma_coefficients(int32_t kind, float sigma_f, float next_f) {
  SigmaCoefficients<C> c{};
  // Heun's second half predicts x0 at x' and divides by sigma_next (its sigma_input); dt stays next - sigma.
  c.sigma = C(kind == kHeunSecond ? next_f : sigma_f);
  c.sigma_next = C(next_f);
  if (kind == kEulerAncestral) {
    // sigma_up = sqrt(next^2 (sigma^2 - next^2) / sigma^2), sigma_down = sqrt(next^2 - sigma_up^2)
    const C s2 = c.sigma * c.sigma, n2 = c.sigma_next * c.sigma_next;
    c.up = sqrt_of(n2 * (s2 - n2) / s2);
    c.dt = sqrt_of(n2 - c.up * c.up) - c.sigma;
  } else {
    c.dt = C(next_f - sigma_f);  // diffusers subtracts its float32 sigmas
  }
  const C s2p1 = c.sigma * c.sigma + C(1);
  c.vm = -c.sigma / sqrt_of(s2p1);
  c.vx = s2p1;
  return c;
}

// k-diffusion's x0_hat from m at x (docs/math.md 5.2): epsilon x - sigma m, v_prediction
// m (-sigma / sqrt(sigma^2 + 1)) + x / (sigma^2 + 1), sample m.
template <typename C>
GK_HD C sigma_predict_x0(C m, C x, const SigmaCoefficients<C>& c, int32_t prediction) {
  if (prediction == kEpsilon) return x - c.sigma * m;
  if (prediction == kVPrediction) return m * c.vm + x / c.vx;
  return m;
}

// One element of a step: m the (guided) model output, x the sample, z the noise (used where the step adds
// noise). Writes x0_hat and returns the next sample.
//   flow:      x0_hat = x - sigma v; x + dt v, or with stochastic sampling (1 - sigma_next) x0_hat + sigma_next z
//   Euler:     d = (x - x0_hat) / sigma; x + d dt
//   ancestral: as Euler with dt = sigma_down - sigma, then + z sigma_up
template <typename C>
GK_HD C sigma_step_element(C m, C x, C z, const SigmaCoefficients<C>& c, int32_t kind, int32_t prediction,
                           bool stochastic, C& x0) {
  if (kind == kFlowEuler) {
    x0 = x - c.sigma * m;
    return stochastic ? (C(1) - c.sigma_next) * x0 + c.sigma_next * z : x + c.dt * m;
  }
  x0 = sigma_predict_x0(m, x, c, prediction);
  const C out = x + (x - x0) / c.sigma * c.dt;
  return kind == kEulerAncestral ? out + z * c.up : out;
}

// Heun's first half: the Euler step (as sigma_step_element) that also writes d = (x - x0_hat) / sigma.
template <typename C>
GK_HD C heun_first_element(C m, C x, const SigmaCoefficients<C>& c, int32_t prediction, C& x0, C& d) {
  x0 = sigma_predict_x0(m, x, c, prediction);
  d = (x - x0) / c.sigma;
  return x + d * c.dt;
}

// Heun's second half at x' = x_prime (the first half's output) from the first half's sample `origin`:
// d' = (x' - x0_hat') / sigma_next, origin + (d + d') / 2 (sigma_next - sigma). A sample whose sigma_next is
// 0 took the Euler step alone (diffusers never evaluates the model there): x' is its result.
template <typename C>
GK_HD C heun_second_element(C m, C x_prime, C origin, C d, const SigmaCoefficients<C>& c, int32_t prediction, C& x0) {
  x0 = sigma_predict_x0(m, x_prime, c, prediction);
  if (c.sigma_next == C(0)) return x_prime;
  const C average = (d + (x_prime - x0) / c.sigma) / C(2);
  return origin + average * c.dt;
}

}  // namespace diffusion
}  // namespace gk
