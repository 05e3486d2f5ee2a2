// The causal_conv1d family on CUDA. The per-element math (activations and their derivatives, the gate)
// comes from common/causal_conv1d.h; this file maps work to threads and fixes every summation order.
//   depthwise conv and grad_x   a thread per kPer consecutive positions of one (b, c) row, taps ascending;
//   full conv and grad_x        a block per kTileQ channels x kTileL positions of one sample, the
//                               (channel, tap) pairs staged kChunkP at a time in shared memory, ascending
//                               (the CPU kernels' order: channel, then tap);
//   grad_weight, grad_bias      sums over the B * L positions, cut into segments: one block per (channel or
//                               weight tile, segment) writes its segment's sums, and a second kernel adds
//                               the segments in order. No atomics, and the segmentation depends on the
//                               shapes only, so results are the same on every run and every GPU;
//   update                      a thread per (b, o) output, then a pass shifting each state row by one;
//   gated                       a thread per 4 consecutive elements of a half.
// Half types load and store in their storage type and compute in float32; backward keeps dL/dz (grad_y
// times the activation's derivative) in the compute type.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <type_traits>

#include "autoregressive/causal_conv1d.h"
#include "autoregressive/causal_conv1d_math.h"
#include "core/launch.cuh"
#include "core/reduce.cuh"

namespace gk {
namespace causal_conv1d {
namespace {

using namespace gpu::common;

constexpr int kThreads = 256;
constexpr int kPer = 4;  // positions per thread, depthwise kernels

// Full convolution: kTileQ output channels x kTileL positions per block (8 warps: a warp per 2 channels,
// a lane per 4 positions), kChunkP (channel, tap) pairs per shared-memory stage.
constexpr int kTileQ = 16;
constexpr int kTileL = 128;
constexpr int kChunkP = 16;
static_assert(kTileQ * kChunkP == kThreads && kTileL == 4 * 32 && kTileQ == 2 * (kThreads / 32), "tile layout");

// Full weight gradient: a kTileO x kTileP tile of grad_w[o, (i, k)] per block (a lane per pair, a warp per
// 4 channels), kChunkL positions per shared-memory stage.
constexpr int kTileO = 32;
constexpr int kTileP = 32;
constexpr int kChunkL = 32;
static_assert(kTileO * kChunkL == 4 * kThreads && kTileP == 32 && kTileO == 4 * (kThreads / 32), "tile layout");

// Taps per pass of the per-channel gradient kernel (a register accumulator each).
constexpr int kTapsPerPass = 8;

// Segmentation of the B * L sums: about kTargetBlocks (tile, segment) blocks in all, segments of at least
// kSegmentMin positions. Constants, not device properties: the order of the sums must not depend on the GPU.
constexpr int64_t kTargetBlocks = 1024;
constexpr int64_t kSegmentMin = 4096;

// State shift: elements per thread per stage.
constexpr int kShiftPer = 4;

// ---------------------------------------------------------------------------------------------------------
// What the convolution kernels do with the finished sum z of output element idx.

template <typename S, int Act>
struct StoreActivated {  // forward: y = act(z)
  S* y;
  __device__ __forceinline__ void operator()(int64_t idx, compute_t<S> z) const { store(y, idx, activate<Act>(z)); }
};

template <typename S, int Act>
struct StoreGradZ {  // backward: dL/dz = grad_y * act'(z), z recomputed
  const S* grad_y;
  compute_t<S>* gz;
  __device__ __forceinline__ void operator()(int64_t idx, compute_t<S> z) const {
    gz[idx] = load(grad_y, idx) * activate_grad<Act>(z);
  }
};

template <typename S>
struct StorePlain {  // grad_x
  S* out;
  __device__ __forceinline__ void operator()(int64_t idx, compute_t<S> z) const { store(out, idx, z); }
};

// ---------------------------------------------------------------------------------------------------------
// Convolutions. Forward: out[b, o, l] = init[o] + sum_{i, k} w[o, i, k] in[b, i, l - shift_k] (zero left of
// 0). Transposed (grad_x): out[b, i, m] = sum_{o, k} w[o, i, k] in[b, o, m + shift_k] (zero from L on).
// `In` is the input's element type: S, or the compute type for a dL/dz scratch.

template <typename S, typename In, bool Transposed, typename Epi>
__global__ void __launch_bounds__(kThreads)
    depthwise_kernel(const In* in, const S* w, const S* bias, ConvShape s, Epi epi) {
  using C = compute_t<S>;
  const int64_t len = s.length, tiles = ceil_div(len, kPer), items = s.batch * s.c_out * tiles;
  for (int64_t item = gpu::thread_index(); item < items; item += gpu::thread_count()) {
    int64_t row, tile, b, c;
    divmod(item, tiles, row, tile);
    divmod(row, s.c_out, b, c);
    const int64_t l0 = tile * kPer;
    const In* src_row = in + row * len;  // depthwise: input row (b, c) is output row (b, c)
    const S* taps = w + c * s.k;
    const C init = bias ? load(bias, c) : C(0);
    C acc[kPer];
#pragma unroll
    for (int e = 0; e < kPer; ++e) acc[e] = init;
    for (int64_t k = 0; k < s.k; ++k) {
      const int64_t shift = tap_shift(k, s.k, s.dilation);
      const C wk = load(taps, k);
#pragma unroll
      for (int e = 0; e < kPer; ++e) {
        const int64_t l = l0 + e;
        const int64_t src = Transposed ? l + shift : l - shift;
        if (l < len && src >= 0 && src < len) acc[e] += wk * C(load(src_row, src));
      }
    }
#pragma unroll
    for (int e = 0; e < kPer; ++e)
      if (l0 + e < len) epi(row * len + l0 + e, acc[e]);
  }
}

template <typename S, typename In, bool Transposed, typename Epi>
__global__ void __launch_bounds__(kThreads) full_kernel(const In* in, const S* w, const S* bias, ConvShape s, Epi epi) {
  using C = compute_t<S>;
  __shared__ C xs[kChunkP][kTileL];
  __shared__ C ws[kChunkP][kTileQ];
  const int64_t len = s.length, taps = s.k;
  // q: the output's channels; r: the channels summed over. w(q, r, k) = w[q * w_q + r * w_r + k].
  const int64_t n_out = Transposed ? s.c_in : s.c_out, n_red = Transposed ? s.c_out : s.c_in;
  const int64_t w_q = Transposed ? taps : s.c_in * taps, w_r = Transposed ? s.c_in * taps : taps;
  const int64_t pairs = n_red * taps;
  const int64_t tiles_l = ceil_div(len, kTileL), tiles_q = ceil_div(n_out, kTileQ);
  const int64_t items = s.batch * tiles_q * tiles_l;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    int64_t rest, tile_l, b, tile_q;
    divmod(item, tiles_l, rest, tile_l);
    divmod(rest, tiles_q, b, tile_q);
    const int64_t l0 = tile_l * kTileL, q0 = tile_q * kTileQ;
    C acc[2][4];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t q = q0 + warp + 8 * h;
      const C init = bias && q < n_out ? load(bias, q) : C(0);
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[h][e] = init;
    }
    for (int64_t p0 = 0; p0 < pairs; p0 += kChunkP) {
      __syncthreads();  // the previous stage's readers are done
      {
        const int j = tid % kTileL;
        const int64_t l = l0 + j;
        for (int m = tid / kTileL; m < kChunkP; m += kThreads / kTileL) {
          const int64_t p = p0 + m;
          C v = C(0);
          if (p < pairs && l < len) {
            int64_t r, k;
            divmod(p, taps, r, k);
            const int64_t shift = tap_shift(k, taps, s.dilation);
            const int64_t src = Transposed ? l + shift : l - shift;
            if (src >= 0 && src < len) v = C(load(in, (b * n_red + r) * len + src));
          }
          xs[m][j] = v;
        }
      }
      {
        // pair fastest: forward weights are contiguous along the pairs of one output channel
        const int m = tid % kChunkP, qq = tid / kChunkP;
        const int64_t p = p0 + m, q = q0 + qq;
        C v = C(0);
        if (p < pairs && q < n_out) {
          int64_t r, k;
          divmod(p, taps, r, k);
          v = load(w, q * w_q + r * w_r + k);
        }
        ws[m][qq] = v;
      }
      __syncthreads();
      const int count = static_cast<int>(min(pairs - p0, int64_t(kChunkP)));
      for (int m = 0; m < count; ++m) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const C wv = ws[m][warp + 8 * h];
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[h][e] += wv * xs[m][lane + 32 * e];
        }
      }
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t q = q0 + warp + 8 * h;
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t l = l0 + lane + 32 * e;
        if (q < n_out && l < len) epi((b * n_out + q) * len + l, acc[h][e]);
      }
    }
    __syncthreads();  // shared memory is staged again by the next item
  }
}

template <typename S, typename In, bool Transposed, typename Epi>
void launch_conv(const ConvShape& s, const In* in, const S* w, const S* bias, Epi epi, cudaStream_t stream,
                 const char* what) {
  if (s.depthwise) {
    const int64_t items = s.batch * s.c_out * ceil_div(s.length, kPer);
    gpu::launch_items(what, depthwise_kernel<S, In, Transposed, Epi>, items, kThreads, stream, in, w, bias, s, epi);
  } else {
    const int64_t n_out = Transposed ? s.c_in : s.c_out;
    const int64_t items = s.batch * ceil_div(n_out, kTileQ) * ceil_div(s.length, kTileL);
    gpu::launch(what, full_kernel<S, In, Transposed, Epi>, gpu::grid_for(items), kThreads, 0, stream, in, w, bias, s,
                epi);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Weight and bias gradients: segment sums, then the segments added in order.

// Scratch comes from gpu::AsyncBuffer: stream-ordered, freed on every exit path.
using gpu::AsyncBuffer;

struct Segments {
  int64_t count, length;  // count segments of `length` positions (the last may be shorter)
};

// For `tiles` blocks per segment over n > 0 positions.
Segments segments_for(int64_t n, int64_t tiles, int64_t multiple) {
  int64_t count = std::min(std::max<int64_t>(1, ceil_div(kTargetBlocks, std::max<int64_t>(tiles, 1))),
                           std::max<int64_t>(1, ceil_div(n, kSegmentMin)));
  const int64_t length = ceil_div(ceil_div(n, count), multiple) * multiple;
  return Segments{ceil_div(n, length), length};
}

// out[j] = sum_s partial[s * count + j], s ascending.
template <typename S>
__global__ void __launch_bounds__(kThreads)
    sum_segments_kernel(const compute_t<S>* partial, int64_t segs, int64_t count, S* out) {
  using C = compute_t<S>;
  for (int64_t j = gpu::thread_index(); j < count; j += gpu::thread_count()) {
    C acc = C(0);
    for (int64_t seg = 0; seg < segs; ++seg) acc += partial[seg * count + j];
    store(out, j, acc);
  }
}

template <typename S>
void sum_segments(const compute_t<S>* partial, int64_t segs, int64_t count, S* out, cudaStream_t stream) {
  gpu::launch_items("causal_conv1d.backward (segment sums)", sum_segments_kernel<S>, count, kThreads, stream, partial,
                    segs, count, out);
}

// A block per (channel c, segment): partial_w[seg][c][k] = sum of gz[b, c, l] x[b, c, l - shift_k] over the
// segment's flat positions b * L + l, for the taps k of [k0, k0 + kTapsPerPass) below `taps`; partial_b[seg][c]
// (when not null) = sum of gz[b, c, l]. Each thread sums its strided positions in order, then the block adds
// the threads' sums in a fixed tree. taps == 0 gives the bias alone (x unused).
template <typename S, typename G>
__global__ void __launch_bounds__(kThreads)
    channel_grad_kernel(const G* gz, const S* x, int64_t batch, int64_t channels, int64_t len, int64_t taps,
                        int64_t dilation, int64_t k0, Segments segs, compute_t<S>* partial_w, compute_t<S>* partial_b) {
  using C = compute_t<S>;
  const int64_t n = batch * len, items = channels * segs.count;
  const int64_t nk = min(taps - k0, int64_t(kTapsPerPass));
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    int64_t c, seg;
    divmod(item, segs.count, c, seg);
    const int64_t q_end = min(n, (seg + 1) * segs.length);
    C acc[kTapsPerPass], acc_b = C(0);
#pragma unroll
    for (int t = 0; t < kTapsPerPass; ++t) acc[t] = C(0);
    for (int64_t q = seg * segs.length + threadIdx.x; q < q_end; q += blockDim.x) {
      int64_t b, l;
      divmod(q, len, b, l);
      const int64_t row = (b * channels + c) * len;
      const C g = C(load(gz, row + l));
      acc_b += g;
#pragma unroll
      for (int t = 0; t < kTapsPerPass; ++t) {
        const int64_t shift = tap_shift(k0 + t, taps, dilation);
        if (t < nk && l >= shift) acc[t] += g * load(x, row + l - shift);
      }
    }
#pragma unroll
    for (int t = 0; t < kTapsPerPass; ++t) {
      if (t < nk) {  // uniform over the block, as block_sum needs
        const C total = gpu::block_sum(acc[t]);
        if (threadIdx.x == 0) partial_w[(seg * channels + c) * taps + k0 + t] = total;
      }
    }
    if (partial_b) {
      const C total = gpu::block_sum(acc_b);
      if (threadIdx.x == 0) partial_b[seg * channels + c] = total;
    }
  }
}

// Full weight gradient, a GEMM over positions: partial[seg][o][p] = sum over the segment's flat positions
// q = b * L + l, ascending, of gz[b, o, l] x[b, i, l - shift_k], p = i * K + k.
template <typename S, typename G>
__global__ void __launch_bounds__(kThreads)
    full_grad_weight_kernel(const G* gz, const S* x, ConvShape s, Segments segs, compute_t<S>* partial) {
  using C = compute_t<S>;
  __shared__ C gs[kTileO][kChunkL + 1];  // +1: the compute loop reads columns of xs without bank conflicts
  __shared__ C xs[kTileP][kChunkL + 1];
  const int64_t len = s.length, taps = s.k, n = s.batch * len, pairs = s.c_in * taps;
  const int64_t tiles_o = ceil_div(s.c_out, kTileO), tiles_p = ceil_div(pairs, kTileP);
  const int64_t items = tiles_o * tiles_p * segs.count;
  const int tid = threadIdx.x, col = tid % kChunkL, row0 = tid / kChunkL;  // staging: rows row0 + 8 m
  const int lane = tid % 32, warp = tid / 32;                              // compute: p = lane, o = warp + 8 e
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    int64_t rest, seg, tile_o, tile_p;
    divmod(item, segs.count, rest, seg);
    divmod(rest, tiles_p, tile_o, tile_p);
    const int64_t o0 = tile_o * kTileO, p0 = tile_p * kTileP;
    const int64_t q_begin = seg * segs.length, q_end = min(n, q_begin + segs.length);
    int64_t chan[4], shift[4];  // the input channel and shift of each staged pair row
#pragma unroll
    for (int m = 0; m < 4; ++m) {
      const int64_t p = p0 + row0 + 8 * m;
      int64_t i = -1, k = 0;
      if (p < pairs) divmod(p, taps, i, k);
      chan[m] = i;
      shift[m] = tap_shift(k, taps, s.dilation);
    }
    C acc[4] = {C(0), C(0), C(0), C(0)};
    for (int64_t q0 = q_begin; q0 < q_end; q0 += kChunkL) {
      __syncthreads();  // the previous stage's readers are done
      const int64_t q = q0 + col;
      const bool q_ok = q < q_end;
      int64_t b = 0, l = 0;
      if (q_ok) divmod(q, len, b, l);
#pragma unroll
      for (int m = 0; m < 4; ++m) {
        const int r = row0 + 8 * m;
        const int64_t o = o0 + r;
        gs[r][col] = q_ok && o < s.c_out ? C(load(gz, (b * s.c_out + o) * len + l)) : C(0);
        xs[r][col] =
            q_ok && chan[m] >= 0 && l >= shift[m] ? load(x, (b * s.c_in + chan[m]) * len + l - shift[m]) : C(0);
      }
      __syncthreads();
      const int count = static_cast<int>(min(q_end - q0, int64_t(kChunkL)));
      for (int c = 0; c < count; ++c) {
        const C xv = xs[lane][c];
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[e] += gs[warp + 8 * e][c] * xv;
      }
    }
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int64_t o = o0 + warp + 8 * e, p = p0 + lane;
      if (o < s.c_out && p < pairs) partial[(seg * s.c_out + o) * pairs + p] = acc[e];
    }
    __syncthreads();  // shared memory is staged again by the next item
  }
}

// grad_x, grad_w and grad_bias from gz = dL/dz (grad_y itself without an activation).
template <typename S, typename G>
void conv_grads(const ConvBackwardArgs& a, const G* gz, cudaStream_t stream) {
  using C = compute_t<S>;
  const ConvShape& s = a.shape;
  const S* x = static_cast<const S*>(a.x);
  const S* w = static_cast<const S*>(a.w);
  S* grad_w = static_cast<S*>(a.grad_w);
  S* grad_b = static_cast<S*>(a.grad_bias);
  const int64_t n = s.batch * s.length, w_numel = s.c_out * s.inputs_per_output() * s.k;
  if (s.batch * s.c_in * s.length > 0)
    launch_conv<S, G, true>(s, gz, w, static_cast<const S*>(nullptr), StorePlain<S>{static_cast<S*>(a.grad_x)}, stream,
                            "causal_conv1d.backward (grad_x)");
  if (n == 0) {  // no positions: the sums are empty
    if (w_numel > 0)
      gpu::check_cuda(cudaMemsetAsync(grad_w, 0, sizeof(S) * w_numel, stream), "causal_conv1d.backward: memset");
    if (grad_b && s.c_out > 0)
      gpu::check_cuda(cudaMemsetAsync(grad_b, 0, sizeof(S) * s.c_out, stream), "causal_conv1d.backward: memset");
    return;
  }
  if (s.c_out == 0) return;  // nothing to sum into
  if (s.depthwise || grad_b) {
    // Per-channel sums: all depthwise taps (and the bias), or the bias alone of a full convolution.
    const int64_t taps = s.depthwise ? s.k : 0;
    const Segments segs = segments_for(n, s.c_out, kThreads);
    AsyncBuffer<C> partial_w(segs.count * s.c_out * taps, stream, "causal_conv1d.backward: cudaMallocAsync");
    AsyncBuffer<C> partial_b(grad_b ? segs.count * s.c_out : 0, stream, "causal_conv1d.backward: cudaMallocAsync");
    const unsigned grid = gpu::grid_for(s.c_out * segs.count);
    for (int64_t k0 = 0; k0 < std::max<int64_t>(taps, 1); k0 += kTapsPerPass) {
      gpu::launch("causal_conv1d.backward (channel sums)", channel_grad_kernel<S, G>, grid, kThreads, 0, stream, gz, x,
                  s.batch, s.c_out, s.length, taps, s.dilation, k0, segs, partial_w.data,
                  k0 == 0 ? partial_b.data : nullptr);
    }
    if (taps > 0) sum_segments<S>(partial_w.data, segs.count, s.c_out * taps, grad_w, stream);
    if (grad_b) sum_segments<S>(partial_b.data, segs.count, s.c_out, grad_b, stream);
  }
  if (!s.depthwise && w_numel > 0) {
    const int64_t pairs = s.c_in * s.k, tiles = ceil_div(s.c_out, kTileO) * ceil_div(pairs, kTileP);
    const Segments segs = segments_for(n, tiles, kChunkL);
    AsyncBuffer<C> partial(segs.count * w_numel, stream, "causal_conv1d.backward: cudaMallocAsync");
    gpu::launch("causal_conv1d.backward (grad_weight)", full_grad_weight_kernel<S, G>,
                gpu::grid_for(tiles * segs.count), kThreads, 0, stream, gz, x, s, segs, partial.data);
    sum_segments<S>(partial.data, segs.count, w_numel, grad_w, stream);
  }
}

// ---------------------------------------------------------------------------------------------------------
// The generation step

// y[b, o] = act(bias[o] + sum_j (sum_{k < K-1} w[o, j, k] state[b, i, W - shift_k] + w[o, j, K-1] x[b, i])),
// in the CPU kernel's order.
template <typename S, int Act>
__global__ void __launch_bounds__(kThreads) update_kernel(UpdateArgs a) {
  using C = compute_t<S>;
  const ConvShape s = a.shape;
  const S* x = static_cast<const S*>(a.x);
  const S* state = static_cast<const S*>(a.state);
  const S* w = static_cast<const S*>(a.w);
  const S* bias = static_cast<const S*>(a.bias);
  S* y = static_cast<S*>(a.y);
  const int64_t width = a.state_len, per = s.depthwise ? 1 : s.c_in;
  for (int64_t row = gpu::thread_index(); row < s.batch * s.c_out; row += gpu::thread_count()) {
    int64_t b, o;
    divmod(row, s.c_out, b, o);
    C acc = bias ? load(bias, o) : C(0);
    for (int64_t j = 0; j < per; ++j) {
      const int64_t i = s.depthwise ? o : j;
      const S* past = state + (b * s.c_in + i) * width;
      const S* taps = w + (s.depthwise ? o : o * s.c_in + j) * s.k;
      for (int64_t k = 0; k + 1 < s.k; ++k) acc += load(taps, k) * load(past, width - tap_shift(k, s.k, s.dilation));
      acc += load(taps, s.k - 1) * load(x, b * s.c_in + i);
    }
    store(y, row, activate<Act>(acc));
  }
}

// state[r] becomes state[r, 1:] followed by x[r]. A block owns whole rows, one contiguous run of elements,
// and walks it in stages: every thread reads its elements of a stage, the block synchronises, then they
// are written. So nothing is overwritten before it is read, and a later stage reads only elements that no
// earlier stage wrote (it reads at or after its own start, earlier stages wrote before it).
template <typename S>
__global__ void __launch_bounds__(kThreads)
    shift_state_kernel(S* state, const S* x, int64_t rows, int64_t width, int64_t rows_per_block) {
  constexpr int64_t kStage = int64_t(kThreads) * kShiftPer;
  const int64_t groups = ceil_div(rows, rows_per_block);
  for (int64_t g = blockIdx.x; g < groups; g += gridDim.x) {
    const int64_t begin = g * rows_per_block * width, end = min(rows, (g + 1) * rows_per_block) * width;
    for (int64_t p = begin; p < end; p += kStage) {
      S v[kShiftPer];
#pragma unroll
      for (int e = 0; e < kShiftPer; ++e) {
        const int64_t idx = p + threadIdx.x + int64_t(e) * kThreads;
        if (idx < end) {
          int64_t r, t;
          divmod(idx, width, r, t);
          v[e] = t + 1 < width ? state[idx + 1] : x[r];
        }
      }
      __syncthreads();
#pragma unroll
      for (int e = 0; e < kShiftPer; ++e) {
        const int64_t idx = p + threadIdx.x + int64_t(e) * kThreads;
        if (idx < end) state[idx] = v[e];
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// The gate, over x viewed as (outer, 2, inner)

// A thread per group of 4 positions: f(o, j0, count) for positions j0 .. j0 + count - 1 of row o.
template <typename F>
__device__ __forceinline__ void for_each_gate_group(int64_t outer, int64_t inner, F f) {
  const int64_t groups = ceil_div(inner, 4), items = outer * groups;
  for (int64_t item = gpu::thread_index(); item < items; item += gpu::thread_count()) {
    int64_t o, g;
    divmod(item, groups, o, g);
    const int64_t j0 = 4 * g;
    f(o, j0, static_cast<int>(min(int64_t(4), inner - j0)));
  }
}

template <typename S>
__global__ void __launch_bounds__(kThreads) gated_kernel(GatedArgs a) {
  using C = compute_t<S>;
  const S* x = static_cast<const S*>(a.x);
  S* y = static_cast<S*>(a.y);
  for_each_gate_group(a.outer, a.inner, [&](int64_t o, int64_t j0, int count) {
    const S* xa = x + o * 2 * a.inner;
    C va[4], vb[4], out[4];
    gpu::load4(xa, j0, count, va);
    gpu::load4(xa + a.inner, j0, count, vb);
#pragma unroll
    for (int l = 0; l < 4; ++l) out[l] = gated(va[l], vb[l]);
    gpu::store4(y + o * a.inner, j0, count, out);
  });
}

template <typename S>
__global__ void __launch_bounds__(kThreads) gated_backward_kernel(GatedBackwardArgs a) {
  using C = compute_t<S>;
  const S* grad_y = static_cast<const S*>(a.grad_y);
  const S* x = static_cast<const S*>(a.x);
  S* grad_x = static_cast<S*>(a.grad_x);
  for_each_gate_group(a.outer, a.inner, [&](int64_t o, int64_t j0, int count) {
    const S* xa = x + o * 2 * a.inner;
    C va[4], vb[4], go[4], da[4], db[4];
    gpu::load4(xa, j0, count, va);
    gpu::load4(xa + a.inner, j0, count, vb);
    gpu::load4(grad_y + o * a.inner, j0, count, go);
#pragma unroll
    for (int l = 0; l < 4; ++l) {
      const GatedGrad<C> d = gated_grad(va[l], vb[l]);
      da[l] = go[l] * d.da;
      db[l] = go[l] * d.db;
    }
    S* ga = grad_x + o * 2 * a.inner;
    gpu::store4(ga, j0, count, da);
    gpu::store4(ga + a.inner, j0, count, db);
  });
}

}  // namespace

void conv_cuda(const ConvArgs& a, void* stream) {
  const cudaStream_t st = gpu::as_stream(stream);
  gpu::dispatch_float(a.dtype, "causal_conv1d.forward", [&](auto type) {
    using S = typename decltype(type)::type;
    with_activation(a.activation, [&](auto act) {
      constexpr int Act = decltype(act)::value;
      launch_conv<S, S, false>(a.shape, static_cast<const S*>(a.x), static_cast<const S*>(a.w),
                               static_cast<const S*>(a.bias), StoreActivated<S, Act>{static_cast<S*>(a.y)}, st,
                               "causal_conv1d.forward");
    });
  });
}

void conv_backward_cuda(const ConvBackwardArgs& a, void* stream) {
  const cudaStream_t st = gpu::as_stream(stream);
  const ConvShape& s = a.shape;
  gpu::dispatch_float(a.dtype, "causal_conv1d.backward", [&](auto type) {
    using S = typename decltype(type)::type;
    using C = compute_t<S>;
    const S* grad_y = static_cast<const S*>(a.grad_y);
    const int64_t ny = s.batch * s.c_out * s.length;
    if (a.activation == kNone || ny == 0) {
      conv_grads<S, S>(a, grad_y, st);
      return;
    }
    // dL/dz needs the pre-activation, recomputed here into a compute-type scratch.
    AsyncBuffer<C> gz(ny, st, "causal_conv1d.backward: cudaMallocAsync");
    with_activation(a.activation, [&](auto act) {
      constexpr int Act = decltype(act)::value;
      if constexpr (Act != kNone)  // handled above: no kernel for it
        launch_conv<S, S, false>(s, static_cast<const S*>(a.x), static_cast<const S*>(a.w),
                                 static_cast<const S*>(a.bias), StoreGradZ<S, Act>{grad_y, gz.data}, st,
                                 "causal_conv1d.backward (dL/dz)");
    });
    conv_grads<S, C>(a, gz.data, st);
  });
}

void update_cuda(const UpdateArgs& a, void* stream) {
  const cudaStream_t st = gpu::as_stream(stream);
  const ConvShape& s = a.shape;
  gpu::dispatch_float(a.dtype, "causal_conv1d.update", [&](auto type) {
    using S = typename decltype(type)::type;
    // Every output reads the old state before any of it shifts: two kernels, ordered by the stream.
    if (s.c_out > 0) {
      with_activation(a.activation, [&](auto act) {
        constexpr int Act = decltype(act)::value;
        gpu::launch_items("causal_conv1d.update", update_kernel<S, Act>, s.batch * s.c_out, kThreads, st, a);
      });
    }
    const int64_t rows = s.batch * s.c_in, width = a.state_len;
    if (rows == 0 || width == 0) return;
    const int64_t rows_per_block = std::max<int64_t>(1, int64_t(kThreads) * kShiftPer / width);
    gpu::launch("causal_conv1d.update (state shift)", shift_state_kernel<S>,
                gpu::grid_for(ceil_div(rows, rows_per_block)), kThreads, 0, st, static_cast<S*>(a.state),
                static_cast<const S*>(a.x), rows, width, rows_per_block);
  });
}

void gated_cuda(const GatedArgs& a, void* stream) {
  gpu::launch_typed(
      a.dtype, "causal_conv1d.gated", [](auto type) { return gated_kernel<typename decltype(type)::type>; },
      a.outer * ceil_div(a.inner, 4), kThreads, stream, a);
}

void gated_backward_cuda(const GatedBackwardArgs& a, void* stream) {
  gpu::launch_typed(
      a.dtype, "causal_conv1d.gated_backward",
      [](auto type) { return gated_backward_kernel<typename decltype(type)::type>; }, a.outer * ceil_div(a.inner, 4),
      kThreads, stream, a);
}

}  // namespace causal_conv1d
}  // namespace gk
