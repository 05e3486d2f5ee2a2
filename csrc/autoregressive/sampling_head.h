// The sampling_head group's kernel entry points: one categorical draw per row of logits by Gumbel-max after
// the sampling filters (temperature, top_k, top_p, min_p; docs/math.md, section 6.2), without a sort.
#pragma once
#include "core/array.h"

namespace gk {
namespace sampling_head {

// out[n] = the draw of row n of logits (rows, vocab), its token k keyed by stream element base[n] + k; the
// per-row filters are arrays of rows values (float64, top_k int64), already checked by the op.
struct SampleLogitsArgs {
  const void* logits;
  const int64_t* base;
  int64_t* out;
  const double* temperature;
  const int64_t* top_k;
  const double* top_p;
  const double* min_p;
  int64_t rows, vocab;
  uint64_t seed, offset;
  DType dtype;
};

void sample_logits_cpu(const SampleLogitsArgs& a);

#ifdef GENKERN_WITH_CUDA
void sample_logits_cuda(const SampleLogitsArgs& a, void* stream);
#endif

}  // namespace sampling_head
}  // namespace gk
