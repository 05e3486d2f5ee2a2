// The genkern random stream as arrays: raw Philox bits and standard normals.
#pragma once
#include "core/array.h"

namespace gk {
namespace random {

struct StreamArgs {
  void* out;  // n elements: uint32 bits, or normals of `dtype`
  int64_t n;
  uint64_t seed, offset;
  DType dtype;
};

void bits_cpu(const StreamArgs& a);
void normal_cpu(const StreamArgs& a);
// The raw block function on explicit counters and keys (known-answer tests), CPU only.
void philox_cpu(const uint32_t* counter, const uint32_t* key, uint32_t* out, int64_t n);

#ifdef GENKERN_WITH_CUDA
void bits_cuda(const StreamArgs& a, void* stream);
void normal_cuda(const StreamArgs& a, void* stream);
#endif

}  // namespace random
}  // namespace gk
