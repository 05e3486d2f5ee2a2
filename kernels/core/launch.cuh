// The host-side glue every genkern CUDA entry point shares: the caller's stream, a launch with its check,
// the usual grid-stride launch over a dtype, and stream-ordered scratch memory.
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "core/dtype.cuh"

namespace gk {
namespace gpu {

// The entry points receive the caller's stream as an opaque pointer (0: the default stream).
inline cudaStream_t as_stream(void* stream) { return static_cast<cudaStream_t>(stream); }

// An entry point's array at the kernel's storage type S.
template <typename S>
const S* typed(const void* p) {
  return static_cast<const S*>(p);
}
template <typename S>
S* typed(void* p) {
  return static_cast<S*>(p);
}

// kernel<<<grid, block, shared, stream>>>(args...), then reports a failed launch as `what`.
template <typename... Params, typename... Args>
void launch(const char* what, void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared, cudaStream_t stream,
            const Args&... args) {
  kernel<<<grid, block, shared, stream>>>(args...);
  check_launch(what);
}

// A grid-stride kernel over `items` work items, a thread each, `threads` per block (grid_for caps the grid).
template <typename... Params, typename... Args>
void launch_items(const char* what, void (*kernel)(Params...), int64_t items, int threads, cudaStream_t stream,
                  const Args&... args) {
  launch(what, kernel, grid_for(ceil_div(items, threads)), threads, 0, stream, args...);
}

// launch_items for the storage type S of a floating dtype, the kernel being kernel_of(Type<S>{}); nothing
// runs when there are no items.
template <typename KernelOf, typename... Args>
void launch_typed(DType dtype, const char* what, KernelOf kernel_of, int64_t items, int threads, void* stream,
                  const Args&... args) {
  if (items <= 0) return;
  dispatch_float(dtype, what,
                 [&](auto type) { launch_items(what, kernel_of(type), items, threads, as_stream(stream), args...); });
}

// `count` elements of T from the stream-ordered pool (none when count <= 0), freed in stream order when the
// buffer goes out of scope: no host synchronisation.
template <typename T>
struct AsyncBuffer {
  T* data = nullptr;
  cudaStream_t stream;
  AsyncBuffer(int64_t count, cudaStream_t s, const char* what) : stream(s) {
    if (count > 0) check_cuda(cudaMallocAsync(reinterpret_cast<void**>(&data), sizeof(T) * count, s), what);
  }
  ~AsyncBuffer() {
    if (data) cudaFreeAsync(data, stream);
  }
  // Frees now, reporting a failure as `what`.
  void release(const char* what) {
    if (data) check_cuda(cudaFreeAsync(data, stream), what);
    data = nullptr;
  }
  AsyncBuffer(const AsyncBuffer&) = delete;
  AsyncBuffer& operator=(const AsyncBuffer&) = delete;
};

// The gpu:: names every kernel file uses unqualified, through `using namespace gpu::common;` in its unnamed
// namespace (core/reduce.cuh adds the sums).
namespace common {
using gpu::ceil_div;
using gpu::compute_t;
using gpu::divmod;
using gpu::load;
using gpu::store;
}  // namespace common

}  // namespace gpu
}  // namespace gk
