// The genkern random stream on CUDA: one thread per Philox block, i.e. per 4 consecutive output elements,
// so every block is computed once and the output is written with packed stores.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "core/normal.h"
#include "core/philox.h"
#include "core/launch.cuh"
#include "random/random.h"

namespace gk {
namespace random {
namespace {

constexpr int kThreads = 256;

__global__ void __launch_bounds__(kThreads)
    bits_kernel(uint32_t* __restrict__ out, int64_t n, uint64_t seed, uint64_t offset) {
  const int64_t blocks = gpu::ceil_div(n, 4);
  for (int64_t b = gpu::thread_index(); b < blocks; b += gpu::thread_count()) {
    const Philox4 bits = stream_block(seed, offset, static_cast<uint64_t>(b));
    const uint32_t v[4] = {bits.x[0], bits.x[1], bits.x[2], bits.x[3]};
    gpu::store4_raw(out, 4 * b, static_cast<int>(min(int64_t(4), n - 4 * b)), v);
  }
}

template <typename S>
__global__ void __launch_bounds__(kThreads)
    normal_kernel(S* __restrict__ out, int64_t n, uint64_t seed, uint64_t offset) {
  using C = gpu::compute_t<S>;
  const int64_t blocks = gpu::ceil_div(n, 4);
  for (int64_t b = gpu::thread_index(); b < blocks; b += gpu::thread_count()) {
    const Normal4 z = stream_normals(seed, offset, static_cast<uint64_t>(b));
    const C v[4] = {C(z.z[0]), C(z.z[1]), C(z.z[2]), C(z.z[3])};
    gpu::store4(out, 4 * b, static_cast<int>(min(int64_t(4), n - 4 * b)), v);
  }
}

}  // namespace

void bits_cuda(const StreamArgs& a, void* stream) {
  if (a.n <= 0) return;
  gpu::launch_items("random.bits", bits_kernel, gpu::ceil_div(a.n, 4), kThreads, gpu::as_stream(stream),
                    static_cast<uint32_t*>(a.out), a.n, a.seed, a.offset);
}

void normal_cuda(const StreamArgs& a, void* stream) {
  gpu::dispatch_float(a.dtype, "random.normal", [&](auto type) {
    using S = typename decltype(type)::type;
    if (a.n <= 0) return;
    gpu::launch_items("random.normal", normal_kernel<S>, gpu::ceil_div(a.n, 4), kThreads, gpu::as_stream(stream),
                      static_cast<S*>(a.out), a.n, a.seed, a.offset);
  });
}

}  // namespace random
}  // namespace gk
