// The mask of a masked (PixelCNN) convolution, shared by every backend (shared/math.md, section 4).
// A k x k kernel with centre c = k / 2 keeps the rows above c and, in row c, the columns left of c; the
// centre tap only for mask B. With G colour groups the centre tap lets output group g see input group h
// iff h < g (mask A) or h <= g (mask B). Groups are contiguous channel ranges, so every kept tap reads a
// prefix [0, end) of the input channels: that is all a kernel needs to skip the masked weights.
#pragma once
#include <cstdint>

#include "macros.h"

namespace gk {
namespace masked_conv {

GK_HD bool tap_kept(int64_t ky, int64_t kx, int64_t kernel_size, bool mask_b) {
  const int64_t c = kernel_size / 2;
  return ky < c || (ky == c && (kx < c || (kx == c && mask_b)));
}

// Output channel oc at tap (ky, kx) reads input channels [0, end); end == 0 when the tap is masked.
GK_HD int64_t in_channel_end(int64_t ky, int64_t kx, int64_t oc, int64_t kernel_size, bool mask_b,
                             int64_t in_channels, int64_t out_channels, int64_t groups) {
  const int64_t c = kernel_size / 2;
  if (ky == c && kx == c) {
    const int64_t group = oc / (out_channels / groups);
    return (group + (mask_b ? 1 : 0)) * (in_channels / groups);
  }
  return tap_kept(ky, kx, kernel_size, mask_b) ? in_channels : 0;
}

}  // namespace masked_conv
}  // namespace gk
