// One decode step of local attention on CPU in one call, instead of a dozen small torch ops: rotate the
// new query and key of every row to their positions, write the key and value into the cache's ring
// (twice: at `slot` and `slot + S`), and attend the query over the `S` cached keys from ring index `first`
// (oldest first, its own key last). It computes what `ops.decode.attend_one` computes after
// `positional.rotate_step` and `KVCache.update` (tests/test_cache.py compares the two).
//
//   q (b, h, d), k (b, hk, d), v (b, hk, dv): any strides; h % hk == 0, query head i uses kv head i / (h / hk)
//   k_buf (b, hk, 2S, d), v_buf (b, hk, 2S, dv): contiguous, the cache's buffers (written here), in q's
//     dtype or, for a float32 q, in bfloat16 (a reduced cache: keys and values rounded on the way in)
//   cos, sig (b, d): the rotation of each row, `cat(cos, cos)` and `cat(-sin, sin)`, or undefined (no rotary)
//   row (B, H, S): additive scores by key (window rule and position bias), B in {1, b}, H in {1, h}
//   key_bias (b, 1, 2S) or undefined: -inf where a ring slot holds no key yet, read from `first`
//   key_factors (S, d) or undefined: per key and channel factors of the scores (xpos)
//   softcap > 0: the score scale * q.k becomes softcap * tanh(score / softcap) before row (0: none)
//   sinks (h,) or undefined: learned sink logits (compute dtype), one per query head, joining the softmax
//     denominator with no value (a query that sees no key still outputs zeros)
//   sink_k (b, hk, T, d), sink_v (b, hk, T, dv) or undefined: the cache's sink-token keys and values (in the
//     buffers' dtype, contiguous; read only), with sink_row (b, T) (compute dtype, contiguous): 0 where the
//     query sees that key as a sink, -inf where not; their scores are softcapped, they take no bias
// Tables are in the compute dtype (float64 for float64, else float32); keys are rounded once on the way
// into the cache (to 16 bits for a 16-bit cache), as the torch path does, and read back widened to the
// compute dtype. Returns the output (b, h, dv) in q's dtype.

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/functional_bfloat16.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include "vec_dots.h"

#include <cmath>
#include <limits>
#include <vector>

namespace {

constexpr double SELF_ATTN_SCORE = -5e4;

using wa_vec::dots;
using wa_vec::load;
using wa_vec::prefetch;

// x[j] = exp(x[j] - shift) in place (-inf gives 0); returns their sum
template <typename T>
T exp_shifted(T* x, int64_t n, T shift) {
  using V = at::vec::Vectorized<T>;
  const V s(shift);
  V total(T(0));
  int64_t j = 0;
  for (; j + V::size() <= n; j += V::size()) {
    const V e = (V::loadu(x + j) - s).exp();
    e.store(x + j);
    total = total + e;
  }
  T sum = at::vec::vec_reduce_all<T>([](V a, V b) { return a + b; }, total);
  for (; j < n; ++j) sum += (x[j] = std::exp(x[j] - shift));
  return sum;
}

// out = sum over j in [lo, n) of w[j] * values[j] (rows of dv), the accumulators held in registers across
// the keys, four vectors of the value dim at a time. A key of weight 0 (hidden) is skipped, never multiplied:
// whatever it holds (NaN, inf) reaches no query that does not see it.
template <typename T, typename C>
void weighted_sum(const T* w, const C* values, int64_t lo, int64_t n, int64_t dv, T* out) {
  using V = at::vec::Vectorized<T>;
  constexpr int64_t L = V::size();
  int64_t c = 0;
  for (; c + 4 * L <= dv; c += 4 * L) {
    V a0(T(0)), a1(T(0)), a2(T(0)), a3(T(0));
    for (int64_t j = lo; j < n; ++j) {
      if (w[j] == T(0)) continue;
      const V e(w[j]);
      const C* x = values + j * dv + c;
      prefetch(x, 4 * L);
      a0 = at::vec::fmadd(e, load<T>(x), a0);
      a1 = at::vec::fmadd(e, load<T>(x + L), a1);
      a2 = at::vec::fmadd(e, load<T>(x + 2 * L), a2);
      a3 = at::vec::fmadd(e, load<T>(x + 3 * L), a3);
    }
    a0.store(out + c), a1.store(out + c + L), a2.store(out + c + 2 * L), a3.store(out + c + 3 * L);
  }
  for (; c + L <= dv; c += L) {
    V a(T(0));
    for (int64_t j = lo; j < n; ++j)
      if (w[j] != T(0)) a = at::vec::fmadd(V(w[j]), load<T>(values + j * dv + c), a);
    a.store(out + c);
  }
  for (; c < dv; ++c) {
    T a = 0;
    for (int64_t j = lo; j < n; ++j)
      if (w[j] != T(0)) a += w[j] * static_cast<T>(values[j * dv + c]);
    out[c] = a;
  }
}

template <typename S, typename C>  // S: q, k, v; C: the cache's buffers
void decode_rows(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& k_buf, at::Tensor& v_buf,
                 const at::Tensor& cos, const at::Tensor& sig, const at::Tensor& row, const at::Tensor& key_bias,
                 const at::Tensor& key_factors, int64_t slot, int64_t first, double scale, bool shared_qk,
                 double softcap, const at::Tensor& sinks, const at::Tensor& sink_k, const at::Tensor& sink_v,
                 const at::Tensor& sink_row, at::Tensor& out) {
  using T = at::opmath_type<S>;
  const int64_t b = q.size(0), h = q.size(1), d = q.size(2), hk = k.size(1), dv = v.size(2);
  const int64_t S2 = k_buf.size(2), Sn = S2 / 2, group = h / hk, half = d / 2;
  const bool rotary = cos.defined();
  const S* qd = q.data_ptr<S>();
  const S* kd = k.data_ptr<S>();
  const S* vd = v.data_ptr<S>();
  C* kb = k_buf.data_ptr<C>();
  C* vb = v_buf.data_ptr<C>();
  const T* rowd = row.data_ptr<T>();
  const int64_t row_b = row.size(0) == 1 ? 0 : row.stride(0), row_h = row.size(1) == 1 ? 0 : row.stride(1);
  const T* biasd = key_bias.defined() ? key_bias.data_ptr<T>() : nullptr;
  const T* factors = key_factors.defined() ? key_factors.data_ptr<T>() : nullptr;
  const T* sink_logits = sinks.defined() ? sinks.data_ptr<T>() : nullptr;
  const int64_t St = sink_k.defined() ? sink_k.size(2) : 0;
  const C* skb = St ? sink_k.data_ptr<C>() : nullptr;
  const C* svb = St ? sink_v.data_ptr<C>() : nullptr;
  const T* srowd = St ? sink_row.data_ptr<T>() : nullptr;
  const bool capped = softcap > 0;
  const T cap = static_cast<T>(softcap), inv_cap = capped ? static_cast<T>(1.0 / softcap) : T(0);
  S* od = out.data_ptr<S>();

  auto rotate = [&](const S* x, int64_t stride, int64_t r, T* y) {  // y = x rotated for row r, in T
    for (int64_t c = 0; c < d; ++c) {
      const T xc = static_cast<T>(x[c * stride]);
      if (!rotary) {
        y[c] = xc;
        continue;
      }
      const T xr = static_cast<T>(x[((c + half) % d) * stride]);  // roll by half: [x2, x1]
      y[c] = xc * cos.data_ptr<T>()[r * d + c] + xr * sig.data_ptr<T>()[r * d + c];
    }
  };

  // 1. the new keys and values into the ring (every row and kv head)
  at::parallel_for(0, b * hk, 64, [&](int64_t begin, int64_t end) {
    std::vector<T> y(d);
    for (int64_t p = begin; p < end; ++p) {
      const int64_t r = p / hk, g = p % hk;
      rotate(kd + r * k.stride(0) + g * k.stride(1), k.stride(2), r, y.data());
      C* k0 = kb + (p * S2 + slot) * d;
      C* v0 = vb + (p * S2 + slot) * dv;
      const S* vs = vd + r * v.stride(0) + g * v.stride(1);
      for (int64_t c = 0; c < d; ++c) k0[c] = k0[c + Sn * d] = static_cast<C>(y[c]);
      for (int64_t c = 0; c < dv; ++c) v0[c] = v0[c + Sn * dv] = static_cast<C>(static_cast<T>(vs[c * v.stride(2)]));
    }
  });

  // 2. each query over its kv head's window. The window rule hides the oldest keys of the ring (on average
  // a quarter of it): they are never read, since a large batch's step is bound by reading the cache
  // from memory. A key hidden after the first one seen (by a bias) is scored, then hidden.
  constexpr T hidden = -std::numeric_limits<T>::infinity();
  at::parallel_for(0, b * h, 32, [&](int64_t begin, int64_t end) {
    std::vector<T> qr(d), score(Sn), acc(dv), row_k(d), sink_score(St), sink_acc(dv);
    for (int64_t p = begin; p < end; ++p) {
      const int64_t r = p / h, i = p % h, g = i / group;
      rotate(qd + r * q.stride(0) + i * q.stride(1), q.stride(2), r, qr.data());
      const C* keys = kb + ((r * hk + g) * S2 + first) * d;
      const C* values = vb + ((r * hk + g) * S2 + first) * dv;
      const T* add = rowd + r * row_b + i * row_h;
      const T* empty = biasd ? biasd + r * S2 + first : nullptr;
      auto seen = [&](int64_t j) { return add[j] != hidden && !(empty && empty[j] == hidden); };
      const bool self_score = shared_qk;  // the query's own key (the last) gets SELF_ATTN_SCORE, whatever hides it
      int64_t lo = 0;
      while (lo < Sn - self_score && !seen(lo)) ++lo;
      if (!factors) dots(qr.data(), keys, d, lo, Sn, score.data());
      T best = hidden;
      for (int64_t j = lo; j < Sn; ++j) {
        T s = 0;
        if (!factors) {
          s = score[j];
        } else {
          at::vec::convert(keys + j * d, row_k.data(), d);
          const T* f = factors + j * d;
          for (int64_t c = 0; c < d; ++c) s += qr[c] * row_k[c] * f[c];
        }
        s = s * static_cast<T>(scale);
        if (capped) s = cap * std::tanh(s * inv_cap);
        s = s + add[j] + (empty ? empty[j] : T(0));
        score[j] = self_score && j == Sn - 1 ? static_cast<T>(SELF_ATTN_SCORE) : seen(j) ? s : hidden;
        best = std::max(best, score[j]);
      }
      const C* sink_keys = St ? skb + (r * hk + g) * St * d : nullptr;
      const C* sink_values = St ? svb + (r * hk + g) * St * dv : nullptr;
      if (St) {  // the sink tokens this query sees only as sinks: scored (softcapped), no bias
        const T* seen_sink = srowd + r * St;
        dots(qr.data(), sink_keys, d, 0, St, sink_score.data());
        for (int64_t j = 0; j < St; ++j) {
          T s = sink_score[j] * static_cast<T>(scale);
          if (capped) s = cap * std::tanh(s * inv_cap);
          sink_score[j] = seen_sink[j] == hidden ? hidden : s + seen_sink[j];
          best = std::max(best, sink_score[j]);
        }
      }
      S* o = od + p * dv;
      if (best == hidden) {  // a query that sees no key (a bias hid them all) outputs zeros, as the op does
        for (int64_t c = 0; c < dv; ++c) o[c] = static_cast<S>(0);
        continue;
      }
      T shift = best, extra = T(0);
      if (sink_logits) {  // the learned sink: one more logit in the denominator, with no value
        shift = std::max(best, sink_logits[i]);
        extra = std::exp(sink_logits[i] - shift);
      }
      T total = exp_shifted(score.data() + lo, Sn - lo, shift) + extra;  // score[j] = exp(score[j] - shift)
      weighted_sum(score.data(), values, lo, Sn, dv, acc.data());
      if (St) {
        total += exp_shifted(sink_score.data(), St, shift);
        weighted_sum(sink_score.data(), sink_values, 0, St, dv, sink_acc.data());
        for (int64_t c = 0; c < dv; ++c) acc[c] += sink_acc[c];
      }
      for (int64_t c = 0; c < dv; ++c) o[c] = static_cast<S>(acc[c] / total);
    }
  });
}

at::Tensor decode_attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor k_buf, at::Tensor v_buf,
                         const c10::optional<at::Tensor>& cos, const c10::optional<at::Tensor>& sig, const at::Tensor& row,
                         const c10::optional<at::Tensor>& key_bias, const c10::optional<at::Tensor>& key_factors,
                         int64_t slot, int64_t first, double scale, bool shared_qk, double softcap,
                         const c10::optional<at::Tensor>& sinks, const c10::optional<at::Tensor>& sink_k,
                         const c10::optional<at::Tensor>& sink_v, const c10::optional<at::Tensor>& sink_row) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "q, k, v must be (b, heads, d)");
  TORCH_CHECK(k_buf.is_contiguous() && v_buf.is_contiguous() && k_buf.dim() == 4 && v_buf.dim() == 4,
              "k_buf and v_buf must be contiguous (b, hk, 2S, d)");
  const int64_t b = q.size(0), h = q.size(1), d = q.size(2), hk = k.size(1), Sn = k_buf.size(2) / 2;
  TORCH_CHECK(k.size(0) == b && v.size(0) == b && v.size(1) == hk && k.size(2) == d && h % hk == 0 && d % 2 == 0,
              "q, k, v shapes do not match");
  TORCH_CHECK(k_buf.size(0) == b && k_buf.size(1) == hk && k_buf.size(3) == d && v_buf.sizes().slice(0, 3) == k_buf.sizes().slice(0, 3)
              && v_buf.size(3) == v.size(2), "k_buf, v_buf do not match k, v");
  TORCH_CHECK(0 <= slot && slot < Sn && 0 <= first && first <= Sn, "slot and first must lie in the ring");
  const auto dtype = q.scalar_type();
  const auto cached = k_buf.scalar_type();
  TORCH_CHECK(k.scalar_type() == dtype && v.scalar_type() == dtype && v_buf.scalar_type() == cached
              && (cached == dtype || (dtype == at::kFloat && cached == at::kBFloat16)),
              "q, k, v must share a dtype, and the buffers theirs or, for float32, bfloat16");
  const auto acc = at::toOpMathType(dtype);
  auto table = [&](const c10::optional<at::Tensor>& t, const char* name) {
    if (!t.has_value() || !t->defined()) return at::Tensor();
    TORCH_CHECK(t->scalar_type() == acc && t->is_contiguous(), name, " must be contiguous in the compute dtype");
    return *t;
  };
  const at::Tensor c = table(cos, "cos"), s = table(sig, "sig"), kb = table(key_bias, "key_bias"),
                   f = table(key_factors, "key_factors"), sk = table(sinks, "sinks"), sr = table(sink_row, "sink_row");
  at::Tensor tk, tv;
  if (sink_k.has_value() && sink_k->defined()) {
    tk = *sink_k;
    TORCH_CHECK(sink_v.has_value() && sink_v->defined() && sr.defined(), "sink_k needs sink_v and sink_row");
    tv = *sink_v;
    const int64_t T = tk.size(2);
    TORCH_CHECK(tk.is_contiguous() && tv.is_contiguous() && tk.dim() == 4 && tv.dim() == 4
                && tk.sizes() == at::IntArrayRef({b, hk, T, d}) && tv.sizes() == at::IntArrayRef({b, hk, T, v.size(2)})
                && tk.scalar_type() == k_buf.scalar_type() && tv.scalar_type() == k_buf.scalar_type(),
                "sink_k, sink_v must be contiguous (b, hk, T, d) in the buffers' dtype");
    TORCH_CHECK(sr.numel() == b * T, "sink_row must be (b, T)");
  }
  TORCH_CHECK(row.scalar_type() == acc && row.dim() == 3 && row.stride(2) == 1 && row.size(2) == Sn
              && (row.size(0) == 1 || row.size(0) == b) && (row.size(1) == 1 || row.size(1) == h), "row must be (1|b, 1|h, S)");
  TORCH_CHECK(!c.defined() || (c.sizes() == at::IntArrayRef({b, d}) && s.defined() && s.sizes() == c.sizes()), "cos, sig must be (b, d)");
  TORCH_CHECK(!kb.defined() || (kb.size(0) == b && kb.numel() == b * 2 * Sn), "key_bias must be (b, 1, 2S)");
  TORCH_CHECK(!f.defined() || f.sizes() == at::IntArrayRef({Sn, d}), "key_factors must be (S, d)");
  TORCH_CHECK(!sk.defined() || sk.sizes() == at::IntArrayRef({h}), "sinks must be (h,)");
  TORCH_CHECK(softcap >= 0 && std::isfinite(softcap), "softcap must be finite and >= 0 (0: none)");
  auto out = at::empty({b, h, v.size(2)}, q.options());
  if (cached != dtype) {  // a bfloat16 cache of a float32 model
    decode_rows<float, at::BFloat16>(q, k, v, k_buf, v_buf, c, s, row, kb, f, slot, first, scale, shared_qk, softcap, sk, tk, tv, sr, out);
  } else {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "windowed_attention_decode", [&] {
      decode_rows<scalar_t, scalar_t>(q, k, v, k_buf, v_buf, c, s, row, kb, f, slot, first, scale, shared_qk, softcap, sk, tk, tv, sr, out);
    });
  }
  return out;
}

}  // namespace

// The op's schema (which declares the ring buffers' writes) and its fake are defined in Python (ops/decode.py); the
// kernel is registered here for CPU tensors, so that a compiled decode step calls it with no Python in between.
TORCH_LIBRARY_IMPL(windowed_attention_cpu, CPU, m) { m.impl("decode_attend", &decode_attend); }
