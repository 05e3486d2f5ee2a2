// Entry point of the sampling_head group: the arrays are checked here (the filter values are the op's
// checks; every value is memory-safe, since a kernel indexes only tokens [0, vocab) of its row).
#include "autoregressive/sampling_head.h"

#include <string>

#include "core/entry.h"

namespace gk {

using namespace sampling_head;

namespace {

void check_row_array(const Array& a, const Array& logits, DType dtype, const char* name) {
  check_contiguous(a, name);
  check_dtype(a, dtype, name);
  check_numel(a, logits.shape[0], name);
  if (a.device != logits.device || a.device_index != logits.device_index)
    throw ValueError(std::string(name) + " and logits are on different devices");
}

void sample_logits_entry(const Array& logits, const Array& base, const Array& out, const Array& temperature,
                         const Array& top_k, const Array& top_p, const Array& min_p, uint64_t seed, uint64_t offset,
                         uintptr_t stream) {
  check_contiguous(logits, "logits");
  check_float(logits, "logits");
  if (logits.device == Device::cpu && logits.dtype != DType::float32 && logits.dtype != DType::float64)
    throw TypeError("logits: the cpu backend takes float32 or float64");
  if (logits.ndim() != 2 || logits.shape[1] < 1) throw ValueError("logits must have shape (rows, vocab >= 1)");
  check_row_array(base, logits, DType::int64, "base");
  check_row_array(out, logits, DType::int64, "out");
  check_row_array(temperature, logits, DType::float64, "temperature");
  check_row_array(top_k, logits, DType::int64, "top_k");
  check_row_array(top_p, logits, DType::float64, "top_p");
  check_row_array(min_p, logits, DType::float64, "min_p");
  const SampleLogitsArgs args{logits.raw(),
                              base.ptr<int64_t>(),
                              out.ptr<int64_t>(),
                              temperature.ptr<double>(),
                              top_k.ptr<int64_t>(),
                              top_p.ptr<double>(),
                              min_p.ptr<double>(),
                              logits.shape[0],
                              logits.shape[1],
                              seed,
                              offset,
                              logits.dtype};
  if (args.rows == 0) return;
  run_on_device(logits, args, stream, sample_logits_cpu, GK_CUDA(sample_logits_cuda));
}

}  // namespace

void bind_sampling_head(py::module_& parent) {
  py::module_ m = parent.def_submodule("sampling_head", "genkern._C.sampling_head: filtered Gumbel-max draws");
  using py::arg;
  m.def("sample_logits", &sample_logits_entry, arg("logits"), arg("base"), arg("out"), arg("temperature"), arg("top_k"),
        arg("top_p"), arg("min_p"), arg("seed"), arg("offset"), arg("stream") = 0);
}

}  // namespace gk
