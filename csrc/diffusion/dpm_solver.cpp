// Entry point of the DPM-Solver++ step: the sizes, dtypes, devices and codes that keep the kernels inside the
// given arrays (the op has checked every argument), then the kernels of dpm_solver.h.
#include "diffusion/dpm_solver.h"

#include <pybind11/stl.h>

#include "core/entry.h"
#include "diffusion/dpm_solver_math.h"

namespace gk {

using namespace diffusion;

namespace {

void dpm_step_entry(const Array& model_output, const Array& sample, const OptArray& noise, const Array& history,
                    const Array& sigmas, const Array& step, const OptArray& rescale, const OptArray& limit,
                    const Array& prev_sample, int64_t prediction, int64_t solver, int64_t order, bool sde,
                    bool final_first_order, bool guided, double guidance_scale, uint64_t seed, uint64_t offset,
                    uintptr_t stream) {
  Checked(sample, "sample")(model_output, "model_output")(noise, "noise")(history, "history")(prev_sample,
                                                                                              "prev_sample");
  if (sample.ndim() < 1) throw ValueError("sample must have a batch dimension");
  if (prediction < kEpsilon || prediction > kSample) throw ValueError("unknown prediction type");
  if (solver != kMidpoint && solver != kHeunSolver) throw ValueError("unknown solver type");
  if (order != 1 && order != 2) throw ValueError("solver order must be 1 or 2");
  const int64_t batch = sample.shape[0];
  check_numel(model_output, (guided ? 2 : 1) * sample.numel(), "model_output");
  check_numel(history, sample.numel(), "history");
  check_numel(prev_sample, sample.numel(), "prev_sample");
  if (noise) check_numel(*noise, sample.numel(), "noise");
  check_step_table(sigmas, step, sample, batch);
  check_per_sample(rescale, sample, batch, "rescale");
  check_per_sample(limit, sample, batch, "dynamic_threshold");
  if (rescale && !guided) throw ValueError("rescale needs guidance");
  if (sample.numel() == 0) return;
  prepare_output(prev_sample);
  const DpmStepArgs args{model_output.raw(),
                         sample.raw(),
                         data_or_null(noise),
                         history.raw(),
                         sigmas.ptr<const float>(),
                         step.ptr<const int64_t>(),
                         rescale ? rescale->ptr<const float>() : nullptr,
                         limit ? limit->ptr<const float>() : nullptr,
                         prev_sample.raw(),
                         batch,
                         sample.numel() / batch,
                         sigmas.numel(),
                         static_cast<int32_t>(prediction),
                         static_cast<int32_t>(solver),
                         static_cast<int32_t>(order),
                         sde ? 1 : 0,
                         final_first_order ? 1 : 0,
                         guided ? 1 : 0,
                         static_cast<float>(guidance_scale),
                         seed,
                         offset,
                         sample.dtype};
  run_on_device(sample, args, stream, dpm_step_cpu, GK_CUDA(dpm_step_cuda));
}

}  // namespace

// Into the diffusion family's submodule (genkern._C.diffusion.dpm_step), beside the other steps.
void bind_dpm_solver(py::module_& m) {
  using py::arg;
  m.def("dpm_step", &dpm_step_entry, arg("model_output"), arg("sample"), arg("noise"), arg("history"), arg("sigmas"),
        arg("step"), arg("rescale"), arg("dynamic_threshold"), arg("prev_sample"), arg("prediction"), arg("solver"),
        arg("order"), arg("sde"), arg("final_first_order"), arg("guided"), arg("guidance_scale"), arg("seed"),
        arg("offset"), arg("stream") = 0);
}

}  // namespace gk
