// The reparam family's kernel entry points. Every pointer is to contiguous memory the bindings have
// checked; `dtype` is the one floating dtype shared by all arrays of a call (fp16/bf16 on CUDA only).
// Reductions see their input as (outer, dim, inner) and reduce over `dim`.
#pragma once
#include "core/array.h"

namespace gk {
namespace reparam {

struct ReduceShape {
  int64_t outer, dim, inner;
  int64_t numel() const { return outer * dim * inner; }
  int64_t rows() const { return outer * inner; }
};

// z[k, j] = mu[j] + exp(logvar[j] / 2) * eps[k, j],  j < n, k < samples; eps from the stream if null.
struct SampleArgs {
  const void* mu;
  const void* logvar;
  const void* eps;  // nullable
  void* z;
  int64_t n, samples;
  uint64_t seed, offset;
  DType dtype;
};

// grad_mu[j] = sum_k grad_z[k, j];  grad_logvar[j] = sum_k grad_z[k, j] * exp(logvar[j] / 2) * eps[k, j] / 2
struct SampleBackwardArgs {
  const void* grad_z;
  const void* mu;
  const void* logvar;
  const void* eps;  // nullable: regenerated from (seed, offset)
  void* grad_mu;
  void* grad_logvar;
  int64_t n, samples;
  uint64_t seed, offset;
  DType dtype;
};

// kl[o, i] = sum_d KL term of (mu, logvar)[o, d, i]
struct KlArgs {
  const void* mu;
  const void* logvar;
  void* kl;
  ReduceShape shape;
  DType dtype;
};

struct KlBackwardArgs {
  const void* grad_kl;
  const void* mu;
  const void* logvar;
  void* grad_mu;
  void* grad_logvar;
  ReduceShape shape;
  DType dtype;
};

// z as in SampleArgs with one sample, and kl as in KlArgs, in one pass.
struct SampleKlArgs {
  const void* mu;
  const void* logvar;
  const void* eps;  // nullable
  void* z;
  void* kl;
  ReduceShape shape;
  uint64_t seed, offset;
  DType dtype;
};

struct SampleKlBackwardArgs {
  const void* grad_z;   // nullable: z unused
  const void* grad_kl;  // nullable: kl unused
  const void* mu;
  const void* logvar;
  const void* eps;  // nullable
  void* grad_mu;
  void* grad_logvar;
  ReduceShape shape;
  uint64_t seed, offset;
  DType dtype;
};

// out[o, i] = sum_d log N(z[o, d, i]; mu, exp(logvar)); mu and logvar (each nullable: 0) are indexed
// by [o % param_outer, d, i], so parameters of shape (B, ...) serve z of shape (K, B, ...).
struct LogProbArgs {
  const void* z;
  const void* mu;
  const void* logvar;
  void* out;
  ReduceShape shape;
  int64_t param_outer;
  DType dtype;
};

// Per-element gradients at z's shape: grad_z, and grad_logvar when asked (d/dmu = -d/dz).
// The caller sums them over broadcast dimensions.
struct LogProbBackwardArgs {
  const void* grad_out;
  const void* z;
  const void* mu;
  const void* logvar;
  void* grad_z;
  void* grad_logvar;  // nullable
  ReduceShape shape;
  int64_t param_outer;
  DType dtype;
};

// z (K, B, D), log_px_z (K, B), mu and logvar (B, D):
// log_w[k, b] = log_px_z[k, b] + sum_d (log N(z; 0, 1) - log N(z; mu, exp(logvar)))
// bound[b] = logsumexp_k log_w[k, b] - log K
struct IwaeArgs {
  const void* log_px_z;
  const void* z;
  const void* mu;
  const void* logvar;
  void* bound;
  void* log_w;
  int64_t samples, batch, dim;
  DType dtype;
};

// With w[k, b] = softmax_k log_w = exp(log_w - bound - log K):
// grad_log_px_z = g_b w;  grad_z = g_b w d(latent)/dz;  grad_mu, grad_logvar summed over k.
struct IwaeBackwardArgs {
  const void* grad_bound;
  const void* log_w;
  const void* bound;
  const void* z;
  const void* mu;
  const void* logvar;
  void* grad_log_px_z;
  void* grad_z;
  void* grad_mu;
  void* grad_logvar;
  int64_t samples, batch, dim;
  DType dtype;
};

void sample_cpu(const SampleArgs& a);
void sample_backward_cpu(const SampleBackwardArgs& a);
void kl_cpu(const KlArgs& a);
void kl_backward_cpu(const KlBackwardArgs& a);
void sample_kl_cpu(const SampleKlArgs& a);
void sample_kl_backward_cpu(const SampleKlBackwardArgs& a);
void log_prob_cpu(const LogProbArgs& a);
void log_prob_backward_cpu(const LogProbBackwardArgs& a);
void iwae_cpu(const IwaeArgs& a);
void iwae_backward_cpu(const IwaeBackwardArgs& a);

#ifdef GENKERN_WITH_CUDA
void sample_cuda(const SampleArgs& a, void* stream);
void sample_backward_cuda(const SampleBackwardArgs& a, void* stream);
void kl_cuda(const KlArgs& a, void* stream);
void kl_backward_cuda(const KlBackwardArgs& a, void* stream);
void sample_kl_cuda(const SampleKlArgs& a, void* stream);
void sample_kl_backward_cuda(const SampleKlBackwardArgs& a, void* stream);
void log_prob_cuda(const LogProbArgs& a, void* stream);
void log_prob_backward_cuda(const LogProbBackwardArgs& a, void* stream);
void iwae_cuda(const IwaeArgs& a, void* stream);
void iwae_backward_cuda(const IwaeBackwardArgs& a, void* stream);
#endif

}  // namespace reparam
}  // namespace gk
