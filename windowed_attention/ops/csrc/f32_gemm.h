// A float32 GEMM for the attention kernel's block matmuls, in two builds: AVX-512F and AVX2 with FMA (the
// widest the CPU runs is chosen at run time). MKL's sgemm keeps to its AVX2 code on AMD Zen 4/5: on the
// kernel's blocks (64 query rows x 320-512 keys x 64 dims) it ran at 71-98 GFLOP/s per core on a Zen 4 whose
// 512-bit FMA peak is 115, this GEMM at 96-115.
//
// Row-major, the contract of the kernel's `gemm` wrappers: C (m x n) = alpha op(A) (m x k) op(B) (k x n)
// + beta C, op(X) = X^T when transposed; beta = 0 never reads C. The micro-kernel and the loops around it
// (`f32_gemm_kernel.h`) are written once over a vector type and compiled twice, inside a `#pragma GCC
// target` region per instruction set: here for AVX-512F, in `f32_gemm_avx2.cpp` for AVX2.
//
// Two things the attention kernel tells the GEMM, which a BLAS cannot be told:
// - `Band`: which entries of a block's product matter. Row r of a block sees the keys [lo[r], hi[r]), both
//   non-decreasing in r; outside them its weights are zero. So the causal diagonal's masked half (and a token
//   window's far corner) is skipped, down to one micro-tile.
// - `Packed`: a transposed B packed once and kept for the next product on the same rows of B. The blocks of
//   one window read the same keys from the same first key, each a few more: each packs only the new ones.

#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu_features.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define F32_GEMM_AVAILABLE 1
#else
#define F32_GEMM_AVAILABLE 0
#endif

namespace f32_gemm {

// The entries of a block's product that matter (see above). Row r of the block (r < rows) sees the columns
// [lo[r], hi[r]) of the block's keys (hi[r] may equal lo[r]: none). How it applies, by the product's shape:
// - `cols`: C is (query rows x keys), op(A) the rows' side: entries of C outside a row's band are left
//   unwritten (the caller never reads them).
// - `k_rows`: C is (query rows x d), summed over keys (k): a row sums only over its band (op(A) is zero
//   outside it).
// - `k_cols`: C is (keys x d), summed over query rows (k): a key sums only over the rows whose band holds it
//   (op(A) is zero elsewhere).
struct Band {
  enum Kind { cols, k_rows, k_cols };
  Kind kind;
  const int64_t* lo;
  const int64_t* hi;
  int64_t rows;
};

// A transposed B packed into panels, kept between products (one per operand and thread, within one call
// of the attention kernel: its memory must not change while the cache is in use).
struct Packed {
  const void* b = nullptr;
  int64_t ldb = 0, k = 0, n = 0;  // the rows of b packed: [0, n)
  std::vector<float> buf;         // this GEMM's panels
  std::vector<uint32_t> pairs;    // bf16_gemm.h's panels (bfloat16 pairs), when the operands are bfloat16

  // The panels are b's (leading dimension ldb, k wide) from now on: those of another b are dropped (their
  // memory kept).
  void hold(const void* rows, int64_t ld, int64_t width) {
    if (b == rows && ldb == ld && k == width) return;
    b = rows;
    ldb = ld;
    k = width;
    n = 0;
  }
};

// Which build runs: none (MKL's sgemm), AVX2 with FMA, or AVX-512F.
enum class Isa : int { none = 0, avx2 = 1, avx512 = 2 };

#if F32_GEMM_AVAILABLE

// The widest build this CPU and OS run.
inline Isa best() {
  if (cpu_features::avx512f()) return Isa::avx512;
  if (cpu_features::avx2_fma()) return Isa::avx2;
  return Isa::none;
}

inline bool supported(Isa isa) { return isa == Isa::none || static_cast<int>(isa) <= static_cast<int>(best()); }

// The one used unless a test says otherwise: the widest supported (measured against MKL on AMD Zen 4 only,
// where MKL takes its AVX2 path; on Intel CPUs MKL's own AVX-512 code is at least as fast on large products).
inline Isa preferred() { return best(); }

#if defined(__clang__) && __clang_major__ >= 18  // clang ignores GCC's target pragma: its own gives each
// function of the region the target (since clang 18 512-bit vectors also need evex512)
#pragma clang attribute push(__attribute__((target("avx512f,evex512"))), apply_to = function)
#elif defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f")
#endif
namespace avx512 {

// 16 float lanes; a micro-tile of 6 rows x 4 vectors (64 columns, the kernel's head dimension): 24
// accumulators of the 32 registers.
struct Vec {
  using reg = __m512;
  using mask = __mmask16;
  static constexpr int L = 16, MR = 6, NV = 4, NREG = 4;
  static reg zero() { return _mm512_setzero_ps(); }
  static reg set1(float x) { return _mm512_set1_ps(x); }
  static reg load(const float* p) { return _mm512_loadu_ps(p); }
  static reg load(mask m, const float* p) { return _mm512_maskz_loadu_ps(m, p); }
  static void store(float* p, mask m, reg x) { _mm512_mask_storeu_ps(p, m, x); }
  static void store(float* p, reg x) { _mm512_storeu_ps(p, x); }
  static reg fmadd(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
  static reg mul(reg a, reg b) { return _mm512_mul_ps(a, b); }
  static mask lanes(int64_t count) {
    return count >= 16 ? mask(0xffff) : count <= 0 ? mask(0) : mask((1u << count) - 1);
  }
  // The 16 x 16 transpose in registers: r[c][q] -> r[q][c], four rounds of 2 x 2 block swaps.
  static void transpose(reg* r) {
    reg t[16];
    for (int i = 0; i < 16; i += 2) {
      t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
      t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
      r[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
      r[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
      r[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
      r[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
    }
    for (int i = 0; i < 8; ++i) {
      const int x = (i / 4) * 8 + (i % 4), y = x + 4;
      t[x] = _mm512_shuffle_f32x4(r[x], r[y], 0x88);
      t[y] = _mm512_shuffle_f32x4(r[x], r[y], 0xdd);
    }
    for (int i = 0; i < 8; ++i) {
      r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
      r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
    }
  }
};

#include "f32_gemm_kernel.h"

}  // namespace avx512
#ifdef __clang__
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

// The AVX2 build lives in a source of its own, `f32_gemm_avx2.cpp`, which the library's build compiles without
// the instruction-set flags the rest gets (on an AVX-512 CPU, AVX-512's): a `#pragma GCC target` region adds to
// the command line's sets, so here the AVX2 build would use AVX-512VL's registers and encodings, and tests on an
// AVX-512 CPU would not run the code an AVX2-only CPU runs.
namespace avx2 {
void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda, const float* b,
          int64_t ldb, float beta, float* c, int64_t ldc, const Band* band, Packed* packed);
}  // namespace avx2

// The GEMM in the build `isa` (not none; the CPU must run it). `band`, `packed`: see above (may be null).
inline void gemm(Isa isa, bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                 int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc,
                 const Band* band = nullptr, Packed* packed = nullptr) {
  if (isa == Isa::avx512) avx512::gemm(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, band, packed);
  else avx2::gemm(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, band, packed);
}

#else
inline Isa best() { return Isa::none; }
inline bool supported(Isa isa) { return isa == Isa::none; }
inline Isa preferred() { return Isa::none; }
inline void gemm(Isa, bool, bool, int64_t, int64_t, int64_t, float, const float*, int64_t, const float*, int64_t,
                 float, float*, int64_t, const Band* = nullptr, Packed* = nullptr) {}
#endif

}  // namespace f32_gemm
