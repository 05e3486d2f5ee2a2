// Entry points of the diffusion family: shape, dtype and device checks, then the kernels of diffusion.h.
#include "diffusion/diffusion.h"

#include <pybind11/stl.h>

#include <string>

#include "core/entry.h"
#include "diffusion/diffusion_math.h"

namespace gk {

using namespace diffusion;

namespace {

// t: one int64 per sample; table: float32 (T + 1, 4); both on the device of `ref`.
void check_schedule(const Array& t, const Array& table, const Array& ref, int64_t batch) {
  check_contiguous(t, "t");
  check_dtype(t, DType::int64, "t");
  check_numel(t, batch, "t");
  check_contiguous(table, "table");
  check_dtype(table, DType::float32, "table");
  if (table.ndim() != 2 || table.shape[1] != kTableColumns || table.shape[0] < 2)
    throw ValueError("table must have shape (T + 1, 4), as NoiseSchedule.table gives");
  for (const Array* a : {&t, &table})
    if (a->device != ref.device || a->device_index != ref.device_index)
      throw ValueError("t and table must be on the device of the data");
}

int64_t batch_of(const Array& x, const char* name) {
  if (x.ndim() < 1) throw ValueError(std::string(name) + " must have a batch dimension");
  return x.shape[0];
}

int32_t check_prediction(int64_t prediction) {
  if (prediction < kEpsilon || prediction > kSample) throw ValueError("unknown prediction type");
  return static_cast<int32_t>(prediction);
}

void q_sample_entry(const Array& x0, const OptArray& noise, const Array& t, const Array& table, const Array& x_t,
                    uint64_t seed, uint64_t offset, uintptr_t stream) {
  Checked(x0, "x0")(noise, "noise")(x_t, "x_t");
  const int64_t batch = batch_of(x0, "x0");
  check_numel(x_t, x0.numel(), "x_t");
  if (noise) check_numel(*noise, x0.numel(), "noise");
  check_schedule(t, table, x0, batch);
  if (x0.numel() == 0) return;
  prepare_output(x_t);
  const QSampleArgs args{x0.raw(),
                         data_or_null(noise),
                         t.ptr<const int64_t>(),
                         table.ptr<const float>(),
                         table.shape[0],
                         x_t.raw(),
                         batch,
                         x0.numel() / batch,
                         seed,
                         offset,
                         x0.dtype};
  run_on_device(x0, args, stream, q_sample_cpu, GK_CUDA(q_sample_cuda));
}

void loss_entry(const Array& model_output, const Array& x0, const OptArray& noise, const Array& t, const Array& table,
                const Array& out, int64_t prediction, double snr_gamma, uint64_t seed, uint64_t offset,
                uintptr_t stream) {
  Checked(model_output, "model_output")(x0, "x0")(noise, "noise")(out, "loss");
  const int64_t batch = batch_of(x0, "x0");
  check_numel(model_output, x0.numel(), "model_output");
  if (noise) check_numel(*noise, x0.numel(), "noise");
  check_numel(out, batch, "loss");
  check_schedule(t, table, x0, batch);
  if (batch == 0) return;
  const LossArgs args{model_output.raw(),
                      x0.raw(),
                      data_or_null(noise),
                      t.ptr<const int64_t>(),
                      table.ptr<const float>(),
                      table.shape[0],
                      out.raw(),
                      batch,
                      x0.numel() / batch,
                      check_prediction(prediction),
                      static_cast<float>(snr_gamma),
                      seed,
                      offset,
                      x0.dtype};
  run_on_device(x0, args, stream, loss_cpu, GK_CUDA(loss_cuda));
}

void loss_backward_entry(const Array& grad_loss, const Array& model_output, const Array& x0, const OptArray& noise,
                         const Array& t, const Array& table, const Array& grad_model_output, int64_t prediction,
                         double snr_gamma, uint64_t seed, uint64_t offset, uintptr_t stream) {
  Checked(model_output, "model_output")(grad_loss, "grad_loss")(x0, "x0")(noise, "noise")(grad_model_output,
                                                                                          "grad_model_output");
  const int64_t batch = batch_of(x0, "x0");
  check_numel(model_output, x0.numel(), "model_output");
  check_numel(grad_model_output, x0.numel(), "grad_model_output");
  if (noise) check_numel(*noise, x0.numel(), "noise");
  check_numel(grad_loss, batch, "grad_loss");
  check_schedule(t, table, x0, batch);
  if (x0.numel() == 0) return;
  prepare_output(grad_model_output);
  const LossBackwardArgs args{grad_loss.raw(),
                              model_output.raw(),
                              x0.raw(),
                              data_or_null(noise),
                              t.ptr<const int64_t>(),
                              table.ptr<const float>(),
                              table.shape[0],
                              grad_model_output.raw(),
                              batch,
                              x0.numel() / batch,
                              check_prediction(prediction),
                              static_cast<float>(snr_gamma),
                              seed,
                              offset,
                              x0.dtype};
  run_on_device(x0, args, stream, loss_backward_cpu, GK_CUDA(loss_backward_cuda));
}

void step_entry(const Array& model_output, const Array& sample, const OptArray& noise, const Array& t,
                const OptArray& prev_t, const Array& table, const OptArray& guidance_rescale,
                const OptArray& dynamic_threshold, const Array& prev_sample, const OptArray& pred_original,
                int64_t kind, int64_t prediction, int64_t variance, bool guided, double guidance_scale, double clip,
                double eta, bool use_clipped_model_output, uint64_t seed, uint64_t offset, uintptr_t stream) {
  Checked(sample, "sample")(model_output, "model_output")(noise, "noise")(prev_sample, "prev_sample")(pred_original,
                                                                                                      "pred_original");
  if (kind != kDdpm && kind != kDdim) throw ValueError("kind must be 0 (DDPM) or 1 (DDIM)");
  if (variance < kFixedSmall || variance > kLearnedRange) throw ValueError("unknown variance type");
  const int64_t batch = batch_of(sample, "sample");
  const int64_t n = batch ? sample.numel() / batch : 0;
  const int64_t per_sample = variance == kLearnedRange ? 2 * n : n;
  check_numel(model_output, (guided ? 2 : 1) * batch * per_sample, "model_output");
  check_numel(prev_sample, sample.numel(), "prev_sample");
  if (pred_original) check_numel(*pred_original, sample.numel(), "pred_original");
  if (noise) check_numel(*noise, sample.numel(), "noise");
  check_schedule(t, table, sample, batch);
  if (prev_t) {
    check_contiguous(*prev_t, "prev_t");
    check_dtype(*prev_t, DType::int64, "prev_t");
    check_numel(*prev_t, batch, "prev_t");
    if (prev_t->device != sample.device || prev_t->device_index != sample.device_index)
      throw ValueError("prev_t must be on the device of the data");
  }
  check_per_sample(guidance_rescale, sample, batch, "guidance_rescale");
  check_per_sample(dynamic_threshold, sample, batch, "dynamic_threshold");
  if (guidance_rescale && !guided) throw ValueError("guidance_rescale needs guidance");
  if (!(eta >= 0.0)) throw ValueError("eta must be non-negative");
  if (sample.numel() == 0) return;
  prepare_output(prev_sample);
  prepare_output(pred_original);
  const StepArgs args{model_output.raw(),
                      sample.raw(),
                      data_or_null(noise),
                      t.ptr<const int64_t>(),
                      prev_t ? prev_t->ptr<const int64_t>() : nullptr,
                      table.ptr<const float>(),
                      table.shape[0],
                      guidance_rescale ? guidance_rescale->ptr<const float>() : nullptr,
                      dynamic_threshold ? dynamic_threshold->ptr<const float>() : nullptr,
                      prev_sample.raw(),
                      data_or_null(pred_original),
                      batch,
                      n,
                      static_cast<int32_t>(kind),
                      check_prediction(prediction),
                      static_cast<int32_t>(variance),
                      guided ? 1 : 0,
                      static_cast<float>(guidance_scale),
                      static_cast<float>(clip),
                      static_cast<float>(eta),
                      use_clipped_model_output ? 1 : 0,
                      seed,
                      offset,
                      sample.dtype};
  run_on_device(sample, args, stream, step_cpu, GK_CUDA(step_cuda));
}

}  // namespace

void bind_sigma_step(py::module_& m);  // csrc/diffusion/sigma_step.cpp
void bind_dpm_solver(py::module_& m);  // csrc/diffusion/dpm_solver.cpp
void bind_unipc(py::module_& m);       // csrc/diffusion/unipc.cpp

void bind_diffusion(py::module_& parent) {
  py::module_ m = parent.def_submodule("diffusion", "genkern._C.diffusion: diffusion kernels");
  using py::arg;
  m.def("q_sample", &q_sample_entry, arg("x0"), arg("noise"), arg("t"), arg("table"), arg("x_t"), arg("seed"),
        arg("offset"), arg("stream") = 0);
  m.def("loss", &loss_entry, arg("model_output"), arg("x0"), arg("noise"), arg("t"), arg("table"), arg("loss"),
        arg("prediction"), arg("snr_gamma"), arg("seed"), arg("offset"), arg("stream") = 0);
  m.def("loss_backward", &loss_backward_entry, arg("grad_loss"), arg("model_output"), arg("x0"), arg("noise"), arg("t"),
        arg("table"), arg("grad_model_output"), arg("prediction"), arg("snr_gamma"), arg("seed"), arg("offset"),
        arg("stream") = 0);
  m.def("step", &step_entry, arg("model_output"), arg("sample"), arg("noise"), arg("t"), arg("prev_t"), arg("table"),
        arg("guidance_rescale"), arg("dynamic_threshold"), arg("prev_sample"), arg("pred_original"), arg("kind"),
        arg("prediction"), arg("variance"), arg("guided"), arg("guidance_scale"), arg("clip"), arg("eta"),
        arg("use_clipped_model_output"), arg("seed"), arg("offset"), arg("stream") = 0);
  bind_sigma_step(m);
  bind_dpm_solver(m);
  bind_unipc(m);
}

}  // namespace gk
