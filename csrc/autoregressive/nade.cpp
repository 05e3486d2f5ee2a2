// Entry points of the NADE family: shape, dtype and device checks, then the kernels of nade.h.
#include "autoregressive/nade.h"

#include <pybind11/stl.h>

#include <algorithm>
#include <limits>
#include <string>

#include "core/entry.h"

namespace gk {

using namespace nade;

namespace {

void check_shape(const Array& a, std::initializer_list<int64_t> expected, const char* name, const char* spelled) {
  bool ok = a.ndim() == static_cast<int64_t>(expected.size());
  for (size_t d = 0; ok && d < expected.size(); ++d) ok = a.shape[d] == expected.begin()[d];
  if (!ok) throw ValueError(std::string(name) + " must have shape " + spelled);
}

// D and H from the parameters, each checked against the others: W (H, D), c (H), V (D, H), b (D).
Shape param_shape(const Array& w, const Array& c, const Array& v, const Array& b, int64_t batch) {
  if (w.ndim() != 2) throw ValueError("weight must have shape (H, D)");
  const Shape s{batch, w.shape[1], w.shape[0]};
  check_shape(c, {s.hidden}, "c", "(H,) with H the rows of weight");
  check_shape(v, {s.dims, s.hidden}, "v", "(D, H), the transposed shape of weight");
  check_shape(b, {s.dims}, "b", "(D,) with D the columns of weight");
  return s;
}

Params params_of(const Array& w, const Array& c, const Array& v, const Array& b) {
  return Params{w.raw(), c.raw(), v.raw(), b.raw()};
}

Shape data_shape(const Array& x, const Array& w, const Array& c, const Array& v, const Array& b) {
  if (x.ndim() != 2) throw ValueError("x must have shape (B, D)");
  const Shape s = param_shape(w, c, v, b, x.shape[0]);
  if (x.shape[1] != s.dims) throw ValueError("x must have shape (B, D) with D the columns of weight");
  return s;
}

void log_prob_entry(const Array& x, const Array& w, const Array& c, const Array& v, const Array& b, const Array& out,
                    uintptr_t stream) {
  Checked(w, "weight")(x, "x")(c, "c")(v, "v")(b, "b")(out, "out");
  const Shape s = data_shape(x, w, c, v, b);
  check_numel(out, s.batch, "out");
  if (s.batch == 0) return;
  const LogProbArgs args{x.raw(), params_of(w, c, v, b), out.raw(), s, w.dtype};
  run_on_device(w, args, stream, log_prob_cpu, GK_CUDA(log_prob_cuda));
}

void log_prob_backward_entry(const Array& grad_out, const Array& x, const Array& w, const Array& c, const Array& v,
                             const Array& b, const Array& grad_w, const Array& grad_c, const Array& grad_v,
                             const Array& grad_b, uintptr_t stream) {
  Checked(w, "weight")(grad_out, "grad_out")(x, "x")(c, "c")(v, "v")(b, "b")(grad_w, "grad_weight")(grad_c, "grad_c")(
      grad_v, "grad_v")(grad_b, "grad_b");
  const Shape s = data_shape(x, w, c, v, b);
  check_numel(grad_out, s.batch, "grad_out");
  check_numel(grad_w, w.numel(), "grad_weight");
  check_numel(grad_c, c.numel(), "grad_c");
  check_numel(grad_v, v.numel(), "grad_v");
  check_numel(grad_b, b.numel(), "grad_b");
  const LogProbBackwardArgs args{grad_out.raw(), x.raw(),      params_of(w, c, v, b), grad_w.raw(),
                                 grad_c.raw(),   grad_v.raw(), grad_b.raw(),          s,
                                 w.dtype};
  // An empty batch still owes zero gradients: the kernels write them.
  prepare_output(grad_w);
  prepare_output(grad_v);
  run_on_device(w, args, stream, log_prob_backward_cpu, GK_CUDA(log_prob_backward_cuda));
}

void sample_entry(const Array& w, const Array& c, const Array& v, const Array& b, const Array& out, uint64_t seed,
                  uint64_t offset, uint64_t first, uintptr_t stream) {
  Checked(w, "weight")(c, "c")(v, "v")(b, "b")(out, "out");
  if (out.ndim() != 2) throw ValueError("out must have shape (n, D)");
  const Shape s = param_shape(w, c, v, b, out.shape[0]);
  if (out.shape[1] != s.dims) throw ValueError("out must have shape (n, D) with D the columns of weight");
  // Stream indices (first + n) * D must not wrap, or two samples would share their noise; int64 as in Python.
  constexpr uint64_t kMax = static_cast<uint64_t>(std::numeric_limits<int64_t>::max());
  const uint64_t n = static_cast<uint64_t>(s.batch), d = static_cast<uint64_t>(std::max<int64_t>(s.dims, 1));
  if (first > kMax - n || first + n > kMax / d)
    throw ValueError("first: (first + n) * D must stay below 2^63 (the stream index of the last draw)");
  if (out.numel() == 0) return;
  const SampleArgs args{params_of(w, c, v, b), out.raw(), s, seed, offset, first, w.dtype};
  run_on_device(w, args, stream, sample_cpu, GK_CUDA(sample_cuda));
}

}  // namespace

void bind_nade(py::module_& parent) {
  py::module_ m = parent.def_submodule("nade", "genkern._C.nade: NADE kernels");
  using py::arg;
  m.def("log_prob", &log_prob_entry, arg("x"), arg("weight"), arg("c"), arg("v"), arg("b"), arg("out"),
        arg("stream") = 0);
  m.def("log_prob_backward", &log_prob_backward_entry, arg("grad_out"), arg("x"), arg("weight"), arg("c"), arg("v"),
        arg("b"), arg("grad_weight"), arg("grad_c"), arg("grad_v"), arg("grad_b"), arg("stream") = 0);
  m.def("sample", &sample_entry, arg("weight"), arg("c"), arg("v"), arg("b"), arg("out"), arg("seed"), arg("offset"),
        arg("first"), arg("stream") = 0);
}

}  // namespace gk
