// The row operations of the attention kernel (`local_attention_cpu.cpp`), vectorized: softmax (scale and add,
// max, exp and sum), its gradient, dot products, softcap (a fast tanh) and its derivative; and the type
// scores and sums are kept in, with its buffers' conversion into matmul operands.

#pragma once

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace local_attention {

// The storage type S of q, k, v, and the type A that scores, softmax and gradient sums are kept in.
template <typename S>
using Acc = at::opmath_type<S>;

// `count` values of an A buffer as S operands for the next matmul: the buffer itself when S == A, else a
// rounded copy in `tmp`.
template <typename S>
const S* operand(const Acc<S>* x, S* tmp, int64_t count) {
  if constexpr (std::is_same_v<S, Acc<S>>) {
    return x;
  } else {
    at::vec::convert(x, tmp, count);
    return tmp;
  }
}

// Row kernels on at::vec::Vectorized (the build sets CPU_CAPABILITY_* to the CPU torch runs on).
template <typename T>
using Vec = at::vec::Vectorized<T>;

// x = x * scale (+ add1) (+ add2), for the `add`s that are not null.
template <typename T>
inline void scale_add(T* x, int64_t n, T scale, const T* add1, const T* add2) {
  const Vec<T> vs(scale);
  int64_t c = 0;
  for (; c + Vec<T>::size() <= n; c += Vec<T>::size()) {
    Vec<T> y = Vec<T>::loadu(x + c) * vs;
    if (add1 != nullptr) y = y + Vec<T>::loadu(add1 + c);
    if (add2 != nullptr) y = y + Vec<T>::loadu(add2 + c);
    y.store(x + c);
  }
  for (; c < n; ++c) x[c] = x[c] * scale + (add1 ? add1[c] : T(0)) + (add2 ? add2[c] : T(0));
}

template <typename T>
inline T row_max(const T* x, int64_t n) {
  Vec<T> vm(-std::numeric_limits<T>::max());
  int64_t c = 0;
  for (; c + Vec<T>::size() <= n; c += Vec<T>::size()) vm = at::vec::maximum(vm, Vec<T>::loadu(x + c));
  T m = at::vec::vec_reduce_all<T>([](Vec<T>& a, Vec<T>& b) { return at::vec::maximum(a, b); }, vm);
  for (; c < n; ++c) m = std::max(m, x[c]);
  return m;
}

// x = exp(x - shift) (* keep); returns the sum.
template <typename T>
inline T exp_sum(T* x, int64_t n, T shift, const T* keep) {
  const Vec<T> vshift(shift);
  Vec<T> vsum(T(0));
  int64_t c = 0;
  for (; c + Vec<T>::size() <= n; c += Vec<T>::size()) {
    Vec<T> y = (Vec<T>::loadu(x + c) - vshift).exp_u20();
    if (keep != nullptr) y = y * Vec<T>::loadu(keep + c);
    y.store(x + c);
    vsum = vsum + y;
  }
  if (c < n) {  // the ragged end of the row: one partial vector, its unused lanes zeroed
    const int64_t rest = n - c;
    Vec<T> y = (Vec<T>::loadu(x + c, rest) - vshift).exp_u20();
    if (keep != nullptr) y = y * Vec<T>::loadu(keep + c, rest);
    y = Vec<T>::set(Vec<T>(T(0)), y, rest);
    y.store(x + c, rest);
    vsum = vsum + y;
  }
  return at::vec::vec_reduce_all<T>([](Vec<T>& a, Vec<T>& b) { return a + b; }, vsum);
}

// `v` as it stands, rounded: the compiler may not fuse the multiply that made it into a later add (GCC and clang
// contract a * b + c into one multiply-add by default, which rounds once).
template <typename V>
inline V rounded(V v) {
  asm("" : "+m"(v));
  return v;
}

// x = exp(x * scale - shift) (the scale applied inside the exponent's pass: logits that are the scaled scores
// alone need no pass of their own); returns the sum of x, or of x * g when g is set (the softmax's delta_i =
// sum_j P_ij dP_ij, taken in the same pass). x * scale is rounded before the shift, as a pass of its own would
// round it: not fused into one multiply-add, so that the row's largest score, whose rounded logit is the
// shift, weighs exactly 1 (a saturated row's gradient is then exactly zero).
template <typename T>
inline T exp_scaled(T* x, int64_t n, T scale, T shift, const T* g) {
  const Vec<T> vscale(scale), vshift(-shift);
  Vec<T> vsum(T(0));
  int64_t c = 0;
  for (; c + Vec<T>::size() <= n; c += Vec<T>::size()) {
    const Vec<T> y = (rounded(Vec<T>::loadu(x + c) * vscale) + vshift).exp_u20();
    y.store(x + c);
    vsum = g != nullptr ? at::vec::fmadd(y, Vec<T>::loadu(g + c), vsum) : vsum + y;
  }
  if (c < n) {  // the ragged end: one partial vector, its unused lanes zeroed
    const int64_t rest = n - c;
    Vec<T> y = (rounded(Vec<T>::loadu(x + c, rest) * vscale) + vshift).exp_u20();
    y = Vec<T>::set(Vec<T>(T(0)), y, rest);
    y.store(x + c, rest);
    vsum = g != nullptr ? at::vec::fmadd(y, Vec<T>::loadu(g + c, rest), vsum) : vsum + y;
  }
  return at::vec::vec_reduce_all<T>([](Vec<T>& a, Vec<T>& b) { return a + b; }, vsum);
}

template <typename T>
inline void scale_row(T* x, int64_t n, T f) {
  const Vec<T> vf(f);
  int64_t c = 0;
  for (; c + Vec<T>::size() <= n; c += Vec<T>::size()) (Vec<T>::loadu(x + c) * vf).store(x + c);
  for (; c < n; ++c) x[c] *= f;
}

// g = p * (g - delta): the gradient of the logits from that of the weights.
template <typename T>
inline void logit_grad(const T* p, T* g, int64_t n, T delta) {
  const Vec<T> vd(delta);
  int64_t c = 0;
  for (; c + Vec<T>::size() <= n; c += Vec<T>::size())
    (Vec<T>::loadu(p + c) * (Vec<T>::loadu(g + c) - vd)).store(g + c);
  for (; c < n; ++c) g[c] = p[c] * (g[c] - delta);
}

// x = x * f elementwise.
template <typename T>
inline void mul_row(T* x, const T* f, int64_t n) {
  for (int64_t c = 0; c < n; ++c) x[c] *= f[c];
}

template <typename T>
inline T dot(const T* a, const T* b, int64_t n) {
  Vec<T> acc(T(0));
  int64_t c = 0;
  for (; c + Vec<T>::size() <= n; c += Vec<T>::size()) acc = at::vec::fmadd(Vec<T>::loadu(a + c), Vec<T>::loadu(b + c), acc);
  T sum = at::vec::vec_reduce_all<T>([](Vec<T>& x, Vec<T>& y) { return x + y; }, acc);
  for (; c < n; ++c) sum += a[c] * b[c];
  return sum;
}

// tanh in float32 as Eigen's fast tanh computes it: a 13/6-degree rational function on [-7.9, 7.9] (outside
// it tanh is +-1 in float32), within a few ulp, at a fraction of Sleef's cost (softcap takes one per score,
// and the backward another). float64 keeps Sleef's.
inline Vec<float> fast_tanh(Vec<float> a) {
  const Vec<float> x = at::vec::clamp(a, Vec<float>(-7.90531110763549805f), Vec<float>(7.90531110763549805f));
  const Vec<float> x2 = x * x;
  Vec<float> p = at::vec::fmadd(x2, Vec<float>(-2.76076847742355e-16f), Vec<float>(2.00018790482477e-13f));
  p = at::vec::fmadd(p, x2, Vec<float>(-8.60467152213735e-11f));
  p = at::vec::fmadd(p, x2, Vec<float>(5.12229709037114e-08f));
  p = at::vec::fmadd(p, x2, Vec<float>(1.48572235717979e-05f));
  p = at::vec::fmadd(p, x2, Vec<float>(6.37261928875436e-04f));
  p = at::vec::fmadd(p, x2, Vec<float>(4.89352455891786e-03f));
  p = p * x;
  Vec<float> q = at::vec::fmadd(x2, Vec<float>(1.19825839466702e-06f), Vec<float>(1.18534705686654e-04f));
  q = at::vec::fmadd(q, x2, Vec<float>(2.26843463243900e-03f));
  q = at::vec::fmadd(q, x2, Vec<float>(4.89352518554385e-03f));
  return p / q;
}

inline Vec<double> fast_tanh(Vec<double> a) { return a.tanh(); }

// x = softcap * tanh(x * scale / softcap), keeping tanh in t (for the backward's 1 - tanh^2) when t is set.
template <typename T>
inline void softcap_row(T* x, int64_t n, T scale, T cap, T* t) {
  const Vec<T> vin(scale / cap), vcap(cap);
  int64_t c = 0;
  for (; c + Vec<T>::size() <= n; c += Vec<T>::size()) {
    const Vec<T> th = fast_tanh(Vec<T>::loadu(x + c) * vin);
    if (t != nullptr) th.store(t + c);
    (th * vcap).store(x + c);
  }
  if (c < n) {  // the ragged end: one partial vector, so every score takes the same tanh
    const Vec<T> th = fast_tanh(Vec<T>::loadu(x + c, n - c) * vin);
    if (t != nullptr) th.store(t + c, n - c);
    (th * vcap).store(x + c, n - c);
  }
}

// g = g * (1 - t^2): the softcap's derivative.
template <typename T>
inline void softcap_grad(T* g, const T* t, int64_t n) {
  const Vec<T> one(T(1));
  int64_t c = 0;
  for (; c + Vec<T>::size() <= n; c += Vec<T>::size()) {
    const Vec<T> th = Vec<T>::loadu(t + c);
    (Vec<T>::loadu(g + c) * (one - th * th)).store(g + c);
  }
  for (; c < n; ++c) g[c] *= T(1) - t[c] * t[c];
}

}  // namespace local_attention
