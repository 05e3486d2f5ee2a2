// CPU kernels of the masked_conv family: direct convolution over the kept taps only.
//
// The input is first copied into a zero-bordered buffer whose rows are padded to a whole number of register
// tiles, so the inner loops need no bounds tests and never read outside an array. Forward and grad_input
// are one kernel: a block of output channels times a tile of a row accumulates in registers over (kept
// tap, input channel), with the weights packed per block so that entries masked by a colour group are
// zeros and whole masked taps are not visited at all. grad_weight puts output channels along the vector
// lanes (grad_y transposed to channels-last) and broadcasts input pixels; each task owns a block of
// (output, input) pairs and sums over (image, row, column) in a fixed order: no atomics, and the same bits
// whatever the thread count. With few input channels (a first layer on pixels) grad_weight instead puts
// pixels along the lanes, which needs no transposed copy of grad_y.
#include "autoregressive/masked_conv.h"

#include <algorithm>
#include <initializer_list>
#include <limits>
#include <stdexcept>
#include <cstring>
#include <memory>
#include <new>
#include <type_traits>
#include <vector>

#include "autoregressive/masked_conv_math.h"
#include "core/memory.h"
#include "core/parallel.h"

namespace gk {
namespace masked_conv {
namespace {

constexpr int64_t kVectorBytes = 64;
constexpr int kBlock = 8;  // output channels per register block
constexpr int kTiles = 2;  // vectors along a row per register block: 8 x 2 accumulators

// Without AVX-512 (a portable build) GCC warns that returning a 64-byte vector changes the ABI; these
// helpers have internal linkage and inline away, so no ABI is ever crossed.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

template <typename T>
struct Simd {
  typedef T vec __attribute__((vector_size(kVectorBytes)));
  static constexpr int64_t kLanes = kVectorBytes / sizeof(T);
  static vec load(const T* p) {
    vec v;
    std::memcpy(&v, p, sizeof v);
    return v;
  }
};

int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// Below this many multiply-adds (or copied elements) a call runs on one thread: waking the pool costs more,
// and calls this small come in long sequences (gradcheck, sampling loops at batch 1).
constexpr int64_t kSerialWork = int64_t(1) << 16;

// work: the call's whole work, a saturating product (work_of), split evenly over its n items.
template <typename Fn>
void parallel_for_work(int64_t n, int64_t work, Fn fn) {
  if (work < kSerialWork) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  cpu::parallel_for(n, n > 0 ? work / n : 0, fn);
}

// The product of the sizes, INT64_MAX where it overflows (a work estimate: it only picks the thread count).
int64_t work_of(std::initializer_list<int64_t> sizes) {
  int64_t total = 1;
  for (int64_t s : sizes)
    if (__builtin_mul_overflow(total, s, &total)) return std::numeric_limits<int64_t>::max();
  return total;
}

template <typename T>
using Buffer = cpu::AlignedBuffer<T>;
static_assert(cpu::kScratchAlign == kVectorBytes, "scratch is aligned to a vector");

// The padded copies are as large as the inputs, and fresh memory page-faults on its first write (dearly in
// a VM), so each calling thread keeps one buffer per slot, grown as needed, for its next calls. Calls on one
// thread never overlap; the pool threads only write into what the calling thread handed them.
enum Slot { kInputSlot = 0, kGradSlot = 1 };

template <typename T>
T* scratch(Slot slot, int64_t n) {
  thread_local Buffer<unsigned char> memory[2];
  thread_local int64_t capacity[2] = {0, 0};
  // A size wrapped past int64 would look small and hand out the old, smaller buffer.
  if (n < 0 || n > std::numeric_limits<int64_t>::max() / static_cast<int64_t>(sizeof(T)))
    throw std::length_error("masked_conv scratch size overflows");
  const int64_t bytes = static_cast<int64_t>(sizeof(T)) * std::max<int64_t>(n, 1);
  if (bytes > capacity[slot]) {
    memory[slot].reset();  // the old buffer goes first: never both at once
    capacity[slot] = 0;
    memory[slot] = cpu::allocate_aligned<unsigned char>(bytes);
    capacity[slot] = bytes;
  }
  return reinterpret_cast<T*>(memory[slot].get());
}

// Where the padded buffers put things, and which taps any output channel reads.
struct Geometry {
  int64_t pad, left, tile, tiled_width, padded_width, padded_rows;  // left: column where the image starts
  std::vector<int64_t> ky, kx;                                      // the visited taps, raster order

  Geometry(const ConvShape& s, int64_t lanes) {
    const int64_t k = s.kernel_size, c = k / 2;
    pad = s.dilation * c;
    tile = kTiles * lanes;
    tiled_width = round_up(std::max<int64_t>(s.width, 1), tile);
    left = pad;
    padded_width = tiled_width + 2 * pad;
    padded_rows = s.height + pad;  // masked taps never look below the centre row, nor the transposed above
    for (int64_t y = 0; y <= c; ++y)
      for (int64_t x = 0; x < k; ++x) {
        // Mask A's centre tap still serves output groups g > 0 when there are colour groups.
        const bool centre = y == c && x == c;
        if (centre ? (s.mask_b || s.groups > 1) : tap_kept(y, x, k, s.mask_b)) {
          ky.push_back(y);
          kx.push_back(x);
        }
      }
  }
  int64_t taps() const { return static_cast<int64_t>(ky.size()); }
};

// dst[p] (rows_out x width_out) = src[p] (height x width) placed at (top, left), zero elsewhere; planes
// beyond `planes` (up to `planes_out`) are all zero.
template <typename T>
const T* padded(Slot slot, const T* src, int64_t images, int64_t channels, int64_t channels_out, int64_t height,
                int64_t width, int64_t top, int64_t left, int64_t rows_out, int64_t width_out) {
  const int64_t plane = rows_out * width_out;
  T* dst = scratch<T>(slot, images * channels_out * plane);
  parallel_for_work(images * channels_out, work_of({images, channels_out, plane}), [&](int64_t p) {
    const int64_t b = p / channels_out, ch = p % channels_out;
    T* d = dst + p * plane;
    if (ch >= channels) {
      std::fill(d, d + plane, T(0));
      return;
    }
    std::fill(d, d + top * width_out, T(0));
    for (int64_t i = 0; i < height; ++i) {
      T* row = d + (top + i) * width_out;
      std::fill(row, row + left, T(0));
      std::copy(src + ((b * channels + ch) * height + i) * width,
                src + ((b * channels + ch) * height + i) * width + width, row + left);
      std::fill(row + left + width, row + width_out, T(0));
    }
    std::fill(d + (top + height) * width_out, d + plane, T(0));
  });
  return dst;
}

// Weights per (block of kBlock outputs, tap, input), zero where masked, and per (block, tap) the input
// range [lo, hi) outside which every entry is zero (the loops skip it).
template <typename T>
struct Packed {
  Buffer<T> w;
  std::vector<int64_t> lo, hi;
};

// value(o, i, t) gives the weight of output o from input i at visited tap t, or 0 where masked.
template <typename T, typename Kept, typename Value>
Packed<T> pack(int64_t outputs, int64_t inputs, int64_t taps, Kept kept, Value value) {
  const int64_t blocks = (outputs + kBlock - 1) / kBlock;
  Packed<T> p{cpu::allocate_aligned<T>(blocks * taps * inputs * kBlock), std::vector<int64_t>(blocks * taps, 0),
              std::vector<int64_t>(blocks * taps, 0)};
  for (int64_t blk = 0; blk < blocks; ++blk)
    for (int64_t t = 0; t < taps; ++t) {
      int64_t lo = inputs, hi = 0;
      T* w = p.w.get() + (blk * taps + t) * inputs * kBlock;
      for (int64_t i = 0; i < inputs; ++i)
        for (int64_t o = 0; o < kBlock; ++o) {
          const int64_t out = blk * kBlock + o;
          const bool on = out < outputs && kept(out, i, t);
          w[i * kBlock + o] = on ? value(out, i, t) : T(0);  // masked entries are never read
          if (on) lo = std::min(lo, i), hi = std::max(hi, i + 1);
        }
      p.lo[blk * taps + t] = lo < hi ? lo : 0;
      p.hi[blk * taps + t] = lo < hi ? hi : 0;
    }
  return p;
}

// out[b, o, i, j] = bias[o] + sum over taps t and inputs c in [lo, hi) of
//   w[o, c, t] * in[b, c, i, j + offset[t]]    (in: padded planes; offset[t] folds the tap's row and column)
template <typename T>
struct Direct {
  const T* in;
  int64_t image_stride, plane, row_stride, inputs;  // inputs: what pack() was given
  const Packed<T>* pk;
  const std::vector<int64_t>* offset;
  const T* bias;  // nullable
  T* out;
  int64_t images, outputs, height, width;

  void run() const {
    using S = Simd<T>;
    using vec = typename S::vec;
    constexpr int64_t L = S::kLanes;
    const int64_t taps = static_cast<int64_t>(offset->size());
    const int64_t blocks = (outputs + kBlock - 1) / kBlock;
    // Per block, the (input offset, weight) pairs of its kept (tap, input) steps, flattened: the inner
    // loop is one pass over them whatever the kernel size or channel count.
    std::vector<int64_t> first(blocks + 1, 0), src_at, w_at;
    for (int64_t blk = 0; blk < blocks; ++blk) {
      first[blk] = static_cast<int64_t>(src_at.size());
      for (int64_t t = 0; t < taps; ++t)
        for (int64_t c = pk->lo[blk * taps + t]; c < pk->hi[blk * taps + t]; ++c) {
          src_at.push_back((*offset)[t] + c * plane);
          w_at.push_back(((blk * taps + t) * inputs + c) * kBlock);
        }
    }
    first[blocks] = static_cast<int64_t>(src_at.size());
    const int64_t work = work_of({images, outputs, height, width, inputs, taps});
    parallel_for_work(images * blocks * height, work, [&](int64_t task) {
      const int64_t i = task % height, blk = (task / height) % blocks, b = task / (height * blocks);
      const T* in_row = in + b * image_stride + i * row_stride;
      for (int64_t j0 = 0; j0 < width; j0 += kTiles * L) {
        vec acc[kBlock][kTiles];
        for (int o = 0; o < kBlock; ++o)
          for (int u = 0; u < kTiles; ++u) acc[o][u] = vec{};
        const T* src = in_row + j0;
        const T* w = pk->w.get();
        for (int64_t n = first[blk]; n < first[blk + 1]; ++n) {
          vec x[kTiles];
          for (int u = 0; u < kTiles; ++u) x[u] = S::load(src + src_at[n] + u * L);
          const T* wc = w + w_at[n];
          for (int o = 0; o < kBlock; ++o)
            for (int u = 0; u < kTiles; ++u) acc[o][u] += wc[o] * x[u];
        }
        const int64_t n = std::min<int64_t>(kTiles * L, width - j0);
        for (int o = 0; o < kBlock && blk * kBlock + o < outputs; ++o) {
          const int64_t oc = blk * kBlock + o;
          if (bias)
            for (int u = 0; u < kTiles; ++u) acc[o][u] += bias[oc];
          // The row's tail tile stores only its n real columns: a vector copy either way.
          std::memcpy(out + ((b * outputs + oc) * height + i) * width + j0, acc[o], n * sizeof(T));
        }
      }
    });
  }
};

// x padded for forward and grad_weight: rows above, columns both sides.
template <typename T>
const T* padded_input(const T* x, const ConvShape& s, const Geometry& g) {
  return padded(kInputSlot, x, s.batch, s.in_channels, s.in_channels, s.height, s.width, g.pad, g.left, g.padded_rows,
                g.padded_width);
}

// Where, from output (i, j) at padded (i, j), tap t reads x.
std::vector<int64_t> input_offsets(const ConvShape& s, const Geometry& g) {
  std::vector<int64_t> offset(g.taps());
  for (int64_t t = 0; t < g.taps(); ++t)
    offset[t] = s.dilation * g.ky[t] * g.padded_width + g.left - g.pad + s.dilation * g.kx[t];
  return offset;
}

// The NaN rule (the reference's): a masked tap or a tap outside the image is not read at all. The fast
// kernels above multiply zeros in instead (masked weights packed as zeros, the zero border, zero lanes past
// the width), which gives the same sums unless a zero meets an inf or NaN (0 * inf = NaN). So a call whose
// operands are all finite takes the fast kernels, and any other takes the exact ones below, which visit only
// the kept taps inside the image.
template <typename T>
bool all_finite(const T* p, int64_t n) {
  T acc = 0;  // x * 0 is NaN exactly when x is inf or NaN
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += p[i] * T(0);
  return acc == acc;
}

// The rows (or columns) [lo, hi) of an output of extent n whose tap at offset `shift` lands inside the input.
struct Span {
  int64_t lo, hi;
  Span(int64_t n, int64_t shift) : lo(std::max<int64_t>(0, -shift)), hi(std::min<int64_t>(n, n - shift)) {}
};

template <typename T>
struct ExactTaps {
  const ConvShape& s;
  const T* w;
  int64_t c() const { return s.kernel_size / 2; }
  int64_t end(int64_t ky, int64_t kx, int64_t oc) const {
    return in_channel_end(ky, kx, oc, s.kernel_size, s.mask_b, s.in_channels, s.out_channels, s.groups);
  }
  T weight(int64_t oc, int64_t ic, int64_t ky, int64_t kx) const {
    return w[((oc * s.in_channels + ic) * s.kernel_size + ky) * s.kernel_size + kx];
  }
  // Output (i, j) reads input (i + dy, j + dx) through tap (ky, kx).
  int64_t dy(int64_t ky) const { return s.dilation * (ky - c()); }
  int64_t dx(int64_t kx) const { return s.dilation * (kx - c()); }
};

template <typename T>
void forward_exact(const ForwardArgs& a) {
  const ConvShape& s = a.s;
  const ExactTaps<T> taps{s, static_cast<const T*>(a.weight)};
  const T* x = static_cast<const T*>(a.x);
  const T* bias = static_cast<const T*>(a.bias);
  T* y = static_cast<T*>(a.y);
  const int64_t H = s.height, W = s.width, k = s.kernel_size;
  parallel_for_work(s.batch * s.out_channels, work_of({s.batch, s.out_channels, H, W, s.in_channels, k, k}),
                    [&](int64_t bo) {
                      const int64_t b = bo / s.out_channels, oc = bo % s.out_channels;
                      T* yo = y + bo * H * W;
                      std::fill(yo, yo + H * W, T(0));
                      for (int64_t ky = 0; ky < k; ++ky)
                        for (int64_t kx = 0; kx < k; ++kx) {
                          const int64_t dy = taps.dy(ky), dx = taps.dx(kx);
                          const Span rows(H, dy), cols(W, dx);
                          for (int64_t ic = 0; ic < taps.end(ky, kx, oc); ++ic) {
                            const T wv = taps.weight(oc, ic, ky, kx);
                            const T* xp = x + (b * s.in_channels + ic) * H * W;
                            for (int64_t i = rows.lo; i < rows.hi; ++i)
                              for (int64_t j = cols.lo; j < cols.hi; ++j)
                                yo[i * W + j] += wv * xp[(i + dy) * W + j + dx];
                          }
                        }
                      if (bias)
                        for (int64_t p = 0; p < H * W; ++p) yo[p] += bias[oc];
                    });
}

template <typename T>
void grad_input_exact(const GradInputArgs& a) {
  const ConvShape& s = a.s;
  const ExactTaps<T> taps{s, static_cast<const T*>(a.weight)};
  const T* gy = static_cast<const T*>(a.grad_y);
  T* gx = static_cast<T*>(a.grad_x);
  const int64_t H = s.height, W = s.width, k = s.kernel_size;
  parallel_for_work(s.batch * s.in_channels, work_of({s.batch, s.out_channels, H, W, s.in_channels, k, k}),
                    [&](int64_t bc) {
                      const int64_t b = bc / s.in_channels, ic = bc % s.in_channels;
                      T* gxp = gx + bc * H * W;
                      std::fill(gxp, gxp + H * W, T(0));
                      for (int64_t oc = 0; oc < s.out_channels; ++oc)
                        for (int64_t ky = 0; ky < k; ++ky)
                          for (int64_t kx = 0; kx < k; ++kx) {
                            if (ic >= taps.end(ky, kx, oc)) continue;
                            const int64_t dy = taps.dy(ky), dx = taps.dx(kx);
                            const Span rows(H, dy), cols(W, dx);
                            const T wv = taps.weight(oc, ic, ky, kx);
                            const T* g = gy + (b * s.out_channels + oc) * H * W;
                            for (int64_t i = rows.lo; i < rows.hi; ++i)
                              for (int64_t j = cols.lo; j < cols.hi; ++j)
                                gxp[(i + dy) * W + j + dx] += wv * g[i * W + j];
                          }
                    });
}

template <typename T>
void grad_bias(const GradWeightArgs& a);

template <typename T>
void grad_weight_exact(const GradWeightArgs& a) {
  const ConvShape& s = a.s;
  const ExactTaps<T> taps{s, nullptr};
  const T* x = static_cast<const T*>(a.x);
  const T* gy = static_cast<const T*>(a.grad_y);
  T* gw = static_cast<T*>(a.grad_weight);
  const int64_t H = s.height, W = s.width, k = s.kernel_size;
  if (a.grad_bias) grad_bias<T>(a);
  parallel_for_work(s.out_channels * s.in_channels, work_of({s.batch, s.out_channels, H, W, s.in_channels, k, k}),
                    [&](int64_t oi) {
                      const int64_t oc = oi / s.in_channels, ic = oi % s.in_channels;
                      for (int64_t ky = 0; ky < k; ++ky)
                        for (int64_t kx = 0; kx < k; ++kx) {
                          T total = 0;  // masked taps: exactly zero, never computed
                          if (ic < taps.end(ky, kx, oc)) {
                            const int64_t dy = taps.dy(ky), dx = taps.dx(kx);
                            const Span rows(H, dy), cols(W, dx);
                            for (int64_t b = 0; b < s.batch; ++b) {
                              const T* xp = x + (b * s.in_channels + ic) * H * W;
                              const T* g = gy + (b * s.out_channels + oc) * H * W;
                              for (int64_t i = rows.lo; i < rows.hi; ++i)
                                for (int64_t j = cols.lo; j < cols.hi; ++j)
                                  total += g[i * W + j] * xp[(i + dy) * W + j + dx];
                            }
                          }
                          gw[(oi * k + ky) * k + kx] = total;
                        }
                    });
}

int64_t numel(const ConvShape& s, int64_t channels) { return s.batch * channels * s.height * s.width; }
int64_t weight_numel(const ConvShape& s) { return s.out_channels * s.in_channels * s.kernel_size * s.kernel_size; }

template <typename T>
struct ForwardKernel {
  static void run(const ForwardArgs& a) {
    const ConvShape& s = a.s;
    if (!all_finite(static_cast<const T*>(a.x), numel(s, s.in_channels)) ||
        !all_finite(static_cast<const T*>(a.weight), weight_numel(s)))
      return forward_exact<T>(a);
    const Geometry g(s, Simd<T>::kLanes);
    const T* w = static_cast<const T*>(a.weight);
    const int64_t k = s.kernel_size;
    const Packed<T> pk = pack<T>(
        s.out_channels, s.in_channels, g.taps(),
        [&](int64_t oc, int64_t ic, int64_t t) {
          return ic < in_channel_end(g.ky[t], g.kx[t], oc, k, s.mask_b, s.in_channels, s.out_channels, s.groups);
        },
        [&](int64_t oc, int64_t ic, int64_t t) { return w[((oc * s.in_channels + ic) * k + g.ky[t]) * k + g.kx[t]]; });
    const auto x = padded_input(static_cast<const T*>(a.x), s, g);
    const std::vector<int64_t> offset = input_offsets(s, g);
    const int64_t plane = g.padded_rows * g.padded_width;
    Direct<T>{x,
              s.in_channels * plane,
              plane,
              g.padded_width,
              s.in_channels,
              &pk,
              &offset,
              static_cast<const T*>(a.bias),
              static_cast<T*>(a.y),
              s.batch,
              s.out_channels,
              s.height,
              s.width}
        .run();
  }
};

// grad_y padded for grad_input: rows below (the transposed taps look down), columns both sides.
template <typename T>
const T* padded_grad(const T* grad_y, const ConvShape& s, const Geometry& g) {
  return padded(kGradSlot, grad_y, s.batch, s.out_channels, s.out_channels, s.height, s.width, 0, g.left, g.padded_rows,
                g.padded_width);
}

template <typename T>
struct GradInputKernel {
  static void run(const GradInputArgs& a) {
    const ConvShape& s = a.s;
    if (!all_finite(static_cast<const T*>(a.grad_y), numel(s, s.out_channels)) ||
        !all_finite(static_cast<const T*>(a.weight), weight_numel(s)))
      return grad_input_exact<T>(a);
    const Geometry g(s, Simd<T>::kLanes);
    const T* w = static_cast<const T*>(a.weight);
    const int64_t k = s.kernel_size, d = s.dilation, c = k / 2;
    const Packed<T> pk = pack<T>(
        s.in_channels, s.out_channels, g.taps(),
        [&](int64_t ic, int64_t oc, int64_t t) {
          return ic < in_channel_end(g.ky[t], g.kx[t], oc, k, s.mask_b, s.in_channels, s.out_channels, s.groups);
        },
        [&](int64_t ic, int64_t oc, int64_t t) { return w[((oc * s.in_channels + ic) * k + g.ky[t]) * k + g.kx[t]]; });
    const auto gy = padded_grad(static_cast<const T*>(a.grad_y), s, g);
    std::vector<int64_t> offset(g.taps());
    for (int64_t t = 0; t < g.taps(); ++t) offset[t] = d * (c - g.ky[t]) * g.padded_width + g.left + d * (c - g.kx[t]);
    const int64_t plane = g.padded_rows * g.padded_width;
    Direct<T>{gy,      s.out_channels * plane,    plane,   g.padded_width, s.out_channels, &pk,    &offset,
              nullptr, static_cast<T*>(a.grad_x), s.batch, s.in_channels,  s.height,       s.width}
        .run();
  }
};

// grad_weight with output channels along the vector lanes: grad_y is transposed to (B, H, W, C_out) so one
// pixel's block of outputs is two vectors, and each input channel's pixel value is a broadcast. A task owns
// a block of outputs and a block of kInputs inputs; its accumulators for every tap live in memory and are
// brought into registers for kRows rows of one image at a time, while those rows sit in L1.
constexpr int64_t kRows = 4;
constexpr int kInputs = 8;
constexpr int kOutVecs = 2;

template <typename T, int NI>
struct GradWeightRows {
  using S = Simd<T>;
  using vec = typename S::vec;
  // acc[NI][kOutVecs] += x[q](pixel + offset) * gyt[pixel], over `rows` rows of `width` pixels.
  static void run(vec* acc, const T* x0, int64_t plane, int64_t row_stride, int64_t offset, const T* g0,
                  int64_t g_stride, int64_t rows, int64_t width) {
    vec sum[NI][kOutVecs];
    for (int q = 0; q < NI; ++q)
      for (int v = 0; v < kOutVecs; ++v) sum[q][v] = acc[q * kOutVecs + v];
    for (int64_t r = 0; r < rows; ++r) {
      const T* xr = x0 + r * row_stride + offset;
      const T* gr = g0 + r * width * g_stride;
      for (int64_t j = 0; j < width; ++j) {
        vec gv[kOutVecs];
        for (int v = 0; v < kOutVecs; ++v) gv[v] = S::load(gr + j * g_stride + v * S::kLanes);
        for (int q = 0; q < NI; ++q) {
          const T xs = xr[q * plane + j];
          for (int v = 0; v < kOutVecs; ++v) sum[q][v] += xs * gv[v];
        }
      }
    }
    for (int q = 0; q < NI; ++q)
      for (int v = 0; v < kOutVecs; ++v) acc[q * kOutVecs + v] = sum[q][v];
  }
};

// The same sums for one input channel and NT taps at once (few input channels, as in a first layer on
// pixels): the grad_y vectors of a pixel serve every tap. acc of tap n is acc + n * acc_stride.
template <typename T, int NT>
struct GradWeightTaps {
  using S = Simd<T>;
  using vec = typename S::vec;
  static void run(vec* acc, int64_t acc_stride, const T* x0, int64_t row_stride, const int64_t* offset, const T* g0,
                  int64_t g_stride, int64_t rows, int64_t width) {
    vec sum[NT][kOutVecs];
    for (int n = 0; n < NT; ++n)
      for (int v = 0; v < kOutVecs; ++v) sum[n][v] = acc[n * acc_stride + v];
    for (int64_t r = 0; r < rows; ++r) {
      const T* xr = x0 + r * row_stride;
      const T* gr = g0 + r * width * g_stride;
      for (int64_t j = 0; j < width; ++j) {
        vec gv[kOutVecs];
        for (int v = 0; v < kOutVecs; ++v) gv[v] = S::load(gr + j * g_stride + v * S::kLanes);
        for (int n = 0; n < NT; ++n) {
          const T xs = xr[offset[n] + j];
          for (int v = 0; v < kOutVecs; ++v) sum[n][v] += xs * gv[v];
        }
      }
    }
    for (int n = 0; n < NT; ++n)
      for (int v = 0; v < kOutVecs; ++v) acc[n * acc_stride + v] = sum[n][v];
  }
};

// grad_weight for few input channels (a first layer on pixels), with pixels along the vector lanes: no
// transposed copy of grad_y, whose size would dwarf the work. A task owns kFewOuts output channels and one
// input channel. Per image it stages those channels' grad_y planes with rows padded to whole tiles (zeros
// past the width), then for groups of up to kFewTaps taps keeps kFewOuts x taps vector sums in registers
// over the image; lanes are added at the end. grad_bias is summed from the staged rows by the tasks of
// input channel 0, so grad_y is read once. The order of every sum is fixed by the shapes alone.
constexpr int kFewOuts = 4;
constexpr int kFewTaps = 6;

template <typename T>
T lane_sum(const typename Simd<T>::vec& v) {
  alignas(kVectorBytes) T lanes[Simd<T>::kLanes];
  std::memcpy(lanes, &v, sizeof lanes);
  T total = 0;
  for (int64_t l = 0; l < Simd<T>::kLanes; ++l) total += lanes[l];
  return total;
}

template <typename T, int NT>
struct GradWeightPixelLanes {
  using S = Simd<T>;
  using vec = typename S::vec;
  // acc[o][n] += gys[o](row i, vector v) * x(row i + tap n's offset, vector v) over the image's rows.
  static void run(vec* acc, const T* gys, int64_t gy_plane, const T* x, const int64_t* offset, int64_t rows,
                  int64_t row_stride, int64_t tiled_width) {
    vec sum[kFewOuts][NT];
    for (int o = 0; o < kFewOuts; ++o)
      for (int n = 0; n < NT; ++n) sum[o][n] = acc[o * kFewTaps + n];
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < tiled_width; j += S::kLanes) {
        vec g[kFewOuts];
        for (int o = 0; o < kFewOuts; ++o) g[o] = S::load(gys + o * gy_plane + i * tiled_width + j);
        for (int n = 0; n < NT; ++n) {
          const vec xv = S::load(x + i * row_stride + offset[n] + j);
          for (int o = 0; o < kFewOuts; ++o) sum[o][n] += g[o] * xv;
        }
      }
    for (int o = 0; o < kFewOuts; ++o)
      for (int n = 0; n < NT; ++n) acc[o * kFewTaps + n] = sum[o][n];
  }
};

template <typename T>
void grad_weight_pixel_lanes(const GradWeightArgs& a, const Geometry& g, const T* x,
                             const std::vector<int64_t>& offset) {
  using S = Simd<T>;
  using vec = typename S::vec;
  const ConvShape& s = a.s;
  const int64_t k = s.kernel_size, taps = g.taps(), plane = g.padded_rows * g.padded_width;
  const int64_t gy_plane = s.height * g.tiled_width;
  const int64_t out_blocks = (s.out_channels + kFewOuts - 1) / kFewOuts;
  const int64_t groups = (taps + kFewTaps - 1) / kFewTaps;
  const T* grad_y = static_cast<const T*>(a.grad_y);
  T* gw = static_cast<T*>(a.grad_weight);
  const int64_t work = work_of({s.batch, s.height, g.tiled_width, s.out_channels, s.in_channels, taps});
  parallel_for_work(out_blocks * s.in_channels, work, [&](int64_t task) {
    const int64_t oc0 = (task / s.in_channels) * kFewOuts, ic = task % s.in_channels;
    const int64_t outs = std::min<int64_t>(kFewOuts, s.out_channels - oc0);
    Buffer<T> staged = cpu::allocate_aligned<T>(kFewOuts * gy_plane);
    std::fill(staged.get(), staged.get() + kFewOuts * gy_plane, T(0));
    std::vector<vec> acc(groups * kFewOuts * kFewTaps, vec{});
    const bool bias = a.grad_bias && ic == 0;
    vec bias_sum[kFewOuts] = {};
    for (int64_t b = 0; b < s.batch; ++b) {
      for (int64_t o = 0; o < outs; ++o) {
        T* plane_o = staged.get() + o * gy_plane;
        for (int64_t i = 0; i < s.height; ++i) {
          const T* src = grad_y + ((b * s.out_channels + oc0 + o) * s.height + i) * s.width;
          std::copy(src, src + s.width, plane_o + i * g.tiled_width);
        }
        if (bias)  // the staged plane is whole vectors, zeros past the width
          for (int64_t e = 0; e < gy_plane; e += S::kLanes) bias_sum[o] += S::load(plane_o + e);
      }
      const T* xb = x + (b * s.in_channels + ic) * plane;
      for (int64_t grp = 0; grp < groups; ++grp) {
        vec* ga = &acc[grp * kFewOuts * kFewTaps];
        const int64_t* off = &offset[grp * kFewTaps];
        const auto run = [&](auto nt) {
          GradWeightPixelLanes<T, decltype(nt)::value>::run(ga, staged.get(), gy_plane, xb, off, s.height,
                                                            g.padded_width, g.tiled_width);
        };
        switch (std::min<int64_t>(kFewTaps, taps - grp * kFewTaps)) {
          case 6:
            run(std::integral_constant<int, 6>{});
            break;
          case 5:
            run(std::integral_constant<int, 5>{});
            break;
          case 4:
            run(std::integral_constant<int, 4>{});
            break;
          case 3:
            run(std::integral_constant<int, 3>{});
            break;
          case 2:
            run(std::integral_constant<int, 2>{});
            break;
          default:
            run(std::integral_constant<int, 1>{});
            break;
        }
      }
    }
    for (int64_t o = 0; o < outs; ++o) {
      const int64_t oc = oc0 + o;
      if (bias) static_cast<T*>(a.grad_bias)[oc] = lane_sum<T>(bias_sum[o]);
      T* dst = gw + (oc * s.in_channels + ic) * k * k;
      std::fill(dst, dst + k * k, T(0));  // masked taps: zero gradient
      for (int64_t t = 0; t < taps; ++t) {
        if (ic >= in_channel_end(g.ky[t], g.kx[t], oc, k, s.mask_b, s.in_channels, s.out_channels, s.groups)) continue;
        dst[g.ky[t] * k + g.kx[t]] = lane_sum<T>(acc[(t / kFewTaps * kFewOuts + o) * kFewTaps + t % kFewTaps]);
      }
    }
  });
}

template <typename T>
void grad_bias(const GradWeightArgs& a) {
  const ConvShape& s = a.s;
  const T* grad_y = static_cast<const T*>(a.grad_y);
  T* gb = static_cast<T*>(a.grad_bias);
  const int64_t hw = s.height * s.width;
  parallel_for_work(s.out_channels, work_of({s.out_channels, s.batch, hw}), [&](int64_t oc) {
    T total = 0;
    for (int64_t b = 0; b < s.batch; ++b) {
      const T* src = grad_y + (b * s.out_channels + oc) * hw;
      T part = 0;
#pragma omp simd reduction(+ : part)
      for (int64_t j = 0; j < hw; ++j) part += src[j];
      total += part;
    }
    gb[oc] = total;
  });
}

template <typename T>
struct GradWeightKernel {
  static void run(const GradWeightArgs& a) {
    using S = Simd<T>;
    using vec = typename S::vec;
    constexpr int64_t L = S::kLanes, kOuts = kOutVecs * L;
    const ConvShape& s = a.s;
    if (!all_finite(static_cast<const T*>(a.grad_y), numel(s, s.out_channels)) ||
        !all_finite(static_cast<const T*>(a.x), numel(s, s.in_channels)))
      return grad_weight_exact<T>(a);
    const Geometry g(s, L);
    const int64_t k = s.kernel_size, taps = g.taps(), hw = s.height * s.width;
    const int64_t plane = g.padded_rows * g.padded_width;
    const T* x = padded_input(static_cast<const T*>(a.x), s, g);
    const std::vector<int64_t> offset = input_offsets(s, g);
    if (s.in_channels < kInputs) {
      grad_weight_pixel_lanes(a, g, x, offset);
      return;
    }
    if (a.grad_bias) grad_bias<T>(a);
    // grad_y transposed to (B, H, W, C_out rounded up to whole blocks), zero beyond C_out.
    const int64_t outs = round_up(s.out_channels, kOuts);
    T* gyt = scratch<T>(kGradSlot, s.batch * hw * outs);
    const T* grad_y = static_cast<const T*>(a.grad_y);
    parallel_for_work(s.batch * s.height, work_of({s.batch, hw, outs}), [&](int64_t bi) {
      const int64_t b = bi / s.height, i = bi % s.height;
      T* dst = gyt + bi * s.width * outs;
      // Reads along rows, writes within this row's small (W x outs) tile: both stay in cache.
      for (int64_t oc = 0; oc < s.out_channels; ++oc) {
        const T* src = grad_y + ((b * s.out_channels + oc) * s.height + i) * s.width;
        for (int64_t j = 0; j < s.width; ++j) dst[j * outs + oc] = src[j];
      }
      for (int64_t j = 0; j < s.width; ++j) std::fill(dst + j * outs + s.out_channels, dst + (j + 1) * outs, T(0));
    });
    T* gw = static_cast<T*>(a.grad_weight);
    const int64_t out_blocks = outs / kOuts, in_blocks = (s.in_channels + kInputs - 1) / kInputs;
    const int64_t work = work_of({s.batch, hw, outs, s.in_channels, taps});
    parallel_for_work(out_blocks * in_blocks, work, [&](int64_t task) {
      const int64_t ob = task / in_blocks, ic0 = (task % in_blocks) * kInputs;
      const int64_t inputs = std::min<int64_t>(kInputs, s.in_channels - ic0);
      std::vector<vec> acc(taps * kInputs * kOutVecs, vec{});
      for (int64_t b = 0; b < s.batch; ++b)
        for (int64_t i0 = 0; i0 < s.height; i0 += kRows) {
          const int64_t rows = std::min(kRows, s.height - i0);
          const T* g0 = gyt + ((b * s.height + i0) * s.width) * outs + ob * kOuts;
          if (inputs == kInputs) {
            const T* x0 = x + (b * s.in_channels + ic0) * plane + i0 * g.padded_width;
            for (int64_t t = 0; t < taps; ++t)
              GradWeightRows<T, kInputs>::run(&acc[t * kInputs * kOutVecs], x0, plane, g.padded_width, offset[t], g0,
                                              outs, rows, s.width);
            continue;
          }
          // A partial block of inputs: one channel at a time, taps in groups.
          constexpr int64_t stride = kInputs * kOutVecs;
          for (int64_t q = 0; q < inputs; ++q) {
            const T* x0 = x + (b * s.in_channels + ic0 + q) * plane + i0 * g.padded_width;
            int64_t t = 0;
            for (; t + kInputs <= taps; t += kInputs)
              GradWeightTaps<T, kInputs>::run(&acc[(t * kInputs + q) * kOutVecs], stride, x0, g.padded_width,
                                              &offset[t], g0, outs, rows, s.width);
            for (; t < taps; ++t)
              GradWeightTaps<T, 1>::run(&acc[(t * kInputs + q) * kOutVecs], stride, x0, g.padded_width, &offset[t], g0,
                                        outs, rows, s.width);
          }
        }
      for (int64_t q = 0; q < inputs; ++q) {
        const int64_t ic = ic0 + q;
        for (int64_t o = 0; o < kOuts; ++o) {
          const int64_t oc = ob * kOuts + o;
          if (oc >= s.out_channels) break;
          T* dst = gw + (oc * s.in_channels + ic) * k * k;
          std::fill(dst, dst + k * k, T(0));  // masked taps: zero gradient
          for (int64_t t = 0; t < taps; ++t) {
            if (ic >= in_channel_end(g.ky[t], g.kx[t], oc, k, s.mask_b, s.in_channels, s.out_channels, s.groups))
              continue;
            alignas(kVectorBytes) T lanes[L];
            std::memcpy(lanes, &acc[(t * kInputs + q) * kOutVecs + o / L], sizeof lanes);
            dst[g.ky[t] * k + g.kx[t]] = lanes[o % L];
          }
        }
      }
    });
  }
};

}  // namespace

void forward_cpu(const ForwardArgs& a) { cpu::dispatch_float<ForwardKernel>(a.dtype, a); }
void grad_input_cpu(const GradInputArgs& a) { cpu::dispatch_float<GradInputKernel>(a.dtype, a); }
void grad_weight_cpu(const GradWeightArgs& a) { cpu::dispatch_float<GradWeightKernel>(a.dtype, a); }

}  // namespace masked_conv
}  // namespace gk
