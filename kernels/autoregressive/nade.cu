// The NADE family on CUDA. The per-element math comes from common/nade.h; this file maps the recurrence to
// threads: a block per example, its threads over the H hidden units (unit j = threadIdx.x + k * blockDim.x is
// thread-owned, so a_j, h_j and backward's running sum never leave the thread), and each step's V_i . h_i a
// fixed-order block reduction, whose total every thread receives bit-identical, so all threads take the
// same branches and draws.
//
// Weight gradients are deterministic without float atomics: a fixed number of groups (a function of the sizes
// only) each sums its run of examples into its own accumulators, then a second kernel adds the groups in
// order. W is read through a transposed copy (D, H), so step i's column W[:, i] is a coalesced row.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <type_traits>

#include "autoregressive/nade_math.h"
#include "core/launch.cuh"
#include "autoregressive/nade.h"
#include "core/reduce.cuh"

namespace gk {
namespace nade {
namespace {

using namespace gpu::common;
using gpu::AsyncBuffer;

// Threads per block when H > 32; each owns up to kMaxPer units in registers, more live in global scratch.
constexpr int kThreads = 128;
constexpr int kMaxPer = 16;
// Backward's groups: at least kMinPerGroup examples each, at most kMaxGroups, within kGroupBudgetBytes.
constexpr int64_t kMinPerGroup = 2;
constexpr int64_t kMaxGroups = 256;
constexpr int64_t kGroupBudgetBytes = int64_t(256) << 20;

template <typename S>
struct Net {
  const S* wt;  // W^T, (D, H)
  const S* c;
  const S* v;
  const S* b;
  int64_t dims, hidden;
};

// This thread's hidden units j = threadIdx.x + k * blockDim.x, k < items: a, h and s (backward's running sum
// of dL/da) in registers when Per > 0 (the loops over k unroll fully), else in this block's slice of a
// global scratch of 3 H values per block.
template <typename C, int Per>
struct Units {
  static constexpr int items = Per;
  C a_[Per], h_[Per], s_[Per];
  __device__ Units(C*, int64_t) {}
  __device__ C& a(int k) { return a_[k]; }
  __device__ C& h(int k) { return h_[k]; }
  __device__ C& s(int k) { return s_[k]; }
};

template <typename C>
struct Units<C, 0> {
  int items;
  C* base;
  int64_t hidden;
  __device__ Units(C* scratch, int64_t hidden_)
      : items(static_cast<int>(ceil_div(hidden_, blockDim.x))),
        base(scratch + blockIdx.x * 3 * hidden_),
        hidden(hidden_) {}
  __device__ C& a(int k) { return base[k * blockDim.x + threadIdx.x]; }
  __device__ C& h(int k) { return base[hidden + k * blockDim.x + threadIdx.x]; }
  __device__ C& s(int k) { return base[2 * hidden + k * blockDim.x + threadIdx.x]; }
};

__device__ __forceinline__ int64_t unit(int k) { return int64_t(k) * blockDim.x + threadIdx.x; }

template <typename S, typename U>
__device__ __forceinline__ void start(const Net<S>& net, U& u) {
#pragma unroll
  for (int k = 0; k < u.items; ++k)
    if (unit(k) < net.hidden) u.a(k) = load(net.c, unit(k));
}

template <typename S, typename U>
__device__ __forceinline__ void refresh(const Net<S>& net, U& u) {
#pragma unroll
  for (int k = 0; k < u.items; ++k)
    if (unit(k) < net.hidden) u.h(k) = sigmoid(u.a(k));
}

// a += W[:, i] x, exactly as the CPU kernels write it: a + x w.
template <typename S, typename U, typename C>
__device__ __forceinline__ void add_column(const Net<S>& net, U& u, int64_t i, C x) {
  const S* w = net.wt + i * net.hidden;
#pragma unroll
  for (int k = 0; k < u.items; ++k)
    if (unit(k) < net.hidden) u.a(k) += x * load(w, unit(k));
}

// This thread's units of a into `to` (H values), or back from it.
template <typename S, typename U, typename C>
__device__ __forceinline__ void keep(const Net<S>& net, U& u, C* to) {
#pragma unroll
  for (int k = 0; k < u.items; ++k)
    if (unit(k) < net.hidden) to[unit(k)] = u.a(k);
}

template <typename S, typename U, typename C>
__device__ __forceinline__ void restore(const Net<S>& net, U& u, const C* from) {
#pragma unroll
  for (int k = 0; k < u.items; ++k)
    if (unit(k) < net.hidden) u.a(k) = from[unit(k)];
}

// l_i = b_i + V_i . h, the same value in every thread.
template <typename S, typename U>
__device__ __forceinline__ compute_t<S> logit(const Net<S>& net, U& u, int64_t i) {
  using C = compute_t<S>;
  const S* v = net.v + i * net.hidden;
  C part = 0;
#pragma unroll
  for (int k = 0; k < u.items; ++k)
    if (unit(k) < net.hidden) part += load(v, unit(k)) * u.h(k);
  return load(net.b, i) + gpu::block_sum(part);
}

template <typename S, int Per>
__global__ void __launch_bounds__(kThreads)
    log_prob_kernel(Net<S> net, const S* x, S* out, int64_t batch, compute_t<S>* scratch) {
  using C = compute_t<S>;
  Units<C, Per> u(scratch, net.hidden);
  for (int64_t n = blockIdx.x; n < batch; n += gridDim.x) {
    start(net, u);
    bool stale = true;
    C logp = 0;
    for (int64_t i = 0; i < net.dims; ++i) {
      if (stale) refresh(net, u);
      const C xi = load(x, n * net.dims + i);
      logp += log_bernoulli(xi, logit(net, u, i));
      stale = xi != C(0);
      if (stale) add_column(net, u, i, xi);
    }
    if (threadIdx.x == 0) store(out, n, logp);
  }
}

template <typename S, int Per>
__global__ void __launch_bounds__(kThreads) sample_kernel(Net<S> net, S* out, int64_t batch, uint64_t seed,
                                                          uint64_t offset, uint64_t first, compute_t<S>* scratch) {
  using C = compute_t<S>;
  Units<C, Per> u(scratch, net.hidden);
  for (int64_t n = blockIdx.x; n < batch; n += gridDim.x) {
    start(net, u);
    bool stale = true;
    const uint64_t row = (first + static_cast<uint64_t>(n)) * static_cast<uint64_t>(net.dims);
    for (int64_t i = 0; i < net.dims; ++i) {
      if (stale) refresh(net, u);
      const C p = sigmoid(logit(net, u, i));
      // Every thread draws the same bit: no broadcast, no barrier.
      stale = bernoulli(stream_element(seed, offset, row + static_cast<uint64_t>(i)), p);
      if (threadIdx.x == 0) store(out, n * net.dims + i, stale ? C(1) : C(0));
      if (stale) add_column(net, u, i, C(1));
    }
  }
}

// One group's accumulators: gv (D, H), gwt (D, H) = grad W^T, gb (D), gc (H).
template <typename C>
struct Partial {
  C* gv;
  C* gwt;
  C* gb;
  C* gc;
  __device__ Partial(C* base, int64_t d, int64_t h)
      : gv(base), gwt(base + d * h), gb(base + 2 * d * h), gc(base + 2 * d * h + d) {}
  __host__ __device__ static int64_t size(int64_t d, int64_t h) { return 2 * d * h + d + h; }
};

// Group g sums examples [g B / G, (g + 1) B / G) in order into partial g; every accumulator element has one
// owning thread (unit j of rows i; thread 0 for gb), so plain read-modify-writes suffice.
// Each block keeps the pre-activations of its current example in its slice of `tape` (nade_math.h: the
// checkpoints, then a chunk's a_i), thread-owned like the units, so no barrier guards it.
template <typename S, int Per>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(Net<S> net, const S* grad_out, const S* x, int64_t batch, int64_t groups, compute_t<S>* partials,
                    compute_t<S>* scratch, compute_t<S>* tape) {
  using C = compute_t<S>;
  const int64_t D = net.dims, H = net.hidden;
  const int64_t steps = checkpoint_steps(D), chunks = checkpoints(D);
  C* const checkpoint = tape + blockIdx.x * tape_size(D, H);  // (chunks, H), then the slots (steps, H)
  C* const slot = checkpoint + chunks * H;
  Units<C, Per> u(scratch, H);
  for (int64_t g = blockIdx.x; g < groups; g += gridDim.x) {
    const Partial<C> p(partials + g * Partial<C>::size(D, H), D, H);
    for (int64_t i = 0; i < D; ++i) {
      for (int64_t j = threadIdx.x; j < H; j += blockDim.x) p.gv[i * H + j] = p.gwt[i * H + j] = C(0);
      if (threadIdx.x == 0) p.gb[i] = C(0);
    }
    for (int64_t j = threadIdx.x; j < H; j += blockDim.x) p.gc[j] = C(0);
    for (int64_t n = g * batch / groups, n1 = (g + 1) * batch / groups; n < n1; ++n) {
      const S* xn = x + n * D;
      // a_{D+1}, in the forward's order so that it ends on the forward's bits.
      start(net, u);
      for (int64_t i = 0; i < D; ++i) {
        if (i % steps == 0) keep(net, u, checkpoint + (i / steps) * H);
        const C xi = load(xn, i);
        if (xi != C(0)) add_column(net, u, i, xi);
      }
#pragma unroll
      for (int k = 0; k < u.items; ++k)
        if (unit(k) < H) u.s(k) = C(0);  // units past H would be the next block's scratch
      bool stale = true;
      const C gn = load(grad_out, n);
      // Backwards, a chunk at a time: s holds sum_{k > i} dL/da_k, which is dL/dW[:, i] / x_i.
      for (int64_t q = chunks - 1; q >= 0; --q) {
        const int64_t i0 = q * steps, i1 = min(D, i0 + steps);
        // The chunk's a_i where x_i != 0 (elsewhere a_i = a_{i+1}), recomputed from its checkpoint; a then
        // ends on a_{i1}, the bits it held (h stays valid).
        restore(net, u, checkpoint + q * H);
        for (int64_t i = i0; i < i1; ++i) {
          const C xi = load(xn, i);
          if (xi == C(0)) continue;
          keep(net, u, slot + (i - i0) * H);
          add_column(net, u, i, xi);
        }
        for (int64_t i = i1 - 1; i >= i0; --i) {
          const C xi = load(xn, i);
          if (xi != C(0)) {
            restore(net, u, slot + (i - i0) * H);  // a_i
            stale = true;
          }
          if (stale) refresh(net, u);
          stale = false;
          const C delta = gn * log_bernoulli_dlogit(xi, logit(net, u, i));
          if (threadIdx.x == 0) p.gb[i] += delta;
          const S* v = net.v + i * H;
#pragma unroll
          for (int k = 0; k < u.items; ++k) {
            const int64_t j = unit(k);
            if (j >= H) continue;
            const C h = u.h(k);
            p.gv[i * H + j] += delta * h;
            if (xi != C(0)) p.gwt[i * H + j] += xi * u.s(k);
            u.s(k) += delta * load(v, j) * sigmoid_grad(h);
          }
        }
      }
#pragma unroll
      for (int k = 0; k < u.items; ++k)
        if (unit(k) < H) p.gc[unit(k)] += u.s(k);
    }
  }
}

// The groups added in order: element t < D H is (i, j) of gv and gwt (read coalesced; grad W written
// transposed), then D elements of gb, then H of gc.
template <typename S>
__global__ void __launch_bounds__(256) finish_kernel(const compute_t<S>* partials, int64_t groups, int64_t D, int64_t H,
                                                     S* grad_w, S* grad_c, S* grad_v, S* grad_b) {
  using C = compute_t<S>;
  const int64_t dh = D * H, size = Partial<C>::size(D, H);
  for (int64_t t = gpu::thread_index(); t < dh + D + H; t += gpu::thread_count()) {
    if (t < dh) {
      C gv = 0, gw = 0;
      for (int64_t g = 0; g < groups; ++g) {
        gv += partials[g * size + t];
        gw += partials[g * size + dh + t];
      }
      store(grad_v, t, gv);
      store(grad_w, (t % H) * D + t / H, gw);
    } else {
      C acc = 0;
      for (int64_t g = 0; g < groups; ++g) acc += partials[g * size + dh + t];
      if (t < dh + D)
        store(grad_b, t - dh, acc);
      else
        store(grad_c, t - dh - D, acc);
    }
  }
}

// out (cols, rows) = in (rows, cols)^T through a shared 32 x 32 tile: both sides coalesced.
template <typename S>
__global__ void __launch_bounds__(256) transpose_kernel(const S* in, S* out, int64_t rows, int64_t cols) {
  __shared__ S tile[32][33];
  const int64_t col_tiles = ceil_div(cols, 32), tiles = ceil_div(rows, 32) * col_tiles;
  for (int64_t t = blockIdx.x; t < tiles; t += gridDim.x) {
    const int64_t r0 = (t / col_tiles) * 32, c0 = (t % col_tiles) * 32;
    __syncthreads();  // the previous tile's readers are done
    for (int dy = threadIdx.y; dy < 32; dy += blockDim.y) {
      const int64_t r = r0 + dy, c = c0 + threadIdx.x;
      if (r < rows && c < cols) tile[dy][threadIdx.x] = in[r * cols + c];
    }
    __syncthreads();
    for (int dy = threadIdx.y; dy < 32; dy += blockDim.y) {
      const int64_t c = c0 + dy, r = r0 + threadIdx.x;
      if (r < rows && c < cols) out[c * rows + r] = tile[threadIdx.x][dy];
    }
  }
}

// Stream-ordered device memory for one call, freed (in stream order) when the call's kernels are queued.
// Threads per block, and units per thread in registers (0: in global scratch).
struct Config {
  int threads, per;
};

Config config_for(int64_t hidden) {
  if (hidden <= 32) return Config{32, 1};
  if (hidden <= kThreads) return Config{static_cast<int>(ceil_div(hidden, 32) * 32), 1};
  int per = 2;
  while (per < kMaxPer && per * int64_t(kThreads) < hidden) per *= 2;
  return Config{kThreads, per * int64_t(kThreads) >= hidden ? per : 0};
}

// fn(std::integral_constant<int, Per>{}) for the runtime units-per-thread.
template <typename Fn>
void with_per(int per, Fn fn) {
  switch (per) {
    case 1:
      return fn(std::integral_constant<int, 1>{});
    case 2:
      return fn(std::integral_constant<int, 2>{});
    case 4:
      return fn(std::integral_constant<int, 4>{});
    case 8:
      return fn(std::integral_constant<int, 8>{});
    case 16:
      return fn(std::integral_constant<int, 16>{});
    default:
      return fn(std::integral_constant<int, 0>{});
  }
}

// W^T into fresh scratch, and the model view over it.
template <typename S>
Net<S> transposed_net(const Params& p, const Shape& s, S* wt, cudaStream_t stream) {
  if (s.dims * s.hidden > 0) {
    const int64_t tiles = ceil_div(s.hidden, 32) * ceil_div(s.dims, 32);
    gpu::launch("nade: transpose", transpose_kernel<S>, gpu::grid_for(tiles), dim3(32, 8), 0, stream,
                static_cast<const S*>(p.w), wt, s.hidden, s.dims);
  }
  return Net<S>{wt,      static_cast<const S*>(p.c), static_cast<const S*>(p.v), static_cast<const S*>(p.b), s.dims,
                s.hidden};
}

// What log_prob and sample launch with: W^T, the block shape for H, and global scratch for the units when
// they do not fit in registers. `kernel(per, launch)` starts the kernel for units-per-thread `per`.
template <typename S>
struct ForwardLaunch {
  Net<S> net;
  unsigned grid;
  int threads;
  compute_t<S>* units;
};

template <typename S, typename Kernel>
void run_forward(const Params& p, const Shape& s, cudaStream_t st, const char* what, Kernel kernel) {
  using C = compute_t<S>;
  const AsyncBuffer<S> wt(s.dims * s.hidden, st, what);
  const Config cfg = config_for(s.hidden);
  const unsigned grid = gpu::grid_for(s.batch);
  const AsyncBuffer<C> units(cfg.per == 0 ? int64_t(grid) * 3 * s.hidden : 0, st, what);
  const ForwardLaunch<S> launch{transposed_net<S>(p, s, wt.data, st), grid, cfg.threads, units.data};
  with_per(cfg.per, [&](auto per) { kernel(per, launch); });
}

}  // namespace

void log_prob_cuda(const LogProbArgs& a, void* stream) {
  const Shape& s = a.shape;
  if (s.batch == 0) return;
  const cudaStream_t st = gpu::as_stream(stream);
  gpu::dispatch_float(a.dtype, "nade.log_prob", [&](auto type) {
    using S = typename decltype(type)::type;
    run_forward<S>(a.params, s, st, "nade.log_prob: cudaMallocAsync", [&](auto per, auto launch) {
      log_prob_kernel<S, decltype(per)::value><<<launch.grid, launch.threads, 0, st>>>(
          launch.net, static_cast<const S*>(a.x), static_cast<S*>(a.out), s.batch, launch.units);
    });
    gpu::check_launch("nade.log_prob");
  });
}

void sample_cuda(const SampleArgs& a, void* stream) {
  const Shape& s = a.shape;
  if (s.batch * s.dims == 0) return;
  const cudaStream_t st = gpu::as_stream(stream);
  gpu::dispatch_float(a.dtype, "nade.sample", [&](auto type) {
    using S = typename decltype(type)::type;
    run_forward<S>(a.params, s, st, "nade.sample: cudaMallocAsync", [&](auto per, auto launch) {
      sample_kernel<S, decltype(per)::value><<<launch.grid, launch.threads, 0, st>>>(
          launch.net, static_cast<S*>(a.out), s.batch, a.seed, a.offset, a.first, launch.units);
    });
    gpu::check_launch("nade.sample");
  });
}

void log_prob_backward_cuda(const LogProbBackwardArgs& a, void* stream) {
  const Shape& s = a.shape;
  const cudaStream_t st = gpu::as_stream(stream);
  gpu::dispatch_float(a.dtype, "nade.log_prob_backward", [&](auto type) {
    using S = typename decltype(type)::type;
    using C = compute_t<S>;
    const int64_t size = Partial<C>::size(s.dims, s.hidden);
    // A function of the sizes only, never of the device: the same bits on every GPU that runs it.
    const int64_t by_memory = std::max<int64_t>(1, kGroupBudgetBytes / (size * int64_t(sizeof(C))));
    const int64_t groups = std::min({kMaxGroups, ceil_div(s.batch, kMinPerGroup), by_memory});
    const AsyncBuffer<C> partials(groups * size, st, "nade.log_prob_backward: cudaMallocAsync");
    if (groups > 0) {
      const AsyncBuffer<S> wt(s.dims * s.hidden, st, "nade.log_prob_backward: cudaMallocAsync");
      const Net<S> net = transposed_net<S>(a.params, s, wt.data, st);
      const Config cfg = config_for(s.hidden);
      const unsigned grid = gpu::grid_for(groups);
      const AsyncBuffer<C> units(cfg.per == 0 ? int64_t(grid) * 3 * s.hidden : 0, st,
                                 "nade.log_prob_backward: cudaMallocAsync");
      const AsyncBuffer<C> tape(int64_t(grid) * tape_size(s.dims, s.hidden), st,
                                "nade.log_prob_backward: cudaMallocAsync");
      with_per(cfg.per, [&](auto per) {
        backward_kernel<S, decltype(per)::value>
            <<<grid, cfg.threads, 0, st>>>(net, static_cast<const S*>(a.grad_out), static_cast<const S*>(a.x), s.batch,
                                           groups, partials.data, units.data, tape.data);
      });
      gpu::check_launch("nade.log_prob_backward");
    }
    // With no examples (groups = 0) this writes the zero gradients.
    const int64_t total = s.dims * s.hidden + s.dims + s.hidden;
    if (total == 0) return;
    gpu::launch_items("nade.log_prob_backward (finish)", finish_kernel<S>, total, 256, st, partials.data, groups,
                      s.dims, s.hidden, static_cast<S*>(a.grad_w), static_cast<S*>(a.grad_c), static_cast<S*>(a.grad_v),
                      static_cast<S*>(a.grad_b));
  });
}

}  // namespace nade
}  // namespace gk
