// The genkern._C module: the Array description type and each family's entry points.
#include "core/entry.h"

#include <pybind11/stl.h>

#include "core/memory.h"
#include "core/parallel.h"

namespace gk {

void prepare_output(const Array& out) {
  if (out.device == Device::cpu) cpu::advise_huge_pages(out.raw(), out.numel() * dtype_size(out.dtype));
}

[[noreturn]] void throw_no_cuda() {
  throw ValueError("genkern was built without CUDA kernels (no CUDA compiler at build time)");
}

}  // namespace gk

PYBIND11_MODULE(_C, m) {
  namespace py = pybind11;
  using gk::Array;
  m.doc() = "genkern compiled core: kernels on caller-owned arrays (pointer, shape, strides, dtype, device).";

  py::enum_<gk::DType>(m, "DType")
      .value("float16", gk::DType::float16)
      .value("bfloat16", gk::DType::bfloat16)
      .value("float32", gk::DType::float32)
      .value("float64", gk::DType::float64)
      .value("uint32", gk::DType::uint32)
      .value("int64", gk::DType::int64);
  py::enum_<gk::Device>(m, "Device").value("cpu", gk::Device::cpu).value("cuda", gk::Device::cuda);

  py::class_<Array>(m, "Array")
      .def(py::init([](uintptr_t data, std::vector<int64_t> shape, std::vector<int64_t> strides, gk::DType dtype,
                       gk::Device device, int device_index) {
             Array a;
             a.data = data;
             a.shape = std::move(shape);
             a.strides = std::move(strides);
             a.dtype = dtype;
             a.device = device;
             a.device_index = device_index;
             return a;
           }),
           py::arg("data"), py::arg("shape"), py::arg("strides"), py::arg("dtype"), py::arg("device"),
           py::arg("device_index") = 0)
      .def_readonly("data", &Array::data)
      .def_readonly("shape", &Array::shape)
      .def_readonly("strides", &Array::strides)
      .def_readonly("dtype", &Array::dtype)
      .def_readonly("device", &Array::device)
      .def("__repr__", [](const Array& a) {
        return std::string("<genkern Array ") + gk::dtype_name(a.dtype) + " numel=" + std::to_string(a.numel()) + ">";
      });

  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const gk::TypeError& e) {
      PyErr_SetString(PyExc_TypeError, e.what());
    } catch (const gk::ValueError& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    }
  });

#ifdef GENKERN_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif

  // The Python side passes torch.get_num_threads() (it follows torch.set_num_threads and OMP_NUM_THREADS)
  // whenever it differs from what this thread last set; 0 returns to OpenMP's default.
  m.def(
      "set_num_threads",
      [](int n) {
        if (n < 0) throw gk::ValueError("set_num_threads: n must be >= 0");
        gk::cpu::requested_threads() = n;
      },
      py::arg("n"));
  m.def("get_num_threads", [] { return gk::cpu::max_threads(); });

  gk::bind_random(m);
  gk::bind_reparam(m);
  gk::bind_diffusion(m);
  gk::bind_causal_conv1d(m);
  gk::bind_masked_conv(m);
  gk::bind_nade(m);
  gk::bind_pixelcnn_sampling(m);
  gk::bind_sampling_head(m);
  gk::bind_logistic_mixture(m);
}
