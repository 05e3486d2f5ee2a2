// The genkern stream on the CPU.
#include "random/random.h"

#include "core/philox.h"
#include "core/parallel.h"

namespace gk {
namespace random {

void bits_cpu(const StreamArgs& a) {
  uint32_t* out = static_cast<uint32_t*>(a.out);
  const int64_t blocks = (a.n + 3) / 4;
  cpu::parallel_for(blocks, 4 * cpu::kRandomWork, [&](int64_t b) {
    const Philox4 bits = stream_block(a.seed, a.offset, static_cast<uint64_t>(b));
    for (int64_t lane = 0; lane < 4 && 4 * b + lane < a.n; ++lane) out[4 * b + lane] = bits.x[lane];
  });
}

template <typename T>
struct NormalKernel {
  static void run(const StreamArgs& a) {
    T* out = static_cast<T*>(a.out);
    const int64_t chunks = (a.n + cpu::kChunk - 1) / cpu::kChunk;
    cpu::parallel_for(chunks, cpu::kChunk * cpu::kRandomWork, [&](int64_t c) {
      const int64_t start = c * cpu::kChunk;
      cpu::load_eps<T>(nullptr, a.seed, a.offset, start, std::min(cpu::kChunk, a.n - start), out + start);
    });
  }
};

void normal_cpu(const StreamArgs& a) { cpu::dispatch_float<NormalKernel>(a.dtype, a); }

void philox_cpu(const uint32_t* counter, const uint32_t* key, uint32_t* out, int64_t n) {
  cpu::parallel_for(n, 4 * cpu::kRandomWork, [&](int64_t i) {
    const uint32_t* c = counter + 4 * i;
    const Philox4 r = philox4x32_10(c[0], c[1], c[2], c[3], key[2 * i], key[2 * i + 1]);
    for (int lane = 0; lane < 4; ++lane) out[4 * i + lane] = r.x[lane];
  });
}

}  // namespace random
}  // namespace gk
