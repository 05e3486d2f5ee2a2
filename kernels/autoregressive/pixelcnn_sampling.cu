// The pixelcnn_sampling family on CUDA: categorical draws by Gumbel-max, and the cached sampler as a single
// persistent kernel.
//
// Samples never depend on each other, so the sampler gives each block a few of them (S, a template
// parameter) and runs the whole program on those, position by position. Blocks never wait for each other,
// and inside a block a __syncthreads between nodes is the only synchronisation: one launch per image batch.
// A convolution node gathers its taps for the block's samples into shared memory (zeros outside the image),
// then each thread owns one output channel. When C_out is small, it also owns a slice of the taps x C_in rows,
// and the slices are summed in a fixed order. Weights are read coalesced, once per block for all its samples,
// and stay in L2 across blocks. At a colour sub-step a node computes only its segments of that step (the
// colour plan: output channels [lo, hi) from the leading `rows` rows), so with colour groups each group of
// each layer is computed once per pixel. A draw is a warp per sample: lanes take the Philox blocks of the row, and a
// shuffle reduction picks the first maximum, categorical::gumbel_argmax's tie rule. With a logistic-mixture
// head a pixel is one draw of all its colours, a thread per sample (mixture::draw_pixel).
//
// The program is the kernel's parameter (a __grid_constant__ struct; CUDA 12.1+ allows 32 KB of them), so a
// launch reads nothing the host must keep alive and can be captured in a CUDA graph.
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <string>

#include "autoregressive/categorical_math.h"
#include "autoregressive/logistic_mixture_math.h"
#include "core/launch.cuh"
#include "autoregressive/pixelcnn_sampling.h"

#if defined(CUDART_VERSION) && CUDART_VERSION < 12010
#error "the cached sampler passes its program as a kernel parameter of up to 32 KB: CUDA 12.1 or newer"
#endif

namespace gk {
namespace pixelcnn_sampling {
namespace {

using namespace gpu::common;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxSamples = 8;  // per block; a warp draws for each
static_assert(kMaxSamples <= kWarps, "a warp per sample draws");
// The program's capacity, within the 32 KB of kernel parameters.
constexpr int kMaxCaches = 48;
constexpr int kMaxNodes = 96;
constexpr int kMaxTaps = 2048;
constexpr int kMaxSegments = 512;

struct Tap {
  int16_t dy, dx;
};

struct DeviceSegment {
  int step, lo, hi, rows;
};

struct DeviceNode {
  const float* weight;  // (rows, c_out) with rows = taps * c_in
  const float* bias;
  const float* cond;
  int kind, row_level, relu_input, accumulate;
  int in, out, residual;
  int c_in, c_out, rows;
  int first_tap, taps;
  int first_segment, segments;  // by step
};

struct DeviceProgram {
  float* caches[kMaxCaches];
  int channels[kMaxCaches];
  DeviceNode nodes[kMaxNodes];
  Tap taps[kMaxTaps];
  DeviceSegment segments[kMaxSegments];
  int n_nodes, logits, max_rows;
  int64_t batch, colors, height, width, levels;
  int64_t* out;
  float scale, shift;
  uint64_t seed, offset, first_sample;
  int64_t mixtures;  // K of a logistic-mixture head, or 0
  int coupled;
};
static_assert(sizeof(DeviceProgram) <= 32764, "kernel parameters are limited to 32764 bytes");

// Candidate (score, k) beats (other, other_k) under categorical::score_beats: NaN scores beat every number,
// equal scores (NaN or not) go to the lower level. A total order, so a shuffle reduction gives every lane the
// sequential rule's winner.
__device__ __forceinline__ bool beats(double score, int64_t k, double other, int64_t other_k) {
  if (isnan(score)) return !isnan(other) || k < other_k;
  return !isnan(other) && (score > other || (score == other && k < other_k));
}

// categorical::gumbel_argmax over levels k of logits[k] on one warp (every lane gets the result), scored in
// float64 as the sequential rule is.
template <typename T>
__device__ int64_t warp_gumbel_argmax(const T* logits, int64_t levels, uint64_t seed, uint64_t offset, uint64_t base,
                                      int lane) {
  double best = -INFINITY;
  int64_t best_k = INT64_MAX;
  const uint64_t end = base + static_cast<uint64_t>(levels);
  for (uint64_t block = (base >> 2) + lane; block <= (end - 1) >> 2; block += 32) {
    const Philox4 bits = stream_block(seed, offset, block);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const uint64_t element = 4 * block + e;
      if (element < base || element >= end) continue;
      const int64_t k = static_cast<int64_t>(element - base);
      const double score =
          static_cast<double>(gpu::to_compute(logits[k])) + static_cast<double>(categorical::gumbel(bits.x[e]));
      if (beats(score, k, best, best_k)) best = score, best_k = k;
    }
  }
#pragma unroll
  for (int step = 16; step > 0; step >>= 1) {
    const double other = __shfl_xor_sync(0xffffffffu, best, step);
    const int64_t other_k = __shfl_xor_sync(0xffffffffu, best_k, step);
    if (beats(other, other_k, best, best_k)) best = other, best_k = other_k;
  }
  return best_k;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    gumbel_argmax_kernel(const T* logits, const int64_t* base, int64_t* out, int64_t rows, int64_t levels,
                         uint64_t seed, uint64_t offset) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = gpu::thread_count() / 32;
  for (int64_t n = gpu::thread_index() / 32; n < rows; n += warps) {
    const int64_t level =
        warp_gumbel_argmax(logits + n * levels, levels, seed, offset, static_cast<uint64_t>(base[n]), lane);
    if (lane == 0) out[n] = level;
  }
}

// The block's view: samples b0 .. b0 + ns - 1 of the batch, and its shared memory.
struct Block {
  const DeviceProgram& p;
  float* rows;     // (S, max_rows): the gathered taps of each sample
  float* partial;  // (parts, S, C_out), parts * C_out <= kThreads: the row slices' sums
  int64_t b0;
  int ns;

  __device__ float* at(int cache, int64_t b, int64_t i, int64_t j) const {
    return p.caches[cache] + ((b * p.height + i) * p.width + j) * p.channels[cache];
  }
};

// The node's value v for sample s, output channel o at (i, j): bias, conditioning and residual added, then
// written or accumulated.
__device__ __forceinline__ void finish(const Block& k, const DeviceNode& n, int s, int o, float v, int64_t i,
                                       int64_t j) {
  const int64_t b = k.b0 + s;
  if (n.bias) v += n.bias[o];
  if (n.cond) v += n.cond[b * n.c_out + o];
  if (n.residual >= 0) v += k.at(n.residual, b, i, j)[o];
  float* dst = k.at(n.out, b, i, j) + o;
  *dst = n.accumulate ? *dst + v : v;
}

// Node n's segments [first, last) (one step's) at (i, j): the taps gathered once, as many rows as the longest
// needs, then each segment's channels.
template <int S>
__device__ void convolve(const Block& k, const DeviceNode& n, const DeviceSegment* first, const DeviceSegment* last,
                         int64_t i, int64_t j) {
  const DeviceProgram& p = k.p;
  int stride = 0;
  for (const DeviceSegment* seg = first; seg != last; ++seg) stride = max(stride, seg->rows);
  for (int q = threadIdx.x; q < k.ns * stride; q += kThreads) {
    const int s = q / stride, r = q - s * stride;
    const int t = r / n.c_in, ch = r - t * n.c_in;
    const Tap tap = p.taps[n.first_tap + t];
    const int64_t y = i + tap.dy, x = j + tap.dx;
    float v = 0.0f;
    if (y >= 0 && y < p.height && x >= 0 && x < p.width) {
      v = k.at(n.in, k.b0 + s, y, x)[ch];
      if (n.relu_input) v = fmaxf(v, 0.0f);
    }
    k.rows[s * stride + r] = v;
  }
  __syncthreads();
  for (const DeviceSegment* seg = first; seg != last; ++seg) {
    const int width = seg->hi - seg->lo, rows = seg->rows;
    // Threads over the segment's channels; when there are fewer channels than threads, `parts` threads per
    // channel each take a contiguous slice of the rows.
    const int parts = width >= kThreads ? 1 : max(1, min(kThreads / width, rows));
    for (int o0 = 0; o0 < width; o0 += kThreads) {
      const int local = parts == 1 ? o0 + static_cast<int>(threadIdx.x) : static_cast<int>(threadIdx.x) % width;
      const int part = parts == 1 ? 0 : static_cast<int>(threadIdx.x) / width;
      const bool active = local < width && part < parts;
      const int o = seg->lo + local;
      float acc[S];
#pragma unroll
      for (int s = 0; s < S; ++s) acc[s] = 0.0f;
      if (active) {
        const int r0 = static_cast<int>(int64_t(rows) * part / parts);
        const int r1 = static_cast<int>(int64_t(rows) * (part + 1) / parts);
        const float* w = n.weight + o;
        for (int r = r0; r < r1; ++r) {
          const float wv = w[int64_t(r) * n.c_out];
#pragma unroll
          for (int s = 0; s < S; ++s) acc[s] = fmaf(k.rows[s * stride + r], wv, acc[s]);
        }
      }
      if (parts == 1) {
        if (active) {
#pragma unroll
          for (int s = 0; s < S; ++s)
            if (s < k.ns) finish(k, n, s, o, acc[s], i, j);
        }
        continue;
      }
      if (active) {
#pragma unroll
        for (int s = 0; s < S; ++s) k.partial[(part * S + s) * width + local] = acc[s];
      }
      __syncthreads();
      for (int q = threadIdx.x; q < k.ns * width; q += kThreads) {
        const int s = q / width, oc = q - s * width;
        float v = 0.0f;
        for (int part_ = 0; part_ < parts; ++part_) v += k.partial[(part_ * S + s) * width + oc];
        finish(k, n, s, seg->lo + oc, v, i, j);
      }
      __syncthreads();  // partial is free again for the next segment
    }
  }
  __syncthreads();  // the outputs are complete before the next node reads them, and rows are free again
}

__device__ void gate(const Block& k, const DeviceNode& n, const DeviceSegment* first, const DeviceSegment* last,
                     int64_t i, int64_t j) {
  const int half = n.c_out;
  for (const DeviceSegment* seg = first; seg != last; ++seg) {
    const int width = seg->hi - seg->lo;
    for (int q = threadIdx.x; q < k.ns * width; q += kThreads) {
      const int s = q / width, ch = seg->lo + (q - s * width);
      const float* src = k.at(n.in, k.b0 + s, i, j);
      k.at(n.out, k.b0 + s, i, j)[ch] = tanhf(src[ch]) / (1.0f + expf(-src[half + ch]));
    }
  }
  __syncthreads();
}

template <int S>
__device__ void evaluate(const Block& k, const DeviceNode& n, const DeviceSegment* first, const DeviceSegment* last,
                         int64_t i, int64_t j) {
  if (n.kind == kGate)
    gate(k, n, first, last, i, j);
  else
    convolve<S>(k, n, first, last, i, j);
}

// Colour c of pixel (i, j) for each sample of the block, a warp each: written to out and, as
// scale * level + shift, to cache 0.
__device__ void draw(const Block& k, int64_t i, int64_t j, int64_t c) {
  const DeviceProgram& p = k.p;
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
  if (warp < k.ns) {
    const int64_t b = k.b0 + warp;
    const int64_t dims = p.colors * p.height * p.width, position = (i * p.width + j) * p.colors + c;
    const uint64_t base = (static_cast<uint64_t>(p.first_sample + b) * dims + position) * p.levels;
    const float* logits = k.at(p.logits, b, i, j) + c * p.levels;
    const int64_t level = warp_gumbel_argmax(logits, p.levels, p.seed, p.offset, base, lane);
    if (lane == 0) {
      p.out[((b * p.colors + c) * p.height + i) * p.width + j] = level;
      k.at(0, b, i, j)[c] = p.scale * static_cast<float>(level) + p.shift;
    }
  }
  __syncthreads();
}

// A pixel's mixture params, contiguous in the channels-last logits cache.
struct PixelParams {
  const float* p;
  __device__ float operator()(int64_t ch) const { return p[ch]; }
};

// Every colour of pixel (i, j) from the mixture's params, a thread per sample of the block (a pixel's draw is
// sequential over its K + C stream elements: mixture::draw_pixel, the discretized_logistic_mixture_sample
// op's draw): written to out and, as scale * level + shift, to cache 0.
__device__ void draw_mixture(const Block& k, int64_t i, int64_t j) {
  const DeviceProgram& p = k.p;
  const int s = static_cast<int>(threadIdx.x);
  if (s < k.ns) {
    const int64_t b = k.b0 + s, pixels = p.height * p.width, pixel = i * p.width + j;
    const uint64_t base =
        (static_cast<uint64_t>(p.first_sample + b) * static_cast<uint64_t>(pixels) + static_cast<uint64_t>(pixel)) *
        static_cast<uint64_t>(p.mixtures + p.colors);
    int64_t* out = p.out + b * p.colors * pixels + pixel;
    mixture::draw_pixel<float>(PixelParams{k.at(p.logits, b, i, j)}, p.mixtures, p.colors, p.coupled != 0, p.levels,
                               p.seed, p.offset, base, out, pixels);
    float* input = k.at(0, b, i, j);
    for (int64_t c = 0; c < p.colors; ++c) input[c] = p.scale * static_cast<float>(out[c * pixels]) + p.shift;
  }
  __syncthreads();
}

template <int S>
__global__ void __launch_bounds__(kThreads) sample_kernel(const __grid_constant__ DeviceProgram p) {
  extern __shared__ __align__(16) unsigned char smem[];
  float* rows = reinterpret_cast<float*>(smem);
  const int64_t b0 = int64_t(blockIdx.x) * S;
  const Block k{p, rows, rows + S * p.max_rows, b0, static_cast<int>(p.batch - b0 < S ? p.batch - b0 : S)};
  for (int64_t i = 0; i < p.height; ++i) {
    for (int n = 0; n < p.n_nodes; ++n)
      if (p.nodes[n].row_level) {
        const DeviceNode& node = p.nodes[n];
        const DeviceSegment whole{0, 0, node.c_out, node.rows};
        for (int64_t j = 0; j < p.width; ++j) evaluate<S>(k, node, &whole, &whole + 1, i, j);
      }
    const int64_t steps = p.mixtures > 0 ? 1 : p.colors;  // SampleArgs::draw_steps
    for (int64_t j = 0; j < p.width; ++j)
      for (int64_t c = 0; c <= steps; ++c) {
        for (int n = 0; n < p.n_nodes; ++n) {
          const DeviceNode& node = p.nodes[n];
          const DeviceSegment* first = p.segments + node.first_segment;
          const DeviceSegment* end = first + node.segments;
          while (first != end && first->step < c) ++first;
          const DeviceSegment* last = first;
          while (last != end && last->step == c) ++last;
          if (first != last) evaluate<S>(k, node, first, last, i, j);  // uniform over the block: no divergence
        }
        if (c == steps) continue;
        if (p.mixtures > 0)
          draw_mixture(k, i, j);
        else
          draw(k, i, j, c);
      }
  }
}

int as_int(int64_t v, const char* what) {
  if (v < 0 || v > INT_MAX / kThreads) throw ValueError(std::string("the cuda sampler: ") + what + " is too large");
  return static_cast<int>(v);
}

// The checked program of csrc/autoregressive/pixelcnn_sampling.cpp as the kernel's parameter.
DeviceProgram encode(const SampleArgs& a) {
  if (a.caches.size() > static_cast<size_t>(kMaxCaches) || a.nodes.size() > static_cast<size_t>(kMaxNodes))
    throw ValueError("the cuda sampler holds at most " + std::to_string(kMaxCaches) + " caches and " +
                     std::to_string(kMaxNodes) + " nodes");
  DeviceProgram p{};
  for (size_t c = 0; c < a.caches.size(); ++c) {
    p.caches[c] = a.caches[c];
    p.channels[c] = as_int(a.channels[c], "a cache's channels");
  }
  int taps = 0, segments = 0;
  for (size_t k = 0; k < a.nodes.size(); ++k) {
    const Node& n = a.nodes[k];
    DeviceNode& d = p.nodes[k];
    d = DeviceNode{n.weight,
                   n.bias,
                   n.cond,
                   n.kind,
                   n.row_level,
                   n.relu_input,
                   n.accumulate,
                   n.in,
                   n.out,
                   n.residual,
                   as_int(n.c_in, "C_in"),
                   as_int(n.c_out, "C_out"),
                   0,
                   taps,
                   0,
                   segments,
                   static_cast<int>(n.segments.size())};
    if (segments + d.segments > kMaxSegments)
      throw ValueError("the cuda sampler holds at most " + std::to_string(kMaxSegments) + " segments in all");
    for (const Segment& seg : n.segments)  // checked: within the node's channels and rows, steps <= colours
      p.segments[segments++] = DeviceSegment{static_cast<int>(seg.step), static_cast<int>(seg.lo),
                                             static_cast<int>(seg.hi), static_cast<int>(seg.rows)};
    if (n.kind != kConv) continue;
    d.taps = static_cast<int>(n.dy.size());
    d.rows = as_int(int64_t(d.taps) * n.c_in, "taps x C_in");
    if (taps + d.taps > kMaxTaps)
      throw ValueError("the cuda sampler holds at most " + std::to_string(kMaxTaps) + " taps in all");
    for (int t = 0; t < d.taps; ++t) {
      if (n.dy[t] < INT16_MIN || n.dy[t] > INT16_MAX || n.dx[t] < INT16_MIN || n.dx[t] > INT16_MAX)
        throw ValueError("the cuda sampler takes tap offsets within +-32767");
      p.taps[taps + t] = Tap{static_cast<int16_t>(n.dy[t]), static_cast<int16_t>(n.dx[t])};
    }
    taps += d.taps;
    p.max_rows = std::max(p.max_rows, d.rows);
  }
  p.n_nodes = static_cast<int>(a.nodes.size());
  p.logits = a.logits;
  p.batch = a.batch;
  p.colors = a.colors;
  p.height = a.height;
  p.width = a.width;
  p.levels = a.levels;
  p.out = a.out;
  p.scale = a.scale;
  p.shift = a.shift;
  p.seed = a.seed;
  p.offset = a.offset;
  p.first_sample = a.first_sample;
  p.mixtures = a.mixtures;
  p.coupled = a.coupled ? 1 : 0;
  return p;
}

size_t shared_bytes(int samples, int max_rows) {
  return sizeof(float) * (static_cast<size_t>(samples) * max_rows + static_cast<size_t>(samples) * kThreads);
}

template <int S>
void launch_sampler(const DeviceProgram& p, size_t bytes, cudaStream_t stream) {
  const auto kernel = sample_kernel<S>;
  gpu::check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)),
                  "pixelcnn_sampling.sample: cudaFuncSetAttribute");
  kernel<<<static_cast<unsigned>(ceil_div(p.batch, S)), kThreads, bytes, stream>>>(p);
  gpu::check_launch("pixelcnn_sampling.sample");
}

}  // namespace

void gumbel_argmax_cuda(const GumbelArgmaxArgs& a, void* stream) {
  gpu::dispatch_float(a.dtype, "gumbel_argmax", [&](auto tag) {
    using T = typename decltype(tag)::type;
    gpu::launch("gumbel_argmax", gumbel_argmax_kernel<T>, gpu::grid_for(ceil_div(a.rows, kWarps)), kThreads, 0,
                gpu::as_stream(stream), static_cast<const T*>(a.logits), a.base, a.out, a.rows, a.levels, a.seed,
                a.offset);
  });
}

void sample_cuda(const SampleArgs& a, void* stream) {
  const DeviceProgram p = encode(a);
  int device = 0, sms = 1, optin = 0;
  gpu::check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  gpu::check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
  gpu::check_cuda(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
                  "cudaDeviceGetAttribute");
  // More samples per block share each weight read; fewer keep every SM busy: at least two blocks per SM
  // when the batch allows, and what fits in shared memory.
  int samples = kMaxSamples;
  while (samples > 1 &&
         (a.batch < int64_t(2) * sms * samples || shared_bytes(samples, p.max_rows) > static_cast<size_t>(optin)))
    samples /= 2;
  const size_t bytes = shared_bytes(samples, p.max_rows);
  if (bytes > static_cast<size_t>(optin))
    throw ValueError("the cuda sampler: a node's taps x C_in (" + std::to_string(p.max_rows) +
                     ") do not fit in shared memory");
  const auto s = gpu::as_stream(stream);
  switch (samples) {
    case 8:
      launch_sampler<8>(p, bytes, s);
      break;
    case 4:
      launch_sampler<4>(p, bytes, s);
      break;
    case 2:
      launch_sampler<2>(p, bytes, s);
      break;
    default:
      launch_sampler<1>(p, bytes, s);
      break;
  }
}

}  // namespace pixelcnn_sampling
}  // namespace gk
