// The pixelcnn_sampling family's kernel entry points: categorical draws by Gumbel-max, and the cached
// (incremental) sampler of an autoregressive convolution network.
//
// The cached sampler runs a small program, built in Python from a model: a list of nodes over activation
// caches, each cache (B, H, W, C) float32 channels-last. A node is a convolution evaluated at one position
// (taps given as (dy, dx) offsets, weight packed (taps, C_in, C_out) with masked entries already zero) or a
// gate tanh(a) * sigmoid(b) over channel halves. Row nodes run once per row, for the whole row, before its
// first pixel (a Gated PixelCNN's vertical stack, which sees only the rows above). A pixel runs colour
// sub-steps c = 0 .. colors: sub-step c runs the pixel nodes' segments of step c (the colour plan, made in
// Python: genkern/autoregressive/sampling_plan.py), then, but after the last colour, the logits cache gives
// colour c by Gumbel-max; it is written to the output and, as scale * level + shift, to cache 0, the
// network's input. A segment computes output channels [lo, hi) from the first `rows` of the weight's rows,
// so that with colour groups each group of each layer is computed once per pixel.
//
// With a logistic-mixture head (mixtures > 0) the logits cache holds the mixture's params (docs/math.md,
// section 6.1: P = 10K coupled RGB, (1 + 2C)K otherwise) and a pixel is one sub-step: after the pixel nodes'
// step-0 segments, mixture::draw_pixel draws all its colours at once (the discretized_logistic_mixture_sample
// op's draw, keyed (sample H W + pixel)(K + C) + draw), then the step-1 segments run.
#pragma once
#include <vector>

#include "core/array.h"

namespace gk {
namespace pixelcnn_sampling {

// out[n] = argmax_k logits[n, k] + gumbel(stream element base[n] + k); logits (N, K), base and out (N,) int64.
struct GumbelArgmaxArgs {
  const void* logits;
  const int64_t* base;
  int64_t* out;
  int64_t rows, levels;
  uint64_t seed, offset;
  DType dtype;
};

enum NodeKind : int { kConv = 0, kGate = 1 };

struct Segment {
  int64_t step = 0, lo = 0, hi = 0, rows = 0;  // rows: 0 for a gate
};

struct Node {
  int kind = kConv;
  bool row_level = false;
  int in = 0, out = 0, residual = -1;  // cache indices; residual: a cache added to the output, or -1
  bool relu_input = false;             // the convolution reads max(input, 0)
  bool accumulate = false;             // add to what the output cache holds at the position
  std::vector<int64_t> dy, dx;         // the taps
  const float* weight = nullptr;       // (taps, C_in, C_out)
  const float* bias = nullptr;         // (C_out,) or null
  const float* cond = nullptr;         // (B, C_out) per-sample bias, or null
  int64_t c_in = 0, c_out = 0;
  std::vector<Segment> segments;  // a pixel node's, by step, covering [0, c_out) once; none for a row node
};

struct SampleArgs {
  std::vector<float*> caches;
  std::vector<int64_t> channels;  // of each cache
  std::vector<Node> nodes;
  int64_t batch, colors, height, width, levels;
  int logits;          // the cache holding the logits: colour c's are channels [c * levels, (c + 1) * levels)
                       // (with a mixture head: the P params)
  int64_t* out;        // (B, colors, H, W) levels
  float scale, shift;  // cache 0 gets scale * level + shift
  uint64_t seed, offset, first_sample;
  int64_t mixtures = 0;  // K of a logistic-mixture head, or 0: categorical logits
  bool coupled = false;  // the mixture's RGB coupling (colors = 3)

  // The draws per pixel: one per colour (categorical), one for the whole pixel (mixture).
  int64_t draw_steps() const { return mixtures > 0 ? 1 : colors; }
};

void gumbel_argmax_cpu(const GumbelArgmaxArgs& a);
void sample_cpu(const SampleArgs& a);

#ifdef GENKERN_WITH_CUDA
void gumbel_argmax_cuda(const GumbelArgmaxArgs& a, void* stream);
void sample_cuda(const SampleArgs& a, void* stream);
#endif

}  // namespace pixelcnn_sampling
}  // namespace gk
