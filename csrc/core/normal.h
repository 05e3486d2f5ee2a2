// Standard normals from the genkern stream: Box-Muller on lane pairs (0,1) and (2,3) of a Philox block.
#pragma once
#include "core/fastmath.h"
#include "core/philox.h"

namespace gk {

struct Normal4 {
  float z[4];
};

// Box-Muller on one lane pair: a gives the radius, b the angle (docs/math.md, section 1).
GK_HD void box_muller(uint32_t bits_a, uint32_t bits_b, float* z_cos, float* z_sin) {
  const float radius = sqrtf(-2.0f * log_uniform24(bits_a >> 8));
  const SinCos sc = sincos_2pi_uniform24(bits_b >> 8);
  *z_cos = radius * sc.cos;
  *z_sin = radius * sc.sin;
}

GK_HD Normal4 normals_from_bits(const Philox4& bits) {
  Normal4 n;
  box_muller(bits.x[0], bits.x[1], &n.z[0], &n.z[1]);
  box_muller(bits.x[2], bits.x[3], &n.z[2], &n.z[3]);
  return n;
}

// The four normals of stream block `block` (elements 4*block .. 4*block + 3).
GK_HD Normal4 stream_normals(uint64_t seed, uint64_t offset, uint64_t block) {
  return normals_from_bits(stream_block(seed, offset, block));
}

// Element i of the normal stream alone (used where an element's neighbours belong to another thread).
GK_HD float stream_normal(uint64_t seed, uint64_t offset, uint64_t i) {
  const Philox4 bits = stream_block(seed, offset, i >> 2);
  const uint32_t lane = static_cast<uint32_t>(i & 3u);
  const uint32_t a = lane < 2 ? bits.x[0] : bits.x[2];
  const uint32_t b = lane < 2 ? bits.x[1] : bits.x[3];
  float zc, zs;
  box_muller(a, b, &zc, &zs);
  return (lane & 1u) ? zs : zc;
}

}  // namespace gk
