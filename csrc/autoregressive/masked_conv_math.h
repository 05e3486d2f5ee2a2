// The mask of a masked (PixelCNN) convolution, shared by every backend (docs/math.md, section 4).
// A k x k kernel with centre c = k / 2 keeps the rows above c and, in row c, the columns left of c; the
// centre tap only for mask B. With G colour groups the centre tap lets output group g see input group h
// iff h < g (mask A) or h <= g (mask B). Groups are contiguous channel ranges, so every kept tap reads a
// prefix [0, end) of the input channels: that is all a kernel needs to skip the masked weights.
#pragma once
#include <cstdint>

#include "core/macros.h"

namespace gk {
namespace masked_conv {

// Templates on the index type: the CPU passes int64_t, the CUDA kernels int (32-bit division is a few
// instructions there, 64-bit a long routine).
template <typename I>
GK_HD bool tap_kept(I ky, I kx, I kernel_size, bool mask_b) {
  const I c = kernel_size / 2;
  return ky < c || (ky == c && (kx < c || (kx == c && mask_b)));
}

// Output channel oc at tap (ky, kx) reads input channels [0, end); end == 0 when the tap is masked.
template <typename I>
GK_HD I in_channel_end(I ky, I kx, I oc, I kernel_size, bool mask_b, I in_channels, I out_channels, I groups) {
  const I c = kernel_size / 2;
  if (ky == c && kx == c) {
    const I group = oc / (out_channels / groups);
    return (group + (mask_b ? 1 : 0)) * (in_channels / groups);
  }
  return tap_kept(ky, kx, kernel_size, mask_b) ? in_channels : 0;
}

}  // namespace masked_conv
}  // namespace gk
