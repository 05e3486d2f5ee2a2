// The reparam family on CUDA. All per-element math comes from common/reparam.h; this file only maps
// elements to threads. Three generic kernels serve eight of the ops, each op being a small struct:
//   elementwise_kernel  a thread per 4 consecutive flat elements, i.e. per Philox block of eps;
//   reduce_rows_kernel  (outer, dim, 1) reductions, a team of threads per row;
//   reduce_cols_kernel  (outer, dim, inner) reductions, a thread per 4 adjacent columns, d split over y.
// The IWAE pair has kernels of its own.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>

#include "core/normal.h"
#include "reparam/reparam_math.h"
#include "core/launch.cuh"
#include "core/reduce.cuh"
#include "reparam/reparam.h"

namespace gk {
namespace reparam {
namespace {

using namespace gpu::common;

constexpr int kThreads = 256;
constexpr int kColX = 32, kColY = 8;  // reduce_cols_kernel and iwae_backward_kernel blocks

// ---------------------------------------------------------------------------------------------------------
// eps

__device__ __forceinline__ float lane_of(const Normal4& n, int64_t i) {
  const int lane = static_cast<int>(i & 3);
  return lane == 0 ? n.z[0] : lane == 1 ? n.z[1] : lane == 2 ? n.z[2] : n.z[3];
}

// Stream normals of flat elements base .. base + count - 1 (count <= 4). Unaligned runs span two Philox
// blocks; selecting lanes with ?: rather than by index keeps the blocks in registers.
template <typename C>
__device__ __forceinline__ void stream_normals4(uint64_t seed, uint64_t offset, int64_t base, int count, C (&e)[4]) {
  const uint64_t first = static_cast<uint64_t>(base) >> 2;
  const Normal4 a = stream_normals(seed, offset, first);
  if ((base & 3) == 0) {
#pragma unroll
    for (int l = 0; l < 4; ++l) e[l] = C(a.z[l]);
    return;
  }
  const uint64_t last = static_cast<uint64_t>(base + count - 1) >> 2;
  const Normal4 b = last != first ? stream_normals(seed, offset, last) : a;
#pragma unroll
  for (int l = 0; l < 4; ++l) {
    const int64_t i = base + l;
    e[l] = C((static_cast<uint64_t>(i) >> 2) == first ? lane_of(a, i) : lane_of(b, i));
  }
}

// eps of flat elements base .. base + count - 1: read when given, drawn from the stream otherwise.
template <typename S>
__device__ __forceinline__ void eps4(const S* eps, uint64_t seed, uint64_t offset, int64_t base, int count,
                                     compute_t<S> (&e)[4]) {
  if (eps)
    gpu::load4(eps, base, count, e);
  else
    stream_normals4(seed, offset, base, count, e);
}

// ---------------------------------------------------------------------------------------------------------
// Element-wise ops over an (outer, dim, inner) array. An op has `shape` and
//   apply(base, c, count): elements base .. base + count - 1, c[l] the coordinates of base + l.

struct Coord {
  int64_t o, d, i;
};

__device__ __forceinline__ void coords4(int64_t f, const ReduceShape& sh, Coord (&c)[4]) {
  int64_t row, i, o, d;
  divmod(f, sh.inner, row, i);
  divmod(row, sh.dim, o, d);
  c[0] = Coord{o, d, i};
#pragma unroll
  for (int l = 1; l < 4; ++l) {
    c[l] = c[l - 1];
    if (++c[l].i == sh.inner) {
      c[l].i = 0;
      if (++c[l].d == sh.dim) {
        c[l].d = 0;
        ++c[l].o;
      }
    }
  }
}

// Index of the reduced output (o, i) of each element.
__device__ __forceinline__ void rows4(const Coord (&c)[4], const ReduceShape& sh, int64_t (&r)[4]) {
#pragma unroll
  for (int l = 0; l < 4; ++l) r[l] = c[l].o * sh.inner + c[l].i;
}

template <typename Op>
__global__ void __launch_bounds__(kThreads) elementwise_kernel(Op op) {
  const int64_t n = op.shape.outer * op.shape.dim * op.shape.inner, groups = ceil_div(n, 4);
  for (int64_t g = gpu::thread_index(); g < groups; g += gpu::thread_count()) {
    const int64_t base = 4 * g;
    Coord c[4];
    coords4(base, op.shape, c);
    op.apply(base, c, static_cast<int>(min(int64_t(4), n - base)));
  }
}

// z[k, j]: shape (samples, 1, n), so c.i is j.
template <typename S>
struct SampleOp {
  using C = compute_t<S>;
  ReduceShape shape;
  const S* mu;
  const S* logvar;
  const S* eps;
  S* z;
  uint64_t seed, offset;

  __device__ __forceinline__ void apply(int64_t base, const Coord (&c)[4], int count) const {
    const int64_t j[4] = {c[0].i, c[1].i, c[2].i, c[3].i};
    C m[4], lv[4], e[4], out[4];
    gpu::gather4(mu, j, count, m);
    gpu::gather4(logvar, j, count, lv);
    eps4(eps, seed, offset, base, count, e);
#pragma unroll
    for (int l = 0; l < 4; ++l) out[l] = sample(m[l], lv[l], e[l]);
    gpu::store4(z, base, count, out);
  }
};

// kl_backward, and sample_kl_backward when grad_z is given: a null gradient contributes nothing (and a
// null grad_z needs no eps).
template <typename S>
struct SampleKlBackwardOp {
  using C = compute_t<S>;
  ReduceShape shape;
  const S* grad_z;   // nullable
  const S* grad_kl;  // nullable
  const S* mu;
  const S* logvar;
  const S* eps;  // nullable
  S* grad_mu;
  S* grad_logvar;
  uint64_t seed, offset;

  __device__ __forceinline__ void apply(int64_t base, const Coord (&c)[4], int count) const {
    C m[4], lv[4], gm[4] = {}, gl[4] = {};
    gpu::load4(mu, base, count, m);
    gpu::load4(logvar, base, count, lv);
    if (grad_z) {
      C gz[4], e[4];
      gpu::load4(grad_z, base, count, gz);
      eps4(eps, seed, offset, base, count, e);
#pragma unroll
      for (int l = 0; l < 4; ++l) {
        gm[l] += gz[l];
        gl[l] += gz[l] * sample_dlogvar(lv[l], e[l]);
      }
    }
    if (grad_kl) {
      int64_t r[4];
      C g[4];
      rows4(c, shape, r);
      gpu::gather4(grad_kl, r, count, g);
#pragma unroll
      for (int l = 0; l < 4; ++l) {
        gm[l] += g[l] * kl_dmu(m[l]);
        gl[l] += g[l] * kl_dlogvar(lv[l]);
      }
    }
    gpu::store4(grad_mu, base, count, gm);
    gpu::store4(grad_logvar, base, count, gl);
  }
};

// Parameter index of element (o, d, i) when parameters of shape (param_outer, dim, inner) broadcast over o.
// The bindings make param_outer divide outer, so it is at least 1 whenever a kernel runs.
__device__ __forceinline__ int64_t param_index(const Coord& c, int64_t param_outer, const ReduceShape& sh) {
  int64_t q, po;
  divmod(c.o, param_outer, q, po);
  return (po * sh.dim + c.d) * sh.inner + c.i;
}

template <typename S>
struct LogProbBackwardOp {
  using C = compute_t<S>;
  ReduceShape shape;
  const S* grad_out;
  const S* z;
  const S* mu;      // nullable
  const S* logvar;  // nullable
  S* grad_z;
  S* grad_logvar;  // nullable
  int64_t param_outer;

  __device__ __forceinline__ void apply(int64_t base, const Coord (&c)[4], int count) const {
    int64_t r[4];
    C g[4], x[4], m[4] = {}, lv[4] = {}, dz[4], dlv[4];
    rows4(c, shape, r);
    gpu::gather4(grad_out, r, count, g);
    gpu::load4(z, base, count, x);
    if (mu || logvar) {
      int64_t p[4];
#pragma unroll
      for (int l = 0; l < 4; ++l) p[l] = param_index(c[l], param_outer, shape);
      if (mu) gpu::gather4(mu, p, count, m);
      if (logvar) gpu::gather4(logvar, p, count, lv);
    }
#pragma unroll
    for (int l = 0; l < 4; ++l) {
      const LogProbGrad<C> grad = normal_log_prob_grad(x[l], m[l], lv[l]);
      dz[l] = g[l] * grad.dz;
      dlv[l] = g[l] * grad.dlogvar;
    }
    gpu::store4(grad_z, base, count, dz);
    if (grad_logvar) gpu::store4(grad_logvar, base, count, dlv);
  }
};

template <typename Op>
void launch_elementwise(const Op& op, cudaStream_t s, const char* name) {
  const int64_t n = op.shape.numel();
  if (n == 0) return;
  gpu::launch_items(name, elementwise_kernel<Op>, ceil_div(n, 4), kThreads, s, op);
}

// ---------------------------------------------------------------------------------------------------------
// Reductions over dim of an (outer, dim, inner) array into out[k][o * inner + i]. An op has C, kOut,
// `shape`, `S* out[kOut]` and
//   terms(base, c, count, t): t[k][l] the k-th summand of element base + l, c the coordinates of base.
// The count elements are consecutive in memory and, for every op but SampleBackwardOp, in the parameters.

// A team of `team` threads per row: up to 32 share a warp (adjacent rows, so short rows still coalesce),
// more take the whole block. A team takes its row in the groups of 4 that the flat index defines (a row
// may start mid-group), so a random eps costs one Philox block per group.
template <typename Op>
__global__ void __launch_bounds__(kThreads) reduce_rows_kernel(Op op, int team) {
  using C = typename Op::C;
  const ReduceShape& sh = op.shape;
  const int member = threadIdx.x % team;
  const int64_t teams = blockDim.x / team;
  for (int64_t first = blockIdx.x * teams; first < sh.outer; first += gridDim.x * teams) {
    const int64_t o = first + threadIdx.x / team;
    C acc[Op::kOut] = {};
    if (o < sh.outer) {
      const int64_t lo = o * sh.dim, hi = lo + sh.dim;
      for (int64_t g = (lo >> 2) + member; 4 * g < hi; g += team) {
        const int64_t base = max(4 * g, lo);
        const int count = static_cast<int>(min(4 * g + 4, hi) - base);
        C t[Op::kOut][4];
        op.terms(base, Coord{o, base - lo, 0}, count, t);
#pragma unroll
        for (int k = 0; k < Op::kOut; ++k)
#pragma unroll
          for (int l = 0; l < 4; ++l)
            if (l < count) acc[k] += t[k][l];
      }
    }
#pragma unroll
    for (int k = 0; k < Op::kOut; ++k) {
      const C total = team_sum(acc[k], team);
      if (member == 0 && o < sh.outer) store(op.out[k], o, total);
    }
  }
}

// threadIdx.x takes 4 adjacent columns (o, i .. i + 3), so loads coalesce over i and eps comes a Philox
// block at a time when inner % 4 == 0; threadIdx.y takes every blockDim.y-th d, and the y partial sums
// are added in order through shared memory.
template <typename Op>
__global__ void __launch_bounds__(kColX* kColY) reduce_cols_kernel(Op op) {
  using C = typename Op::C;
  __shared__ C partial[Op::kOut][kColY][kColX][4];
  const ReduceShape& sh = op.shape;
  const int64_t per_o = ceil_div(sh.inner, 4), groups = sh.outer * per_o;
  for (int64_t tile = int64_t(blockIdx.x) * kColX; tile < groups; tile += int64_t(gridDim.x) * kColX) {
    const int64_t grp = tile + threadIdx.x;
    int64_t o = 0, i = 0;
    int count = 0;
    if (grp < groups) {
      divmod(grp, per_o, o, i);
      i *= 4;
      count = static_cast<int>(min(int64_t(4), sh.inner - i));
    }
    C acc[Op::kOut][4] = {};
    for (int64_t d = threadIdx.y; count > 0 && d < sh.dim; d += blockDim.y) {
      C t[Op::kOut][4];
      op.terms((o * sh.dim + d) * sh.inner + i, Coord{o, d, i}, count, t);
#pragma unroll
      for (int k = 0; k < Op::kOut; ++k)
#pragma unroll
        for (int l = 0; l < 4; ++l) acc[k][l] += t[k][l];
    }
#pragma unroll
    for (int k = 0; k < Op::kOut; ++k)
#pragma unroll
      for (int l = 0; l < 4; ++l) partial[k][threadIdx.y][threadIdx.x][l] = acc[k][l];
    __syncthreads();
    if (threadIdx.y == 0 && count > 0) {
#pragma unroll
      for (int k = 0; k < Op::kOut; ++k) {
        for (unsigned y = 1; y < blockDim.y; ++y)
#pragma unroll
          for (int l = 0; l < 4; ++l) acc[k][l] += partial[k][y][threadIdx.x][l];
        gpu::store4(op.out[k], o * sh.inner + i, count, acc[k]);
      }
    }
    __syncthreads();  // partial is rewritten by the next tile
  }
}

template <typename Op>
void launch_cols(const Op& op, cudaStream_t s) {
  const ReduceShape& sh = op.shape;
  const dim3 block(kColX, static_cast<unsigned>(std::min<int64_t>(kColY, std::max<int64_t>(sh.dim, 1))));
  reduce_cols_kernel<<<gpu::grid_for(ceil_div(sh.outer * ceil_div(sh.inner, 4), kColX)), block, 0, s>>>(op);
}

// inner == 1 goes to the row kernel, with about one group of 4 per team member. Everything else, and
// dim == 0 (which must still write zeros), goes to the column kernel.
template <typename Op>
void launch_reduce(const Op& op, cudaStream_t s, const char* name) {
  const ReduceShape& sh = op.shape;
  if (sh.rows() == 0) return;
  if (sh.inner == 1 && sh.dim > 0) {
    const gpu::TeamLaunch tl = gpu::team_for(sh.dim, kThreads);
    reduce_rows_kernel<<<gpu::grid_for(ceil_div(sh.outer, tl.threads / tl.team)), tl.threads, 0, s>>>(op, tl.team);
  } else {
    launch_cols(op, s);
  }
  gpu::check_launch(name);
}

template <typename S>
struct KlOp {
  using C = compute_t<S>;
  static constexpr int kOut = 1;
  ReduceShape shape;
  S* out[kOut];
  const S* mu;
  const S* logvar;

  __device__ __forceinline__ void terms(int64_t base, const Coord&, int count, C (&t)[kOut][4]) const {
    C m[4], lv[4];
    gpu::load4(mu, base, count, m);
    gpu::load4(logvar, base, count, lv);
#pragma unroll
    for (int l = 0; l < 4; ++l) t[0][l] = kl(m[l], lv[l]);
  }
};

// Writes z as it goes: each element's z and KL term come from one sample_and_kl call (one shared exp).
template <typename S>
struct SampleKlOp {
  using C = compute_t<S>;
  static constexpr int kOut = 1;
  ReduceShape shape;
  S* out[kOut];
  const S* mu;
  const S* logvar;
  const S* eps;
  S* z;
  uint64_t seed, offset;

  __device__ __forceinline__ void terms(int64_t base, const Coord&, int count, C (&t)[kOut][4]) const {
    C m[4], lv[4], e[4], zs[4];
    gpu::load4(mu, base, count, m);
    gpu::load4(logvar, base, count, lv);
    eps4(eps, seed, offset, base, count, e);
#pragma unroll
    for (int l = 0; l < 4; ++l) {
      const SampleKl<C> r = sample_and_kl(m[l], lv[l], e[l]);
      zs[l] = r.z;
      t[0][l] = r.kl;
    }
    gpu::store4(z, base, count, zs);
  }
};

template <typename S>
struct LogProbOp {
  using C = compute_t<S>;
  static constexpr int kOut = 1;
  ReduceShape shape;
  S* out[kOut];
  const S* z;
  const S* mu;      // nullable
  const S* logvar;  // nullable
  int64_t param_outer;

  __device__ __forceinline__ void terms(int64_t base, const Coord& c, int count, C (&t)[kOut][4]) const {
    C x[4];
    gpu::load4(z, base, count, x);
    if (!mu && !logvar) {
#pragma unroll
      for (int l = 0; l < 4; ++l) t[0][l] = std_normal_log_prob(x[l]);
      return;
    }
    const int64_t p = param_index(c, param_outer, shape);
    C m[4] = {}, lv[4] = {};
    if (mu) gpu::load4(mu, p, count, m);
    if (logvar) gpu::load4(logvar, p, count, lv);
#pragma unroll
    for (int l = 0; l < 4; ++l) t[0][l] = normal_log_prob(x[l], m[l], lv[l]);
  }
};

// Shape (1, samples, n) with parameters indexed by i = j alone: consecutive along i only, so this op runs
// in the column kernel only.
template <typename S>
struct SampleBackwardOp {
  using C = compute_t<S>;
  static constexpr int kOut = 2;
  ReduceShape shape;
  S* out[kOut];  // grad_mu, grad_logvar
  const S* grad_z;
  const S* logvar;
  const S* eps;
  uint64_t seed, offset;

  __device__ __forceinline__ void terms(int64_t base, const Coord& c, int count, C (&t)[kOut][4]) const {
    C gz[4], lv[4], e[4];
    gpu::load4(grad_z, base, count, gz);
    gpu::load4(logvar, c.i, count, lv);
    eps4(eps, seed, offset, base, count, e);
#pragma unroll
    for (int l = 0; l < 4; ++l) {
      t[0][l] = gz[l];
      t[1][l] = gz[l] * sample_dlogvar(lv[l], e[l]);
    }
  }
};

// ---------------------------------------------------------------------------------------------------------
// IWAE

// Folds a partial logsumexp (m2, s2), s2 = sum exp(x - m2), into (m, s). Equal maxima add directly, which
// also keeps +inf from producing inf - inf; a NaN maximum sticks. gk::exp(-inf) is exactly 0.
template <typename C>
__device__ __forceinline__ void lse_merge(C& m, C& s, C m2, C s2) {
  if (m2 != m2) {
    m = m2;
  } else if (m2 > m) {
    s = s * gk::exp(m - m2) + s2;
    m = m2;
  } else if (m2 == m) {
    s += s2;
  } else {
    s += s2 * gk::exp(m2 - m);
  }
}

// A block per batch element b. The block is cut into groups of `width` lanes (a power of two <= 32 near
// dim); a group sums one sample's latent terms over d with shuffles, and its first lane keeps a running
// logsumexp of the log-weights it produced. The groups' logsumexps are merged at the end, so the bound
// comes from compute-type log-weights, not from their rounded stored copies.
template <typename S>
__global__ void __launch_bounds__(kThreads) iwae_kernel(IwaeArgs a, int width) {
  using C = compute_t<S>;
  __shared__ C warp_m[32], warp_s[32];
  const S* log_px_z = static_cast<const S*>(a.log_px_z);
  const S* z = static_cast<const S*>(a.z);
  S* log_w = static_cast<S*>(a.log_w);
  const int lane = threadIdx.x % width, group = threadIdx.x / width, groups = blockDim.x / width;
  const C log_k = gk::log(C(a.samples));
  for (int64_t b = blockIdx.x; b < a.batch; b += gridDim.x) {
    const S* mu = static_cast<const S*>(a.mu) + b * a.dim;
    const S* logvar = static_cast<const S*>(a.logvar) + b * a.dim;
    C m = C(-INFINITY), s = C(0);
    for (int64_t k0 = 0; k0 < a.samples; k0 += groups) {
      const int64_t k = k0 + group, kb = k * a.batch + b;
      C latent = C(0);
      if (k < a.samples) {
        const S* z_kb = z + kb * a.dim;
        for (int64_t d = lane; d < a.dim; d += width)
          latent += iwae_latent_term(load(z_kb, d), load(mu, d), load(logvar, d));
      }
      for (int off = width >> 1; off > 0; off >>= 1) latent += __shfl_xor_sync(0xffffffffu, latent, off);
      if (k < a.samples && lane == 0) {
        const C log_w_kb = load(log_px_z, kb) + latent;
        store(log_w, kb, log_w_kb);
        lse_merge(m, s, log_w_kb, C(1));
      }
    }
    for (int off = 16; off > 0; off >>= 1) {
      const C m2 = __shfl_down_sync(0xffffffffu, m, off), s2 = __shfl_down_sync(0xffffffffu, s, off);
      lse_merge(m, s, m2, s2);
    }
    __syncthreads();  // thread 0 is done reading the previous b's warp_m / warp_s
    if ((threadIdx.x & 31) == 0) {
      warp_m[threadIdx.x >> 5] = m;
      warp_s[threadIdx.x >> 5] = s;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      for (unsigned w = 1; w < (blockDim.x >> 5); ++w) lse_merge(m, s, warp_m[w], warp_s[w]);
      // A finite maximum has s >= 1, inside gk::log's domain; an infinite or NaN one is the bound.
      store(static_cast<S*>(a.bound), b, isfinite(m) ? m + gk::log(s) - log_k : m);
    }
  }
}

// threadIdx.x takes a (b, d) column, threadIdx.y every blockDim.y-th sample k: grad_z and grad_log_px_z are
// written as they come, grad_mu and grad_logvar summed over k (y partials added in order through shared
// memory). With dim == 0 each b keeps one column, for grad_log_px_z.
template <typename S>
__global__ void __launch_bounds__(kColX* kColY) iwae_backward_kernel(IwaeBackwardArgs a) {
  using C = compute_t<S>;
  __shared__ C partial[2][kColY][kColX];
  const S* grad_bound = static_cast<const S*>(a.grad_bound);
  const S* log_w = static_cast<const S*>(a.log_w);
  const S* z = static_cast<const S*>(a.z);
  const S* mu = static_cast<const S*>(a.mu);
  const S* logvar = static_cast<const S*>(a.logvar);
  S* grad_log_px_z = static_cast<S*>(a.grad_log_px_z);
  S* grad_z = static_cast<S*>(a.grad_z);
  const int64_t per_b = max(a.dim, int64_t(1)), cols = a.batch * per_b, plane = a.batch * a.dim;
  for (int64_t tile = int64_t(blockIdx.x) * kColX; tile < cols; tile += int64_t(gridDim.x) * kColX) {
    const int64_t col = tile + threadIdx.x;
    int64_t b = 0, d = 0;
    if (col < cols) divmod(col, per_b, b, d);
    const bool has_d = col < cols && d < a.dim;  // col is then b * dim + d
    C dmu = C(0), dlogvar = C(0);
    if (col < cols) {
      const C g = load(grad_bound, b);
      C w_max = C(-INFINITY), w_sum = C(0);  // the softmax over k (reparam_math.h), recomputed by each thread
      for (int64_t k = 0; k < a.samples; ++k) w_max = softmax_max(w_max, load(log_w, k * a.batch + b));
      for (int64_t k = 0; k < a.samples; ++k) w_sum += gk::exp(load(log_w, k * a.batch + b) - w_max);
      const C mu_bd = has_d ? load(mu, col) : C(0), logvar_bd = has_d ? load(logvar, col) : C(0);
      for (int64_t k = threadIdx.y; k < a.samples; k += blockDim.y) {
        const int64_t kb = k * a.batch + b;
        const C gw = g * softmax_weight(load(log_w, kb), w_max, w_sum);
        if (d == 0) store(grad_log_px_z, kb, gw);
        if (has_d) {
          const LatentGrad<C> grad = iwae_latent_grad(load(z, k * plane + col), mu_bd, logvar_bd);
          store(grad_z, k * plane + col, gw * grad.dz);
          dmu += gw * grad.dmu;
          dlogvar += gw * grad.dlogvar;
        }
      }
    }
    partial[0][threadIdx.y][threadIdx.x] = dmu;
    partial[1][threadIdx.y][threadIdx.x] = dlogvar;
    __syncthreads();
    if (threadIdx.y == 0 && has_d) {
      for (unsigned y = 1; y < blockDim.y; ++y) {
        dmu += partial[0][y][threadIdx.x];
        dlogvar += partial[1][y][threadIdx.x];
      }
      store(static_cast<S*>(a.grad_mu), col, dmu);
      store(static_cast<S*>(a.grad_logvar), col, dlogvar);
    }
    __syncthreads();  // partial is rewritten by the next tile
  }
}

// ---------------------------------------------------------------------------------------------------------
// Entry points

// The op of each entry point at the storage type S (make<S> overloaded on the entry's arguments).
template <typename S>
SampleOp<S> make(const SampleArgs& a) {
  return {ReduceShape{a.samples, 1, a.n},
          gpu::typed<S>(a.mu),
          gpu::typed<S>(a.logvar),
          gpu::typed<S>(a.eps),
          gpu::typed<S>(a.z),
          a.seed,
          a.offset};
}

template <typename S>
SampleBackwardOp<S> make(const SampleBackwardArgs& a) {
  return {ReduceShape{1, a.samples, a.n},
          {gpu::typed<S>(a.grad_mu), gpu::typed<S>(a.grad_logvar)},
          gpu::typed<S>(a.grad_z),
          gpu::typed<S>(a.logvar),
          gpu::typed<S>(a.eps),
          a.seed,
          a.offset};
}

template <typename S>
KlOp<S> make(const KlArgs& a) {
  return {a.shape, {gpu::typed<S>(a.kl)}, gpu::typed<S>(a.mu), gpu::typed<S>(a.logvar)};
}

// kl_backward is sample_kl_backward without grad_z (so without eps).
template <typename S>
SampleKlBackwardOp<S> make(const KlBackwardArgs& a) {
  return {a.shape,
          nullptr,
          gpu::typed<S>(a.grad_kl),
          gpu::typed<S>(a.mu),
          gpu::typed<S>(a.logvar),
          nullptr,
          gpu::typed<S>(a.grad_mu),
          gpu::typed<S>(a.grad_logvar),
          0,
          0};
}

template <typename S>
SampleKlOp<S> make(const SampleKlArgs& a) {
  return {a.shape,
          {gpu::typed<S>(a.kl)},
          gpu::typed<S>(a.mu),
          gpu::typed<S>(a.logvar),
          gpu::typed<S>(a.eps),
          gpu::typed<S>(a.z),
          a.seed,
          a.offset};
}

template <typename S>
SampleKlBackwardOp<S> make(const SampleKlBackwardArgs& a) {
  return {a.shape,
          gpu::typed<S>(a.grad_z),
          gpu::typed<S>(a.grad_kl),
          gpu::typed<S>(a.mu),
          gpu::typed<S>(a.logvar),
          gpu::typed<S>(a.eps),
          gpu::typed<S>(a.grad_mu),
          gpu::typed<S>(a.grad_logvar),
          a.seed,
          a.offset};
}

template <typename S>
LogProbOp<S> make(const LogProbArgs& a) {
  return {a.shape,      {gpu::typed<S>(a.out)}, gpu::typed<S>(a.z), gpu::typed<S>(a.mu), gpu::typed<S>(a.logvar),
          a.param_outer};
}

template <typename S>
LogProbBackwardOp<S> make(const LogProbBackwardArgs& a) {
  return {a.shape,
          gpu::typed<S>(a.grad_out),
          gpu::typed<S>(a.z),
          gpu::typed<S>(a.mu),
          gpu::typed<S>(a.logvar),
          gpu::typed<S>(a.grad_z),
          gpu::typed<S>(a.grad_logvar),
          a.param_outer};
}

// How each kind of op runs.
struct Elementwise {
  template <typename Op>
  static void run(const Op& op, cudaStream_t s, const char* name) {
    launch_elementwise(op, s, name);
  }
};
struct Reduce {
  template <typename Op>
  static void run(const Op& op, cudaStream_t s, const char* name) {
    launch_reduce(op, s, name);
  }
};
struct Columns {  // the column kernel only (see SampleBackwardOp)
  template <typename Op>
  static void run(const Op& op, cudaStream_t s, const char* name) {
    if (op.shape.rows() == 0) return;
    launch_cols(op, s);
    gpu::check_launch(name);
  }
};

// make<S>(a) for the storage type S of a.dtype, run as Launch says.
template <typename Launch, typename Args>
void run_op(const Args& a, void* stream, const char* name) {
  gpu::dispatch_float(a.dtype, name, [&](auto type) {
    Launch::run(make<typename decltype(type)::type>(a), gpu::as_stream(stream), name);
  });
}

}  // namespace

void sample_cuda(const SampleArgs& a, void* stream) { run_op<Elementwise>(a, stream, "reparam.sample"); }
void sample_backward_cuda(const SampleBackwardArgs& a, void* stream) {
  run_op<Columns>(a, stream, "reparam.sample_backward");
}
void kl_cuda(const KlArgs& a, void* stream) { run_op<Reduce>(a, stream, "reparam.kl"); }
void kl_backward_cuda(const KlBackwardArgs& a, void* stream) { run_op<Elementwise>(a, stream, "reparam.kl_backward"); }
void sample_kl_cuda(const SampleKlArgs& a, void* stream) { run_op<Reduce>(a, stream, "reparam.sample_kl"); }
void sample_kl_backward_cuda(const SampleKlBackwardArgs& a, void* stream) {
  run_op<Elementwise>(a, stream, "reparam.sample_kl_backward");
}
void log_prob_cuda(const LogProbArgs& a, void* stream) { run_op<Reduce>(a, stream, "reparam.log_prob"); }
void log_prob_backward_cuda(const LogProbBackwardArgs& a, void* stream) {
  run_op<Elementwise>(a, stream, "reparam.log_prob_backward");
}

void iwae_cuda(const IwaeArgs& a, void* stream) {
  gpu::dispatch_float(a.dtype, "reparam.iwae", [&](auto type) {
    using S = typename decltype(type)::type;
    if (a.batch == 0) return;
    int width = 1;  // lanes per sample: enough for dim, at most a warp
    while (width < 32 && width < a.dim) width *= 2;
    const int threads = static_cast<int>(std::min<int64_t>(kThreads, ceil_div(width * a.samples, 32) * 32));
    gpu::launch("reparam.iwae", iwae_kernel<S>, gpu::grid_for(a.batch), threads, 0, gpu::as_stream(stream), a, width);
  });
}

void iwae_backward_cuda(const IwaeBackwardArgs& a, void* stream) {
  gpu::dispatch_float(a.dtype, "reparam.iwae_backward", [&](auto type) {
    using S = typename decltype(type)::type;
    if (a.batch == 0) return;
    const int64_t cols = a.batch * std::max<int64_t>(a.dim, 1);
    const dim3 block(kColX, static_cast<unsigned>(std::min<int64_t>(kColY, a.samples)));
    gpu::launch("reparam.iwae_backward", iwae_backward_kernel<S>, gpu::grid_for(ceil_div(cols, kColX)), block, 0,
                gpu::as_stream(stream), a);
  });
}

}  // namespace reparam
}  // namespace gk
