// The masked_conv family on CUDA. The mask comes from common/masked_conv.h; this file maps work to threads.
//
// Forward and grad_input are one kernel, a shared-memory tiled direct convolution over the kept taps (the
// grad_input one is the transposed convolution: taps mirrored, looking down and right):
//   a block owns a tile of kTileH x kTileW output pixels of one image and a block of output channels;
//   per stage of input channels it stages in shared memory the input halo of the tile (rows above, never
//   below, for forward; rows below for grad_input) and the weights of every kept tap, zero where a colour
//   group masks them, so the weight's masked entries are never read. A thread accumulates kRows pixels of
//   one column times Oct output channels: a warp reads 32 consecutive pixels (no bank conflicts) and one
//   set of weights (a broadcast). Tiles whose halo cannot fit in shared memory (huge dilations) take a
//   plain kernel that reads global memory instead.
// grad_weight is a GEMM, grad_weight[o, (i, t)] = sum over pixels p of grad_y[o, p] * x[i, p shifted by
// tap t], tiled 64 x 64 with the pixel axis split into chunks that depend on the shape only; each (chunk,
// tile) block writes its partial sums, and a second kernel adds them in chunk order: no atomics, the same
// bits on every run and every GPU. The bias gradient rides along as the row sums of the grad_y tiles.
// Half types compute in float32; everything accumulates with explicit fused multiply-adds (the build uses
// --fmad=false for the other families' bit-exact math; the convolution has no such contract).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <type_traits>

#include "autoregressive/masked_conv_math.h"
#include "core/launch.cuh"
#include "autoregressive/masked_conv.h"

namespace gk {
namespace masked_conv {
namespace {

using namespace gpu::common;
using gpu::AsyncBuffer;

constexpr int kThreads = 256;

__device__ __forceinline__ float mad(float a, float b, float c) { return fmaf(a, b, c); }
__device__ __forceinline__ double mad(double a, double b, double c) { return fma(a, b, c); }

// N consecutive elements of shared memory in 16-byte loads (one 8-byte load for two floats); p must be
// aligned to the smaller of 16 bytes and N elements.
template <typename C>
struct alignas(16) Shared16 {
  C v[16 / sizeof(C)];
};
template <typename C>
struct alignas(8) Shared8 {
  C v[8 / sizeof(C)];
};
template <int N, typename C>
__device__ __forceinline__ void load_shared(const C* p, C (&out)[N]) {
  constexpr int bytes = N * sizeof(C);
  static_assert(bytes == 8 || bytes % 16 == 0, "8 bytes or whole 16-byte words");
  if constexpr (bytes == 8) {
    const Shared8<C> w = *reinterpret_cast<const Shared8<C>*>(p);
#pragma unroll
    for (int e = 0; e < N; ++e) out[e] = w.v[e];
  } else {
    constexpr int per = 16 / sizeof(C);
#pragma unroll
    for (int i = 0; i < N / per; ++i) {
      const Shared16<C> w = reinterpret_cast<const Shared16<C>*>(p)[i];
#pragma unroll
      for (int e = 0; e < per; ++e) out[i * per + e] = w.v[e];
    }
  }
}

// Taps visited, in raster order: every tap a mask keeps is one of the first c * k + c + 1 (rows above the
// centre, then the centre row up to the centre), tap t being (t / k, t % k). The centre is visited for
// mask B, and for mask A too when colour groups let later groups see earlier ones there.
int64_t visited_taps(const ConvShape& s) {
  const int64_t c = s.kernel_size / 2;
  return c * s.kernel_size + c + (s.mask_b || s.groups > 1 ? 1 : 0);
}

// ---------------------------------------------------------------------------------------------------------
// Forward and grad_input: out[b, o, i, j] = bias[o] + sum over kept (tap, q) of W(o, q, tap) * in[b, q, i', j']
// with (i', j') = (i, j) + dilation * (ky - c, kx - c) for forward (o: output channel, q: input channel),
// and (i, j) + dilation * (c - ky, c - kx) for grad_input (o: input channel, q: output channel).

template <typename S>
struct Direct {
  const S* in;                                   // (images, inputs, height, width)
  const S* weight;                               // (C_out, C_in, k, k)
  const S* bias;                                 // (outputs,) or null
  S* out;                                        // (images, outputs, height, width)
  int64_t images, height, width, dilation, pad;  // pad = dilation * (k / 2)
  // Channel counts, kernel size and taps are int (the entry points check they fit): 32-bit index math.
  int inputs, outputs;
  int in_channels, out_channels, groups;  // the convolution's, for the mask
  int kernel_size, taps;
  bool mask_b;
  // The tiled kernel only: input channels per stage, halo extent, tiles along a row, output blocks.
  int stage, halo_h, halo_w, tiles_w, out_blocks;
};

// W(o, q) at tap (ky, kx), zero where the mask drops it (or o, q lie beyond the channels): never read then.
template <bool Transposed, typename S>
__device__ __forceinline__ compute_t<S> masked_weight(const Direct<S>& a, int o, int q, int ky, int kx) {
  if (o >= a.outputs || q >= a.inputs) return compute_t<S>(0);
  const int oc = Transposed ? q : o, ic = Transposed ? o : q;
  if (ic >= in_channel_end(ky, kx, oc, a.kernel_size, a.mask_b, a.in_channels, a.out_channels, a.groups))
    return compute_t<S>(0);
  return load(a.weight, ((int64_t(oc) * a.in_channels + ic) * a.kernel_size + ky) * a.kernel_size + kx);
}

constexpr int kTileW = 32;                                        // a warp's lanes: one column each
constexpr int kRows = 4;                                          // rows per thread
constexpr int kTileH = 2 * kRows;                                 // two warps of kRows rows each
constexpr int kOutGroups = kThreads / (kTileW * kTileH / kRows);  // 4 groups of Oct output channels
constexpr int kMaxStage = 8;                                      // input channels per shared-memory stage, at most
constexpr size_t kDefaultSharedBytes = 48 * 1024;                 // dynamic shared memory without an opt-in
constexpr int64_t kMaxGridYZ = 65535;

// Grid: x over (column tile, block of output channels), y over row tiles, z over images; each strides on
// where a dimension has more than the grid holds.
template <typename S, int Oct, bool Transposed>
__global__ void __launch_bounds__(kThreads, 2) direct_tiled_kernel(Direct<S> a) {
  using C = compute_t<S>;
  constexpr int kBlockOut = kOutGroups * Oct;
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  C* w_s = reinterpret_cast<C*>(shared_bytes);   // [taps][stage][kBlockOut]
  C* in_s = w_s + a.taps * a.stage * kBlockOut;  // [stage][halo_h][halo_w]
  const int tid = threadIdx.x;
  const int group = tid / (kThreads / kOutGroups);  // warp-uniform: the warp's weights are a broadcast
  const int col = tid % kTileW;
  const int row0 = (tid % (kThreads / kOutGroups)) / kTileW * kRows;
  const int c = a.kernel_size / 2, k = a.kernel_size, d = static_cast<int>(a.dilation), taps = a.taps;
  const int weight_count = taps * a.stage * kBlockOut;
  const int plane = a.halo_h * a.halo_w;
  const int halo_count = a.stage * plane;
  // kThreads elements on in the halo: step_q planes, step_y rows (< halo_h) and step_x columns (< halo_w).
  const int step_x = kThreads % a.halo_w, step_y = kThreads / a.halo_w % a.halo_h, step_q = kThreads / plane;
  const int first_x = tid % a.halo_w, first_y = tid / a.halo_w % a.halo_h, first_q = tid / plane;
  const int64_t hw = a.height * a.width;
  for (int64_t b = blockIdx.z; b < a.images; b += gridDim.z)
    for (int64_t i0 = blockIdx.y * int64_t(kTileH); i0 < a.height; i0 += gridDim.y * int64_t(kTileH))
      for (int x = blockIdx.x; x < a.tiles_w * a.out_blocks; x += gridDim.x) {
        // Blocks of output channels vary fastest: neighbouring blocks read the same halo from L2.
        const int o0 = x % a.out_blocks * kBlockOut;
        const int64_t j0 = int64_t(x / a.out_blocks) * kTileW;
        const int64_t top = Transposed ? i0 : i0 - a.pad, left = j0 - a.pad;
        const S* in_b = a.in + b * a.inputs * hw;
        C acc[kRows][Oct];
#pragma unroll
        for (int r = 0; r < kRows; ++r)
#pragma unroll
          for (int o = 0; o < Oct; ++o) acc[r][o] = C(0);
        for (int q0 = 0; q0 < a.inputs; q0 += a.stage) {
          __syncthreads();  // the previous stage's (or tile's) readers are done with shared memory
          for (int e = tid; e < weight_count; e += kThreads) {
            const int o = e % kBlockOut, q = e / kBlockOut % a.stage, t = e / (kBlockOut * a.stage);
            w_s[e] = masked_weight<Transposed>(a, o0 + o, q0 + q, t / k, t % k);
          }
          // Element e = (q * halo_h + y) * halo_w + x, its coordinates stepped along with e (no divisions).
          int x_h = first_x, y_h = first_y, q = first_q;
          for (int e = tid; e < halo_count; e += kThreads) {
            const int64_t gi = top + y_h, gj = left + x_h;
            C v = C(0);
            if (q0 + q < a.inputs && gi >= 0 && gi < a.height && gj >= 0 && gj < a.width)
              v = load(in_b, (q0 + q) * hw + gi * a.width + gj);
            in_s[e] = v;
            x_h += step_x;
            y_h += step_y;
            q += step_q;
            if (x_h >= a.halo_w) x_h -= a.halo_w, ++y_h;
            if (y_h >= a.halo_h) y_h -= a.halo_h, ++q;
          }
          __syncthreads();
          for (int t = 0; t < taps; ++t) {
            const int ky = t / k, kx = t % k;
            // The tap's offset inside the halo from this thread's first pixel.
            const int dy = Transposed ? d * (c - ky) : d * ky, dx = Transposed ? d * (2 * c - kx) : d * kx;
            const C* wt = w_s + t * a.stage * kBlockOut + group * Oct;
            const C* xt = in_s + (row0 + dy) * a.halo_w + col + dx;
#pragma unroll 1
            for (int q = 0; q < a.stage; ++q) {
              C wv[Oct], xv[kRows];
              load_shared(wt + q * kBlockOut, wv);  // the warp's weights: a broadcast
#pragma unroll
              for (int r = 0; r < kRows; ++r) xv[r] = xt[q * plane + r * a.halo_w];
#pragma unroll
              for (int r = 0; r < kRows; ++r)
#pragma unroll
                for (int o = 0; o < Oct; ++o) acc[r][o] = mad(wv[o], xv[r], acc[r][o]);
            }
          }
        }
        const int64_t j = j0 + col;
#pragma unroll
        for (int o = 0; o < Oct; ++o) {
          const int oc = o0 + group * Oct + o;
          if (oc >= a.outputs || j >= a.width) continue;
          const C bias = a.bias ? load(a.bias, oc) : C(0);
          S* out = a.out + (b * a.outputs + oc) * hw;
#pragma unroll
          for (int r = 0; r < kRows; ++r) {
            const int64_t i = i0 + row0 + r;
            if (i < a.height) store(out, i * a.width + j, acc[r][o] + bias);
          }
        }
      }
}

// The same sums, a thread per output pixel and channel, reading global memory: for halos too large to
// stage. Grid: x over columns, y over rows, z over output channels; each thread walks the images.
template <typename S, bool Transposed>
__global__ void __launch_bounds__(kThreads) direct_global_kernel(Direct<S> a) {
  using C = compute_t<S>;
  const int c = a.kernel_size / 2;
  const int64_t hw = a.height * a.width;
  for (int o = blockIdx.z; o < a.outputs; o += gridDim.z)
    for (int64_t i = blockIdx.y; i < a.height; i += gridDim.y)
      for (int64_t j = blockIdx.x * int64_t(kThreads) + threadIdx.x; j < a.width; j += gridDim.x * int64_t(kThreads))
        for (int64_t b = 0; b < a.images; ++b) {
          C acc = C(0);
          for (int t = 0; t < a.taps; ++t) {
            const int ky = t / a.kernel_size, kx = t % a.kernel_size;
            const int64_t gi = Transposed ? i + a.dilation * (c - ky) : i + a.dilation * (ky - c);
            const int64_t gj = Transposed ? j + a.dilation * (c - kx) : j + a.dilation * (kx - c);
            if (gi < 0 || gi >= a.height || gj < 0 || gj >= a.width) continue;
            const S* in = a.in + b * a.inputs * hw + gi * a.width + gj;
            for (int q = 0; q < a.inputs; ++q)
              acc = mad(masked_weight<Transposed>(a, o, q, ky, kx), load(in, q * hw), acc);
          }
          store(a.out, (b * a.outputs + o) * hw + i * a.width + j, acc + (a.bias ? load(a.bias, o) : C(0)));
        }
}

int max_shared_bytes() {
  int device = 0, bytes = 0;
  gpu::check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  gpu::check_cuda(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
                  "cudaDeviceGetAttribute");
  return bytes;
}

unsigned grid_dim(int64_t n, int64_t cap) { return static_cast<unsigned>(std::max<int64_t>(1, std::min(n, cap))); }

template <typename S, bool Transposed>
void launch_direct(Direct<S> a, cudaStream_t stream, const char* what) {
  using C = compute_t<S>;
  const int64_t pad = a.pad;
  const double limit = max_shared_bytes();
  auto run = [&](auto oct) {
    constexpr int Oct = decltype(oct)::value;
    constexpr int kBlockOut = kOutGroups * Oct;
    // Shared memory for `stage` input channels a stage (in double: the halo grows with the dilation).
    auto bytes = [&](int stage) {
      return static_cast<double>(sizeof(C)) *
             (double(a.taps) * stage * kBlockOut + double(stage) * (kTileH + pad) * (kTileW + 2.0 * pad));
    };
    // As even a split of the inputs into stages of at most kMaxStage as there is, fewer channels a stage
    // where shared memory runs short.
    int stage = static_cast<int>(ceil_div(a.inputs, ceil_div(a.inputs, kMaxStage)));
    while (stage > 1 && bytes(stage) > limit) --stage;
    const int64_t tiles_w = ceil_div(a.width, kTileW), out_blocks = ceil_div(a.outputs, kBlockOut);
    if (bytes(stage) > limit || tiles_w * out_blocks > INT32_MAX) {
      const dim3 grid(grid_dim(ceil_div(a.width, kThreads), INT32_MAX), grid_dim(a.height, kMaxGridYZ),
                      grid_dim(a.outputs, kMaxGridYZ));
      gpu::launch(what, direct_global_kernel<S, Transposed>, grid, kThreads, 0, stream, a);
      return;
    }
    a.stage = stage;
    a.halo_h = static_cast<int>(kTileH + pad);
    a.halo_w = static_cast<int>(kTileW + 2 * pad);
    a.tiles_w = static_cast<int>(tiles_w);
    a.out_blocks = static_cast<int>(out_blocks);
    const size_t shared = static_cast<size_t>(bytes(stage));
    auto kernel = direct_tiled_kernel<S, Oct, Transposed>;
    if (shared > kDefaultSharedBytes)
      gpu::check_cuda(
          cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared)), what);
    const dim3 grid(grid_dim(tiles_w * out_blocks, INT32_MAX), grid_dim(ceil_div(a.height, kTileH), kMaxGridYZ),
                    grid_dim(a.images, kMaxGridYZ));
    gpu::launch(what, kernel, grid, kThreads, shared, stream, a);
  };
  // Few output channels (a last layer to RGB logits, say) would leave most of a 32-channel block idle;
  // float64 accumulators take two registers each, so there a thread keeps 4 channels, not 8.
  if (a.outputs <= 2 * kOutGroups)
    run(std::integral_constant<int, 2>{});
  else
    run(std::integral_constant<int, sizeof(C) == 8 ? 4 : 8>{});
}

// The kernels index channels, taps and groups in 32 bits.
void check_int_sizes(const ConvShape& s) {
  const int64_t c = s.kernel_size / 2;
  if (s.in_channels > INT32_MAX || s.out_channels > INT32_MAX || (c + 1) * s.kernel_size > INT32_MAX)
    throw ValueError("masked_conv on CUDA: channel counts and kernel size must stay below 2^31");
}

template <typename S>
Direct<S> direct_args(const ConvShape& s, const void* in, const void* weight, const void* bias, void* out,
                      bool transposed) {
  check_int_sizes(s);
  Direct<S> a{};
  a.in = static_cast<const S*>(in);
  a.weight = static_cast<const S*>(weight);
  a.bias = static_cast<const S*>(bias);
  a.out = static_cast<S*>(out);
  a.images = s.batch;
  a.height = s.height;
  a.width = s.width;
  a.dilation = s.dilation;
  a.pad = s.dilation * (s.kernel_size / 2);
  a.in_channels = static_cast<int>(s.in_channels);
  a.out_channels = static_cast<int>(s.out_channels);
  a.inputs = transposed ? a.out_channels : a.in_channels;
  a.outputs = transposed ? a.in_channels : a.out_channels;
  a.groups = static_cast<int>(s.groups);
  a.kernel_size = static_cast<int>(s.kernel_size);
  a.taps = static_cast<int>(visited_taps(s));
  a.mask_b = s.mask_b;
  return a;
}

// ---------------------------------------------------------------------------------------------------------
// grad_weight: partial[chunk, o, n] = sum over the chunk's pixels p of grad_y[o, p] * X[n, p], with
// n = i * taps + t and X[n, p] = x[i] at p shifted by tap t (zero outside the image); bias_partial[chunk, o]
// = sum over the chunk of grad_y[o, p]. Pixels p run over (image, row, column).

constexpr int kGemmM = 64, kGemmN = 64, kGemmK = 16;  // block tile: output channels x columns x pixels
constexpr int kGemmSub = 4;                           // each thread: 4 x 4 outputs, strided by 16
constexpr int64_t kTargetItems = 1024;                // (chunk, tile) blocks to aim for: a few waves of any GPU
constexpr int64_t kMinChunk = 512;                    // pixels per chunk, at least

template <typename S>
struct WeightGrad {
  using C = compute_t<S>;
  const S* grad_y;  // (batch, C_out, H, W)
  const S* x;       // (batch, C_in, H, W)
  C* partial;       // (chunks, C_out, columns)
  C* bias_partial;  // (chunks, C_out) or null
  int64_t in_channels, out_channels, height, width, pixels, columns;
  int64_t kernel_size, dilation, taps, chunk, chunks, m_tiles, n_tiles;
};

template <typename S>
__global__ void __launch_bounds__(kThreads) weight_grad_kernel(WeightGrad<S> a) {
  using C = compute_t<S>;
  static_assert(kThreads == kGemmK * (kGemmM / kGemmSub) && kThreads == (kGemmM / kGemmSub) * (kGemmN / kGemmSub),
                "one element of each tile per thread and step");
  // Rows padded by 4 elements: the loads write along the pixel axis, 16 rows apart (at most 2-way bank
  // conflicts), and each row stays 16-byte aligned for the compute loop's vector loads.
  __shared__ __align__(16) C gy_s[kGemmK][kGemmM + 4];
  __shared__ __align__(16) C x_s[kGemmK][kGemmN + 4];
  const int tid = threadIdx.x;
  // This thread's outputs: 4 consecutive rows from 4 * tm times 4 consecutive columns from 4 * tn.
  const int tm = tid / (kGemmN / kGemmSub), tn = tid % (kGemmN / kGemmSub);
  const int lk = tid % kGemmK, lrow = tid / kGemmK;  // loads: pixel lk of the step, rows lrow + 16 r
  constexpr int kStride = kGemmM / kGemmSub;
  const int64_t hw = a.height * a.width, c = a.kernel_size / 2;
  const int64_t items = a.chunks * a.m_tiles * a.n_tiles;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int64_t n0 = item % a.n_tiles * kGemmN, m0 = item / a.n_tiles % a.m_tiles * kGemmM;
    const int64_t chunk = item / (a.n_tiles * a.m_tiles);
    const int64_t p_begin = chunk * a.chunk, p_end = min(a.pixels, p_begin + a.chunk);
    const bool with_bias = a.bias_partial != nullptr && n0 == 0;
    // The input channel and tap shift of the columns this thread loads: fixed over the chunk.
    int64_t col_i[kGemmSub], col_dy[kGemmSub], col_dx[kGemmSub];
#pragma unroll
    for (int r = 0; r < kGemmSub; ++r) {
      const int64_t n = n0 + lrow + kStride * r;
      const bool valid = n < a.columns;  // never, when mask A with one group leaves no tap at all (k = 1)
      const int64_t t = valid ? n % a.taps : 0;
      col_i[r] = valid ? n / a.taps : -1;
      col_dy[r] = a.dilation * (t / a.kernel_size - c);
      col_dx[r] = a.dilation * (t % a.kernel_size - c);
    }
    C acc[kGemmSub][kGemmSub];
#pragma unroll
    for (int r = 0; r < kGemmSub; ++r)
#pragma unroll
      for (int s = 0; s < kGemmSub; ++s) acc[r][s] = C(0);
    C bias_acc = C(0);
    for (int64_t p0 = p_begin; p0 < p_end; p0 += kGemmK) {
      const int64_t p = p0 + lk;
      const bool p_ok = p < p_end;
      int64_t b = 0, i = 0, j = 0;
      if (p_ok) {
        b = p / hw;
        const int64_t pix = p - b * hw;
        i = pix / a.width;
        j = pix - i * a.width;
      }
      __syncthreads();  // the previous step's readers are done
#pragma unroll
      for (int r = 0; r < kGemmSub; ++r) {
        const int64_t m = m0 + lrow + kStride * r;
        gy_s[lk][lrow + kStride * r] =
            p_ok && m < a.out_channels ? load(a.grad_y, (b * a.out_channels + m) * hw + i * a.width + j) : C(0);
        const int64_t gi = i + col_dy[r], gj = j + col_dx[r];
        const bool inside = p_ok && col_i[r] >= 0 && gi >= 0 && gi < a.height && gj >= 0 && gj < a.width;
        x_s[lk][lrow + kStride * r] =
            inside ? load(a.x, ((b * a.in_channels + col_i[r]) * a.height + gi) * a.width + gj) : C(0);
      }
      __syncthreads();
#pragma unroll 4
      for (int kk = 0; kk < kGemmK; ++kk) {
        C gv[kGemmSub], xv[kGemmSub];
        load_shared(&gy_s[kk][tm * kGemmSub], gv);
        load_shared(&x_s[kk][tn * kGemmSub], xv);
#pragma unroll
        for (int r = 0; r < kGemmSub; ++r)
#pragma unroll
          for (int s = 0; s < kGemmSub; ++s) acc[r][s] = mad(gv[r], xv[s], acc[r][s]);
      }
      if (with_bias && tid < kGemmM)
        for (int kk = 0; kk < kGemmK; ++kk) bias_acc += gy_s[kk][tid];
    }
#pragma unroll
    for (int r = 0; r < kGemmSub; ++r) {
      const int64_t m = m0 + tm * kGemmSub + r;
      if (m >= a.out_channels) continue;
      C* row = a.partial + (chunk * a.out_channels + m) * a.columns;
#pragma unroll
      for (int s = 0; s < kGemmSub; ++s) {
        const int64_t n = n0 + tn * kGemmSub + s;
        if (n < a.columns) row[n] = acc[r][s];
      }
    }
    if (with_bias && tid < kGemmM && m0 + tid < a.out_channels)
      a.bias_partial[chunk * a.out_channels + m0 + tid] = bias_acc;
  }
}

// grad_weight[o, i, ky, kx] = the chunks' partials added in chunk order where the mask keeps the entry, zero
// elsewhere; grad_bias[o] likewise.
template <typename S>
__global__ void __launch_bounds__(kThreads)
    weight_grad_finish_kernel(WeightGrad<S> a, S* grad_weight, S* grad_bias, bool mask_b, int64_t groups) {
  using C = compute_t<S>;
  const int64_t k = a.kernel_size, weights = a.out_channels * a.in_channels * k * k;
  const int64_t total = weights + (grad_bias ? a.out_channels : 0);
  for (int64_t e = gpu::thread_index(); e < total; e += gpu::thread_count()) {
    C sum = C(0);
    if (e >= weights) {
      const int64_t o = e - weights;
      for (int64_t chunk = 0; chunk < a.chunks; ++chunk) sum += a.bias_partial[chunk * a.out_channels + o];
      store(grad_bias, o, sum);
      continue;
    }
    const int64_t kx = e % k, ky = e / k % k, i = e / (k * k) % a.in_channels, o = e / (k * k * a.in_channels);
    if (i < in_channel_end(ky, kx, o, k, mask_b, a.in_channels, a.out_channels, groups)) {
      const C* p = a.partial + o * a.columns + i * a.taps + ky * k + kx;
      for (int64_t chunk = 0; chunk < a.chunks; ++chunk) sum += p[chunk * a.out_channels * a.columns];
    }
    store(grad_weight, e, sum);
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------
// The NaN rule (the reference's, and the CPU's): masked taps and taps outside the image are not read. The
// kernels above multiply zeros in there (masked weights staged as zeros, the zero halo), which gives the
// same sums unless a zero meets an inf or NaN. Without a host synchronisation: a pass flags any non-finite
// operand on the device, and exact kernels that visit only the kept taps inside the image then overwrite
// the outputs; with finite operands they return at once.

template <typename S>
__global__ void __launch_bounds__(kThreads) flag_nonfinite_kernel(const S* p, int64_t n, int* flag) {
  for (int64_t i = gpu::thread_index(); i < n; i += gpu::thread_count())
    if (!isfinite(load(p, i))) *flag = 1;  // every writer stores the same value
}

template <typename S>
void flag_nonfinite(const S* p, int64_t n, int* flag, cudaStream_t stream, const char* what) {
  if (n > 0) gpu::launch_items(what, flag_nonfinite_kernel<S>, n, kThreads, stream, p, n, flag);
}

// direct_global_kernel's sums over the kept (tap, channel) pairs only, for a flagged call.
template <typename S, bool Transposed>
__global__ void __launch_bounds__(kThreads) direct_exact_kernel(Direct<S> a, const int* flag) {
  using C = compute_t<S>;
  if (*flag == 0) return;
  const int c = a.kernel_size / 2, k = a.kernel_size;
  const int64_t hw = a.height * a.width;
  for (int o = blockIdx.z; o < a.outputs; o += gridDim.z)
    for (int64_t i = blockIdx.y; i < a.height; i += gridDim.y)
      for (int64_t j = blockIdx.x * int64_t(kThreads) + threadIdx.x; j < a.width; j += gridDim.x * int64_t(kThreads))
        for (int64_t b = 0; b < a.images; ++b) {
          C acc = C(0);
          for (int t = 0; t < a.taps; ++t) {
            const int ky = t / k, kx = t % k;
            const int64_t gi = Transposed ? i + a.dilation * (c - ky) : i + a.dilation * (ky - c);
            const int64_t gj = Transposed ? j + a.dilation * (c - kx) : j + a.dilation * (kx - c);
            if (gi < 0 || gi >= a.height || gj < 0 || gj >= a.width) continue;
            const S* in = a.in + b * a.inputs * hw + gi * a.width + gj;
            for (int q = 0; q < a.inputs; ++q) {
              const int oc = Transposed ? q : o, ic = Transposed ? o : q;
              if (ic >= in_channel_end(ky, kx, oc, k, a.mask_b, a.in_channels, a.out_channels, a.groups)) continue;
              acc = mad(load(a.weight, ((int64_t(oc) * a.in_channels + ic) * k + ky) * k + kx), load(in, q * hw), acc);
            }
          }
          store(a.out, (b * a.outputs + o) * hw + i * a.width + j, acc + (a.bias ? load(a.bias, o) : C(0)));
        }
}

template <typename S, bool Transposed>
void launch_exact(const Direct<S>& a, int64_t in_count, int64_t weight_count, cudaStream_t stream, const char* what) {
  const AsyncBuffer<int> flag(1, stream, what);
  gpu::check_cuda(cudaMemsetAsync(flag.data, 0, sizeof(int), stream), what);
  flag_nonfinite(a.in, in_count, flag.data, stream, what);
  flag_nonfinite(a.weight, weight_count, flag.data, stream, what);
  const dim3 grid(grid_dim(ceil_div(a.width, kThreads), INT32_MAX), grid_dim(a.height, kMaxGridYZ),
                  grid_dim(a.outputs, kMaxGridYZ));
  gpu::launch(what, direct_exact_kernel<S, Transposed>, grid, kThreads, 0, stream, a, flag.data);
}

// grad_weight of a flagged call: one thread per weight entry, summing grad_y times the inputs its tap reads
// inside the image; masked entries are zero, never computed. grad_bias (the finish kernel's) is unaffected.
template <typename S>
__global__ void __launch_bounds__(kThreads)
    weight_grad_exact_kernel(WeightGrad<S> a, S* grad_weight, bool mask_b, int64_t groups, const int* flag) {
  using C = compute_t<S>;
  if (*flag == 0) return;
  const int64_t k = a.kernel_size, c = k / 2, hw = a.height * a.width, batch = a.pixels / max(hw, int64_t(1));
  const int64_t total = a.out_channels * a.in_channels * k * k;
  for (int64_t e = gpu::thread_index(); e < total; e += gpu::thread_count()) {
    const int64_t kx = e % k, ky = e / k % k, ic = e / (k * k) % a.in_channels, oc = e / (k * k * a.in_channels);
    C sum = C(0);
    if (ic < in_channel_end(ky, kx, oc, k, mask_b, a.in_channels, a.out_channels, groups)) {
      const int64_t dy = a.dilation * (ky - c), dx = a.dilation * (kx - c);
      for (int64_t b = 0; b < batch; ++b)
        for (int64_t i = max(int64_t(0), -dy); i < min(a.height, a.height - dy); ++i)
          for (int64_t j = max(int64_t(0), -dx); j < min(a.width, a.width - dx); ++j)
            sum = mad(load(a.grad_y, (b * a.out_channels + oc) * hw + i * a.width + j),
                      load(a.x, (b * a.in_channels + ic) * hw + (i + dy) * a.width + j + dx), sum);
    }
    store(grad_weight, e, sum);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Entry points

void forward_cuda(const ForwardArgs& a, void* stream) {
  gpu::dispatch_float(a.dtype, "masked_conv.forward", [&](auto type) {
    using S = typename decltype(type)::type;
    const Direct<S> d = direct_args<S>(a.s, a.x, a.weight, a.bias, a.y, false);
    launch_direct<S, false>(d, gpu::as_stream(stream), "masked_conv.forward");
    launch_exact<S, false>(d, a.s.batch * a.s.in_channels * a.s.height * a.s.width,
                           a.s.out_channels * a.s.in_channels * a.s.kernel_size * a.s.kernel_size,
                           gpu::as_stream(stream), "masked_conv.forward (exact)");
  });
}

void grad_input_cuda(const GradInputArgs& a, void* stream) {
  gpu::dispatch_float(a.dtype, "masked_conv.grad_input", [&](auto type) {
    using S = typename decltype(type)::type;
    const Direct<S> d = direct_args<S>(a.s, a.grad_y, a.weight, nullptr, a.grad_x, true);
    launch_direct<S, true>(d, gpu::as_stream(stream), "masked_conv.grad_input");
    launch_exact<S, true>(d, a.s.batch * a.s.out_channels * a.s.height * a.s.width,
                          a.s.out_channels * a.s.in_channels * a.s.kernel_size * a.s.kernel_size,
                          gpu::as_stream(stream), "masked_conv.grad_input (exact)");
  });
}

void grad_weight_cuda(const GradWeightArgs& a, void* stream) {
  const cudaStream_t s = gpu::as_stream(stream);
  const ConvShape& sh = a.s;
  gpu::dispatch_float(a.dtype, "masked_conv.grad_weight", [&](auto type) {
    using S = typename decltype(type)::type;
    using C = compute_t<S>;
    const int64_t k = sh.kernel_size;
    const int64_t pixels = sh.batch * sh.height * sh.width;
    if (pixels == 0) {  // an empty batch: the gradients are zeros (all-zero bits in every float type)
      gpu::check_cuda(cudaMemsetAsync(a.grad_weight, 0, sizeof(S) * sh.out_channels * sh.in_channels * k * k, s),
                      "masked_conv.grad_weight: cudaMemsetAsync");
      if (a.grad_bias)
        gpu::check_cuda(cudaMemsetAsync(a.grad_bias, 0, sizeof(S) * sh.out_channels, s),
                        "masked_conv.grad_weight: cudaMemsetAsync");
      return;
    }
    WeightGrad<S> w{};
    w.grad_y = static_cast<const S*>(a.grad_y);
    w.x = static_cast<const S*>(a.x);
    w.in_channels = sh.in_channels;
    w.out_channels = sh.out_channels;
    w.height = sh.height;
    w.width = sh.width;
    w.pixels = pixels;
    w.kernel_size = k;
    w.dilation = sh.dilation;
    w.taps = visited_taps(sh);
    w.columns = sh.in_channels * w.taps;
    w.m_tiles = ceil_div(sh.out_channels, kGemmM);
    w.n_tiles = std::max<int64_t>(1, ceil_div(w.columns, kGemmN));  // one even with no columns: the bias
    // Chunks from the shape alone, so the sums (and their bits) never depend on the GPU.
    int64_t chunks =
        std::max<int64_t>(1, std::min(ceil_div(kTargetItems, w.m_tiles * w.n_tiles), ceil_div(pixels, kMinChunk)));
    w.chunk = ceil_div(ceil_div(pixels, chunks), kGemmK) * kGemmK;
    w.chunks = ceil_div(pixels, w.chunk);
    const int64_t weight_partials = w.chunks * sh.out_channels * w.columns;
    const int64_t bias_partials = a.grad_bias ? w.chunks * sh.out_channels : 0;
    // Stream-ordered scratch: no host synchronisation.
    gpu::AsyncBuffer<C> scratch(weight_partials + bias_partials, s, "masked_conv.grad_weight: cudaMallocAsync");
    w.partial = scratch.data;
    w.bias_partial = a.grad_bias ? scratch.data + weight_partials : nullptr;
    gpu::launch("masked_conv.grad_weight", weight_grad_kernel<S>, gpu::grid_for(w.chunks * w.m_tiles * w.n_tiles),
                kThreads, 0, s, w);
    const int64_t outputs = sh.out_channels * sh.in_channels * k * k + (a.grad_bias ? sh.out_channels : 0);
    gpu::launch_items("masked_conv.grad_weight (finish)", weight_grad_finish_kernel<S>, outputs, kThreads, s, w,
                      static_cast<S*>(a.grad_weight), static_cast<S*>(a.grad_bias), sh.mask_b, sh.groups);
    const AsyncBuffer<int> flag(1, s, "masked_conv.grad_weight: cudaMallocAsync");
    gpu::check_cuda(cudaMemsetAsync(flag.data, 0, sizeof(int), s), "masked_conv.grad_weight: cudaMemsetAsync");
    flag_nonfinite(w.grad_y, pixels * sh.out_channels, flag.data, s, "masked_conv.grad_weight (flag)");
    flag_nonfinite(w.x, pixels * sh.in_channels, flag.data, s, "masked_conv.grad_weight (flag)");
    gpu::launch_items("masked_conv.grad_weight (exact)", weight_grad_exact_kernel<S>,
                      sh.out_channels * sh.in_channels * k * k, kThreads, s, w, static_cast<S*>(a.grad_weight),
                      sh.mask_b, sh.groups, static_cast<const int*>(flag.data));
    scratch.release("masked_conv.grad_weight: cudaFreeAsync");
  });
}

}  // namespace masked_conv
}  // namespace gk
