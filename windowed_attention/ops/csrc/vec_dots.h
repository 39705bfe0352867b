// Vector helpers shared by the decode step (`decode_cpu.cpp`) and the few-row projections
// (`small_linear_cpu.cpp`): dot products of one vector against rows stored in T or in a 16-bit C (widened
// to float on load), four rows at a time, reading ahead.

#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/functional_bfloat16.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>
#include <type_traits>

namespace wa_vec {

// One vector of the compute dtype T from cached elements C (T itself, or 16-bit floats widened to float)
template <typename T, typename C>
inline at::vec::Vectorized<T> load(const C* at) {
  if constexpr (std::is_same_v<T, C>) {
    return at::vec::Vectorized<T>::loadu(at);
  } else {
    at::vec::Vectorized<float> out;
    at::vec::load_to_float<C>(at, out);
    return out;
  }
}

template <typename T, typename C>
T dot(const T* a, const C* b, int64_t n) {
  using V = at::vec::Vectorized<T>;
  V acc(T(0));
  int64_t c = 0;
  for (; c + V::size() <= n; c += V::size()) acc = at::vec::fmadd(V::loadu(a + c), load<T>(b + c), acc);
  T s = at::vec::vec_reduce_all<T>([](V x, V y) { return x + y; }, acc);
  for (; c < n; ++c) s += a[c] * static_cast<T>(b[c]);
  return s;
}

// The keys and values of a step come from memory (a large batch's cache is far larger than the caches of
// the CPU), read in order; asking for the bytes PREFETCH_AHEAD further on while computing on these reads
// them at about twice the rate the hardware's own prefetching gives alone (measured: 0.73 -> 0.45 ms for
// a batch of 16 at one thread).
constexpr int64_t PREFETCH_AHEAD = 4096;

template <typename T>
inline void prefetch(const T* at, int64_t count) {  // the `count` elements from PREFETCH_AHEAD bytes after `at`
  const char* from = reinterpret_cast<const char*>(at) + PREFETCH_AHEAD;
  for (int64_t line = 0; line < count * static_cast<int64_t>(sizeof(T)); line += 64) __builtin_prefetch(from + line);
}

// out[j] = q . keys[j] for j in [lo, n) (rows of d): four keys at a time, so that the four reductions
// overlap instead of each waiting on its chain of multiply-adds
template <typename T, typename C>
void dots(const T* q, const C* keys, int64_t d, int64_t lo, int64_t n, T* out) {
  using V = at::vec::Vectorized<T>;
  auto sum = [](V x) { return at::vec::vec_reduce_all<T>([](V a, V b) { return a + b; }, x); };
  int64_t j = lo;
  for (; j + 4 <= n; j += 4) {
    const C* k0 = keys + j * d;
    const C *k1 = k0 + d, *k2 = k1 + d, *k3 = k2 + d;
    prefetch(k0, 4 * d);
    V a0(T(0)), a1(T(0)), a2(T(0)), a3(T(0));
    int64_t c = 0;
    for (; c + V::size() <= d; c += V::size()) {
      const V x = V::loadu(q + c);
      a0 = at::vec::fmadd(x, load<T>(k0 + c), a0);
      a1 = at::vec::fmadd(x, load<T>(k1 + c), a1);
      a2 = at::vec::fmadd(x, load<T>(k2 + c), a2);
      a3 = at::vec::fmadd(x, load<T>(k3 + c), a3);
    }
    T s0 = sum(a0), s1 = sum(a1), s2 = sum(a2), s3 = sum(a3);
    for (; c < d; ++c) {
      s0 += q[c] * static_cast<T>(k0[c]);
      s1 += q[c] * static_cast<T>(k1[c]);
      s2 += q[c] * static_cast<T>(k2[c]);
      s3 += q[c] * static_cast<T>(k3[c]);
    }
    out[j] = s0, out[j + 1] = s1, out[j + 2] = s2, out[j + 3] = s3;
  }
  for (; j < n; ++j) out[j] = dot(q, keys + j * d, d);
}

}  // namespace wa_vec
