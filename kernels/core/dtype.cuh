// What every genkern CUDA kernel shares: storage <-> compute conversions, packed 4-element loads and
// stores, dtype dispatch, grid sizing and launch checks.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "core/array.h"

namespace gk {
namespace gpu {

// Half types compute in float; float and double compute in themselves.
template <typename S>
struct ComputeOf {
  using type = float;
};
template <>
struct ComputeOf<double> {
  using type = double;
};
template <typename S>
using compute_t = typename ComputeOf<S>::type;

__device__ __forceinline__ float to_compute(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_compute(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_compute(float x) { return x; }
__device__ __forceinline__ double to_compute(double x) { return x; }

template <typename S>
__device__ __forceinline__ S from_compute(compute_t<S> x);
template <>
__device__ __forceinline__ __half from_compute<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_compute<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <>
__device__ __forceinline__ float from_compute<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ double from_compute<double>(double x) {
  return x;
}

template <typename S>
__device__ __forceinline__ compute_t<S> load(const S* p, int64_t i) {
  return to_compute(p[i]);
}

template <typename S>
__device__ __forceinline__ void store(S* p, int64_t i, compute_t<S> v) {
  p[i] = from_compute<S>(v);
}

// Four consecutive elements moved as one (or, for double, two) memory transactions.
template <typename S>
struct alignas(4 * sizeof(S)) Pack4 {
  S v[4];
};

template <typename S>
__device__ __forceinline__ bool pack_aligned(const S* p) {
  return reinterpret_cast<uintptr_t>(p) % sizeof(Pack4<S>) == 0;
}

// Elements base .. base + count - 1 (count <= 4) of p into v; lanes from count on are zero.
template <typename S>
__device__ __forceinline__ void load4(const S* p, int64_t base, int count, compute_t<S> (&v)[4]) {
  if (count == 4 && pack_aligned(p + base)) {
    const Pack4<S> pack = *reinterpret_cast<const Pack4<S>*>(p + base);
#pragma unroll
    for (int l = 0; l < 4; ++l) v[l] = to_compute(pack.v[l]);
    return;
  }
#pragma unroll
  for (int l = 0; l < 4; ++l) {
    v[l] = compute_t<S>(0);
    if (l < count) v[l] = load(p, base + l);
  }
}

// Elements idx[0 .. count - 1] of p; a packed load when they happen to be consecutive.
template <typename S>
__device__ __forceinline__ void gather4(const S* p, const int64_t (&idx)[4], int count, compute_t<S> (&v)[4]) {
  const bool consecutive = idx[1] == idx[0] + 1 && idx[2] == idx[0] + 2 && idx[3] == idx[0] + 3;
  if (count == 4 && consecutive) {
    load4(p, idx[0], 4, v);
    return;
  }
#pragma unroll
  for (int l = 0; l < 4; ++l) {
    v[l] = compute_t<S>(0);
    if (l < count) v[l] = load(p, idx[l]);
  }
}

// Stores v[0 .. count - 1] (already in storage type) at base .. base + count - 1.
template <typename S>
__device__ __forceinline__ void store4_raw(S* p, int64_t base, int count, const S (&v)[4]) {
  if (count == 4 && pack_aligned(p + base)) {
    Pack4<S> pack;
#pragma unroll
    for (int l = 0; l < 4; ++l) pack.v[l] = v[l];
    *reinterpret_cast<Pack4<S>*>(p + base) = pack;
    return;
  }
#pragma unroll
  for (int l = 0; l < 4; ++l)
    if (l < count) p[base + l] = v[l];
}

template <typename S>
__device__ __forceinline__ void store4(S* p, int64_t base, int count, const compute_t<S> (&v)[4]) {
  S s[4];
#pragma unroll
  for (int l = 0; l < 4; ++l) s[l] = from_compute<S>(v[l]);
  store4_raw(p, base, count, s);
}

// Calls f(Type<S>{}) with S the storage type of a floating dtype.
template <typename T>
struct Type {
  using type = T;
};

template <typename F>
void dispatch_float(DType dtype, const char* op, F&& f) {
  switch (dtype) {
    case DType::float16:
      f(Type<__half>{});
      return;
    case DType::bfloat16:
      f(Type<__nv_bfloat16>{});
      return;
    case DType::float32:
      f(Type<float>{});
      return;
    case DType::float64:
      f(Type<double>{});
      return;
    default:
      throw TypeError(std::string(op) + ": unsupported dtype " + dtype_name(dtype) + " on CUDA");
  }
}

// Grid-stride loops: this thread's first index and the stride.
__device__ __forceinline__ int64_t thread_index() { return int64_t(blockIdx.x) * blockDim.x + threadIdx.x; }
__device__ __forceinline__ int64_t thread_count() { return int64_t(gridDim.x) * blockDim.x; }

inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

// Reports a failed launch (bad configuration, no kernel image for this GPU) without waiting for the kernel.
inline void check_launch(const char* kernel) { check_cuda(cudaGetLastError(), kernel); }

// A grid of at most `blocks` blocks, capped at a few waves of the current device: the kernels loop over the
// rest, so any problem size works with a bounded grid.
inline unsigned grid_for(int64_t blocks) {
  int device = 0, sms = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
  const int64_t cap = int64_t(std::max(sms, 1)) * 32;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(blocks, cap)));
}

__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// q = a / b, r = a % b (a >= 0, b > 0), in 32-bit arithmetic when that suffices: 64-bit division is a long
// software sequence on GPUs.
__device__ __forceinline__ void divmod(int64_t a, int64_t b, int64_t& q, int64_t& r) {
  if (((a | b) >> 32) == 0) {
    const uint32_t q32 = static_cast<uint32_t>(a) / static_cast<uint32_t>(b);
    q = q32;
    r = static_cast<uint32_t>(a) - q32 * static_cast<uint32_t>(b);
  } else {
    q = a / b;
    r = a - q * b;
  }
}

}  // namespace gpu
}  // namespace gk
