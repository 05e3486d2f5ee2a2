// Per-element math of flow matching (rectified flow, docs/math.md 5.1), shared by the CPU and CUDA kernels.
// Noising and the loss need no code of their own: x_sigma = (1 - sigma) x0 + sigma eps and the target
// v = eps - x0 are q_sample and the v-prediction target of diffusion_math.h on a table whose rows hold
// signal = 1 - sigma and noise = sigma (genkern.diffusion.flow builds it).
#pragma once

#include "core/macros.h"

namespace gk {
namespace diffusion {

// One Euler step sigma -> sigma_next with velocity v at x, as diffusers' FlowMatchEulerDiscreteScheduler:
// x + dt v (dt = sigma_next - sigma, taken in float32 as diffusers does), or with stochastic sampling
// (1 - sigma_next) x0_hat + sigma_next z. Writes x0_hat = x - sigma v.
template <typename C>
GK_HD C flow_euler(C v, C x, C z, C sigma, C sigma_next, C dt, bool stochastic, C& x0) {
  x0 = x - sigma * v;
  return stochastic ? (C(1) - sigma_next) * x0 + sigma_next * z : x + dt * v;
}

}  // namespace diffusion
}  // namespace gk
