// CPU kernels of the masked_conv family: direct convolution over the kept taps only.
//
// The input is first copied into a zero-bordered buffer whose rows are padded to a whole number of register
// tiles, so the inner loops need no bounds tests and never read outside an array. Forward and grad_input
// are one kernel: a block of output channels times a tile of a row accumulates in registers over (kept
// tap, input channel), with the weights packed per block so that entries masked by a colour group are
// zeros and whole masked taps are not visited at all. grad_weight gives each task one input channel and
// one block of output channels, and sums over (image, row, column) in a fixed order: no atomics, and the
// same bits whatever the thread count.
#include "../masked_conv.h"

#include <algorithm>
#include <cstring>
#include <memory>
#include <vector>

#include "../common/masked_conv.h"
#include "parallel.h"

namespace gk {
namespace masked_conv {
namespace {

constexpr int64_t kVectorBytes = 64;
constexpr int kBlock = 8;  // output channels per register block
constexpr int kTiles = 2;  // vectors along a row per register block: 8 x 2 accumulators

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

// Where the padded buffers put things, and which taps any output channel reads.
struct Geometry {
  int64_t pad, tile, tiled_width, padded_width, padded_rows;
  std::vector<int64_t> ky, kx;  // the visited taps, raster order

  Geometry(const ConvShape& s, int64_t lanes) {
    const int64_t k = s.kernel_size, c = k / 2;
    pad = s.dilation * c;
    tile = kTiles * lanes;
    tiled_width = round_up(std::max<int64_t>(s.width, 1), tile);
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
std::unique_ptr<T[]> padded(const T* src, int64_t images, int64_t channels, int64_t channels_out, int64_t height,
                            int64_t width, int64_t top, int64_t left, int64_t rows_out, int64_t width_out) {
  const int64_t plane = rows_out * width_out;
  std::unique_ptr<T[]> dst(new T[images * channels_out * plane]);
  cpu::parallel_for(images * channels_out, [&](int64_t p) {
    const int64_t b = p / channels_out, ch = p % channels_out;
    T* d = dst.get() + p * plane;
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
  std::unique_ptr<T[]> w;
  std::vector<int64_t> lo, hi;
};

// value(o, i, t) gives the weight of output o from input i at visited tap t, or 0 where masked.
template <typename T, typename Kept, typename Value>
Packed<T> pack(int64_t outputs, int64_t inputs, int64_t taps, Kept kept, Value value) {
  const int64_t blocks = (outputs + kBlock - 1) / kBlock;
  Packed<T> p{std::unique_ptr<T[]>(new T[std::max<int64_t>(blocks * taps * inputs * kBlock, 1)]),
              std::vector<int64_t>(blocks * taps, 0), std::vector<int64_t>(blocks * taps, 0)};
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
    cpu::parallel_for(images * blocks * height, [&](int64_t task) {
      const int64_t i = task % height, blk = (task / height) % blocks, b = task / (height * blocks);
      const T* in_row = in + b * image_stride + i * row_stride;
      for (int64_t j0 = 0; j0 < width; j0 += kTiles * L) {
        vec acc[kBlock][kTiles];
        for (int o = 0; o < kBlock; ++o)
          for (int u = 0; u < kTiles; ++u) acc[o][u] = vec{};
        for (int64_t t = 0; t < taps; ++t) {
          const int64_t lo = pk->lo[blk * taps + t], hi = pk->hi[blk * taps + t];
          const T* src = in_row + (*offset)[t] + j0;
          const T* w = pk->w.get() + (blk * taps + t) * inputs * kBlock;
          for (int64_t c = lo; c < hi; ++c) {
            vec x[kTiles];
            for (int u = 0; u < kTiles; ++u) x[u] = S::load(src + c * plane + u * L);
            const T* wc = w + c * kBlock;
            for (int o = 0; o < kBlock; ++o)
              for (int u = 0; u < kTiles; ++u) acc[o][u] += wc[o] * x[u];
          }
        }
        const int64_t n = std::min<int64_t>(kTiles * L, width - j0);
        for (int o = 0; o < kBlock && blk * kBlock + o < outputs; ++o) {
          const int64_t oc = blk * kBlock + o;
          alignas(kVectorBytes) T row[kTiles * L];
          std::memcpy(row, acc[o], sizeof row);
          const T b0 = bias ? bias[oc] : T(0);
          T* dst = out + ((b * outputs + oc) * height + i) * width + j0;
          for (int64_t j = 0; j < n; ++j) dst[j] = row[j] + b0;
        }
      }
    });
  }
};

template <typename T>
struct ForwardKernel {
  static void run(const ForwardArgs& a) {
    const ConvShape& s = a.s;
    const Geometry g(s, Simd<T>::kLanes);
    const T* w = static_cast<const T*>(a.weight);
    const int64_t k = s.kernel_size, d = s.dilation;
    const Packed<T> pk = pack<T>(
        s.out_channels, s.in_channels, g.taps(),
        [&](int64_t oc, int64_t ic, int64_t t) {
          return ic < in_channel_end(g.ky[t], g.kx[t], oc, k, s.mask_b, s.in_channels, s.out_channels, s.groups);
        },
        [&](int64_t oc, int64_t ic, int64_t t) { return w[((oc * s.in_channels + ic) * k + g.ky[t]) * k + g.kx[t]]; });
    const auto x = padded(static_cast<const T*>(a.x), s.batch, s.in_channels, s.in_channels, s.height, s.width, g.pad,
                          g.pad, g.padded_rows, g.padded_width);
    std::vector<int64_t> offset(g.taps());
    for (int64_t t = 0; t < g.taps(); ++t) offset[t] = d * g.ky[t] * g.padded_width + d * g.kx[t];
    const int64_t plane = g.padded_rows * g.padded_width;
    Direct<T>{x.get(), s.in_channels * plane, plane, g.padded_width, s.in_channels, &pk, &offset,
              static_cast<const T*>(a.bias), static_cast<T*>(a.y), s.batch, s.out_channels, s.height, s.width}
        .run();
  }
};

// grad_y padded for both backward kernels: rows below (the transposed taps look down), columns both sides,
// and output channels rounded up to a whole block of zero planes (grad_weight reads whole blocks).
template <typename T>
std::unique_ptr<T[]> padded_grad(const T* grad_y, const ConvShape& s, const Geometry& g) {
  return padded(grad_y, s.batch, s.out_channels, round_up(s.out_channels, kBlock), s.height, s.width, 0, g.pad,
                g.padded_rows, g.padded_width);
}

template <typename T>
struct GradInputKernel {
  static void run(const GradInputArgs& a) {
    const ConvShape& s = a.s;
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
    for (int64_t t = 0; t < g.taps(); ++t)
      offset[t] = d * (c - g.ky[t]) * g.padded_width + g.pad + d * (c - g.kx[t]);
    const int64_t plane = g.padded_rows * g.padded_width;
    Direct<T>{gy.get(), round_up(s.out_channels, kBlock) * plane, plane, g.padded_width, s.out_channels, &pk, &offset,
              nullptr, static_cast<T*>(a.grad_x), s.batch, s.in_channels, s.height, s.width}
        .run();
  }
};

// Rows of an image per step of grad_weight: their grad_y rows stay in L1 while every tap passes over them.
constexpr int64_t kRows = 4;

template <typename T>
struct GradWeightKernel {
  static void run(const GradWeightArgs& a) {
    using S = Simd<T>;
    using vec = typename S::vec;
    constexpr int64_t L = S::kLanes;
    const ConvShape& s = a.s;
    const Geometry g(s, L);
    const int64_t k = s.kernel_size, d = s.dilation, taps = g.taps();
    const int64_t plane = g.padded_rows * g.padded_width;
    const auto x = padded(static_cast<const T*>(a.x), s.batch, s.in_channels, s.in_channels, s.height, s.width, g.pad,
                          g.pad, g.padded_rows, g.padded_width);
    const int64_t gy_planes = round_up(s.out_channels, kBlock);
    const auto gy = padded_grad(static_cast<const T*>(a.grad_y), s, g);
    std::vector<int64_t> offset(taps);
    for (int64_t t = 0; t < taps; ++t) offset[t] = d * g.ky[t] * g.padded_width + d * g.kx[t];
    T* gw = static_cast<T*>(a.grad_weight);
    const int64_t blocks = gy_planes / kBlock;
    cpu::parallel_for(blocks * s.in_channels, [&](int64_t task) {
      const int64_t blk = task / s.in_channels, ic = task % s.in_channels;
      // Taps where some output of the block reads this input channel.
      std::vector<int64_t> live;
      for (int64_t t = 0; t < taps; ++t) {
        const int64_t last = std::min(s.out_channels, (blk + 1) * kBlock) - 1;  // ends grow with oc
        if (ic < in_channel_end(g.ky[t], g.kx[t], last, k, s.mask_b, s.in_channels, s.out_channels, s.groups))
          live.push_back(t);
      }
      std::vector<vec> acc(taps * kBlock, vec{});
      for (int64_t b = 0; b < s.batch; ++b)
        for (int64_t i0 = 0; i0 < s.height; i0 += kRows) {
          const int64_t rows = std::min(kRows, s.height - i0);
          const T* g0 = gy.get() + (b * gy_planes + blk * kBlock) * plane + i0 * g.padded_width + g.pad;
          const T* x0 = x.get() + (b * s.in_channels + ic) * plane + i0 * g.padded_width;
          for (int64_t t : live) {
            vec sum[kBlock];
            for (int o = 0; o < kBlock; ++o) sum[o] = acc[t * kBlock + o];
            for (int64_t r = 0; r < rows; ++r)
              for (int64_t j = 0; j < g.tiled_width; j += L) {
                const vec xv = S::load(x0 + offset[t] + r * g.padded_width + j);
                for (int o = 0; o < kBlock; ++o) sum[o] += S::load(g0 + o * plane + r * g.padded_width + j) * xv;
              }
            for (int o = 0; o < kBlock; ++o) acc[t * kBlock + o] = sum[o];
          }
        }
      for (int o = 0; o < kBlock; ++o) {
        const int64_t oc = blk * kBlock + o;
        if (oc >= s.out_channels) break;
        T* dst = gw + (oc * s.in_channels + ic) * k * k;
        std::fill(dst, dst + k * k, T(0));  // masked taps: zero gradient
        for (int64_t t : live) {
          if (ic >= in_channel_end(g.ky[t], g.kx[t], oc, k, s.mask_b, s.in_channels, s.out_channels, s.groups))
            continue;
          alignas(kVectorBytes) T lanes[L];
          std::memcpy(lanes, &acc[t * kBlock + o], sizeof lanes);
          T total = 0;
          for (int64_t l = 0; l < L; ++l) total += lanes[l];
          dst[g.ky[t] * k + g.kx[t]] = total;
        }
      }
    });
    if (a.grad_bias) {
      const T* grad_y = static_cast<const T*>(a.grad_y);
      T* gb = static_cast<T*>(a.grad_bias);
      const int64_t hw = s.height * s.width;
      cpu::parallel_for(s.out_channels, [&](int64_t oc) {
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
  }
};

}  // namespace

void forward_cpu(const ForwardArgs& a) { cpu::dispatch_float<ForwardKernel>(a.dtype, a); }
void grad_input_cpu(const GradInputArgs& a) { cpu::dispatch_float<GradInputKernel>(a.dtype, a); }
void grad_weight_cpu(const GradWeightArgs& a) { cpu::dispatch_float<GradWeightKernel>(a.dtype, a); }

}  // namespace masked_conv
}  // namespace gk
