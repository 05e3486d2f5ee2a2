// CPU kernels of the NADE family: the recurrence of csrc/autoregressive/nade_math.h, per example, with its H running
// pre-activations and hidden units in L1. A few examples advance together through the D steps, so each row
// of V and of W^T is loaded once for all of them; every loop over H is a plain vectorisable loop.
//
// Since x is binary, a_{i+1} = a_i whenever x_i = 0, and h_i = sigmoid(a_i) is recomputed only after a step
// that changed a: on sparse data (binarised images) most steps cost one dot product.
#include "autoregressive/nade.h"

#include <algorithm>
#include <memory>

#include "autoregressive/nade_math.h"
#include "core/parallel.h"

namespace gk {
namespace nade {
namespace {

// Examples advanced together: 3 vectors of H per example (a, h, and backward's running sum) stay in L1.
constexpr int64_t kTile = 4;

// Backward's gradient accumulators (see slot_count).
constexpr int64_t kMaxSlots = 32;
constexpr int64_t kMinExamplesPerSlot = 8;
constexpr int64_t kSlotBudgetBytes = int64_t(64) << 20;

template <typename T>
void refresh(const T* a, T* h, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) h[j] = sigmoid(a[j]);
}

template <typename T>
T dot(const T* u, const T* v, int64_t n) {
  T acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t j = 0; j < n; ++j) acc += u[j] * v[j];
  return acc;
}

// y += alpha * x
template <typename T>
void axpy(T alpha, const T* x, T* y, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) y[j] += alpha * x[j];
}

constexpr int64_t kTransposeBlock = 32;

// Rows [r0, r0 + 32) of out (cols, rows) = in (rows, cols)^T, in square blocks so that both sides move in
// whole cache lines.
template <typename T>
void transpose_rows(const T* in, T* out, int64_t rows, int64_t cols, int64_t r0) {
  const int64_t r1 = std::min(rows, r0 + kTransposeBlock);
  for (int64_t c0 = 0; c0 < cols; c0 += kTransposeBlock) {
    const int64_t c1 = std::min(cols, c0 + kTransposeBlock);
    for (int64_t c = c0; c < c1; ++c)
      for (int64_t r = r0; r < r1; ++r) out[c * rows + r] = in[r * cols + c];
  }
}

template <typename T>
std::unique_ptr<T[]> transposed(const T* in, int64_t rows, int64_t cols) {
  std::unique_ptr<T[]> out(new T[rows * cols]);
  const int64_t blocks = (rows + kTransposeBlock - 1) / kTransposeBlock;
  cpu::parallel_for(blocks, kTransposeBlock * cols,
                    [&](int64_t rb) { transpose_rows(in, out.get(), rows, cols, rb * kTransposeBlock); });
  return out;
}

// The model with W^T (D, H): the recurrence adds column i of W, a contiguous row of W^T.
template <typename T>
struct Model {
  std::unique_ptr<T[]> wt_owner;
  const T* wt;
  const T* c;
  const T* v;
  const T* b;
  int64_t dims, hidden;

  Model(const Params& p, const Shape& s)
      : wt_owner(transposed(static_cast<const T*>(p.w), s.hidden, s.dims)),
        wt(wt_owner.get()),
        c(static_cast<const T*>(p.c)),
        v(static_cast<const T*>(p.v)),
        b(static_cast<const T*>(p.b)),
        dims(s.dims),
        hidden(s.hidden) {}

  const T* w_row(int64_t i) const { return wt + i * hidden; }
  const T* v_row(int64_t i) const { return v + i * hidden; }
  // l_i = b_i + V_i . h_i
  T logit(int64_t i, const T* h) const { return b[i] + dot(v_row(i), h, hidden); }
};

// The running state of up to kTile examples: `vectors` arrays of H per example in one allocation.
template <typename T>
struct TileState {
  std::unique_ptr<T[]> memory;
  int64_t hidden;
  bool stale[kTile];  // h is out of date with a

  TileState(int64_t hidden_, int vectors) : memory(new T[kTile * vectors * hidden_]), hidden(hidden_) {}
  T* vec(int e, int which) { return memory.get() + (static_cast<int64_t>(which) * kTile + e) * hidden; }
  T* a(int e) { return vec(e, 0); }
  T* h(int e) { return vec(e, 1); }
  T* s(int e) { return vec(e, 2); }

  void start(int count, const T* c) {
    for (int e = 0; e < count; ++e) {
      std::copy(c, c + hidden, a(e));
      stale[e] = true;
    }
  }
  const T* hidden_units(int e) {
    if (stale[e]) refresh(a(e), h(e), hidden);
    stale[e] = false;
    return h(e);
  }
  // a += W[:, i] x_i: the step from a_i to a_{i+1} (none where x_i = 0: an inf in W[:, i] never meets it).
  void add_column(int e, const T* w_row, T x) {
    if (x == T(0)) return;
    axpy(x, w_row, a(e), hidden);
    stale[e] = true;
  }
};

template <typename T>
struct LogProbKernel {
  static void run(const LogProbArgs& args) {
    const Shape& s = args.shape;
    const Model<T> m(args.params, s);
    const T* x = static_cast<const T*>(args.x);
    T* out = static_cast<T*>(args.out);
    cpu::parallel_for((s.batch + kTile - 1) / kTile, kTile * s.dims * s.hidden * 2, [&](int64_t tile) {
      const int64_t n0 = tile * kTile;
      const int count = static_cast<int>(std::min(kTile, s.batch - n0));
      TileState<T> st(s.hidden, 2);
      T logp[kTile] = {};
      st.start(count, m.c);
      for (int64_t i = 0; i < s.dims; ++i) {
        for (int e = 0; e < count; ++e) {
          const T xi = x[(n0 + e) * s.dims + i];
          logp[e] += log_bernoulli(xi, m.logit(i, st.hidden_units(e)));
          st.add_column(e, m.w_row(i), xi);
        }
      }
      for (int e = 0; e < count; ++e) out[n0 + e] = logp[e];
    });
  }
};

// How many accumulators the backward pass sums the examples into: each takes a contiguous run of examples
// in order, and the accumulators are then added in order. A fixed function of the problem size, never of
// the thread count, so the gradients have the same bits however many threads run. Enough of them to keep
// threads busy, within a memory budget (each holds 2 D H + D + H values).
int64_t slot_count(const Shape& s, int64_t value_size) {
  const int64_t per_slot = (2 * s.dims * s.hidden + s.dims + s.hidden) * value_size;
  const int64_t by_memory = std::max<int64_t>(1, kSlotBudgetBytes / std::max<int64_t>(per_slot, 1));
  const int64_t by_batch = (s.batch + kMinExamplesPerSlot - 1) / kMinExamplesPerSlot;
  return std::min({kMaxSlots, by_batch, by_memory});
}

template <typename T>
struct LogProbBackwardKernel {
  // One accumulator's share: examples [n0, n1) into gv (D, H), gwt (D, H) = grad W^T, gb (D), gc (H).
  static void accumulate(const Model<T>& m, const T* x, const T* g, int64_t n0, int64_t n1, T* gv, T* gwt, T* gb,
                         T* gc) {
    const int64_t D = m.dims, H = m.hidden;
    const int64_t steps = checkpoint_steps(D), chunks = checkpoints(D), per_example = tape_size(D, H);
    TileState<T> st(H, 3);
    // Per example (nade_math.h): `chunks` checkpoints a_{q steps}, then `steps` slots for a chunk's a_i.
    std::unique_ptr<T[]> tape(new T[kTile * per_example]);
    const auto checkpoint = [&](int e, int64_t q) { return tape.get() + e * per_example + q * H; };
    const auto slot = [&](int e, int64_t t) { return tape.get() + e * per_example + (chunks + t) * H; };
    for (int64_t t0 = n0; t0 < n1; t0 += kTile) {
      const int count = static_cast<int>(std::min(kTile, n1 - t0));
      // a_{D+1}: the forward recurrence in the forward's order, so it ends on the forward's bits.
      st.start(count, m.c);
      for (int64_t i = 0; i < D; ++i)
        for (int e = 0; e < count; ++e) {
          if (i % steps == 0) std::copy(st.a(e), st.a(e) + H, checkpoint(e, i / steps));
          st.add_column(e, m.w_row(i), x[(t0 + e) * D + i]);
        }
      for (int e = 0; e < count; ++e) {
        std::fill(st.s(e), st.s(e) + H, T(0));
        st.stale[e] = true;
      }
      // Backwards, a chunk at a time: s holds sum_{k > i} dL/da_k, which is dL/dW[:, i] / x_i.
      for (int64_t q = chunks - 1; q >= 0; --q) {
        const int64_t i0 = q * steps, i1 = std::min(D, i0 + steps);
        // The chunk's a_i where x_i != 0 (elsewhere a_i = a_{i+1}), recomputed in a from the checkpoint; a
        // then ends on a_{i1}, the bits it held (h stays valid).
        for (int e = 0; e < count; ++e) {
          std::copy(checkpoint(e, q), checkpoint(e, q) + H, st.a(e));
          for (int64_t i = i0; i < i1; ++i) {
            const T xi = x[(t0 + e) * D + i];
            if (xi == T(0)) continue;
            std::copy(st.a(e), st.a(e) + H, slot(e, i - i0));
            axpy(xi, m.w_row(i), st.a(e), H);
          }
        }
        for (int64_t i = i1 - 1; i >= i0; --i) {
          const T* vi = m.v_row(i);
          T* gv_i = gv + i * H;
          T* gw_i = gwt + i * H;
          for (int e = 0; e < count; ++e) {
            const T xi = x[(t0 + e) * D + i];
            if (xi != T(0)) {
              std::copy(slot(e, i - i0), slot(e, i - i0) + H, st.a(e));  // a_i
              st.stale[e] = true;
            }
            const T* h = st.hidden_units(e);
            const T delta = g[t0 + e] * log_bernoulli_dlogit(xi, m.logit(i, h));
            T* sum = st.s(e);
            gb[i] += delta;
            if (xi != T(0)) axpy(xi, sum, gw_i, H);
#pragma omp simd
            for (int64_t j = 0; j < H; ++j) {
              gv_i[j] += delta * h[j];
              sum[j] += delta * vi[j] * sigmoid_grad(h[j]);
            }
          }
        }
      }
      for (int e = 0; e < count; ++e) axpy(T(1), st.s(e), gc, H);
    }
  }

  static void run(const LogProbBackwardArgs& args) {
    const Shape& s = args.shape;
    const int64_t D = s.dims, H = s.hidden;
    T* grad_w = static_cast<T*>(args.grad_w);
    T* grad_c = static_cast<T*>(args.grad_c);
    T* grad_v = static_cast<T*>(args.grad_v);
    T* grad_b = static_cast<T*>(args.grad_b);
    if (s.batch == 0) {
      std::fill(grad_w, grad_w + D * H, T(0));
      std::fill(grad_v, grad_v + D * H, T(0));
      std::fill(grad_b, grad_b + D, T(0));
      std::fill(grad_c, grad_c + H, T(0));
      return;
    }
    const Model<T> m(args.params, s);
    const T* x = static_cast<const T*>(args.x);
    const T* g = static_cast<const T*>(args.grad_out);
    const int64_t slots = slot_count(s, sizeof(T));
    const int64_t per_slot = 2 * D * H + D + H;
    std::unique_ptr<T[]> partial(new T[slots * per_slot]);
    cpu::parallel_for(slots, (s.batch + slots - 1) / slots * D * H * 8, [&](int64_t slot) {
      T* p = partial.get() + slot * per_slot;
      std::fill(p, p + per_slot, T(0));  // here, not before: each thread first-touches its own memory
      const int64_t n0 = slot * s.batch / slots, n1 = (slot + 1) * s.batch / slots;
      accumulate(m, x, g, n0, n1, p, p + D * H, p + 2 * D * H, p + 2 * D * H + D);
    });
    // The accumulators summed in slot order; grad W^T goes back to (H, D), a block of rows i at a time so that
    // the transposed writes fill whole cache lines.
    constexpr int64_t kRows = 16;
    const int64_t blocks = (D + kRows - 1) / kRows;
    const auto sum_rows = [&](int64_t blk) {
      const int64_t i0 = blk * kRows, i1 = std::min(D, i0 + kRows);
      for (int64_t i = i0; i < i1; ++i) {
        T* gv = grad_v + i * H;
        std::copy(partial.get() + i * H, partial.get() + (i + 1) * H, gv);
        for (int64_t slot = 1; slot < slots; ++slot) axpy(T(1), partial.get() + slot * per_slot + i * H, gv, H);
        T gb = partial[2 * D * H + i];
        for (int64_t slot = 1; slot < slots; ++slot) gb += partial[slot * per_slot + 2 * D * H + i];
        grad_b[i] = gb;
      }
      for (int64_t j = 0; j < H; ++j) {
        for (int64_t i = i0; i < i1; ++i) {
          T gw = partial[D * H + i * H + j];
          for (int64_t slot = 1; slot < slots; ++slot) gw += partial[slot * per_slot + D * H + i * H + j];
          grad_w[j * D + i] = gw;
        }
      }
    };
    cpu::parallel_for(blocks, kRows * H * slots * 2, sum_rows);
    const T* gc0 = partial.get() + 2 * D * H + D;
    std::copy(gc0, gc0 + H, grad_c);
    for (int64_t slot = 1; slot < slots; ++slot) axpy(T(1), gc0 + slot * per_slot, grad_c, H);
  }
};

template <typename T>
struct SampleKernel {
  static void run(const SampleArgs& args) {
    const Shape& s = args.shape;
    const Model<T> m(args.params, s);
    T* out = static_cast<T*>(args.out);
    cpu::parallel_for((s.batch + kTile - 1) / kTile, kTile * s.dims * s.hidden * 2, [&](int64_t tile) {
      const int64_t n0 = tile * kTile;
      const int count = static_cast<int>(std::min(kTile, s.batch - n0));
      TileState<T> st(s.hidden, 2);
      st.start(count, m.c);
      for (int64_t i = 0; i < s.dims; ++i) {
        for (int e = 0; e < count; ++e) {
          const T p = sigmoid(m.logit(i, st.hidden_units(e)));
          const uint64_t index =
              (args.first + static_cast<uint64_t>(n0 + e)) * static_cast<uint64_t>(s.dims) + static_cast<uint64_t>(i);
          const T xi = bernoulli(stream_element(args.seed, args.offset, index), p) ? T(1) : T(0);
          out[(n0 + e) * s.dims + i] = xi;
          st.add_column(e, m.w_row(i), xi);
        }
      }
    });
  }
};

}  // namespace

void log_prob_cpu(const LogProbArgs& a) { cpu::dispatch_float<LogProbKernel>(a.dtype, a); }
void log_prob_backward_cpu(const LogProbBackwardArgs& a) { cpu::dispatch_float<LogProbBackwardKernel>(a.dtype, a); }
void sample_cpu(const SampleArgs& a) { cpu::dispatch_float<SampleKernel>(a.dtype, a); }

}  // namespace nade
}  // namespace gk
