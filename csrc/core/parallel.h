// CPU kernel plumbing shared by the families: OpenMP loops, dtype dispatch, and stream normals in chunks.
#pragma once
#include <omp.h>

#include <algorithm>
#include <climits>
#include <cstdint>

#include "core/array.h"
#include "core/normal.h"
#include "core/philox_blocks.h"

namespace gk {
namespace cpu {

// Elements per chunk: the chunk's normals stay in L1 between generation and use.
constexpr int64_t kChunk = 1024;

// Work below which a call runs on the calling thread, in element-sized units (an element read or written
// once, a multiply-add; a random normal counts kRandomWork). Waking the pool costs a few microseconds idle,
// and when other processes keep the cores busy a parallel region waits for whichever of its threads the OS
// descheduled (15.6 ms for a 16K-element ddim_step that takes 0.29 ms on one thread): small calls must not
// open one. torch uses 32K elements; measured on a 2-core Xeon, the crossover of an element-wise kernel is
// 32K-64K elements, of one drawing normals 8K-16K (so kRandomWork = 4).
constexpr int64_t kGrain = int64_t(1) << 15;
constexpr int64_t kRandomWork = 4;

// Threads the calling thread asked for (genkern._C.set_num_threads: the Python side passes
// torch.get_num_threads(), which follows torch.set_num_threads and OMP_NUM_THREADS); 0: OpenMP's default.
// Per calling thread, as OpenMP's and torch's own thread counts are.
inline int& requested_threads() {
  thread_local int threads = 0;
  return threads;
}

inline int max_threads() {
  const int requested = requested_threads();
  return requested > 0 ? requested : omp_get_max_threads();
}

// How many threads n items of `work_per_item` each get: one per kGrain of work, at most the requested count.
inline int threads_for(int64_t n, int64_t work_per_item) {
  if (n <= 1) return 1;
  int64_t total;
  if (__builtin_mul_overflow(n, std::max<int64_t>(work_per_item, 1), &total)) total = INT64_MAX;
  if (total < kGrain) return 1;
  return static_cast<int>(std::min({int64_t{max_threads()}, n, total / kGrain}));
}

// fn(i) for i in [0, n), on up to threads_for(n, work_per_item) threads. Results never depend on how many
// run: each item's work is fixed by the shapes.
template <typename Fn>
void parallel_for(int64_t n, int64_t work_per_item, Fn fn) {
  const int threads = threads_for(n, work_per_item);
  if (threads <= 1) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t i = 0; i < n; ++i) fn(i);
}

// Calls fn<T>() with T = float or double; the CPU kernels take no half types.
template <template <typename> class Kernel, typename Args>
void dispatch_float(DType dtype, const Args& args) {
  switch (dtype) {
    case DType::float32:
      Kernel<float>::run(args);
      return;
    case DType::float64:
      Kernel<double>::run(args);
      return;
    default:
      throw TypeError(std::string("the cpu backend computes in float32 or float64, got ") + dtype_name(dtype));
  }
}

// out[0, count) = stream normals of flat elements [start, start + count), count <= kChunk.
// Whole Philox blocks are generated, Box-Muller runs over them in a vectorised loop, and the window is
// copied out.
inline void stream_normals_span(uint64_t seed, uint64_t offset, int64_t start, int64_t count, float* out) {
  constexpr int64_t kBlocks = kChunk / 4 + 2;
  alignas(64) uint32_t x0[kBlocks], x1[kBlocks], x2[kBlocks], x3[kBlocks];
  alignas(64) float buffer[4 * kBlocks];
  const int64_t first_block = start >> 2;
  const int64_t blocks = ((start + count + 3) >> 2) - first_block;
  philox_blocks(seed, offset, static_cast<uint64_t>(first_block), blocks, x0, x1, x2, x3);
#pragma omp simd
  for (int64_t b = 0; b < blocks; ++b) {
    box_muller(x0[b], x1[b], &buffer[4 * b + 0], &buffer[4 * b + 1]);
    box_muller(x2[b], x3[b], &buffer[4 * b + 2], &buffer[4 * b + 3]);
  }
  std::copy(buffer + (start & 3), buffer + (start & 3) + count, out);
}

// eps for flat elements [start, start + count): read from the given array, or drawn from the stream.
template <typename T>
inline void load_eps(const T* eps, uint64_t seed, uint64_t offset, int64_t start, int64_t count, T* out) {
  if (eps) {
    std::copy(eps + start, eps + start + count, out);
    return;
  }
  if constexpr (sizeof(T) == sizeof(float)) {
    stream_normals_span(seed, offset, start, count, out);
  } else {
    alignas(64) float normals[kChunk];
    stream_normals_span(seed, offset, start, count, normals);
    std::copy(normals, normals + count, out);
  }
}

// Splits the flat range [start, start + len) into pieces that are contiguous modulo `period` and calls
// fn(t0, j0, n): elements t0 .. t0 + n of the range map to j0 .. j0 + n of the periodic array.
template <typename Fn>
inline void for_each_periodic(int64_t start, int64_t len, int64_t period, Fn fn) {
  int64_t t = 0;
  while (t < len) {
    const int64_t j = (start + t) % period;
    const int64_t n = std::min(len - t, period - j);
    fn(t, j, n);
    t += n;
  }
}

}  // namespace cpu
}  // namespace gk
