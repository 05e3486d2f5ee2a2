// Output memory on the CPU. A fresh multi-megabyte tensor is untouched memory, and on first write every
// 4 KiB page faults; for the large outputs of memory-bound kernels the faults cost more than the kernel.
// Asking for transparent huge pages first (a hint, honoured where THP is enabled) makes them 512x fewer.
#pragma once
#include <algorithm>
#include <cstdint>
#include <memory>
#include <new>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace gk {
namespace cpu {

constexpr int64_t kHugePage = int64_t(1) << 21;

inline void advise_huge_pages(void* data, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (bytes < 2 * kHugePage) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHugePage - 1) & ~uintptr_t(kHugePage - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + static_cast<uintptr_t>(bytes)) & ~uintptr_t(kHugePage - 1);
  // Only whole huge pages inside the array: the advice never reaches memory we do not own. Failure is fine.
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)data;
  (void)bytes;
#endif
}

// Scratch memory aligned to a 64-byte vector, for kernels that load whole vectors from it.
constexpr size_t kScratchAlign = 64;

struct AlignedDelete {
  void operator()(void* p) const { ::operator delete[](p, std::align_val_t(kScratchAlign)); }
};
template <typename T>
using AlignedBuffer = std::unique_ptr<T[], AlignedDelete>;

template <typename T>
AlignedBuffer<T> allocate_aligned(int64_t n) {
  const size_t bytes = sizeof(T) * static_cast<size_t>(std::max<int64_t>(n, 1));
  return AlignedBuffer<T>(static_cast<T*>(::operator new[](bytes, std::align_val_t(kScratchAlign))));
}

}  // namespace cpu
}  // namespace gk
