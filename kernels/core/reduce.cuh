// Warp, block and team sums shared by the CUDA reduction kernels.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace gk {
namespace gpu {

template <typename C>
__device__ __forceinline__ C warp_sum(C v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Sum over the block (blockDim.x a multiple of 32), returned to every thread.
template <typename C>
__device__ __forceinline__ C block_sum(C v) {
  __shared__ C warp_totals[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // the previous call's readers are done with warp_totals
  if (lane == 0) warp_totals[warp] = v;
  __syncthreads();
  v = lane < static_cast<int>(blockDim.x >> 5) ? warp_totals[lane] : C(0);
  return warp_sum(v);
}

// Sum over a team of `team` threads (a power of two, uniform over the block): a shuffle tree within a
// warp, the whole block beyond. Every member gets the total.
template <typename C>
__device__ __forceinline__ C team_sum(C v, int team) {
  if (team > 32) return block_sum(v);
  for (int off = team >> 1; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Host side: a team for rows of `len` elements taken in groups of 4, about one group per member and at most
// `max_threads`; blocks of `threads` hold whole teams (a team beyond a warp takes the whole block).
struct TeamLaunch {
  int team, threads;
};
inline TeamLaunch team_for(int64_t len, int max_threads) {
  int team = 1;
  while (team < max_threads && 4 * team < len) team *= 2;
  return TeamLaunch{team, team > 32 ? team : max_threads};
}

namespace common {  // see core/launch.cuh
using gpu::block_sum;
using gpu::team_sum;
using gpu::warp_sum;
}  // namespace common

}  // namespace gpu
}  // namespace gk
