// Entry point of the UniPC step: the sizes, dtypes, devices and codes that keep the kernels inside the given
// arrays (the op has checked every argument), then the kernels of unipc.h.
#include "diffusion/unipc.h"

#include <pybind11/stl.h>

#include "core/entry.h"
#include "diffusion/unipc_math.h"

namespace gk {

using namespace diffusion;

namespace {

void unipc_step_entry(const Array& model_output, const Array& sample, const Array& history, const Array& sigmas,
                      const Array& step, const OptArray& rescale, const OptArray& limit, const Array& prev_sample,
                      int64_t prediction, int64_t solver, int64_t predictor_order, int64_t corrector_order,
                      bool final_first_order, bool corrector, bool flow_sigmas, bool guided, double guidance_scale,
                      uintptr_t stream) {
  Checked(sample, "sample")(model_output, "model_output")(history, "history")(prev_sample, "prev_sample");
  if (sample.ndim() < 1) throw ValueError("sample must have a batch dimension");
  if (prediction < kEpsilon || prediction > kFlowPrediction) throw ValueError("unknown prediction type");
  if (solver != kBh1 && solver != kBh2) throw ValueError("unknown solver type");
  if (predictor_order != 1 && predictor_order != 2) throw ValueError("predictor order must be 1 or 2");
  if (corrector_order != 1 && corrector_order != 2) throw ValueError("corrector order must be 1 or 2");
  const int64_t batch = sample.shape[0], total = sample.numel();
  check_numel(model_output, (guided ? 2 : 1) * total, "model_output");
  check_numel(prev_sample, total, "prev_sample");
  // A second-order step reads the x0_hat before the previous one: the third slot.
  const int64_t slots = predictor_order == 2 || corrector_order == 2 ? 3 : 2;
  if (history.ndim() < 1 || history.shape[0] < slots)
    throw ValueError("history must have a slot per saved state (2, or 3 for second order)");
  const int64_t held = history.shape[0];
  if (held > 3) throw ValueError("history must have 2 or 3 slots");
  check_numel(history, held * total, "history");
  check_step_table(sigmas, step, sample, batch);
  check_per_sample(rescale, sample, batch, "rescale");
  check_per_sample(limit, sample, batch, "dynamic_threshold");
  if (rescale && !guided) throw ValueError("rescale needs guidance");
  if (total == 0) return;
  prepare_output(prev_sample);
  const UniPcStepArgs args{model_output.raw(),
                           sample.raw(),
                           history.raw(),
                           sigmas.ptr<const float>(),
                           step.ptr<const int64_t>(),
                           rescale ? rescale->ptr<const float>() : nullptr,
                           limit ? limit->ptr<const float>() : nullptr,
                           prev_sample.raw(),
                           batch,
                           total / batch,
                           sigmas.numel(),
                           static_cast<int32_t>(held),
                           static_cast<int32_t>(prediction),
                           static_cast<int32_t>(solver),
                           static_cast<int32_t>(predictor_order),
                           static_cast<int32_t>(corrector_order),
                           final_first_order ? 1 : 0,
                           corrector ? 1 : 0,
                           flow_sigmas ? 1 : 0,
                           guided ? 1 : 0,
                           static_cast<float>(guidance_scale),
                           sample.dtype};
  run_on_device(sample, args, stream, unipc_step_cpu, GK_CUDA(unipc_step_cuda));
}

}  // namespace

// Into the diffusion family's submodule (genkern._C.diffusion.unipc_step), beside the other steps.
void bind_unipc(py::module_& m) {
  using py::arg;
  m.def("unipc_step", &unipc_step_entry, arg("model_output"), arg("sample"), arg("history"), arg("sigmas"), arg("step"),
        arg("rescale"), arg("dynamic_threshold"), arg("prev_sample"), arg("prediction"), arg("solver"),
        arg("predictor_order"), arg("corrector_order"), arg("final_first_order"), arg("corrector"), arg("flow_sigmas"),
        arg("guided"), arg("guidance_scale"), arg("stream") = 0);
}

}  // namespace gk
