// Entry points of the reparam family: shape, dtype and device checks, then the kernels of reparam.h.
#include "reparam/reparam.h"

#include <pybind11/stl.h>

#include <string>

#include "core/entry.h"

namespace gk {

using namespace reparam;

namespace {

ReduceShape reduce_shape(int64_t outer, int64_t dim, int64_t inner) {
  if (outer < 0 || dim < 0 || inner < 0) throw ValueError("reduction shape must be non-negative");
  return ReduceShape{outer, dim, inner};
}

void sample(const Array& mu, const Array& logvar, const OptArray& eps, const Array& z, uint64_t seed, uint64_t offset,
            uintptr_t stream) {
  Checked(mu, "mu")(logvar, "logvar")(eps, "eps")(z, "z");
  const int64_t n = mu.numel();
  check_numel(logvar, n, "logvar");
  if (n == 0 ? z.numel() != 0 : z.numel() % n != 0) throw ValueError("z must hold a whole number of samples of mu");
  if (eps) check_numel(*eps, z.numel(), "eps");
  if (z.numel() == 0) return;
  const SampleArgs args{mu.raw(), logvar.raw(), data_or_null(eps), z.raw(), n, z.numel() / n, seed, offset, mu.dtype};
  prepare_output(z);
  run_on_device(mu, args, stream, sample_cpu, GK_CUDA(sample_cuda));
}

void sample_backward(const Array& grad_z, const Array& mu, const Array& logvar, const OptArray& eps,
                     const Array& grad_mu, const Array& grad_logvar, uint64_t seed, uint64_t offset, uintptr_t stream) {
  Checked(mu, "mu")(logvar, "logvar")(grad_z, "grad_z")(eps, "eps")(grad_mu, "grad_mu")(grad_logvar, "grad_logvar");
  const int64_t n = mu.numel();
  check_numel(logvar, n, "logvar");
  check_numel(grad_mu, n, "grad_mu");
  check_numel(grad_logvar, n, "grad_logvar");
  if (n == 0) return;
  if (grad_z.numel() % n != 0) throw ValueError("grad_z must hold a whole number of samples of mu");
  if (eps) check_numel(*eps, grad_z.numel(), "eps");
  const SampleBackwardArgs args{
      grad_z.raw(),       mu.raw(), logvar.raw(), data_or_null(eps), grad_mu.raw(), grad_logvar.raw(), n,
      grad_z.numel() / n, seed,     offset,       mu.dtype};
  prepare_output(grad_mu);
  prepare_output(grad_logvar);
  run_on_device(mu, args, stream, sample_backward_cpu, GK_CUDA(sample_backward_cuda));
}

void kl(const Array& mu, const Array& logvar, const Array& out, int64_t outer, int64_t dim, int64_t inner,
        uintptr_t stream) {
  Checked(mu, "mu")(logvar, "logvar")(out, "kl");
  const ReduceShape s = reduce_shape(outer, dim, inner);
  check_numel(mu, s.numel(), "mu");
  check_numel(logvar, s.numel(), "logvar");
  check_numel(out, s.rows(), "kl");
  if (s.rows() == 0) return;
  run_on_device(mu, KlArgs{mu.raw(), logvar.raw(), out.raw(), s, mu.dtype}, stream, kl_cpu, GK_CUDA(kl_cuda));
}

void kl_backward(const Array& grad_kl, const Array& mu, const Array& logvar, const Array& grad_mu,
                 const Array& grad_logvar, int64_t outer, int64_t dim, int64_t inner, uintptr_t stream) {
  Checked(mu, "mu")(logvar, "logvar")(grad_kl, "grad_kl")(grad_mu, "grad_mu")(grad_logvar, "grad_logvar");
  const ReduceShape s = reduce_shape(outer, dim, inner);
  for (auto [a, name] :
       {std::pair{&mu, "mu"}, {&logvar, "logvar"}, {&grad_mu, "grad_mu"}, {&grad_logvar, "grad_logvar"}})
    check_numel(*a, s.numel(), name);
  check_numel(grad_kl, s.rows(), "grad_kl");
  if (s.numel() == 0) return;
  const KlBackwardArgs args{grad_kl.raw(), mu.raw(), logvar.raw(), grad_mu.raw(), grad_logvar.raw(), s, mu.dtype};
  prepare_output(grad_mu);
  prepare_output(grad_logvar);
  run_on_device(mu, args, stream, kl_backward_cpu, GK_CUDA(kl_backward_cuda));
}

void sample_kl(const Array& mu, const Array& logvar, const OptArray& eps, const Array& z, const Array& out,
               int64_t outer, int64_t dim, int64_t inner, uint64_t seed, uint64_t offset, uintptr_t stream) {
  Checked(mu, "mu")(logvar, "logvar")(eps, "eps")(z, "z")(out, "kl");
  const ReduceShape s = reduce_shape(outer, dim, inner);
  for (auto [a, name] : {std::pair{&mu, "mu"}, {&logvar, "logvar"}, {&z, "z"}}) check_numel(*a, s.numel(), name);
  if (eps) check_numel(*eps, s.numel(), "eps");
  check_numel(out, s.rows(), "kl");
  if (s.rows() == 0) return;
  const SampleKlArgs args{mu.raw(), logvar.raw(), data_or_null(eps), z.raw(), out.raw(), s, seed, offset, mu.dtype};
  prepare_output(z);
  run_on_device(mu, args, stream, sample_kl_cpu, GK_CUDA(sample_kl_cuda));
}

void sample_kl_backward(const OptArray& grad_z, const OptArray& grad_kl, const Array& mu, const Array& logvar,
                        const OptArray& eps, const Array& grad_mu, const Array& grad_logvar, int64_t outer, int64_t dim,
                        int64_t inner, uint64_t seed, uint64_t offset, uintptr_t stream) {
  Checked(mu, "mu")(logvar, "logvar")(grad_z, "grad_z")(grad_kl, "grad_kl")(eps, "eps")(grad_mu, "grad_mu")(
      grad_logvar, "grad_logvar");
  const ReduceShape s = reduce_shape(outer, dim, inner);
  for (auto [a, name] :
       {std::pair{&mu, "mu"}, {&logvar, "logvar"}, {&grad_mu, "grad_mu"}, {&grad_logvar, "grad_logvar"}})
    check_numel(*a, s.numel(), name);
  if (grad_z) check_numel(*grad_z, s.numel(), "grad_z");
  if (eps) check_numel(*eps, s.numel(), "eps");
  if (grad_kl) check_numel(*grad_kl, s.rows(), "grad_kl");
  if (s.numel() == 0) return;
  const SampleKlBackwardArgs args{data_or_null(grad_z),
                                  data_or_null(grad_kl),
                                  mu.raw(),
                                  logvar.raw(),
                                  data_or_null(eps),
                                  grad_mu.raw(),
                                  grad_logvar.raw(),
                                  s,
                                  seed,
                                  offset,
                                  mu.dtype};
  prepare_output(grad_mu);
  prepare_output(grad_logvar);
  run_on_device(mu, args, stream, sample_kl_backward_cpu, GK_CUDA(sample_kl_backward_cuda));
}

void check_params(const OptArray& mu, const OptArray& logvar, int64_t param_numel) {
  if (mu) check_numel(*mu, param_numel, "mu");
  if (logvar) check_numel(*logvar, param_numel, "logvar");
}

int64_t check_param_outer(int64_t outer, int64_t param_outer) {
  if (param_outer < 0 || (param_outer == 0 ? outer != 0 : outer % param_outer != 0))
    throw ValueError("param_outer must divide the outer size of z");
  return param_outer;
}

void log_prob(const Array& z, const OptArray& mu, const OptArray& logvar, const Array& out, int64_t outer, int64_t dim,
              int64_t inner, int64_t param_outer, uintptr_t stream) {
  Checked(z, "z")(mu, "mu")(logvar, "logvar")(out, "out");
  const ReduceShape s = reduce_shape(outer, dim, inner);
  check_numel(z, s.numel(), "z");
  check_params(mu, logvar, check_param_outer(outer, param_outer) * dim * inner);
  check_numel(out, s.rows(), "out");
  if (s.rows() == 0) return;
  const LogProbArgs args{z.raw(), data_or_null(mu), data_or_null(logvar), out.raw(), s, param_outer, z.dtype};
  run_on_device(z, args, stream, log_prob_cpu, GK_CUDA(log_prob_cuda));
}

void log_prob_backward(const Array& grad_out, const Array& z, const OptArray& mu, const OptArray& logvar,
                       const Array& grad_z, const OptArray& grad_logvar, int64_t outer, int64_t dim, int64_t inner,
                       int64_t param_outer, uintptr_t stream) {
  Checked(z, "z")(grad_out, "grad_out")(mu, "mu")(logvar, "logvar")(grad_z, "grad_z")(grad_logvar, "grad_logvar");
  const ReduceShape s = reduce_shape(outer, dim, inner);
  check_numel(z, s.numel(), "z");
  check_numel(grad_z, s.numel(), "grad_z");
  if (grad_logvar) check_numel(*grad_logvar, s.numel(), "grad_logvar");
  check_params(mu, logvar, check_param_outer(outer, param_outer) * dim * inner);
  check_numel(grad_out, s.rows(), "grad_out");
  if (s.numel() == 0) return;
  const LogProbBackwardArgs args{
      grad_out.raw(), z.raw(), data_or_null(mu), data_or_null(logvar), grad_z.raw(), data_or_null(grad_logvar), s,
      param_outer,    z.dtype};
  prepare_output(grad_z);
  prepare_output(grad_logvar);
  run_on_device(z, args, stream, log_prob_backward_cpu, GK_CUDA(log_prob_backward_cuda));
}

struct IwaeShape {
  int64_t samples, batch, dim;
};

IwaeShape iwae_shape(const Array& z, const Array& mu, const Array& logvar, const Array& per_sample,
                     const char* per_sample_name) {
  if (z.ndim() != 3) throw ValueError("z must have shape (K, B, D)");
  const IwaeShape s{z.shape[0], z.shape[1], z.shape[2]};
  if (s.samples < 1) throw ValueError("z must hold at least one sample (K >= 1)");
  check_numel(mu, s.batch * s.dim, "mu");
  check_numel(logvar, s.batch * s.dim, "logvar");
  check_numel(per_sample, s.samples * s.batch, per_sample_name);
  return s;
}

void iwae(const Array& log_px_z, const Array& z, const Array& mu, const Array& logvar, const Array& bound,
          const Array& log_w, uintptr_t stream) {
  Checked(z, "z")(log_px_z, "log_px_z")(mu, "mu")(logvar, "logvar")(bound, "bound")(log_w, "log_w");
  const IwaeShape s = iwae_shape(z, mu, logvar, log_px_z, "log_px_z");
  check_numel(log_w, s.samples * s.batch, "log_w");
  check_numel(bound, s.batch, "bound");
  if (s.batch == 0) return;
  const IwaeArgs args{log_px_z.raw(), z.raw(),   mu.raw(), logvar.raw(), bound.raw(),
                      log_w.raw(),    s.samples, s.batch,  s.dim,        z.dtype};
  run_on_device(z, args, stream, iwae_cpu, GK_CUDA(iwae_cuda));
}

void iwae_backward(const Array& grad_bound, const Array& log_w, const Array& bound, const Array& z, const Array& mu,
                   const Array& logvar, const Array& grad_log_px_z, const Array& grad_z, const Array& grad_mu,
                   const Array& grad_logvar, uintptr_t stream) {
  Checked(z, "z")(grad_bound, "grad_bound")(log_w, "log_w")(bound, "bound")(mu, "mu")(logvar, "logvar")(
      grad_log_px_z, "grad_log_px_z")(grad_z, "grad_z")(grad_mu, "grad_mu")(grad_logvar, "grad_logvar");
  const IwaeShape s = iwae_shape(z, mu, logvar, log_w, "log_w");
  check_numel(grad_bound, s.batch, "grad_bound");
  check_numel(bound, s.batch, "bound");
  check_numel(grad_log_px_z, s.samples * s.batch, "grad_log_px_z");
  check_numel(grad_z, z.numel(), "grad_z");
  check_numel(grad_mu, mu.numel(), "grad_mu");
  check_numel(grad_logvar, mu.numel(), "grad_logvar");
  if (s.batch == 0) return;
  const IwaeBackwardArgs args{
      grad_bound.raw(), log_w.raw(),   bound.raw(),       z.raw(),   mu.raw(), logvar.raw(), grad_log_px_z.raw(),
      grad_z.raw(),     grad_mu.raw(), grad_logvar.raw(), s.samples, s.batch,  s.dim,        z.dtype};
  prepare_output(grad_z);
  run_on_device(z, args, stream, iwae_backward_cpu, GK_CUDA(iwae_backward_cuda));
}

}  // namespace

void bind_reparam(py::module_& parent) {
  py::module_ m = parent.def_submodule("reparam", "genkern._C.reparam: reparameterized sampling kernels");
  using py::arg;
  m.def("sample", &sample, arg("mu"), arg("logvar"), arg("eps"), arg("z"), arg("seed"), arg("offset"),
        arg("stream") = 0);
  m.def("sample_backward", &sample_backward, arg("grad_z"), arg("mu"), arg("logvar"), arg("eps"), arg("grad_mu"),
        arg("grad_logvar"), arg("seed"), arg("offset"), arg("stream") = 0);
  m.def("kl", &kl, arg("mu"), arg("logvar"), arg("kl"), arg("outer"), arg("dim"), arg("inner"), arg("stream") = 0);
  m.def("kl_backward", &kl_backward, arg("grad_kl"), arg("mu"), arg("logvar"), arg("grad_mu"), arg("grad_logvar"),
        arg("outer"), arg("dim"), arg("inner"), arg("stream") = 0);
  m.def("sample_kl", &sample_kl, arg("mu"), arg("logvar"), arg("eps"), arg("z"), arg("kl"), arg("outer"), arg("dim"),
        arg("inner"), arg("seed"), arg("offset"), arg("stream") = 0);
  m.def("sample_kl_backward", &sample_kl_backward, arg("grad_z"), arg("grad_kl"), arg("mu"), arg("logvar"), arg("eps"),
        arg("grad_mu"), arg("grad_logvar"), arg("outer"), arg("dim"), arg("inner"), arg("seed"), arg("offset"),
        arg("stream") = 0);
  m.def("log_prob", &log_prob, arg("z"), arg("mu"), arg("logvar"), arg("out"), arg("outer"), arg("dim"), arg("inner"),
        arg("param_outer"), arg("stream") = 0);
  m.def("log_prob_backward", &log_prob_backward, arg("grad_out"), arg("z"), arg("mu"), arg("logvar"), arg("grad_z"),
        arg("grad_logvar"), arg("outer"), arg("dim"), arg("inner"), arg("param_outer"), arg("stream") = 0);
  m.def("iwae", &iwae, arg("log_px_z"), arg("z"), arg("mu"), arg("logvar"), arg("bound"), arg("log_w"),
        arg("stream") = 0);
  m.def("iwae_backward", &iwae_backward, arg("grad_bound"), arg("log_w"), arg("bound"), arg("z"), arg("mu"),
        arg("logvar"), arg("grad_log_px_z"), arg("grad_z"), arg("grad_mu"), arg("grad_logvar"), arg("stream") = 0);
}

}  // namespace gk
