// Fused local attention for CPU (backend "fused"): forward and backward in float32, float64, bfloat16 and
// float16 (16-bit operands into MKL's bf16/f16 x bf16/f16 -> fp32 matmuls, softmax and gradient sums in
// float32).
//
// Each task owns a block of at most BLOCK_Q query rows inside one window. The keys every row of a block
// may see form one contiguous range [klo, khi) (each row's visible keys are an interval, and the
// intervals move right with the row), so a block costs two (forward) or five (backward) BLAS calls on
// exactly that range: masked work is skipped down to BLOCK_Q-sized steps, unlike a dense window block, and
// with our float32 GEMM down to its micro-tiles (the rows' ranges passed as a `Band`; the keys and values
// packed for one block kept for the next, `Packed`).
// The scores of one block (BLOCK_Q x span*w) live in a per-thread buffer, so memory stays O(n d).
//
// Forward: S = Q K^T; P = softmax of the visible entries (row max and sum in one sweep); O = P V; saves
// the log-sum-exp. Backward recomputes P from the log-sum-exp, takes the softmax gradient with
// delta_i = sum_j P_ij dP_ij from the recomputed rows (not <dO_i, O_i>: equal in exact arithmetic, but only
// the row sum cancels exactly when a row's softmax saturates to one key, as autograd's does), and
// accumulates dK, dV over the overlapping key ranges. Blocks of neighbouring windows share keys, so the
// backward runs in two phases over groups of `max(look_backward + look_forward, 1)` windows: the groups of
// one phase never touch the same keys and need no locks. Bias gradients go to one buffer per thread,
// summed at the end.
//
// The window rule is spec.py's, as numbers: window blocks (w, look-around) counted from each document's start,
// cut by the token bounds (left, right; -1 none) and the document. Packed documents (runs of equal ids per
// row of `documents`) get blocks and backward groups of their own, so no block spans two of them and none
// computes keys across them. Queries may be the last n_q of the n key positions (row r is position
// r + n - n_q). Sink tokens (the first ones of each document) are extra columns before a block's window
// keys, for the rows that see them only as sinks; every block may see them, so their dK, dV come from a pass
// of their own per (key row, document), recomputed from the saved softmax row sums (delta), race-free.
// Softcap scores are softcap * tanh(scale q.k / softcap) before bias and masks; learned sinks (one per
// query row p % h) join each softmax denominator, their gradient -sum_i p_sink_i delta_i summed in a
// fixed order.
//
// Semantics are those of `reference.py`: a row that sees no key outputs zeros with zero gradients;
// `mask_self` replaces a query's score with itself by -5e4; `bias` is (H, w, span*w), head = p % H;
// `keep` is the (B, n) key padding mask, batch = p / (P / B); `key_scale` (span, d) multiplies the keys of
// each neighbour-window slot (xpos), applied to a per-slot scaled copy of the block's queries instead (the
// same products, no copy of the keys), and treated as a constant. Dropout (probability `dropout_p`) zeroes
// each weight with that probability and divides the rest by 1 - p; which weights drop is a hash of
// (seed, head, query, key), so the backward recomputes the same ones for any blocking or thread count.
//
// Grouped-query attention: k and v may hold fewer rows than q (P_kv = P / groups); query row p reads key
// and value row p / groups in place (nothing is repeated). Forward tasks of the query rows that share a
// key row run one after another (their key blocks stay in cache); a backward task owns a key row and runs
// all of its query rows, so the dK, dV sums over the sharing heads need no locks either.
//
// What it builds on, one header each: blas.h (the matmuls), row_kernels.h (vectorized row operations),
// plan.h (a call's blocks and backward units), output_pool.h (the memory of large outputs), work_grain.h (how
// finely work is split among threads) and test_hooks.h (ops only tests call).

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

#include "blas.h"
#include "output_pool.h"
#include "plan.h"
#include "row_kernels.h"
#include "test_hooks.h"
#include "work_grain.h"

namespace local_attention {
namespace {

constexpr double SELF_SCORE = -5e4;

// A 32-bit integer mixer (Chris Wellons' lowbias32): every input bit flips each output bit with
// probability close to 1/2, which is all dropout asks of a counter-based random stream.
inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

// Task t of a list whose key row p_kv holds start[p_kv + 1] - start[p_kv] tasks: (p_kv, index in its row).
inline std::pair<int64_t, int64_t> locate(const std::vector<int64_t>& start, int64_t t) {
  const int64_t p_kv = std::upper_bound(start.begin(), start.end(), t) - start.begin() - 1;
  return {p_kv, t - start[p_kv]};
}

using work_grain::grain_for;

// MKL's thread-local thread count, by value (MKL's header maps `mkl_set_num_threads_local` to this name; the
// lowercase symbol is the Fortran interface, which takes a pointer). Weak: a torch without MKL has no such
// symbol, and then nothing is needed.
extern "C" __attribute__((weak)) int MKL_Set_Num_Threads_Local(int);

// `f(begin, end)` over the tasks [0, tasks) that hold about `work` multiply-adds in all: in chunks of at least
// MIN_CHUNK_WORK on torch's threads, or inline on the calling thread when the whole list is smaller. Inline, the
// BLAS calls run on one thread too: outside a parallel region MKL would open one of its own for each product
// (milliseconds apiece on a loaded machine), however small.
template <typename F>
void parallel_tasks(int64_t tasks, double work, const F& f) {
  const int64_t grain = grain_for(tasks, work);
  const bool threads = at::get_num_threads() > 1 && !at::in_parallel_region();
  if (tasks > grain && threads) {
    at::parallel_for(0, tasks, grain, f);
    return;
  }
  if (tasks <= 0) return;
  if (!threads || !MKL_Set_Num_Threads_Local) {  // MKL runs on one thread already
    f(0, tasks);
    return;
  }
  const int previous = MKL_Set_Num_Threads_Local(1);
  try {
    f(0, tasks);
  } catch (...) {
    MKL_Set_Num_Threads_Local(previous);
    throw;
  }
  MKL_Set_Num_Threads_Local(previous);
}

// A row's visible columns: up to three ascending, disjoint ranges [x0, x1): sink tokens before its window,
// sink tokens after it (not causal: a sink prefix longer than the window's reach), and window keys.
struct Cols {
  int64_t r[3][2];

  template <typename F>
  void each(F&& f) const {
    for (const auto& x : r)
      if (x[1] > x[0]) f(x[0], x[1] - x[0]);
  }

  // x = 0 outside the ranges (a row of C columns).
  template <typename T>
  void zero_rest(T* x, int64_t C) const {
    int64_t at = 0;
    for (const auto& y : r)
      if (y[1] > y[0]) {
        std::fill(x + at, x + y[0], T(0));
        at = y[1];
      }
    std::fill(x + at, x + C, T(0));
  }
};

template <typename S>
struct Inputs {
  using T = Acc<S>;
  const S *q, *k, *v;
  const T *bias, *keep, *key_scale, *sinks;
  int64_t P, d, dv, heads, per_keep, groups, sink_heads;  // groups: query rows per key/value row (GQA)
  int64_t sink_tokens;
  T scale, softcap;  // softcap 0: none
  bool mask_self;
  Geometry g;
  bool dropout;
  uint32_t drop_below, seed_lo, seed_hi;  // a weight drops when its hash is below drop_below
  T kept_scale;                           // 1 / (1 - dropout_p)

  int64_t span_keys() const { return (g.lb + g.lf + 1) * g.w; }
  // Columns a block's rows hold at most (sink tokens, then window keys; never more than the sequence).
  int64_t max_cols() const { return std::min(span_keys(), g.n) + std::min(sink_tokens, g.n); }
  T sink(int64_t p) const { return sinks[p % sink_heads]; }

  // The dropout factors of query i of head p on keys [j0, j0 + count): 0 (dropped) or 1 / (1 - p).
  void dropout_factors(int64_t p, int64_t i, int64_t j0, int64_t count, T* f) const {
    const uint64_t row = static_cast<uint64_t>(p) * static_cast<uint64_t>(g.n) + static_cast<uint64_t>(i);
    const uint32_t key =
        mix32(mix32(static_cast<uint32_t>(row) ^ seed_lo) + static_cast<uint32_t>(row >> 32) + seed_hi);
    const uint32_t start = key + static_cast<uint32_t>(j0) * 0x9e3779b9U, m = static_cast<uint32_t>(count);
    const T kept = kept_scale;
    for (uint32_t c = 0; c < m; ++c) f[c] = mix32(start + c * 0x9e3779b9U) >= drop_below ? kept : T(0);
  }

  // Sink tokens query i (window keys [lo, hi)) sees only as sinks, as sink columns: those of the first
  // min(sink_tokens, length) of its document before lo, and (not causal) after hi. Causal rows need no
  // check beyond: lo <= i, and causal windows end at i.
  void sink_only(const Block& b, int64_t lo, int64_t hi, Cols& cols) const {
    const int64_t count = std::min(sink_tokens, b.e - b.s);
    cols.r[0][0] = 0;
    cols.r[0][1] = std::clamp<int64_t>(std::min(count, lo - b.s), 0, b.nsb);
    cols.r[1][0] = std::clamp<int64_t>(hi - b.s, cols.r[0][1], b.nsb);
    cols.r[1][1] = g.causal ? cols.r[1][0] : std::max(cols.r[1][0], std::min(count, b.nsb));
  }

  Block block(int64_t p, const Span& sp) const {
    Block b{p, sp.s, sp.e, sp.win, sp.r0, sp.r1, 0, 0, 0};
    int64_t lo, hi, hi_last;
    g.interval(b.r0, b.s, b.e, b.klo, hi);
    g.interval(b.r1 - 1, b.s, b.e, lo, hi_last);
    b.khi = hi_last;
    b.khi = std::max(b.khi, b.klo);
    // lo grows with the row; hi too, so the first row reaches least far (not causal: sinks after it)
    const int64_t count = std::min(sink_tokens, b.e - b.s);
    b.nsb = !g.causal && hi - b.s < count ? count : std::clamp<int64_t>(std::min(count, lo - b.s), 0, count);
    return b;
  }

  const S* q_rows(const Block& b) const { return q + (b.p * g.n_q + b.r0 - g.off) * d; }
  int64_t qrow(int64_t p, int64_t i) const { return p * g.n_q + i - g.off; }

  // f(slot, lo, hi) for the keys [lo, hi) of the block that lie in each neighbour-window slot.
  template <typename F>
  void for_each_slot(const Block& b, F&& f) const {
    for (int64_t lo = b.klo; lo < b.khi;) {
      const int64_t hi = std::min(b.khi, b.s + ((lo - b.s) / g.w + 1) * g.w);
      f((lo - b.s) / g.w - (b.win - g.lb), lo, hi);
      lo = hi;
    }
  }

  // The block's scores Q K^T (rows x cols, leading dimension cols): the sink columns, then the window's.
  // With key_scale, the queries are scaled per slot into qs (slot s at qs + s * BLOCK_Q * d), which the
  // backward reuses for dK (sink tokens take no key scale, as in the reference).
  // `band` (the rows' window columns, `bands`) and `packed` (the keys packed for the block before) let the GEMM
  // skip work.
  void scores(const Block& b, T* out, S* qs, const Band* band = nullptr, Packed* packed = nullptr) const {
    const S* qb = q_rows(b);
    const S* kb = k + (b.p / groups * g.n + b.klo) * d;
    const int64_t m = b.rows(), L = b.keys(), C = b.cols();
    if (b.nsb > 0) gemm(false, true, m, b.nsb, d, T(1), qb, d, k + (b.p / groups * g.n + b.s) * d, d, T(0), out, C);
    out += b.nsb;
    if (L <= 0) return;
    if (key_scale == nullptr) {
      gemm(false, true, m, L, d, T(1), qb, d, kb, d, T(0), out, C, band, packed);
      return;
    }
    for_each_slot(b, [&](int64_t slot, int64_t lo, int64_t hi) {
      S* qsb = qs + slot * BLOCK_Q * d;
      const T* f = key_scale + slot * d;
      for (int64_t r = 0; r < m; ++r)
        for (int64_t c = 0; c < d; ++c) qsb[r * d + c] = static_cast<S>(static_cast<T>(qb[r * d + c]) * f[c]);
      gemm(false, true, m, hi - lo, d, T(1), qsb, d, kb + (lo - b.klo) * d, d, T(0), out + (lo - b.klo), C);
    });
  }

  // The block's rows' window columns [lo[r], hi[r]) (relative to klo; what `logits` keeps) as the GEMM's
  // bands: over the block's columns (`cols`), over its keys summed per row (`k_rows`), and per key summed
  // over its rows (`k_cols`). lo, hi: BLOCK_Q entries each.
  std::array<Band, 3> bands(const Block& b, int64_t* lo, int64_t* hi) const {
    for (int64_t i = b.r0; i < b.r1; ++i) {
      int64_t l, h;
      g.interval(i, b.s, b.e, l, h);
      lo[i - b.r0] = l - b.klo;
      hi[i - b.r0] = std::max(h - b.klo, l - b.klo);
    }
    return {Band{Band::cols, lo, hi, b.rows()}, Band{Band::k_rows, lo, hi, b.rows()},
            Band{Band::k_cols, lo, hi, b.rows()}};
  }

  // The key padding mask over the block's columns (1 = kept) in `buf` (or in place), or null.
  const T* keep_cols(const Block& b, T* buf) const {
    if (keep == nullptr) return nullptr;
    const T* row = keep + (b.p / per_keep) * g.n;
    if (b.nsb == 0) return row + b.klo;
    std::copy(row + b.s, row + b.s + b.nsb, buf);
    std::copy(row + b.klo, row + b.khi, buf + b.nsb);
    return buf;
  }

  // For masked keys: a large negative logit so they never win the row max (then weight 0 via keep_cols).
  // Written into `buf` (the block's columns long); null when there is no key padding mask.
  const T* penalty(const Block& b, const T* kc, T* buf) const {
    if (kc == nullptr) return nullptr;
    for (int64_t c = 0; c < b.cols(); ++c) buf[c] = kc[c] > T(0) ? T(0) : T(-1e30);
    return buf;
  }

  // Scores -> logits (softcap or scale) on n entries, keeping tanh in t (backward) when t is set.
  void transform(T* x, int64_t n, T* t) const {
    if (softcap > T(0)) softcap_row(x, n, scale, softcap, t);
    else scale_row(x, n, scale);
  }

  // The columns row i of the block sees (its window keys [lo, hi)): sink columns, then the window columns.
  void visible(const Block& b, int64_t i, Cols& cols, int64_t& lo, int64_t& hi) const {
    g.interval(i, b.s, b.e, lo, hi);
    sink_only(b, lo, hi, cols);
    cols.r[2][0] = b.nsb + lo - b.klo;
    cols.r[2][1] = b.nsb + std::max(hi, lo) - b.klo;
  }

  // Whether the logits are the scaled scores alone (no softcap, bias, key padding or self score), so that the
  // softmax can take the scale inside its exponent (`exp_scaled`) instead of a pass of its own.
  bool raw_logits() const {
    return bias == nullptr && softcap == T(0) && keep == nullptr && !mask_self && scale > T(0);
  }

  // Row i of the block when `raw_logits`: its scores as they stand, the columns it cannot see zeroed.
  void raw_row(const Block& b, int64_t i, T* s, Cols& cols) const {
    int64_t lo, hi;
    visible(b, i, cols, lo, hi);
    cols.zero_rest(s, b.cols());
  }

  // Row i of the block (s: its scores over the block's columns): zero the columns it cannot see and turn the
  // rest into the logits the softmax sees (scale or softcap, bias, key padding, the self score). Its visible
  // columns `cols`: sink columns, then the window columns [nsb + a, nsb + e). t: tanh of the softcap (same
  // layout), or null.
  void logits(const Block& b, int64_t i, T* s, const T* pen, T* t, Cols& cols) const {
    int64_t lo, hi;
    visible(b, i, cols, lo, hi);
    const int64_t a = cols.r[2][0] - b.nsb, e = cols.r[2][1] - b.nsb;
    T* sw = s + b.nsb;
    const T* brow = nullptr;
    if (bias != nullptr)  // columns count from the document's start
      brow = bias + ((b.p % heads) * g.w + (i - b.s - b.win * g.w)) * span_keys() + (b.klo - b.s - (b.win - g.lb) * g.w);
    if (softcap > T(0)) {
      softcap_row(sw + a, e - a, scale, softcap, t ? t + b.nsb + a : nullptr);
      if (brow) scale_add(sw + a, e - a, T(1), brow + a, static_cast<const T*>(nullptr));
    } else {
      scale_add(sw + a, e - a, scale, brow ? brow + a : nullptr, static_cast<const T*>(nullptr));
    }
    if (mask_self && i >= lo && i < hi) sw[i - b.klo] = static_cast<T>(SELF_SCORE);
    if (pen != nullptr) scale_add(sw + a, e - a, T(1), pen + b.nsb + a, static_cast<const T*>(nullptr));
    for (int x = 0; x < 2; ++x) {
      const int64_t c = cols.r[x][0], len = cols.r[x][1] - c;
      transform(s + c, len, t ? t + c : nullptr);
      if (pen != nullptr) scale_add(s + c, len, T(1), pen + c, static_cast<const T*>(nullptr));
    }
    cols.zero_rest(s, b.cols());
  }
};


template <typename S>
void forward_impl(const Inputs<S>& in, const Plan& plan, S* out, Acc<S>* lse) {
  using T = Acc<S>;
  constexpr bool same = std::is_same_v<S, T>;
  const int64_t n = in.g.n, cap = in.max_cols(), G = in.groups, P_kv = in.P / G;
  // task = (p_kv, block, r): the G query rows sharing a key row are neighbours (their keys stay in cache)
  std::vector<int64_t> start(P_kv + 1, 0);
  for (int64_t p_kv = 0; p_kv < P_kv; ++p_kv) start[p_kv + 1] = start[p_kv] + plan.spans[p_kv * G / plan.per].size() * G;
  // a task: up to BLOCK_Q rows, each over at most `cap` keys, d + dv multiply-adds per key
  const double work = double(start[P_kv]) * BLOCK_Q * double(cap) * double(in.d + in.dv);
  parallel_tasks(start[P_kv], work, [&](int64_t begin, int64_t end) {
    std::vector<T> buf(BLOCK_Q * cap), pbuf(cap), kbuf(cap), fbuf(in.dropout ? cap : 0);
    std::vector<T> obuf(same ? 0 : BLOCK_Q * in.dv);
    std::vector<S> wbuf(same ? 0 : BLOCK_Q * cap);
    std::vector<S> qsbuf(in.key_scale ? (in.g.lb + in.g.lf + 1) * BLOCK_Q * in.d : 0);
    std::vector<int64_t> lo(BLOCK_Q), hi(BLOCK_Q);
    std::vector<T> norm(BLOCK_Q);  // per row: 1 / the softmax's denominator (0 where no weight survives)
    const bool raw = in.raw_logits();
    const T* none = nullptr;
    Packed keys;  // the keys packed for the block before (the next block of a window reads the same ones, and more)
    for (int64_t t = begin; t < end; ++t) {
      const auto [p_kv, local] = locate(start, t);
      const int64_t p = p_kv * G + local % G;
      const Block b = in.block(p, plan.spans[p / plan.per][local / G]);
      S* o = out + in.qrow(p, b.r0) * in.dv;
      const int64_t C = b.cols(), nsb = b.nsb;
      if (C <= 0) {
        std::fill(o, o + b.rows() * in.dv, S(0));
        std::fill(lse + in.qrow(p, b.r0), lse + in.qrow(p, b.r1), T(0));
        continue;
      }
      T* scores = buf.data();
      const auto band = in.bands(b, lo.data(), hi.data());
      in.scores(b, scores, qsbuf.data(), &band[0], &keys);
      const T* keep = in.keep_cols(b, kbuf.data());
      const T* pen = in.penalty(b, keep, pbuf.data());
      for (int64_t i = b.r0; i < b.r1; ++i) {
        T* s = scores + (i - b.r0) * C;
        Cols cols;
        T mx = -std::numeric_limits<T>::max(), sum = T(0);
        if (raw) in.raw_row(b, i, s, cols);  // the scale goes into the exponent
        else in.logits(b, i, s, pen, nullptr, cols);
        cols.each([&](int64_t c, int64_t len) { mx = std::max(mx, row_max(s + c, len)); });
        // raw: the max of the scores, scaled (scale > 0); a row that sees nothing keeps the floor
        if (raw && mx > -std::numeric_limits<T>::max()) mx *= in.scale;
        // a learned sink joins the denominator (and the shift, so that a large one cannot overflow)
        const T shift = in.sinks != nullptr ? std::max(mx, in.sink(p)) : mx;
        cols.each([&](int64_t c, int64_t len) {
          sum += raw ? exp_scaled(s + c, len, in.scale, shift, none) : exp_sum(s + c, len, shift, keep ? keep + c : none);
        });
        // the weights stay unnormalised: the output rows are divided by their totals after the products
        norm[i - b.r0] = T(0);
        if (sum > T(0)) {
          const T total = sum + (in.sinks != nullptr ? std::exp(in.sink(p) - shift) : T(0));
          norm[i - b.r0] = T(1) / total;
          lse[in.qrow(p, i)] = shift + std::log(total);
          if (in.dropout) {
            cols.each([&](int64_t c, int64_t len) {
              in.dropout_factors(p, i, c < nsb ? b.s + c : b.klo + c - nsb, len, fbuf.data());
              mul_row(s + c, fbuf.data(), len);
            });
          }
        } else {
          // sees no key, or a learned sink so large that every weight underflows: all weights are zero, and
          // the backward's exp(score - lse) must be too (a huge lse; finite, as masked logits are)
          lse[in.qrow(p, i)] = in.sinks != nullptr ? T(1e30) : T(0);
        }
      }
      const S* weights = operand<S>(scores, wbuf.data(), b.rows() * C);
      const S* vb = in.v + (p / G * n + b.klo) * in.dv;
      const S* vs = in.v + (p / G * n + b.s) * in.dv;
      T* ob = nullptr;
      if constexpr (same) ob = o;
      else ob = obuf.data();
      if (b.keys() > 0)
        gemm(false, false, b.rows(), in.dv, b.keys(), T(1), weights + nsb, C, vb, in.dv, T(0), ob, in.dv, &band[1]);
      if (nsb > 0) gemm(false, false, b.rows(), in.dv, nsb, T(1), weights, C, vs, in.dv, T(b.keys() > 0), ob, in.dv);
      for (int64_t r = 0; r < b.rows(); ++r) scale_row(ob + r * in.dv, in.dv, norm[r]);
      if constexpr (!same) at::vec::convert(obuf.data(), o, b.rows() * in.dv);
    }
  });
}

// The upstream gradient as autograd hands it over: any strides (an expanded `.sum()` gradient has all
// strides 0). Rows that BLAS can read in place are used there; others are gathered per block.
template <typename S>
struct Strided {
  const S* data;
  int64_t sp, sn, sd;

  bool in_place(int64_t cols) const { return sd == 1 && sn >= cols; }
  const S* row(int64_t p, int64_t i) const { return data + p * sp + i * sn; }

  // Rows [r0, r0 + m) of head p as a matrix with leading dimension `ld`: in place or copied into `buf`.
  const S* rows(int64_t p, int64_t r0, int64_t m, int64_t cols, S* buf, int64_t& ld) const {
    if (in_place(cols)) {
      ld = sn;
      return row(p, r0);
    }
    for (int64_t r = 0; r < m; ++r)
      for (int64_t c = 0; c < cols; ++c) buf[r * cols + c] = row(p, r0 + r)[c * sd];
    ld = cols;
    return buf;
  }
};

// Per key row, the start of each task list (units of one phase, or documents) over the rows of documents.
template <typename L>
std::vector<int64_t> starts_of(int64_t P_kv, int64_t G, int64_t per, const L& lists) {
  std::vector<int64_t> start(P_kv + 1, 0);
  for (int64_t p_kv = 0; p_kv < P_kv; ++p_kv) start[p_kv + 1] = start[p_kv] + lists[p_kv * G / per].size();
  return start;
}

// The sink tokens' dK, dV. Every block of a document may see them, outside the key ranges the backward's
// phases give one owner each, so a task per (key row, document) walks the document's blocks and recomputes
// the sink columns alone (delta_i saved by the main pass), in a fixed order: no races, and the same bits
// for any thread count.
template <typename S>
void sink_token_grads(const Inputs<S>& in, const Plan& plan, const Strided<S>& grad_out, const Acc<S>* lse,
                      const Acc<S>* deltas, Acc<S>* dk, Acc<S>* dv) {
  using T = Acc<S>;
  constexpr bool same = std::is_same_v<S, T>;
  const int64_t n = in.g.n, w = in.g.w, G = in.groups, P_kv = in.P / G, cap = std::min(in.sink_tokens, n);
  const auto start = starts_of(P_kv, G, plan.per, plan.docs);
  // all tasks together: every query row against the sink columns, four products of d or dv
  const double work = double(in.P) * double(in.g.n_q) * double(cap) * 2.0 * double(in.d + in.dv);
  parallel_tasks(start[P_kv], work, [&](int64_t begin, int64_t end) {
    std::vector<T> sbuf(BLOCK_Q * cap), gbuf(BLOCK_Q * cap), pbuf(cap), fbuf(in.dropout ? cap : 0);
    std::vector<T> tanh_buf(in.softcap > T(0) ? cap : 0);
    std::vector<S> wbuf(same ? 0 : BLOCK_Q * cap), dsbuf(same ? 0 : BLOCK_Q * cap);
    std::vector<S> gobuf(grad_out.in_place(in.dv) ? 0 : BLOCK_Q * in.dv);
    for (int64_t t = begin; t < end; ++t) {
      const auto [p_kv, index] = locate(start, t);
      const auto [s0, e0] = plan.docs[p_kv * G / plan.per][index];
      const S* ks = in.k + (p_kv * n + s0) * in.d;
      const S* vs = in.v + (p_kv * n + s0) * in.dv;
      const int64_t nw = (e0 - s0 + w - 1) / w;
      for (int64_t win = 0; win < nw; ++win)
        for (int64_t j = 0; s0 + win * w + j * BLOCK_Q < std::min(e0, s0 + (win + 1) * w); ++j) {
          Span sp;
          if (!make_span(s0, e0, win, j, w, in.g.off, sp)) continue;
          for (int64_t p = p_kv * G; p < (p_kv + 1) * G; ++p) {
            const Block b = in.block(p, sp);
            const int64_t m = b.rows(), nsb = b.nsb;
            if (nsb == 0) continue;
            const S* qb = in.q_rows(b);
            int64_t ldg;
            const S* gob = grad_out.rows(p, b.r0 - in.g.off, m, in.dv, gobuf.data(), ldg);
            T* scores = sbuf.data();
            T* Gr = gbuf.data();
            gemm(false, true, m, nsb, in.d, T(1), qb, in.d, ks, in.d, T(0), scores, nsb);
            gemm(false, true, m, nsb, in.dv, T(1), gob, ldg, vs, in.dv, T(0), Gr, nsb);
            const T* keep = in.keep == nullptr ? nullptr : in.keep + (p / in.per_keep) * n + s0;
            const T* pen = in.penalty(Block{p, s0, e0, 0, 0, 0, s0, s0, nsb}, keep, pbuf.data());
            for (int64_t i = b.r0; i < b.r1; ++i) {
              T* s = scores + (i - b.r0) * nsb;
              T* g = Gr + (i - b.r0) * nsb;
              int64_t lo, hi;
              in.g.interval(i, b.s, b.e, lo, hi);
              Cols cols;
              in.sink_only(b, lo, hi, cols);
              cols.r[2][0] = cols.r[2][1] = nsb;
              T* th = in.softcap > T(0) ? tanh_buf.data() : nullptr;
              const T l = lse[in.qrow(p, i)], delta = deltas[in.qrow(p, i)];
              cols.each([&](int64_t c, int64_t len) {
                in.transform(s + c, len, th ? th + c : nullptr);
                if (pen != nullptr) scale_add(s + c, len, T(1), pen + c, static_cast<const T*>(nullptr));
                exp_sum(s + c, len, l, keep ? keep + c : nullptr);
                if (in.dropout) {
                  in.dropout_factors(p, i, s0 + c, len, fbuf.data() + c);
                  mul_row(g + c, fbuf.data() + c, len);
                }
                logit_grad(s + c, g + c, len, delta);
                if (in.dropout) mul_row(s + c, fbuf.data() + c, len);
                if (th != nullptr) softcap_grad(g + c, th + c, len);
              });
              cols.zero_rest(s, nsb);
              cols.zero_rest(g, nsb);
            }
            const S* weights = operand<S>(scores, wbuf.data(), m * nsb);
            const S* dlogits = operand<S>(Gr, dsbuf.data(), m * nsb);
            gemm(true, false, nsb, in.dv, m, T(1), weights, nsb, gob, ldg, T(1), dv + (p_kv * n + s0) * in.dv, in.dv);
            gemm(true, false, nsb, in.d, m, in.scale, dlogits, nsb, qb, in.d, T(1), dk + (p_kv * n + s0) * in.d, in.d);
          }
        }
    }
  });
}

template <typename S>
void backward_impl(const Inputs<S>& in, const Plan& plan, const Strided<S>& grad_out, const Acc<S>* lse, S* dq,
                   Acc<S>* dk, Acc<S>* dv, Acc<S>* dbias, Acc<S>* dsinks) {
  using T = Acc<S>;
  constexpr bool same = std::is_same_v<S, T>;
  const int64_t n = in.g.n, w = in.g.w, cap = in.max_cols();
  const int64_t G = in.groups, P_kv = in.P / G;  // a task owns key row p_kv and its G query rows
  const int64_t span_keys = in.span_keys();
  const int64_t bias_numel = in.bias == nullptr ? 0 : in.heads * w * span_keys;
  // delta_i per query row: for the learned sinks' gradient and the sink tokens' dK, dV (a pass of its own)
  const bool keep_delta = in.sinks != nullptr || in.sink_tokens > 0;
  std::vector<T> deltas(keep_delta ? in.P * in.g.n_q : 0, T(0));

  std::vector<std::vector<T>> dbias_parts(bias_numel ? at::get_num_threads() : 0);
  for (int64_t phase = 0; phase < 2; ++phase) {
    const auto& units = plan.units[phase];
    const auto start = starts_of(P_kv, G, plan.per, units);
    // the phase's tasks together cover at most every query row against `cap` keys, four products of d or dv
    const double work = double(in.P) * double(in.g.n_q) * double(cap) * 2.0 * double(in.d + in.dv);
    parallel_tasks(start[P_kv], work, [&](int64_t begin, int64_t end) {
      std::vector<T> sbuf(BLOCK_Q * cap), gbuf(BLOCK_Q * cap), pbuf(cap), kbuf(cap);
      std::vector<T> tanh_buf(in.softcap > T(0) ? BLOCK_Q * cap : 0);
      std::vector<T> fbuf(in.dropout ? cap : 0);
      std::vector<S> wbuf(same ? 0 : BLOCK_Q * cap), dsbuf(same ? 0 : BLOCK_Q * cap);
      std::vector<S> gobuf(grad_out.in_place(in.dv) ? 0 : BLOCK_Q * in.dv);
      std::vector<T> qbuf(same && !in.key_scale ? 0 : BLOCK_Q * in.d);
      std::vector<T> tbuf(in.key_scale ? BLOCK_Q * in.d : 0);
      std::vector<S> qsbuf(in.key_scale ? (in.g.lb + in.g.lf + 1) * BLOCK_Q * in.d : 0);
      std::vector<int64_t> lo(BLOCK_Q), hi(BLOCK_Q);
      const bool raw = in.raw_logits();
      const T* none = nullptr;
      Packed keys, values;  // packed for the block before, as in the forward
      T* db = nullptr;
      if (bias_numel) {
        auto& part = dbias_parts[at::get_thread_num()];
        if (part.empty()) part.assign(bias_numel, T(0));
        db = part.data();
      }
      for (int64_t t = begin; t < end; ++t) {
        const auto [p_kv, index] = locate(start, t);
        const auto& unit = units[p_kv * G / plan.per][index];
        if (phase == 0) {
          std::fill(dk + (p_kv * n + unit.z0) * in.d, dk + (p_kv * n + unit.z1) * in.d, T(0));
          std::fill(dv + (p_kv * n + unit.z0) * in.dv, dv + (p_kv * n + unit.z1) * in.dv, T(0));
        }
        for (int64_t win = unit.w0; win < unit.w1; ++win)
          for (int64_t j = 0; unit.s + win * w + j * BLOCK_Q < std::min(unit.e, unit.s + (win + 1) * w); ++j) {
            Span sp;
            if (!make_span(unit.s, unit.e, win, j, w, in.g.off, sp)) continue;
            for (int64_t p = p_kv * G; p < (p_kv + 1) * G; ++p) {  // the query rows sharing key row p_kv
              const Block b = in.block(p, sp);
              S* dqb = dq + in.qrow(p, b.r0) * in.d;
              const int64_t L = b.keys(), m = b.rows(), C = b.cols(), nsb = b.nsb;
              if (C <= 0) {
                std::fill(dqb, dqb + m * in.d, S(0));
                continue;
              }
              const S* qb = in.q_rows(b);
              const S* kb = in.k + (p_kv * n + b.klo) * in.d;
              const S* vb = in.v + (p_kv * n + b.klo) * in.dv;
              const S* ks = in.k + (p_kv * n + b.s) * in.d;
              int64_t ldg;
              const S* gob = grad_out.rows(p, b.r0 - in.g.off, m, in.dv, gobuf.data(), ldg);
              T* scores = sbuf.data();
              T* Gr = gbuf.data();
              const auto band = in.bands(b, lo.data(), hi.data());
              in.scores(b, scores, qsbuf.data(), &band[0], &keys);
              if (L > 0) gemm(false, true, m, L, in.dv, T(1), gob, ldg, vb, in.dv, T(0), Gr + nsb, C, &band[0], &values);
              if (nsb > 0)
                gemm(false, true, m, nsb, in.dv, T(1), gob, ldg, in.v + (p_kv * n + b.s) * in.dv, in.dv, T(0), Gr, C);
              const T* keep = in.keep_cols(b, kbuf.data());
              const T* pen = in.penalty(b, keep, pbuf.data());
              for (int64_t i = b.r0; i < b.r1; ++i) {
                T* s = scores + (i - b.r0) * C;  // scores -> weights P
                T* g = Gr + (i - b.r0) * C;      // grad of weights -> grad of logits dS
                T* th = in.softcap > T(0) ? tanh_buf.data() + (i - b.r0) * C : nullptr;
                Cols cols;
                const T l = lse[in.qrow(p, i)];
                T delta = T(0);
                if (raw) {  // P = exp(scale S - lse), and without dropout delta in the same pass
                  in.raw_row(b, i, s, cols);
                  cols.each([&](int64_t c, int64_t len) {
                    const T part = exp_scaled(s + c, len, in.scale, l, in.dropout ? none : g + c);
                    if (!in.dropout) delta += part;
                  });
                } else {
                  in.logits(b, i, s, pen, th, cols);
                  cols.each([&](int64_t c, int64_t len) { exp_sum(s + c, len, l, keep ? keep + c : nullptr); });
                }
                const int64_t a = cols.r[2][0] - nsb, e = cols.r[2][1] - nsb;
                if (!raw || in.dropout)
                  cols.each([&](int64_t c, int64_t len) {
                    if (in.dropout) {  // g: the gradient of the dropped weights -> of the softmax weights
                      in.dropout_factors(p, i, c < nsb ? b.s + c : b.klo + c - nsb, len, fbuf.data() + c);
                      mul_row(g + c, fbuf.data() + c, len);
                    }
                    delta += dot(s + c, g + c, len);
                  });
                cols.each([&](int64_t c, int64_t len) {
                  logit_grad(s + c, g + c, len, delta);
                  if (in.dropout) mul_row(s + c, fbuf.data() + c, len);  // s: the dropped weights, for dV
                });
                cols.zero_rest(g, C);
                if (in.mask_self && i >= b.klo + a && i < b.klo + e) g[nsb + i - b.klo] = 0;  // a constant score
                if (db != nullptr) {
                  T* brow = db + ((p % in.heads) * w + (i - b.s - win * w)) * span_keys + (b.klo - b.s - (win - in.g.lb) * w);
                  for (int64_t c = a; c < e; ++c) brow[c] += g[nsb + c];
                }
                if (keep_delta) deltas[in.qrow(p, i)] = delta;
                // the bias gradient is dS; q and k get it through the softcap's 1 - tanh^2
                if (th != nullptr) cols.each([&](int64_t c, int64_t len) { softcap_grad(g + c, th + c, len); });
              }
              // dV += P^T dO (P with dropout applied), dQ = scale dS K, dK += scale dS^T Q over the window
              // keys; the sink columns add to dQ here, and to their keys' dK, dV in a pass of their own
              const S* weights = operand<S>(scores, wbuf.data(), m * C);
              const S* dlogits = operand<S>(Gr, dsbuf.data(), m * C);
              if (L > 0)
                gemm(true, false, L, in.dv, m, T(1), weights + nsb, C, gob, ldg, T(1), dv + (p_kv * n + b.klo) * in.dv, in.dv,
                     &band[2]);
              if (in.key_scale != nullptr) {  // per slot: dQ += scale (dS K) * f, dK += scale dS^T (Q * f)
                T* acc = qbuf.data();
                std::fill(acc, acc + m * in.d, T(0));
                in.for_each_slot(b, [&](int64_t slot, int64_t lo, int64_t hi) {
                  const S* ds = dlogits + nsb + (lo - b.klo);
                  gemm(false, false, m, in.d, hi - lo, in.scale, ds, C, kb + (lo - b.klo) * in.d, in.d, T(0), tbuf.data(),
                       in.d);
                  const T* f = in.key_scale + slot * in.d;
                  for (int64_t r = 0; r < m; ++r)
                    for (int64_t c = 0; c < in.d; ++c) acc[r * in.d + c] += tbuf[r * in.d + c] * f[c];
                  gemm(true, false, hi - lo, in.d, m, in.scale, ds, C, qsbuf.data() + slot * BLOCK_Q * in.d, in.d, T(1),
                       dk + (p_kv * n + lo) * in.d, in.d);
                });
                if (nsb > 0) gemm(false, false, m, in.d, nsb, in.scale, dlogits, C, ks, in.d, T(1), acc, in.d);
                if constexpr (same) std::copy(acc, acc + m * in.d, dqb);
                else at::vec::convert(acc, dqb, m * in.d);
              } else {
                T* acc = nullptr;
                if constexpr (same) acc = dqb;
                else acc = qbuf.data();
                if (L > 0) gemm(false, false, m, in.d, L, in.scale, dlogits + nsb, C, kb, in.d, T(0), acc, in.d, &band[1]);
                if (nsb > 0) gemm(false, false, m, in.d, nsb, in.scale, dlogits, C, ks, in.d, T(L > 0), acc, in.d);
                if constexpr (!same) at::vec::convert(qbuf.data(), dqb, m * in.d);
                if (L > 0)
                  gemm(true, false, L, in.d, m, in.scale, dlogits + nsb, C, qb, in.d, T(1), dk + (p_kv * n + b.klo) * in.d, in.d,
                       &band[2]);
              }
            }
          }
      }
    });
  }
  if (in.sink_tokens > 0) sink_token_grads(in, plan, grad_out, lse, deltas.data(), dk, dv);
  if (bias_numel) {
    std::fill(dbias, dbias + bias_numel, T(0));
    for (const auto& part : dbias_parts)
      if (!part.empty())
        for (int64_t x = 0; x < bias_numel; ++x) dbias[x] += part[x];
  }
  if (in.sinks != nullptr) {  // d sink = -sum_i p_sink_i delta_i, in a fixed order (any thread count)
    std::fill(dsinks, dsinks + in.sink_heads, T(0));
    for (int64_t p = 0; p < in.P; ++p)
      for (int64_t r = 0; r < in.g.n_q; ++r) {
        const T delta = deltas[p * in.g.n_q + r];
        if (delta != T(0)) dsinks[p % in.sink_heads] -= std::exp(in.sink(p) - lse[p * in.g.n_q + r]) * delta;
      }
  }
}

template <typename S>
Inputs<S> make_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& keep,
                      const std::optional<at::Tensor>& key_scale, const std::optional<at::Tensor>& sinks, int64_t w,
                      int64_t lb, int64_t lf, int64_t left, int64_t right, bool causal, int64_t sink_tokens,
                      double softcap, double scale, bool mask_self, double dropout_p, int64_t seed) {
  using T = Acc<S>;
  Inputs<S> in{};
  in.P = q.size(0);
  in.groups = q.size(0) / k.size(0);
  in.d = q.size(2);
  in.dv = v.size(2);
  in.q = q.data_ptr<S>();
  in.k = k.data_ptr<S>();
  in.v = v.data_ptr<S>();
  in.bias = bias.has_value() ? bias->data_ptr<T>() : nullptr;
  in.heads = bias.has_value() ? bias->size(0) : 1;
  in.keep = keep.has_value() ? keep->data_ptr<T>() : nullptr;
  in.key_scale = key_scale.has_value() ? key_scale->data_ptr<T>() : nullptr;
  in.sinks = sinks.has_value() ? sinks->data_ptr<T>() : nullptr;
  in.sink_heads = sinks.has_value() ? sinks->size(0) : 1;
  in.sink_tokens = sink_tokens;
  in.softcap = static_cast<T>(softcap);
  in.per_keep = keep.has_value() ? in.P / keep->size(0) : 1;
  in.scale = static_cast<T>(scale);
  in.mask_self = mask_self;
  in.g = Geometry{k.size(1), q.size(1), k.size(1) - q.size(1), w, lb, lf, left, right, causal};
  in.dropout = dropout_p > 0.0;
  in.drop_below = static_cast<uint32_t>(std::min(std::ldexp(dropout_p, 32), 4294967295.0));
  in.seed_lo = static_cast<uint32_t>(static_cast<uint64_t>(seed));
  in.seed_hi = static_cast<uint32_t>(static_cast<uint64_t>(seed) >> 32);
  in.kept_scale = static_cast<T>(1.0 / (1.0 - dropout_p));
  return in;
}

at::ScalarType acc_type(const at::Tensor& q) { return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// The new per-call tensors and scalars: documents (B, n) int64 ids whose query rows sharing a key row share a
// row (B | P / groups), sinks (h,) in the accumulation type with h | P, the token bounds, sink tokens, softcap.
void check(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& bias,
           const std::optional<at::Tensor>& keep, const std::optional<at::Tensor>& key_scale,
           const std::optional<at::Tensor>& documents, const std::optional<at::Tensor>& sinks, int64_t w, int64_t lb,
           int64_t lf, int64_t left, int64_t right, int64_t sink_tokens, double softcap) {
  int64_t span = 0, columns = 0, rows = 0;  // the kernel's index arithmetic must not overflow
  TORCH_CHECK(w >= 1 && lb >= 0 && lf >= 0 && !__builtin_add_overflow(lb, lf + 1, &span)
              && !__builtin_mul_overflow(span, w, &columns) && !__builtin_mul_overflow(span + 1, w, &rows),
              "window_size must be >= 1 and the look-around >= 0, with (look_backward + look_forward + 2) * "
              "window_size within int64");
  TORCH_CHECK(left >= -1 && right >= -1, "left and right (token bounds) must be >= 0, or -1 for none");
  TORCH_CHECK(sink_tokens >= 0, "sink_tokens must be >= 0");
  TORCH_CHECK(softcap >= 0.0 && std::isfinite(softcap), "softcap must be finite and > 0 (0: none)");
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous(), "q, k, v must be contiguous");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), "q, k, v dtypes differ");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "q, k, v must be (P, n, d)");
  TORCH_CHECK(k.size(0) >= 1 && q.size(0) % k.size(0) == 0 && v.size(0) == k.size(0),
              "k and v must have P_kv rows dividing the P rows of q (grouped-query attention)");
  TORCH_CHECK(q.size(1) <= k.size(1) && v.size(1) == k.size(1) && k.size(2) == q.size(2),
              "k must be (P_kv, n, d) and v (P_kv, n, dv) for q (P, n_q, d) with n_q <= n");
  const int64_t n = k.size(1);
  TORCH_CHECK(!bias.has_value() || (bias->is_contiguous() && bias->scalar_type() == acc_type(q)),
              "bias must be contiguous, float64 for float64 inputs and float32 otherwise");
  // the kernel indexes the bias and the mask by these shapes: a direct call of the op with others must not
  // read past them
  TORCH_CHECK(!bias.has_value() || (bias->dim() == 3 && bias->size(0) >= 1 && q.size(0) % bias->size(0) == 0
                                    && bias->size(1) == w && bias->size(2) == (lb + lf + 1) * w),
              "bias must be (H, w, span * w) with H dividing the P rows of q");
  TORCH_CHECK(!keep.has_value() || (keep->is_contiguous() && keep->scalar_type() == acc_type(q)),
              "keep must be contiguous (1 = kept, 0 = masked), float64 for float64 inputs and float32 otherwise");
  TORCH_CHECK(!keep.has_value() || (keep->dim() == 2 && keep->size(0) >= 1 && q.size(0) % keep->size(0) == 0
                                    && keep->size(1) == n),
              "keep must be (B, n) with B dividing the P rows of q");
  TORCH_CHECK(!key_scale.has_value() || (key_scale->is_contiguous() && key_scale->scalar_type() == acc_type(q) &&
                                         key_scale->sizes() == at::IntArrayRef({lb + lf + 1, q.size(2)})),
              "key_scale must be contiguous (span, d), float64 for float64 inputs and float32 otherwise");
  TORCH_CHECK(!documents.has_value() || (documents->is_contiguous() && documents->scalar_type() == at::kLong &&
                                         documents->dim() == 2 && documents->size(0) >= 1 && documents->size(1) == n &&
                                         q.size(0) % documents->size(0) == 0 &&
                                         (q.size(0) / documents->size(0)) % (q.size(0) / k.size(0)) == 0),
              "documents must be contiguous int64 (B, n), with B dividing the P rows of q and the query rows "
              "sharing a key row in one row of documents");
  TORCH_CHECK(!sinks.has_value() || (sinks->is_contiguous() && sinks->scalar_type() == acc_type(q) &&
                                     sinks->dim() == 1 && sinks->size(0) >= 1 && q.size(0) % sinks->size(0) == 0),
              "sinks must be contiguous (h,) with h dividing the P rows of q, float64 for float64 inputs and "
              "float32 otherwise");
}

Plan plan_of(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& documents, int64_t w,
             int64_t lb, int64_t lf, int64_t left, int64_t right, bool causal) {
  const Geometry g{k.size(1), q.size(1), k.size(1) - q.size(1), w, lb, lf, left, right, causal};
  return documents.has_value() ? make_plan(g, q.size(0), documents->data_ptr<int64_t>(), documents->size(0))
                               : make_plan(g, q.size(0), nullptr, 1);
}

// q (P, n_q, d), k (P_kv, n, d), v (P_kv, n, dv) -> out (P, n_q, dv) in q's dtype, lse (P, n_q) in the
// accumulation type. The queries are the last n_q positions.
std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                           const std::optional<at::Tensor>& bias,
                                           const std::optional<at::Tensor>& keep,
                                           const std::optional<at::Tensor>& key_scale,
                                           const std::optional<at::Tensor>& documents,
                                           const std::optional<at::Tensor>& sinks, int64_t w, int64_t lb, int64_t lf,
                                           int64_t left, int64_t right, bool causal, int64_t sink_tokens,
                                           double softcap, double scale, bool mask_self, double dropout_p,
                                           int64_t seed) {
  check(q, k, v, bias, keep, key_scale, documents, sinks, w, lb, lf, left, right, sink_tokens, softcap);
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "dropout_p must be in [0, 1)");
  auto& pool = OutputPool::instance();
  auto out = pool.empty({q.size(0), q.size(1), v.size(2)}, q.scalar_type());
  auto lse = at::empty({q.size(0), q.size(1)}, q.options().dtype(acc_type(q)));
  const Plan plan = plan_of(q, k, documents, w, lb, lf, left, right, causal);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "windowed_attention_forward", [&] {
    auto in = make_inputs<scalar_t>(q, k, v, bias, keep, key_scale, sinks, w, lb, lf, left, right, causal, sink_tokens, softcap,
                                    scale, mask_self, dropout_p, seed);
    forward_impl(in, plan, out.data_ptr<scalar_t>(), lse.data_ptr<Acc<scalar_t>>());
  });
  return {out, lse};
}

// Gradients of q (q's dtype), of k and v, bias and sinks (the accumulation type; bias's and sinks' empty
// (0,) without them).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& lse, const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& keep,
    const std::optional<at::Tensor>& key_scale, const std::optional<at::Tensor>& documents,
    const std::optional<at::Tensor>& sinks, int64_t w, int64_t lb, int64_t lf, int64_t left, int64_t right,
    bool causal, int64_t sink_tokens, double softcap, double scale, bool mask_self, double dropout_p, int64_t seed) {
  check(q, k, v, bias, keep, key_scale, documents, sinks, w, lb, lf, left, right, sink_tokens, softcap);
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "dropout_p must be in [0, 1)");
  TORCH_CHECK(lse.is_contiguous() && lse.sizes() == at::IntArrayRef({q.size(0), q.size(1)}), "lse must be (P, n_q), contiguous");
  TORCH_CHECK(grad_out.dim() == 3 && grad_out.sizes() == at::IntArrayRef({q.size(0), q.size(1), v.size(2)}),
              "grad_out must have the output's shape");
  TORCH_CHECK(grad_out.scalar_type() == q.scalar_type() && lse.scalar_type() == acc_type(q), "saved tensor dtypes");
  const auto acc = q.options().dtype(acc_type(q));
  auto& pool = OutputPool::instance();
  auto dq = pool.empty(q.sizes(), q.scalar_type());
  auto dk = pool.empty(k.sizes(), acc_type(q));  // zeroed by the backward's first phase
  auto dv = pool.empty(v.sizes(), acc_type(q));
  auto dbias = bias.has_value() ? at::empty_like(*bias) : at::empty({0}, acc);
  auto dsinks = sinks.has_value() ? at::empty_like(*sinks) : at::empty({0}, acc);
  const Plan plan = plan_of(q, k, documents, w, lb, lf, left, right, causal);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "windowed_attention_backward", [&] {
    using T = Acc<scalar_t>;
    auto in = make_inputs<scalar_t>(q, k, v, bias, keep, key_scale, sinks, w, lb, lf, left, right, causal, sink_tokens, softcap,
                                    scale, mask_self, dropout_p, seed);
    const Strided<scalar_t> go{grad_out.data_ptr<scalar_t>(), grad_out.stride(0), grad_out.stride(1), grad_out.stride(2)};
    backward_impl(in, plan, go, lse.data_ptr<T>(), dq.data_ptr<scalar_t>(), dk.data_ptr<T>(), dv.data_ptr<T>(),
                  bias.has_value() ? dbias.data_ptr<T>() : nullptr, sinks.has_value() ? dsinks.data_ptr<T>() : nullptr);
  });
  return {dq, dk, dv, dbias, dsinks};
}

// Whether any of the `len` entries at `x` (floating-point numbers of U's width) is NaN or infinite: all its
// exponent bits set. Branch-free, so the loop vectorizes.
template <typename U>
bool any_nonfinite(const void* x, int64_t len, U exponent) {
  const auto* bytes = static_cast<const unsigned char*>(x);
  U bad = 0;
  for (int64_t i = 0; i < len; ++i) {
    U bits;
    std::memcpy(&bits, bytes + i * sizeof(U), sizeof(U));
    bad |= static_cast<U>((bits & exponent) == exponent);
  }
  return bad != 0;
}

bool any_nonfinite(const at::Tensor& t) {  // t contiguous
  switch (t.scalar_type()) {
    case at::kFloat: return any_nonfinite<uint32_t>(t.const_data_ptr(), t.numel(), 0x7f800000u);
    case at::kDouble: return any_nonfinite<uint64_t>(t.const_data_ptr(), t.numel(), 0x7ff0000000000000ull);
    case at::kBFloat16: return any_nonfinite<uint16_t>(t.const_data_ptr(), t.numel(), 0x7f80);
    case at::kHalf: return any_nonfinite<uint16_t>(t.const_data_ptr(), t.numel(), 0x7c00);
    default: TORCH_CHECK(false, "q, k, v must be float32, float64, bfloat16 or float16");
  }
}

// The plain call (`ops/fused_cpu.py`, `plain_forward`): q (..., n_q, d), k (..., n, d), v (..., n, dv) with any
// leading dims, packed to (P, n, d) as `ops.api.pack_leading` does; no mask, bias, key scale, documents,
// sinks, shared-qk rule or dropout. Returns the output (..., n_q, dv), or None when k or v holds a NaN or an
// infinity, for the caller's exact route (`ops/finite.py`): checking every entry here costs a fraction of a
// microsecond on a small call, where the Python sums it replaces cost several.
std::optional<at::Tensor> forward_plain(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t w,
                                        int64_t lb, int64_t lf, int64_t left, int64_t right, bool causal,
                                        int64_t sink_tokens, double softcap, double scale) {
  TORCH_CHECK(q.dim() >= 2 && k.dim() >= 2 && v.dim() >= 2 && q.numel() > 0 && k.numel() > 0,
              "q, k, v must be (..., n, d), not empty");
  const auto pack = [](const at::Tensor& t) { return t.reshape({-1, t.size(-2), t.size(-1)}).contiguous(); };
  const at::Tensor qp = pack(q), kp = pack(k), vp = pack(v);
  if (any_nonfinite(kp) || any_nonfinite(vp)) return std::nullopt;
  const std::optional<at::Tensor> none;
  auto out = std::get<0>(forward(qp, kp, vp, none, none, none, none, none, w, lb, lf, left, right, causal,
                                 sink_tokens, softcap, scale, false, 0.0, 0));
  std::vector<int64_t> sizes = q.sizes().vec();
  sizes.back() = v.size(-1);
  return out.view(sizes);
}

}  // namespace
}  // namespace local_attention

TORCH_LIBRARY(windowed_attention_cpu, m) {
  m.def("forward", &local_attention::forward);
  m.def("forward_plain", &local_attention::forward_plain);
  m.def("backward", &local_attention::backward);
  m.def("release_memory", [] { local_attention::OutputPool::instance().release(); });
  m.def("idle_bytes", [] { return local_attention::OutputPool::instance().idle_bytes(); });
  local_attention::define_test_hooks(m);
}
