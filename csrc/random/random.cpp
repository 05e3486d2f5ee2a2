// Entry points of the random stream: checks, then the CPU or CUDA kernels of random.h.
#include "random/random.h"

#include <pybind11/stl.h>

#include "core/entry.h"

namespace gk {

namespace {

void stream_bits(const Array& out, uint64_t seed, uint64_t offset, uintptr_t stream) {
  check_contiguous(out, "out");
  check_dtype(out, DType::uint32, "out");
  const random::StreamArgs args{out.raw(), out.numel(), seed, offset, out.dtype};
  if (args.n == 0) return;
  prepare_output(out);
  run_on_device(out, args, stream, random::bits_cpu, GK_CUDA(random::bits_cuda));
}

void stream_normal(const Array& out, uint64_t seed, uint64_t offset, uintptr_t stream) {
  check_contiguous(out, "out");
  check_float(out, "out");
  const random::StreamArgs args{out.raw(), out.numel(), seed, offset, out.dtype};
  if (args.n == 0) return;
  prepare_output(out);
  run_on_device(out, args, stream, random::normal_cpu, GK_CUDA(random::normal_cuda));
}

void philox(const Array& counter, const Array& key, const Array& out) {
  for (auto [a, name, width] : {std::tuple{&counter, "counter", 4}, {&key, "key", 2}, {&out, "out", 4}}) {
    check_contiguous(*a, name);
    check_dtype(*a, DType::uint32, name);
    if (a->device != Device::cpu) throw ValueError(std::string(name) + " must be in host memory");
    if (a->ndim() != 2 || a->shape[1] != width)
      throw ValueError(std::string(name) + " must have shape (n, " + std::to_string(width) + ")");
  }
  const int64_t n = counter.shape[0];
  if (key.shape[0] != n || out.shape[0] != n) throw ValueError("counter, key and out must have the same n");
  py::gil_scoped_release release;
  random::philox_cpu(counter.ptr<uint32_t>(), key.ptr<uint32_t>(), out.ptr<uint32_t>(), n);
}

}  // namespace

void bind_random(py::module_& parent) {
  py::module_ m = parent.def_submodule("random", "genkern._C.random: the genkern random stream");
  m.def("bits", &stream_bits, py::arg("out"), py::arg("seed"), py::arg("offset"), py::arg("stream") = 0,
        "Fill `out` (uint32) with the genkern stream for (seed, offset).");
  m.def("normal", &stream_normal, py::arg("out"), py::arg("seed"), py::arg("offset"), py::arg("stream") = 0,
        "Fill `out` with the genkern standard normals for (seed, offset).");
  m.def("philox4x32_10", &philox, py::arg("counter"), py::arg("key"), py::arg("out"),
        "Philox4x32-10 on explicit (n, 4) counters and (n, 2) keys.");
}

}  // namespace gk
