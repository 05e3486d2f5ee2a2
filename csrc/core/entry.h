// What the family entry files share: pybind11, argument checks, and the CPU/CUDA switch.
#pragma once
#include <pybind11/pybind11.h>

#include <initializer_list>
#include <optional>
#include <string>

#include "core/array.h"

namespace gk {

namespace py = pybind11;

using OptArray = std::optional<Array>;

inline void* data_or_null(const OptArray& a) { return a ? a->raw() : nullptr; }

// Every array of a call, checked against the first: contiguous, same dtype, same device.
struct Checked {
  const Array& ref;
  const char* ref_name;
  Checked(const Array& first, const char* name) : ref(first), ref_name(name) {
    check_contiguous(first, name);
    check_float(first, name);
  }
  const Checked& operator()(const Array& a, const char* name) const {
    check_contiguous(a, name);
    check_same(a, ref, name, ref_name);
    return *this;
  }
  const Checked& operator()(const OptArray& a, const char* name) const {
    if (a) (*this)(*a, name);
    return *this;
  }
};

// A per-sample float32 array (timestep sigmas, guidance rescale factors, thresholds) on the data's device.
inline void check_per_sample(const OptArray& a, const Array& ref, int64_t batch, const char* name) {
  if (!a) return;
  check_contiguous(*a, name);
  check_dtype(*a, DType::float32, name);
  check_numel(*a, batch, name);
  if (a->device != ref.device || a->device_index != ref.device_index)
    throw ValueError(std::string(name) + " must be on the device of the data");
}

// A multistep solver's float32 sigma table (at least one step and the final sigma) and its (batch,) int64
// step indices into it, both on the data's device.
inline void check_step_table(const Array& sigmas, const Array& step, const Array& data, int64_t batch) {
  check_contiguous(sigmas, "sigmas");
  check_dtype(sigmas, DType::float32, "sigmas");
  if (sigmas.numel() < 2) throw ValueError("sigmas must hold at least one step and the final sigma");
  if (sigmas.device != data.device || sigmas.device_index != data.device_index)
    throw ValueError("sigmas must be on the device of the data");
  check_contiguous(step, "step");
  check_dtype(step, DType::int64, "step");
  check_numel(step, batch, "step");
  if (step.device != data.device || step.device_index != data.device_index)
    throw ValueError("step must be on the device of the data");
}

[[noreturn]] void throw_no_cuda();

// Call on each large output before a CPU kernel writes it (see cpu/memory.h).
void prepare_output(const Array& out);
inline void prepare_output(const OptArray& out) {
  if (out) prepare_output(*out);
}

// The CUDA version of a kernel, or nullptr in a build without CUDA.
#ifdef GENKERN_WITH_CUDA
#define GK_CUDA(fn) (fn)
#else
#define GK_CUDA(fn) nullptr
#endif

template <typename T>
struct NoDeduce {
  using type = T;
};

// Runs the CPU or the CUDA version of a kernel by where `where` lives; the CUDA one on `stream`.
template <typename Args>
void run_on_device(const Array& where, const Args& args, uintptr_t stream, void (*cpu)(const Args&),
                   typename NoDeduce<void (*)(const Args&, void*)>::type cuda) {
  if (where.device == Device::cpu) {
    py::gil_scoped_release release;
    cpu(args);
    return;
  }
  if (!cuda) throw_no_cuda();
  cuda(args, reinterpret_cast<void*>(stream));
}

void bind_random(py::module_& m);
void bind_reparam(py::module_& m);
void bind_diffusion(py::module_& m);
void bind_causal_conv1d(py::module_& m);
void bind_masked_conv(py::module_& m);
void bind_nade(py::module_& m);
void bind_pixelcnn_sampling(py::module_& m);
void bind_sampling_head(py::module_& m);
void bind_logistic_mixture(py::module_& m);

}  // namespace gk
