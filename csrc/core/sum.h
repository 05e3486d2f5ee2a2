// Pairwise summation: the rounding error of n terms grows as log n instead of n (the order torch.sum uses in
// spirit). The order is a fixed function of n, so a sum's bits never depend on the thread count.
#pragma once
#include <cstdint>

namespace gk {
namespace cpu {

// sum of p[0, n): halves summed separately below a base case of 8 added in order.
template <typename T>
T pairwise_sum(const T* p, int64_t n) {
  if (n <= 8) {
    T acc = 0;
    for (int64_t i = 0; i < n; ++i) acc += p[i];
    return acc;
  }
  const int64_t half = n / 2;
  return pairwise_sum(p, half) + pairwise_sum(p + half, n - half);
}

}  // namespace cpu
}  // namespace gk
