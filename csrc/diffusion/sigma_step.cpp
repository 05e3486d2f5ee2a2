// Entry point of the sigma-space steps: the sizes, dtypes, devices and codes that keep the kernels inside the
// given arrays (the op has checked every argument), then the kernels of sigma_step.h.
#include "diffusion/sigma_step.h"

#include <pybind11/stl.h>

#include <string>

#include "core/entry.h"
#include "diffusion/sigma_step_math.h"

namespace gk {

using namespace diffusion;

namespace {

void sigma_step_entry(const Array& model_output, const Array& sample, const OptArray& noise, const Array& sigma,
                      const Array& sigma_next, const OptArray& rescale, const Array& prev_sample,
                      const OptArray& pred_original, int64_t kind, int64_t prediction, bool guided,
                      double guidance_scale, bool stochastic, uint64_t seed, uint64_t offset, const OptArray& origin,
                      const OptArray& derivative, const OptArray& model_input, const OptArray& model_scale,
                      uintptr_t stream) {
  Checked(sample, "sample")(model_output, "model_output")(noise, "noise")(prev_sample, "prev_sample")(
      pred_original, "pred_original")(origin, "origin")(derivative, "derivative")(model_input, "model_input")(
      model_scale, "model_scale");
  if (sample.ndim() < 1) throw ValueError("sample must have a batch dimension");
  if (kind < kFlowEuler || kind > kHeunSecond) throw ValueError("unknown sigma step kind");
  const bool heun = kind == kHeunFirst || kind == kHeunSecond;
  if (heun != bool(derivative)) throw ValueError("derivative is given exactly for the Heun kinds");
  if ((kind == kHeunSecond) != bool(origin)) throw ValueError("origin is given exactly for Heun's second half");
  if (prediction < kEpsilon || prediction > kSample) throw ValueError("unknown prediction type");
  const int64_t batch = sample.shape[0];
  check_numel(model_output, (guided ? 2 : 1) * sample.numel(), "model_output");
  check_numel(prev_sample, sample.numel(), "prev_sample");
  if (pred_original) check_numel(*pred_original, sample.numel(), "pred_original");
  if (noise) check_numel(*noise, sample.numel(), "noise");
  if (derivative) check_numel(*derivative, sample.numel(), "derivative");
  if (origin) check_numel(*origin, sample.numel(), "origin");
  if (bool(model_input) != bool(model_scale)) throw ValueError("model_input and model_scale are given together");
  if (model_input) check_numel(*model_input, sample.numel(), "model_input");
  if (model_scale) check_numel(*model_scale, batch, "model_scale");
  check_per_sample(sigma, sample, batch, "sigma");
  check_per_sample(sigma_next, sample, batch, "sigma_next");
  check_per_sample(rescale, sample, batch, "rescale");
  if (rescale && !guided) throw ValueError("rescale needs guidance");
  if (sample.numel() == 0) return;
  prepare_output(prev_sample);
  prepare_output(pred_original);
  prepare_output(model_input);
  const SigmaStepArgs args{model_output.raw(),
                           sample.raw(),
                           data_or_null(noise),
                           sigma.ptr<const float>(),
                           sigma_next.ptr<const float>(),
                           rescale ? rescale->ptr<const float>() : nullptr,
                           prev_sample.raw(),
                           data_or_null(pred_original),
                           data_or_null(derivative),
                           data_or_null(origin),
                           data_or_null(model_input),
                           data_or_null(model_scale),
                           batch,
                           sample.numel() / batch,
                           static_cast<int32_t>(kind),
                           static_cast<int32_t>(prediction),
                           guided ? 1 : 0,
                           stochastic ? 1 : 0,
                           static_cast<float>(guidance_scale),
                           seed,
                           offset,
                           sample.dtype};
  run_on_device(sample, args, stream, sigma_step_cpu, GK_CUDA(sigma_step_cuda));
}

}  // namespace

// Into the diffusion family's submodule (genkern._C.diffusion.sigma_step), beside the DDPM / DDIM step.
void bind_sigma_step(py::module_& m) {
  using py::arg;
  m.def("sigma_step", &sigma_step_entry, arg("model_output"), arg("sample"), arg("noise"), arg("sigma"),
        arg("sigma_next"), arg("rescale"), arg("prev_sample"), arg("pred_original"), arg("kind"), arg("prediction"),
        arg("guided"), arg("guidance_scale"), arg("stochastic"), arg("seed"), arg("offset"), arg("origin") = py::none(),
        arg("derivative") = py::none(), arg("model_input") = py::none(), arg("model_scale") = py::none(),
        arg("stream") = 0);
}

}  // namespace gk
