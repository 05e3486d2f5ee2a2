// Entry points of the pixelcnn_sampling family: the program and the arrays are checked here, so that the
// kernels (CPU and CUDA) can index without bounds tests beyond the image border.
#include "autoregressive/pixelcnn_sampling.h"

#include <pybind11/stl.h>

#include <cmath>
#include <limits>
#include <string>

#include "core/entry.h"

namespace gk {

using namespace pixelcnn_sampling;

namespace {

void check_device(const Array& a, const Array& where, const char* name, const char* where_name) {
  if (a.device != where.device || a.device_index != where.device_index)
    throw ValueError(std::string(name) + " and " + where_name + " are on different devices");
}

void gumbel_argmax_entry(const Array& logits, const Array& base, const Array& out, uint64_t seed, uint64_t offset,
                         uintptr_t stream) {
  check_contiguous(logits, "logits");
  check_float(logits, "logits");
  if (logits.device == Device::cpu && logits.dtype != DType::float32 && logits.dtype != DType::float64)
    throw TypeError("logits: the cpu backend takes float32 or float64");
  if (logits.ndim() != 2) throw ValueError("logits must have shape (N, levels)");
  if (logits.shape[1] < 1) throw ValueError("logits must have at least one level");
  for (const Array* a : {&base, &out}) {
    const char* name = a == &base ? "base" : "out";
    check_contiguous(*a, name);
    check_dtype(*a, DType::int64, name);
    check_numel(*a, logits.shape[0], name);
    check_device(*a, logits, name, "logits");
  }
  const GumbelArgmaxArgs args{logits.raw(),    base.ptr<int64_t>(), out.ptr<int64_t>(),
                              logits.shape[0], logits.shape[1],     seed,
                              offset,          logits.dtype};
  if (args.rows == 0) return;
  // A row's draws are stream elements base .. base + levels - 1 as uint64: a negative base, or one within
  // levels of 2^63, wraps, and the warp-wide CUDA draw then finds no element of its row and returns a level
  // past the end (which callers use as an index). CPU arrays are checked here; on a GPU reading base would
  // synchronise, and the op checks it (genkern.autoregressive._ops._check_gumbel_argmax).
  if (base.device == Device::cpu) {
    const int64_t last_base = std::numeric_limits<int64_t>::max() - (args.levels - 1);
    for (int64_t n = 0; n < args.rows; ++n)
      if (args.base[n] < 0 || args.base[n] > last_base)
        throw ValueError("base: row " + std::to_string(n) + " starts at stream index " + std::to_string(args.base[n]) +
                         ", outside [0, 2^63 - levels]");
  }
  run_on_device(logits, args, stream, gumbel_argmax_cpu, GK_CUDA(gumbel_argmax_cuda));
}

// A float32 array of the program, on out's device.
const Array& float_array(const py::handle& h, const Array& out, const char* name) {
  const Array& a = py::cast<const Array&>(h);
  check_contiguous(a, name);
  check_dtype(a, DType::float32, name);
  check_device(a, out, name, "out");
  return a;
}

// One node from its Python tuple:
// (kind, row_level, in, out, residual, relu_input, accumulate, dy, dx, weight, bias, cond).
Node parse_node(const py::handle& h, const std::vector<int64_t>& channels, const Array& out, const std::string& where) {
  const py::tuple t = py::cast<py::tuple>(h);
  if (t.size() != 12) throw ValueError(where + ": a node is a 12-tuple");
  Node n;
  n.kind = py::cast<int>(t[0]);
  n.row_level = py::cast<bool>(t[1]);
  n.in = py::cast<int>(t[2]);
  n.out = py::cast<int>(t[3]);
  n.residual = py::cast<int>(t[4]);
  n.relu_input = py::cast<bool>(t[5]);
  n.accumulate = py::cast<bool>(t[6]);
  const int caches = static_cast<int>(channels.size());
  if (n.in < 0 || n.in >= caches || n.out < 1 || n.out >= caches || n.residual < -1 || n.residual >= caches)
    throw ValueError(where + ": cache index out of range (cache 0, the input, is written by the sampler only)");
  if (n.in == n.out || n.residual == n.out) throw ValueError(where + ": a node cannot read the cache it writes");
  n.c_in = channels[n.in];
  n.c_out = channels[n.out];
  if (n.kind == kGate) {
    if (n.c_in != 2 * n.c_out) throw ValueError(where + ": a gate's input has twice its output's channels");
    if (n.residual >= 0 || n.accumulate || n.relu_input) throw ValueError(where + ": a gate takes no extras");
    return n;
  }
  if (n.kind != kConv) throw ValueError(where + ": kind must be 0 (conv) or 1 (gate)");
  n.dy = py::cast<std::vector<int64_t>>(t[7]);
  n.dx = py::cast<std::vector<int64_t>>(t[8]);
  const int64_t taps = static_cast<int64_t>(n.dy.size());
  if (taps < 1 || n.dx.size() != n.dy.size()) throw ValueError(where + ": dy and dx must list the same taps (>= 1)");
  const Array& w = float_array(t[9], out, "weight");
  if (w.ndim() != 3 || w.shape[0] != taps || w.shape[1] != n.c_in || w.shape[2] != n.c_out)
    throw ValueError(where + ": weight must have shape (taps, C_in, C_out) of its caches");
  n.weight = w.ptr<const float>();
  if (!t[10].is_none()) {
    const Array& b = float_array(t[10], out, "bias");
    check_numel(b, n.c_out, "bias");
    n.bias = b.ptr<const float>();
  }
  if (!t[11].is_none()) {
    const Array& c = float_array(t[11], out, "cond");
    check_numel(c, out.shape[0] * n.c_out, "cond");
    n.cond = c.ptr<const float>();
  }
  if (n.residual >= 0 && channels[n.residual] != n.c_out)
    throw ValueError(where + ": the residual cache must have the output's channels");
  return n;
}

// Causality of the program: a pixel node reads only positions already computed (rows above, or this row
// up to this column); a row node reads pixel caches only in rows above, row caches anywhere in rows up to
// this one. Violations would read stale values, not foreign memory; they are refused as program bugs.
void check_order(const std::vector<Node>& nodes, int caches) {
  std::vector<int> row_cache(caches, -1);  // -1 unwritten, 0 pixel, 1 row
  row_cache[0] = 0;
  for (const Node& n : nodes) {
    const int kind = n.row_level ? 1 : 0;
    if (row_cache[n.out] != -1 && row_cache[n.out] != kind)
      throw ValueError("a cache is written by both row and pixel nodes");
    if (row_cache[n.in] == -1 || (n.residual >= 0 && row_cache[n.residual] == -1))
      throw ValueError("a node reads a cache no earlier node writes");
    if (n.accumulate && row_cache[n.out] == -1) throw ValueError("the first node writing a cache cannot accumulate");
    const bool reads_row = row_cache[n.in] == 1;
    for (size_t t = 0; t < n.dy.size(); ++t) {
      const int64_t dy = n.dy[t], dx = n.dx[t];
      const bool ok =
          n.row_level ? (reads_row ? dy <= 0 : dy < 0) : (reads_row ? dy <= 0 : dy < 0 || (dy == 0 && dx <= 0));
      if (!ok) throw ValueError("a tap reads a position that is not computed yet");
    }
    if (n.kind == kGate && !n.row_level && row_cache[n.in] == 1) {
      // a pixel gate of a row cache would be fine, but no model builds one; keep the contract simple
      throw ValueError("a pixel gate must read a pixel cache");
    }
    if (n.residual >= 0 && row_cache[n.residual] == 1 && !n.row_level)
      throw ValueError("a pixel node's residual must be a pixel cache");
    row_cache[n.out] = kind;
  }
}

// A node's colour plan: (step, lo, hi, rows) tuples by step (at most `steps`, the draws per pixel), covering the output
// channels once, rows within the weight's (a wrong plan gives wrong samples, never an access outside the arrays).
std::vector<Segment> parse_segments(const py::handle& h, const Node& n, int64_t steps, const std::string& where) {
  const auto tuples = py::cast<std::vector<std::vector<int64_t>>>(h);
  if (n.row_level) {
    if (!tuples.empty()) throw ValueError(where + ": a row node has no segments");
    return {};
  }
  const int64_t max_rows = n.kind == kConv ? static_cast<int64_t>(n.dy.size()) * n.c_in : 0;
  std::vector<Segment> segments;
  std::vector<char> covered(static_cast<size_t>(n.c_out), 0);
  for (const auto& t : tuples) {
    if (t.size() != 4) throw ValueError(where + ": a segment is (step, lo, hi, rows)");
    const Segment s{t[0], t[1], t[2], t[3]};
    if (s.step < 0 || s.step > steps || (!segments.empty() && s.step < segments.back().step))
      throw ValueError(where + ": segment steps must be in [0, draws per pixel], in order");
    if (s.lo < 0 || s.lo >= s.hi || s.hi > n.c_out) throw ValueError(where + ": a segment's channels are outside");
    if (s.rows < 0 || s.rows > max_rows) throw ValueError(where + ": a segment's rows are outside the weight");
    for (int64_t o = s.lo; o < s.hi; ++o) {
      if (covered[o]) throw ValueError(where + ": segments overlap");
      covered[o] = 1;
    }
    segments.push_back(s);
  }
  for (char c : covered)
    if (!c) throw ValueError(where + ": the segments must cover every output channel");
  return segments;
}

void sample_entry(const py::list& caches, const py::list& nodes, const py::list& segments, const Array& out, int logits,
                  int64_t levels, double scale, double shift, uint64_t seed, uint64_t offset, uint64_t first_sample,
                  int64_t mixtures, bool coupled, uintptr_t stream) {
  check_contiguous(out, "out");
  check_dtype(out, DType::int64, "out");
  if (out.ndim() != 4) throw ValueError("out must have shape (B, C, H, W)");
  SampleArgs a;
  a.batch = out.shape[0];
  a.colors = out.shape[1];
  a.height = out.shape[2];
  a.width = out.shape[3];
  a.levels = levels;
  if (levels < 1) throw ValueError("levels must be >= 1");
  if (mixtures < 0) throw ValueError("mixtures must be >= 0 (0: categorical logits)");
  a.mixtures = mixtures;
  a.coupled = coupled;
  if (mixtures > 0 && levels < 2) throw ValueError("levels must be >= 2 with a logistic-mixture head");
  if (mixtures == 0 && coupled) throw ValueError("coupled: only a logistic-mixture head (mixtures > 0) couples");
  if (coupled && a.colors != 3) throw ValueError("coupled: the mixture's RGB coupling needs out's 3 colours");
  if (!std::isfinite(scale) || !std::isfinite(shift)) throw ValueError("scale and shift must be finite");
  if (caches.size() < 2) throw ValueError("caches: the input cache and at least one more");
  for (size_t k = 0; k < caches.size(); ++k) {
    const Array& c = float_array(caches[k], out, "caches");
    if (c.ndim() != 4 || c.shape[0] != a.batch || c.shape[1] != a.height || c.shape[2] != a.width)
      throw ValueError("caches[" + std::to_string(k) + "] must have shape (B, H, W, channels) with out's B, H, W");
    a.caches.push_back(c.ptr<float>());
    a.channels.push_back(c.shape[3]);
  }
  if (a.channels[0] != a.colors) throw ValueError("caches[0], the input, must have out's colour channels");
  // The logits cache: colours x levels logits, or the mixture's params (10K coupled, (1 + 2C)K otherwise; by
  // division, so that no product of the arguments can overflow).
  const bool head_ok = logits >= 1 && logits < static_cast<int>(caches.size()) &&
                       (mixtures > 0 ? a.channels[logits] % mixtures == 0 &&
                                           a.channels[logits] / mixtures == (coupled ? 10 : 1 + 2 * a.colors)
                                     : a.channels[logits] == a.colors * levels);
  if (!head_ok)
    throw ValueError(mixtures > 0 ? "logits must name a cache with the mixture's (1 + 2 colours) K channels (10 K "
                                    "coupled)"
                                  : "logits must name a cache with colours * levels channels");
  if (segments.size() != nodes.size()) throw ValueError("segments: one list per node");
  for (size_t k = 0; k < nodes.size(); ++k) {
    a.nodes.push_back(parse_node(nodes[k], a.channels, out, "nodes[" + std::to_string(k) + "]"));
    a.nodes.back().segments =
        parse_segments(segments[k], a.nodes.back(), a.draw_steps(), "segments[" + std::to_string(k) + "]");
  }
  check_order(a.nodes, static_cast<int>(caches.size()));
  a.logits = logits;
  a.out = out.ptr<int64_t>();
  a.scale = static_cast<float>(scale);
  a.shift = static_cast<float>(shift);
  a.seed = seed;
  a.offset = offset;
  a.first_sample = first_sample;
  // Draw (sample, position, level) has stream index ((first_sample + s) * dims + position) * levels, a mixture's
  // draw t of (sample, pixel) ((first_sample + s) H W + pixel)(K + C) + t: int64.
  const uint64_t kMax = static_cast<uint64_t>(std::numeric_limits<int64_t>::max());
  const uint64_t per_sample =
      mixtures > 0 ? static_cast<uint64_t>(a.height * a.width) * static_cast<uint64_t>(mixtures + a.colors)
                   : static_cast<uint64_t>(a.colors * a.height * a.width) * static_cast<uint64_t>(levels);
  if (per_sample > 0 && (first_sample > kMax || static_cast<uint64_t>(a.batch) > kMax - first_sample ||
                         first_sample + static_cast<uint64_t>(a.batch) > kMax / per_sample))
    throw ValueError(mixtures > 0 ? "first_sample: (first_sample + batch) * H * W * (mixtures + colours) must stay "
                                    "below 2^63"
                                  : "first_sample: (first_sample + batch) * dims * levels must stay below 2^63");
  if (out.numel() == 0) return;
  run_on_device(out, a, stream, sample_cpu, GK_CUDA(sample_cuda));
}

}  // namespace

void bind_pixelcnn_sampling(py::module_& parent) {
  py::module_ m = parent.def_submodule("pixelcnn_sampling",
                                       "genkern._C.pixelcnn_sampling: Gumbel-max draws and the cached sampler");
  using py::arg;
  m.def("gumbel_argmax", &gumbel_argmax_entry, arg("logits"), arg("base"), arg("out"), arg("seed"), arg("offset"),
        arg("stream") = 0);
  m.def("sample", &sample_entry, arg("caches"), arg("nodes"), arg("segments"), arg("out"), arg("logits"), arg("levels"),
        arg("scale"), arg("shift"), arg("seed"), arg("offset"), arg("first_sample"), arg("mixtures") = 0,
        arg("coupled") = false, arg("stream") = 0);
}

}  // namespace gk
