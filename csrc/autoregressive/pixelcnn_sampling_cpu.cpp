// CPU kernels of the pixelcnn_sampling family.
//
// The cached sampler gives each thread a contiguous slice of the batch and runs the whole pixel loop on it:
// samples are independent, so no thread ever waits for another. At a position, a convolution node gathers
// its taps for a block of samples into one row each (taps x C_in, contiguous in the channels-last caches)
// and multiplies the block by the packed weight, output channels along the vector lanes: a small GEMM whose
// weights stay in cache across the block.
#include "autoregressive/pixelcnn_sampling.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <new>
#include <vector>

#include "autoregressive/categorical_math.h"
#include "autoregressive/logistic_mixture.h"
#include "core/memory.h"
#include "core/parallel.h"
#include "core/philox_blocks.h"

namespace gk {
namespace pixelcnn_sampling {
namespace {

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"  // 64-byte vectors in internal helpers only: no ABI is crossed
#endif

constexpr int64_t kLanes = 16;
typedef float vec __attribute__((vector_size(kLanes * sizeof(float))));
constexpr int kSampleBlock = 8;  // samples gathered together, sharing weight loads (see multiply_block)
constexpr int kVectorBlock = 4;  // output-channel vectors per register block: 4 x 4 accumulators

int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

using Buffer = cpu::AlignedBuffer<float>;

Buffer allocate(int64_t n) { return cpu::allocate_aligned<float>(n); }

// A convolution node's weight as (taps * C_in) rows of C_out padded to whole vectors (zeros beyond C_out).
struct PackedWeight {
  Buffer w;
  int64_t rows = 0, padded = 0;
};

PackedWeight pack(const Node& n) {
  PackedWeight p;
  p.rows = static_cast<int64_t>(n.dy.size()) * n.c_in;
  p.padded = round_up(n.c_out, kLanes);
  p.w = allocate(p.rows * p.padded);
  for (int64_t r = 0; r < p.rows; ++r) {
    std::copy(n.weight + r * n.c_out, n.weight + (r + 1) * n.c_out, p.w.get() + r * p.padded);
    std::fill(p.w.get() + r * p.padded + n.c_out, p.w.get() + (r + 1) * p.padded, 0.0f);
  }
  return p;
}

vec load(const float* p) {
  vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

void store(float* p, vec v) { std::memcpy(p, &v, sizeof v); }

// result[s, o .. o + NV * kLanes) = sum_{r < n_rows} rows[s, r] * w[r, o ..] for the block's NS samples, the
// rows of sample s starting at rows + s * stride.
template <int NS, int NV>
void multiply_tile(const float* rows, int64_t stride, int64_t n_rows, const float* w, int64_t padded, int64_t o,
                   float* result) {
  vec acc[NS][NV];
  for (int s = 0; s < NS; ++s)
    for (int v = 0; v < NV; ++v) acc[s][v] = vec{};
  for (int64_t r = 0; r < n_rows; ++r) {
    vec wv[NV];
    for (int v = 0; v < NV; ++v) wv[v] = load(w + r * padded + o + v * kLanes);
    for (int s = 0; s < NS; ++s) {
      const float a = rows[s * stride + r];
      for (int v = 0; v < NV; ++v) acc[s][v] += a * wv[v];
    }
  }
  for (int s = 0; s < NS; ++s)
    for (int v = 0; v < NV; ++v) store(result + s * padded + o + v * kLanes, acc[s][v]);
}

// The output vectors [o_begin, o_end) (multiples of kLanes) of the block's products.
template <int NS>
void multiply(const float* rows, int64_t stride, int64_t n_rows, const PackedWeight& p, int64_t o_begin, int64_t o_end,
              float* result) {
  for (int64_t o = o_begin; o < o_end; o += kVectorBlock * kLanes) {
    switch (std::min<int64_t>(kVectorBlock, (o_end - o) / kLanes)) {
      case 4:
        multiply_tile<NS, 4>(rows, stride, n_rows, p.w.get(), p.padded, o, result);
        break;
      case 3:
        multiply_tile<NS, 3>(rows, stride, n_rows, p.w.get(), p.padded, o, result);
        break;
      case 2:
        multiply_tile<NS, 2>(rows, stride, n_rows, p.w.get(), p.padded, o, result);
        break;
      default:
        multiply_tile<NS, 1>(rows, stride, n_rows, p.w.get(), p.padded, o, result);
        break;
    }
  }
}

// The block's ns samples: in groups of 4 against up to 4 output vectors, or of 8 against a segment of at
// most 2 (a colour group of a 96-channel layer), so that each weight load feeds as many multiply-adds.
void multiply_block(int ns, const float* rows, int64_t stride, int64_t n_rows, const PackedWeight& p, int64_t o_begin,
                    int64_t o_end, float* result) {
  const int group = o_end - o_begin <= 2 * kLanes ? 8 : 4;
  for (int s0 = 0; s0 < ns; s0 += group) {
    const float* r = rows + s0 * stride;
    float* out = result + s0 * p.padded;
    switch (std::min(group, ns - s0)) {
      case 8:
        multiply<8>(r, stride, n_rows, p, o_begin, o_end, out);
        break;
      case 7:
        multiply<7>(r, stride, n_rows, p, o_begin, o_end, out);
        break;
      case 6:
        multiply<6>(r, stride, n_rows, p, o_begin, o_end, out);
        break;
      case 5:
        multiply<5>(r, stride, n_rows, p, o_begin, o_end, out);
        break;
      case 4:
        multiply<4>(r, stride, n_rows, p, o_begin, o_end, out);
        break;
      case 3:
        multiply<3>(r, stride, n_rows, p, o_begin, o_end, out);
        break;
      case 2:
        multiply<2>(r, stride, n_rows, p, o_begin, o_end, out);
        break;
      default:
        multiply<1>(r, stride, n_rows, p, o_begin, o_end, out);
        break;
    }
  }
}

struct Geometry {
  int64_t height, width;
  float* at(float* cache, int64_t channels, int64_t b, int64_t i, int64_t j) const {
    return cache + ((b * height + i) * width + j) * channels;
  }
};

// One thread's share of the batch, with its scratch rows.
class SliceSampler {
 public:
  SliceSampler(const SampleArgs& a, const std::vector<PackedWeight>& packed, int64_t first, int64_t last)
      : a_(a), packed_(packed), g_{a.height, a.width}, first_(first), last_(last) {
    int64_t rows = 1, padded = kLanes;
    for (const PackedWeight& p : packed) {
      rows = std::max(rows, p.rows);
      padded = std::max(padded, p.padded);
    }
    rows_ = allocate(kSampleBlock * rows);
    result_ = allocate(kSampleBlock * padded);
    const int64_t blocks = a.levels / 4 + 2;  // a draw's levels span at most this many Philox blocks
    for (auto& w : words_) w.assign(blocks, 0u);
    noise_.assign(4 * blocks, 0.0f);
  }

  void run() {
    for (int64_t i = 0; i < a_.height; ++i) {
      for (size_t n = 0; n < a_.nodes.size(); ++n)
        if (a_.nodes[n].row_level) {
          const Node& node = a_.nodes[n];
          const Segment whole{0, 0, node.c_out, static_cast<int64_t>(node.dy.size()) * node.c_in};
          for (int64_t j = 0; j < a_.width; ++j) evaluate(n, &whole, &whole + 1, i, j);
        }
      const int64_t steps = a_.draw_steps();
      for (int64_t j = 0; j < a_.width; ++j)
        for (int64_t c = 0; c <= steps; ++c) {
          for (size_t n = 0; n < a_.nodes.size(); ++n) {
            const std::vector<Segment>& segments = a_.nodes[n].segments;
            const Segment* first = segments.data();
            const Segment* end = first + segments.size();
            while (first != end && first->step < c) ++first;
            const Segment* last = first;
            while (last != end && last->step == c) ++last;
            if (first != last) evaluate(n, first, last, i, j);
          }
          if (c == steps) continue;
          if (a_.mixtures > 0)
            draw_mixture(i, j);
          else
            draw(i, j, c);
        }
    }
  }

 private:
  // Node n's segments [first, last) (all of one step) at (i, j).
  void evaluate(size_t n, const Segment* first, const Segment* last, int64_t i, int64_t j) {
    if (a_.nodes[n].kind == kGate)
      for (const Segment* s = first; s != last; ++s) gate(a_.nodes[n], *s, i, j);
    else
      convolve(a_.nodes[n], packed_[n], first, last, i, j);
  }

  // The segments share one gather of the rows the longest of them needs.
  void convolve(const Node& n, const PackedWeight& p, const Segment* first, const Segment* last, int64_t i, int64_t j) {
    const int64_t taps = static_cast<int64_t>(n.dy.size());
    int64_t stride = 0;
    for (const Segment* seg = first; seg != last; ++seg) stride = std::max(stride, seg->rows);
    float* in = a_.caches[n.in];
    for (int64_t b0 = first_; b0 < last_; b0 += kSampleBlock) {
      const int ns = static_cast<int>(std::min<int64_t>(kSampleBlock, last_ - b0));
      for (int s = 0; s < ns; ++s) {
        float* row = rows_.get() + s * stride;
        for (int64_t t = 0; t < taps && t * n.c_in < stride; ++t, row += n.c_in) {
          const int64_t count = std::min(n.c_in, stride - t * n.c_in);
          const int64_t y = i + n.dy[t], x = j + n.dx[t];
          if (y < 0 || y >= a_.height || x < 0 || x >= a_.width) {
            std::fill(row, row + count, 0.0f);
            continue;
          }
          const float* src = g_.at(in, n.c_in, b0 + s, y, x);
          if (n.relu_input)
            for (int64_t ch = 0; ch < count; ++ch) row[ch] = std::max(src[ch], 0.0f);
          else
            std::copy(src, src + count, row);
        }
      }
      for (const Segment* seg = first; seg != last; ++seg) {
        const int64_t o_begin = seg->lo / kLanes * kLanes, o_end = round_up(seg->hi, kLanes);
        multiply_block(ns, rows_.get(), stride, seg->rows, p, o_begin, o_end, result_.get());
        for (int s = 0; s < ns; ++s) finish(n, b0 + s, result_.get() + s * p.padded, seg->lo, seg->hi, i, j);
      }
    }
  }

  // Output channels [lo, hi) of sample b from the products r: bias, conditioning and residual added.
  void finish(const Node& n, int64_t b, const float* r, int64_t lo, int64_t hi, int64_t i, int64_t j) {
    float* dst = g_.at(a_.caches[n.out], n.c_out, b, i, j);
    const float* residual = n.residual >= 0 ? g_.at(a_.caches[n.residual], n.c_out, b, i, j) : nullptr;
    const float* cond = n.cond ? n.cond + b * n.c_out : nullptr;
    for (int64_t o = lo; o < hi; ++o) {
      float v = r[o];
      if (n.bias) v += n.bias[o];
      if (cond) v += cond[o];
      if (residual) v += residual[o];
      dst[o] = n.accumulate ? dst[o] + v : v;
    }
  }

  void gate(const Node& n, const Segment& seg, int64_t i, int64_t j) {
    const int64_t half = a_.channels[n.out];
    for (int64_t b = first_; b < last_; ++b) {
      const float* src = g_.at(a_.caches[n.in], 2 * half, b, i, j);
      float* dst = g_.at(a_.caches[n.out], half, b, i, j);
      for (int64_t ch = seg.lo; ch < seg.hi; ++ch) dst[ch] = std::tanh(src[ch]) / (1.0f + std::exp(-src[half + ch]));
    }
  }

  void draw(int64_t i, int64_t j, int64_t c) {
    const int64_t dims = a_.colors * a_.height * a_.width;
    const int64_t position = (i * a_.width + j) * a_.colors + c;
    for (int64_t b = first_; b < last_; ++b) {
      const float* logits = g_.at(a_.caches[a_.logits], a_.colors * a_.levels, b, i, j) + c * a_.levels;
      const uint64_t base = (static_cast<uint64_t>(a_.first_sample + b) * dims + position) * a_.levels;
      const int64_t level = gumbel_argmax_row(logits, base);
      a_.out[((b * a_.colors + c) * a_.height + i) * a_.width + j] = level;
      g_.at(a_.caches[0], a_.colors, b, i, j)[c] = a_.scale * static_cast<float>(level) + a_.shift;
    }
  }

  // Every colour of pixel (i, j) from the mixture's params in the logits cache (contiguous, channels-last):
  // the discretized_logistic_mixture_sample op's draw, keyed ((first_sample + b) H W + pixel)(K + C).
  void draw_mixture(int64_t i, int64_t j) {
    const int64_t pixels = a_.height * a_.width, pixel = i * a_.width + j;
    const int64_t params = a_.channels[a_.logits];
    const uint64_t draws = static_cast<uint64_t>(a_.mixtures + a_.colors);
    for (int64_t b = first_; b < last_; ++b) {
      const uint64_t base =
          (static_cast<uint64_t>(a_.first_sample + b) * static_cast<uint64_t>(pixels) + static_cast<uint64_t>(pixel)) *
          draws;
      int64_t* out = a_.out + b * a_.colors * pixels + pixel;
      mixture::draw_pixel_cpu(g_.at(a_.caches[a_.logits], params, b, i, j), 1, a_.mixtures, a_.colors, a_.coupled,
                              a_.levels, a_.seed, a_.offset, base, out, pixels);
      float* input = g_.at(a_.caches[0], a_.colors, b, i, j);
      for (int64_t c = 0; c < a_.colors; ++c) input[c] = a_.scale * static_cast<float>(out[c * pixels]) + a_.shift;
    }
  }

  // categorical::gumbel_argmax with the noise of the whole row made at once: the Philox blocks by the
  // vectorised generator, the Gumbel transform in a simd loop (the same values, element by element).
  int64_t gumbel_argmax_row(const float* logits, uint64_t base) {
    const uint64_t first_block = base >> 2;
    const int64_t blocks = static_cast<int64_t>(((base + a_.levels + 3) >> 2) - first_block);
    cpu::philox_blocks(a_.seed, a_.offset, first_block, blocks, words_[0].data(), words_[1].data(), words_[2].data(),
                       words_[3].data());
    float* noise = noise_.data();
    for (int lane = 0; lane < 4; ++lane) {
      const uint32_t* w = words_[lane].data();
#pragma omp simd
      for (int64_t k = 0; k < blocks; ++k) noise[4 * k + lane] = categorical::gumbel(w[k]);
    }
    noise += base & 3u;
    int64_t best = 0;
    double best_score = double(logits[0]) + double(noise[0]);
    for (int64_t k = 1; k < a_.levels; ++k) {
      const double score = double(logits[k]) + double(noise[k]);
      if (categorical::score_beats(score, best_score)) {
        best = k;
        best_score = score;
      }
    }
    return best;
  }

  const SampleArgs& a_;
  const std::vector<PackedWeight>& packed_;
  Geometry g_;
  int64_t first_, last_;
  Buffer rows_, result_;
  std::vector<uint32_t> words_[4];  // Philox words of a draw's blocks
  std::vector<float> noise_;
};

}  // namespace

void gumbel_argmax_cpu(const GumbelArgmaxArgs& a) {
  auto run = [&](auto* logits) {
    cpu::parallel_for(a.rows, a.levels * cpu::kRandomWork, [&](int64_t n) {
      a.out[n] = categorical::gumbel_argmax(logits + n * a.levels, 1, a.levels, a.seed, a.offset,
                                            static_cast<uint64_t>(a.base[n]));
    });
  };
  if (a.dtype == DType::float64)
    run(static_cast<const double*>(a.logits));
  else
    run(static_cast<const float*>(a.logits));
}

void sample_cpu(const SampleArgs& a) {
  std::vector<PackedWeight> packed(a.nodes.size());
  for (size_t n = 0; n < a.nodes.size(); ++n)
    if (a.nodes[n].kind == kConv) packed[n] = pack(a.nodes[n]);
  // A slice of samples per thread (each runs the whole program: far above the grain).
  const int64_t slices = std::min<int64_t>(a.batch, cpu::max_threads());
#pragma omp parallel for schedule(static, 1) num_threads(static_cast<int>(slices)) if (slices > 1)
  for (int64_t t = 0; t < slices; ++t) {
    SliceSampler(a, packed, a.batch * t / slices, a.batch * (t + 1) / slices).run();
  }
}

}  // namespace pixelcnn_sampling
}  // namespace gk
