// Qualifiers that let one inline function serve both the C++ (CPU) and the CUDA kernels.
#pragma once

#if defined(__CUDACC__)
#define GK_HD __host__ __device__ __forceinline__
#else
#define GK_HD inline
#endif

// Full unrolling of short fixed loops: the CPU vectoriser needs straight-line code.
#if defined(__CUDACC__)
#define GK_UNROLL _Pragma("unroll")
#elif defined(__clang__)
#define GK_UNROLL _Pragma("unroll")
#elif defined(__GNUC__)
#define GK_UNROLL _Pragma("GCC unroll 16")
#else
#define GK_UNROLL
#endif

#include <cstdint>
#include <cstring>

namespace gk {

GK_HD float bits_to_float(uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(b);
#else
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
#endif
}

GK_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t b;
  std::memcpy(&b, &f, sizeof b);
  return b;
#endif
}

}  // namespace gk
