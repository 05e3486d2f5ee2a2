// The diffusion family on CUDA: q_sample, the simplified loss and its gradient (training), and the DDPM /
// DDIM step (sampling). All per-element math comes from common/diffusion.h; this file maps elements to
// threads. Arrays are (batch, n), element (b, j) being flat element b * n + j, which is also its index in the
// noise stream.
//   q_sample / loss_backward  a thread per 4 consecutive flat elements, i.e. per Philox block of eps (a
//                             sample boundary may fall inside a group when n % 4 != 0: each element then
//                             takes its own sample's coefficients);
//   loss                      a team of threads per sample (or per segment of a long sample, the segment
//                             sums then added in order by a second kernel): deterministic, no atomics;
//   step (DDPM / DDIM)        as q_sample, a thread per group of 4, taken as one run of elements per sample
//                             in it (one run unless a sample boundary falls inside the group).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math_constants.h>

#include <algorithm>
#include <type_traits>

#include "diffusion/diffusion_math.h"
#include "core/normal.h"
#include "diffusion/diffusion.h"
#include "core/launch.cuh"
#include "core/reduce.cuh"

namespace gk {
namespace diffusion {
namespace {

using namespace gpu::common;

constexpr int kThreads = 256;

// Loss segmentation, a function of (batch, n) only so that results do not depend on the device: samples
// of at least kMinSegmented elements in batches too small to fill a GPU are split into segments of at
// least kSegmentMin elements, about kTargetItems (sample, segment) items in all.
constexpr int64_t kMinSegmented = 1 << 16;
constexpr int64_t kSegmentMin = 1 << 15;
constexpr int64_t kTargetItems = 1024;

// The schedule row of sample b (clamped into the table, see level_clamped).
__device__ __forceinline__ Level level_of(const float* table, int64_t rows, const int64_t* t, int64_t b) {
  return level_clamped(table, rows, t[b]);
}

__device__ __forceinline__ float lane_of(const Normal4& z, int lane) {
  return lane == 0 ? z.z[0] : lane == 1 ? z.z[1] : lane == 2 ? z.z[2] : z.z[3];
}

// eps of flat elements base .. base + count - 1, all inside Philox block base >> 2.
template <typename S>
__device__ __forceinline__ void eps4(const S* noise, uint64_t seed, uint64_t offset, int64_t base, int count,
                                     compute_t<S> (&e)[4]) {
  using C = compute_t<S>;
  if (noise) {
    gpu::load4(noise, base, count, e);
    return;
  }
  const Normal4 z = stream_normals(seed, offset, static_cast<uint64_t>(base) >> 2);
  const int first = static_cast<int>(base & 3);
  if (first == 0) {
#pragma unroll
    for (int l = 0; l < 4; ++l) e[l] = C(z.z[l]);
    return;
  }
#pragma unroll
  for (int l = 0; l < 4; ++l) e[l] = l < count ? C(lane_of(z, (first + l) & 3)) : C(0);
}

// Samples of flat elements base .. base + 3 (n > 0) and their levels; lanes from count on repeat the last
// valid one (so nothing past the batch is read).
__device__ __forceinline__ void levels4(const float* table, int64_t rows, const int64_t* t, int64_t base, int count,
                                        int64_t n, int64_t (&b)[4], Level (&lv)[4]) {
  int64_t s, j;
  divmod(base, n, s, j);
#pragma unroll
  for (int l = 0; l < 4; ++l) {
    b[l] = s;
    if (++j == n) {
      j = 0;
      ++s;
    }
  }
  lv[0] = level_of(table, rows, t, b[0]);
#pragma unroll
  for (int l = 1; l < 4; ++l) {
    if (l >= count) b[l] = b[l - 1];
    lv[l] = b[l] != b[l - 1] ? level_of(table, rows, t, b[l]) : lv[l - 1];
  }
}

// ---------------------------------------------------------------------------------------------------------
// Element-wise kernels

template <typename S>
__global__ void __launch_bounds__(kThreads) q_sample_kernel(QSampleArgs a) {
  using C = compute_t<S>;
  const S* x0 = static_cast<const S*>(a.x0);
  const S* noise = static_cast<const S*>(a.noise);
  S* x_t = static_cast<S*>(a.x_t);
  const int64_t total = a.batch * a.n, groups = ceil_div(total, 4);
  for (int64_t g = gpu::thread_index(); g < groups; g += gpu::thread_count()) {
    const int64_t base = 4 * g;
    const int count = static_cast<int>(min(int64_t(4), total - base));
    int64_t b[4];
    Level lv[4];
    levels4(a.table, a.table_rows, a.t, base, count, a.n, b, lv);
    C x[4], e[4], out[4];
    gpu::load4(x0, base, count, x);
    eps4(noise, a.seed, a.offset, base, count, e);
#pragma unroll
    for (int l = 0; l < 4; ++l) out[l] = q_sample(x[l], e[l], lv[l]);
    gpu::store4(x_t, base, count, out);
  }
}

template <typename S>
__global__ void __launch_bounds__(kThreads) loss_backward_kernel(LossBackwardArgs a) {
  using C = compute_t<S>;
  const S* grad_loss = static_cast<const S*>(a.grad_loss);
  const S* m = static_cast<const S*>(a.model_output);
  const S* x0 = static_cast<const S*>(a.x0);
  const S* noise = static_cast<const S*>(a.noise);
  S* grad = static_cast<S*>(a.grad_model_output);
  const int64_t total = a.batch * a.n, groups = ceil_div(total, 4);
  const C n_c = C(a.n);
  for (int64_t g = gpu::thread_index(); g < groups; g += gpu::thread_count()) {
    const int64_t base = 4 * g;
    const int count = static_cast<int>(min(int64_t(4), total - base));
    int64_t b[4];
    Level lv[4];
    levels4(a.table, a.table_rows, a.t, base, count, a.n, b, lv);
    C coef[4];
    coef[0] = load(grad_loss, b[0]) * C(min_snr_weight(lv[0], a.snr_gamma, a.prediction)) / n_c;
#pragma unroll
    for (int l = 1; l < 4; ++l)
      coef[l] = b[l] != b[l - 1] ? load(grad_loss, b[l]) * C(min_snr_weight(lv[l], a.snr_gamma, a.prediction)) / n_c
                                 : coef[l - 1];
    C x[4], mo[4], e[4], out[4];
    gpu::load4(x0, base, count, x);
    gpu::load4(m, base, count, mo);
    eps4(noise, a.seed, a.offset, base, count, e);
    // (grad_loss * weight) / n, then times 2 (m - target): the order of the reference's autograd.
#pragma unroll
    for (int l = 0; l < 4; ++l) out[l] = coef[l] * (C(2) * (mo[l] - loss_target(x[l], e[l], lv[l], a.prediction)));
    gpu::store4(grad, base, count, out);
  }
}

// ---------------------------------------------------------------------------------------------------------
// The loss

// loss[b] = weight * (sum / n), the order the reference uses (mean, then weight); n == 0 gives 0.
template <typename S>
__device__ __forceinline__ void finish_loss(const LossArgs& a, int64_t b, compute_t<S> sum) {
  using C = compute_t<S>;
  const Level l = level_of(a.table, a.table_rows, a.t, b);
  const C w = C(min_snr_weight(l, a.snr_gamma, a.prediction));
  store(static_cast<S*>(a.loss), b, a.n > 0 ? (sum / C(a.n)) * w : C(0));
}

// A team of `team` threads per item; item = (sample, segment) with `segs` segments of `seg_len` elements
// per sample. The team takes its range in the groups of 4 that the flat index defines (a range may start
// mid-group), so a stream eps costs one Philox block per group. With `partial` null (segs == 1) the team
// writes the loss; otherwise the segment sum goes to partial[item].
template <typename S>
__global__ void __launch_bounds__(kThreads)
    loss_kernel(LossArgs a, int team, int64_t segs, int64_t seg_len, compute_t<S>* partial) {
  using C = compute_t<S>;
  const S* m = static_cast<const S*>(a.model_output);
  const S* x0 = static_cast<const S*>(a.x0);
  const S* noise = static_cast<const S*>(a.noise);
  const int64_t n = a.n, items = a.batch * segs;
  const int member = threadIdx.x % team;
  const int64_t teams = blockDim.x / team;
  for (int64_t first = int64_t(blockIdx.x) * teams; first < items; first += int64_t(gridDim.x) * teams) {
    const int64_t item = first + threadIdx.x / team;
    int64_t b = 0, s = 0;
    C acc = 0;
    if (item < items) {
      divmod(item, segs, b, s);
      const Level l = level_of(a.table, a.table_rows, a.t, b);
      const int64_t lo = b * n + s * seg_len, hi = b * n + min(n, (s + 1) * seg_len);
      for (int64_t g = (lo >> 2) + member; 4 * g < hi; g += team) {
        const int64_t base = max(4 * g, lo);
        const int count = static_cast<int>(min(4 * g + 4, hi) - base);
        C x[4], mo[4], e[4];
        gpu::load4(x0, base, count, x);
        gpu::load4(m, base, count, mo);
        eps4(noise, a.seed, a.offset, base, count, e);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          if (k < count) {
            const C d = loss_target(x[k], e[k], l, a.prediction) - mo[k];
            acc += d * d;
          }
        }
      }
    }
    const C total = team_sum(acc, team);
    if (member == 0 && item < items) {
      if (partial)
        partial[item] = total;
      else
        finish_loss<S>(a, b, total);
    }
  }
}

// loss[b] from the segment sums of sample b, added in order.
template <typename S>
__global__ void __launch_bounds__(kThreads) loss_finish_kernel(LossArgs a, int64_t segs, const compute_t<S>* partial) {
  using C = compute_t<S>;
  for (int64_t b = gpu::thread_index(); b < a.batch; b += gpu::thread_count()) {
    C acc = 0;
    for (int64_t s = 0; s < segs; ++s) acc += partial[b * segs + s];
    finish_loss<S>(a, b, acc);
  }
}

// ---------------------------------------------------------------------------------------------------------
// The denoising step

// What one sample contributes to its elements' step: coefficients, thresholding limit, guidance rescale.
template <typename C>
struct SampleStep {
  StepCoefficients<C> c;
  C limit;    // +inf: no thresholding
  C rescale;  // k of guide; 1 without guidance_rescale
};

template <typename C, int32_t Kind>
__device__ __forceinline__ SampleStep<C> sample_step(const StepArgs& a, int64_t b) {
  SampleStep<C> s;
  s.c = step_coefficients<C>(a.table, a.table_rows, a.t, a.prev_t, b, Kind, a.variance, C(a.eta));
  if (a.dynamic_threshold)
    s.limit = C(a.dynamic_threshold[b]);
  else
    s.limit = a.clip > 0.0f ? C(a.clip) : C(CUDART_INF_F);
  s.rescale = a.guidance_rescale ? C(a.guidance_rescale[b]) : C(1);
  return s;
}

// Flat elements first .. first + count - 1 (count <= 4), all of sample b and inside one Philox block.
template <typename S, int32_t Kind, int32_t P>
__device__ __forceinline__ void step_run(const StepArgs& a, int64_t first, int count, int64_t b) {
  using C = compute_t<S>;
  const S* mo = static_cast<const S*>(a.model_output);
  const int64_t n = a.n, stride = a.variance == kLearnedRange ? 2 * n : n;
  const int64_t m_at = first + b * (stride - n);    // model_output (b, j) is at b * stride + j
  const int64_t cond_at = m_at + a.batch * stride;  // guidance: the conditional half follows
  const bool guided = a.guided != 0;
  const SampleStep<C> s = sample_step<C, Kind>(a, b);
  C x[4], m[4], z[4] = {}, v[4] = {};
  gpu::load4(static_cast<const S*>(a.sample), first, count, x);
  gpu::load4(mo, m_at, count, m);
  if (guided) {
    C cond[4];
    gpu::load4(mo, cond_at, count, cond);
#pragma unroll
    for (int l = 0; l < 4; ++l) m[l] = guide(m[l], cond[l], C(a.guidance_scale), s.rescale);
  }
  // The normals cost more than the rest of the step: drawn only where they are added (DDPM t > 0, DDIM
  // eta > 0); which elements draw never changes a value, z of (b, j) being stream element b * n + j.
  if (s.c.noisy) {
    eps4(static_cast<const S*>(a.noise), a.seed, a.offset, first, count, z);
    // The learned variance (DDPM only: DDIM ignores it) is the second half of the conditional output.
    if (Kind == kDdpm && a.variance == kLearnedRange) gpu::load4(mo, (guided ? cond_at : m_at) + n, count, v);
  }
  const C limit = s.limit;
  const bool divide = a.dynamic_threshold != nullptr, clipped_eps = a.use_clipped_model_output != 0;
  C out[4], x0[4];
#pragma unroll
  for (int l = 0; l < 4; ++l)
    out[l] = step_element(m[l], x[l], v[l], z[l], s.c, Kind, P, a.variance, limit, divide, clipped_eps, x0[l]);
  gpu::store4(static_cast<S*>(a.prev_sample), first, count, out);
  if (a.pred_original) gpu::store4(static_cast<S*>(a.pred_original), first, count, x0);
}

// A thread per group of 4 flat elements. Kind and P are template constants so that step_element's branches
// on them fold; the other options are uniform per launch and stay runtime branches.
template <typename S, int32_t Kind, int32_t P>
__global__ void __launch_bounds__(kThreads) step_kernel(StepArgs a) {
  const int64_t n = a.n, total = a.batch * n, groups = ceil_div(total, 4);
  for (int64_t g = gpu::thread_index(); g < groups; g += gpu::thread_count()) {
    const int64_t base = 4 * g, end = min(base + 4, total);
    // One run per sample in the group: the whole group unless a sample boundary falls inside it (n % 4 != 0).
    // A loop, not unrolled lanes, so that the per-sample coefficients are computed by one copy of the code.
    int64_t b, j;
    divmod(base, n, b, j);
    for (int64_t first = base; first < end; ++b, j = 0) {
      const int count = static_cast<int>(min(end - first, n - j));
      step_run<S, Kind, P>(a, first, count, b);
      first += count;
    }
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------
// Entry points

// A thread per group of 4 flat elements of the (batch, n) arrays.
template <typename Args>
int64_t groups_of(const Args& a) {
  return ceil_div(a.batch * a.n, 4);
}

void q_sample_cuda(const QSampleArgs& a, void* stream) {
  gpu::launch_typed(
      a.dtype, "diffusion.q_sample", [](auto type) { return q_sample_kernel<typename decltype(type)::type>; },
      groups_of(a), kThreads, stream, a);
}

void loss_backward_cuda(const LossBackwardArgs& a, void* stream) {
  gpu::launch_typed(
      a.dtype, "diffusion.loss_backward", [](auto type) { return loss_backward_kernel<typename decltype(type)::type>; },
      groups_of(a), kThreads, stream, a);
}

void loss_cuda(const LossArgs& a, void* stream) {
  if (a.batch == 0) return;
  const cudaStream_t s = gpu::as_stream(stream);
  gpu::dispatch_float(a.dtype, "diffusion.loss", [&](auto type) {
    using S = typename decltype(type)::type;
    using C = compute_t<S>;
    const int64_t n = a.n;
    int64_t segs = 1, seg_len = std::max<int64_t>(n, 1);
    if (n >= kMinSegmented && a.batch < kTargetItems) {
      segs = std::min(ceil_div(kTargetItems, a.batch), ceil_div(n, kSegmentMin));
      seg_len = ceil_div(ceil_div(n, segs), 4) * 4;
      segs = ceil_div(n, seg_len);
    }
    // Per item, about one group of 4 per team member, up to a whole block.
    const gpu::TeamLaunch tl = gpu::team_for(segs > 1 ? seg_len : n, kThreads);
    const unsigned grid = gpu::grid_for(ceil_div(a.batch * segs, tl.threads / tl.team));
    if (segs == 1) {
      gpu::launch("diffusion.loss", loss_kernel<S>, grid, tl.threads, 0, s, a, tl.team, int64_t(1), seg_len,
                  static_cast<C*>(nullptr));
      return;
    }
    // Stream-ordered scratch for the segment sums: no host synchronisation.
    gpu::AsyncBuffer<C> partial(a.batch * segs, s, "diffusion.loss: cudaMallocAsync");
    gpu::launch("diffusion.loss", loss_kernel<S>, grid, tl.threads, 0, s, a, tl.team, segs, seg_len, partial.data);
    gpu::launch_items("diffusion.loss (finish)", loss_finish_kernel<S>, a.batch, kThreads, s, a, segs, partial.data);
    partial.release("diffusion.loss: cudaFreeAsync");
  });
}

void step_cuda(const StepArgs& a, void* stream) {
  const int64_t total = a.batch * a.n;
  if (total == 0) return;
  const cudaStream_t s = gpu::as_stream(stream);
  const unsigned grid = gpu::grid_for(ceil_div(groups_of(a), kThreads));
  gpu::dispatch_float(a.dtype, "diffusion.step", [&](auto type) {
    using S = typename decltype(type)::type;
    // The entry point has validated kind and prediction.
    auto launch = [&](auto kind_c) {
      constexpr int32_t Kind = decltype(kind_c)::value;
      switch (a.prediction) {
        case kEpsilon:
          step_kernel<S, Kind, kEpsilon><<<grid, kThreads, 0, s>>>(a);
          break;
        case kVPrediction:
          step_kernel<S, Kind, kVPrediction><<<grid, kThreads, 0, s>>>(a);
          break;
        default:
          step_kernel<S, Kind, kSample><<<grid, kThreads, 0, s>>>(a);
          break;
      }
    };
    if (a.kind == kDdpm)
      launch(std::integral_constant<int32_t, kDdpm>{});
    else
      launch(std::integral_constant<int32_t, kDdim>{});
    gpu::check_launch("diffusion.step");
  });
}

}  // namespace diffusion
}  // namespace gk
