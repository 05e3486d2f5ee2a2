// Entry points of the discretised logistic mixture: shape, dtype and device checks, then the kernels of
// logistic_mixture.h.
#include "autoregressive/logistic_mixture.h"

#include <pybind11/stl.h>

#include <limits>
#include <string>

#include "core/entry.h"

namespace gk {

using namespace mixture;

namespace {

DType compute_dtype(DType d) { return d == DType::float64 ? DType::float64 : DType::float32; }

void check_on(const Array& a, const Array& ref, const char* name) {
  check_contiguous(a, name);
  if (a.device != ref.device || a.device_index != ref.device_index)
    throw ValueError(std::string(name) + " must be on the device of params");
}

// The shape from params (B, P, H, W), C = `colors`, K and L, each checked against the others.
Shape shape_of(const Array& params, int64_t colors, int64_t mixtures, int64_t levels, bool coupled) {
  if (params.ndim() != 4) throw ValueError("params must have shape (B, P, H, W)");
  if (mixtures < 1) throw ValueError("num_mixtures must be >= 1");
  if (levels < 2) throw ValueError("levels must be >= 2");
  if (colors < 1) throw ValueError("the colour channels must be >= 1");
  if (coupled && colors != 3) throw ValueError("rgb coupling needs C = 3 colour channels");
  const Shape s{params.shape[0], colors, params.shape[2], params.shape[3], mixtures, levels, coupled};
  // P = (1 + per_channel C) K cannot overflow: it equals params' own dimension, or the check fails first.
  const int64_t per = s.per_channel() * colors + 1;
  if (mixtures > std::numeric_limits<int64_t>::max() / per || params.shape[1] != per * mixtures)
    throw ValueError("params must have " + std::string(coupled ? "10K" : "(1 + 2C)K") + " channels");
  return s;
}

void check_levels_array(const Array& a, const Array& params, std::initializer_list<int64_t> shape, const char* name) {
  check_on(a, params, name);
  check_dtype(a, DType::int64, name);
  bool ok = a.ndim() == static_cast<int64_t>(shape.size());
  for (size_t d = 0; ok && d < shape.size(); ++d) ok = a.shape[d] == shape.begin()[d];
  if (!ok) throw ValueError(std::string(name) + " must have shape (B, C, H, W) matching params");
}

void check_pixels(const Array& a, const Array& params, const Shape& s, const char* name) {
  check_on(a, params, name);
  check_dtype(a, compute_dtype(params.dtype), name);
  check_numel(a, s.batch * s.pixels(), name);
}

void log_prob_entry(const Array& params, const Array& x, const Array& out, int64_t levels, int64_t mixtures,
                    bool coupled, uintptr_t stream) {
  Checked(params, "params");
  if (x.ndim() != 4) throw ValueError("x must have shape (B, C, H, W)");
  const Shape s = shape_of(params, x.shape[1], mixtures, levels, coupled);
  check_levels_array(x, params, {s.batch, s.colors, s.height, s.width}, "x");
  check_pixels(out, params, s, "out");
  if (out.numel() == 0) return;
  const LogProbArgs args{params.raw(), x.ptr<int64_t>(), out.raw(), s, params.dtype};
  run_on_device(params, args, stream, log_prob_cpu, GK_CUDA(log_prob_cuda));
}

void log_prob_backward_entry(const Array& grad, const Array& params, const Array& x, const Array& log_prob,
                             const Array& grad_params, int64_t levels, int64_t mixtures, bool coupled,
                             uintptr_t stream) {
  Checked(params, "params")(grad_params, "grad_params");
  if (x.ndim() != 4) throw ValueError("x must have shape (B, C, H, W)");
  const Shape s = shape_of(params, x.shape[1], mixtures, levels, coupled);
  check_levels_array(x, params, {s.batch, s.colors, s.height, s.width}, "x");
  check_pixels(grad, params, s, "grad");
  check_pixels(log_prob, params, s, "log_prob");
  check_numel(grad_params, params.numel(), "grad_params");
  if (params.numel() == 0) return;
  prepare_output(grad_params);
  const LogProbBackwardArgs args{grad.raw(), params.raw(), x.ptr<int64_t>(), log_prob.raw(), grad_params.raw(),
                                 s,          params.dtype};
  run_on_device(params, args, stream, log_prob_backward_cpu, GK_CUDA(log_prob_backward_cuda));
}

// CPU only: on a GPU the backward's recomputation is cheap next to its memory traffic, and the op composes
// the forward and backward kernels there.
void log_prob_with_grad_entry(const Array& params, const Array& x, const Array& log_prob, const Array& grad_params,
                              int64_t levels, int64_t mixtures, bool coupled, double weight) {
  Checked(params, "params")(grad_params, "grad_params");
  if (params.device != Device::cpu) throw ValueError("log_prob_with_grad runs on CPU arrays");
  if (x.ndim() != 4) throw ValueError("x must have shape (B, C, H, W)");
  const Shape s = shape_of(params, x.shape[1], mixtures, levels, coupled);
  check_levels_array(x, params, {s.batch, s.colors, s.height, s.width}, "x");
  check_pixels(log_prob, params, s, "log_prob");
  check_numel(grad_params, params.numel(), "grad_params");
  if (params.numel() == 0) return;
  prepare_output(grad_params);
  const LogProbWithGradArgs args{params.raw(), x.ptr<int64_t>(), log_prob.raw(), grad_params.raw(), weight, s,
                                 params.dtype};
  log_prob_with_grad_cpu(args);
}

void sample_entry(const Array& params, const Array& out, int64_t levels, int64_t mixtures, bool coupled, uint64_t seed,
                  uint64_t offset, uint64_t first, uintptr_t stream) {
  Checked(params, "params");
  if (out.ndim() != 4) throw ValueError("out must have shape (B, C, H, W)");
  const Shape s = shape_of(params, out.shape[1], mixtures, levels, coupled);
  check_levels_array(out, params, {s.batch, s.colors, s.height, s.width}, "out");
  // The last draw's stream index ((first + B) H W)(K + C) must not wrap (two samples would share noise).
  constexpr uint64_t kMax = static_cast<uint64_t>(std::numeric_limits<int64_t>::max());
  const uint64_t n = static_cast<uint64_t>(s.batch);
  const uint64_t per_sample = static_cast<uint64_t>(s.pixels() > 0 ? s.pixels() : 1);
  const uint64_t draws = static_cast<uint64_t>(s.draws());
  if (first > kMax - n || first + n > kMax / per_sample || (first + n) * per_sample > kMax / draws)
    throw ValueError("first: (first + B) * H * W * (K + C) must stay below 2^63 (the stream index of the last draw)");
  if (out.numel() == 0) return;
  const SampleArgs args{params.raw(), out.ptr<int64_t>(), s, seed, offset, first, params.dtype};
  run_on_device(params, args, stream, sample_cpu, GK_CUDA(sample_cuda));
}

}  // namespace

void bind_logistic_mixture(py::module_& parent) {
  py::module_ m = parent.def_submodule("logistic_mixture", "genkern._C.logistic_mixture: PixelCNN++'s head");
  using py::arg;
  m.def("log_prob", &log_prob_entry, arg("params"), arg("x"), arg("out"), arg("levels"), arg("num_mixtures"),
        arg("coupled"), arg("stream") = 0);
  m.def("log_prob_backward", &log_prob_backward_entry, arg("grad"), arg("params"), arg("x"), arg("log_prob"),
        arg("grad_params"), arg("levels"), arg("num_mixtures"), arg("coupled"), arg("stream") = 0);
  m.def("log_prob_with_grad", &log_prob_with_grad_entry, arg("params"), arg("x"), arg("log_prob"), arg("grad_params"),
        arg("levels"), arg("num_mixtures"), arg("coupled"), arg("weight"));
  m.def("sample", &sample_entry, arg("params"), arg("out"), arg("levels"), arg("num_mixtures"), arg("coupled"),
        arg("seed"), arg("offset"), arg("first"), arg("stream") = 0);
}

}  // namespace gk
