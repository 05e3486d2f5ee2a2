// Entry points of the diffusion family: shape, dtype and device checks, then the kernels of diffusion.h.
#include "diffusion.h"

#include <pybind11/stl.h>

#include <string>

#include "bindings.h"
#include "common/diffusion.h"

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
  const QSampleArgs args{x0.raw(), data_or_null(noise), t.ptr<const int64_t>(), table.ptr<const float>(),
                         table.shape[0], x_t.raw(), batch, x0.numel() / batch, seed, offset, x0.dtype};
  run_on_device(x0, args, stream, q_sample_cpu, GK_CUDA(q_sample_cuda));
}

void loss_entry(const Array& model_output, const Array& x0, const OptArray& noise, const Array& t, const Array& table,
          const Array& out, int64_t prediction, double snr_gamma, uint64_t seed, uint64_t offset, uintptr_t stream) {
  Checked(model_output, "model_output")(x0, "x0")(noise, "noise")(out, "loss");
  const int64_t batch = batch_of(x0, "x0");
  check_numel(model_output, x0.numel(), "model_output");
  if (noise) check_numel(*noise, x0.numel(), "noise");
  check_numel(out, batch, "loss");
  check_schedule(t, table, x0, batch);
  if (batch == 0) return;
  const LossArgs args{model_output.raw(), x0.raw(), data_or_null(noise), t.ptr<const int64_t>(),
                      table.ptr<const float>(), table.shape[0], out.raw(), batch, x0.numel() / batch, check_prediction(prediction),
                      static_cast<float>(snr_gamma), seed, offset, x0.dtype};
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
  const LossBackwardArgs args{grad_loss.raw(), model_output.raw(), x0.raw(), data_or_null(noise),
                              t.ptr<const int64_t>(), table.ptr<const float>(), table.shape[0],
                              grad_model_output.raw(), batch,
                              x0.numel() / batch, check_prediction(prediction), static_cast<float>(snr_gamma),
                              seed, offset, x0.dtype};
  run_on_device(x0, args, stream, loss_backward_cpu, GK_CUDA(loss_backward_cuda));
}

}  // namespace

void bind_diffusion(py::module_& m) {
  using py::arg;
  m.def("diffusion_q_sample", &q_sample_entry, arg("x0"), arg("noise"), arg("t"), arg("table"), arg("x_t"), arg("seed"),
        arg("offset"), arg("stream") = 0);
  m.def("diffusion_loss", &loss_entry, arg("model_output"), arg("x0"), arg("noise"), arg("t"), arg("table"), arg("loss"),
        arg("prediction"), arg("snr_gamma"), arg("seed"), arg("offset"), arg("stream") = 0);
  m.def("diffusion_loss_backward", &loss_backward_entry, arg("grad_loss"), arg("model_output"), arg("x0"), arg("noise"),
        arg("t"), arg("table"), arg("grad_model_output"), arg("prediction"), arg("snr_gamma"), arg("seed"),
        arg("offset"), arg("stream") = 0);
}

}  // namespace gk
