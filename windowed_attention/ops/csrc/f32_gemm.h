// A float32 GEMM on AVX-512F for the attention kernel's block matmuls, for CPUs that have those
// instructions. MKL's sgemm keeps to its AVX2 code on AMD Zen 4/5: on the kernel's blocks (64 query rows x
// 320-512 keys x 64 dims) it ran at 71-98 GFLOP/s per core on a Zen 4 whose 512-bit FMA peak is 115, this
// GEMM at 96-115.
//
// Row-major, the contract of the kernel's `gemm` wrappers: C (m x n) = alpha op(A) (m x k) op(B) (k x n)
// + beta C, op(X) = X^T when transposed; beta = 0 never reads C. A micro-tile of R rows and V vectors of 16
// columns keeps R x V accumulators in registers over a chunk of at most KC steps of k (the chunks add into
// C, so rounding errors grow with the chunk, as MKL's do), each step broadcasting one element of op(A) per
// row and loading V vectors of a row of op(B). Rows of op(B) are read in place when B is not transposed
// (the columns beyond n masked off); a transposed B is packed, one panel of NR columns at a time (k x NR,
// zero beyond n), through 16 x 16 in-register transposes. Elements of op(A) are read in place either way:
// along a row of `a` when A is not transposed, across R consecutive columns of a row of `a` when it is.

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

#if F32_GEMM_AVAILABLE

// 24 accumulators: 6 rows x 4 vectors (64 columns, the head dimension of the kernel's NN and TN products)
constexpr int MR = 6;            // rows of a micro-tile
constexpr int NV = 4;            // vectors of 16 columns in a micro-tile
constexpr int64_t NR = 16 * NV;  // columns of a micro-tile (and of a packed panel of B)
constexpr int64_t KC = 256;      // the longest sum over k kept in registers

// Whether this CPU and OS run this GEMM: AVX512F, with the OS saving the AVX-512 state.
inline bool supported() { return cpu_features::avx512f(); }

// Whether it should be used: wherever it is supported (measured against MKL on AMD Zen 4 only, where MKL
// takes its AVX2 path; on Intel CPUs MKL's own AVX-512 code is at least as fast on large products).
inline bool preferred() { return supported(); }

inline __mmask16 lanes(int64_t count) {
  return count >= 16 ? __mmask16(0xffff) : count <= 0 ? __mmask16(0) : __mmask16((1u << count) - 1);
}

// op(B) (k x n) = b^T (b is n x k, leading dimension ldb) as panels of NR columns: panel p holds, for q < k,
// the NR values op(B)[q][p * NR + c] at p * k * NR + q * NR + c, zero beyond n.
__attribute__((target("avx512f"))) inline void pack_bt(int64_t n, int64_t k, const float* b, int64_t ldb,
                                                       float* out) {
  for (int64_t j0 = 0; j0 < n; j0 += 16) {
    float* panel = out + (j0 / NR) * k * NR + j0 % NR;
    const int64_t cols = std::min<int64_t>(16, n - j0);
    for (int64_t q0 = 0; q0 < k; q0 += 16) {
      const __mmask16 mq = lanes(k - q0);
      __m512 r[16];
      for (int c = 0; c < 16; ++c)
        r[c] = c < cols ? _mm512_maskz_loadu_ps(mq, b + (j0 + c) * ldb + q0) : _mm512_setzero_ps();
      // 16 x 16 transpose: r[c][q] -> t[q][c], in four rounds of 2 x 2 block swaps
      __m512 t[16];
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
      // r[q] now holds column q0 + q of the 16 rows: row q0 + q of the panel
      for (int q = 0; q < 16; ++q)
        if (q0 + q < k) _mm512_storeu_ps(panel + (q0 + q) * NR, r[q]);
    }
  }
}

// R rows x V vectors of C. op(A)[i][q] is at a + i * ra + q * qa; op(B)[q][16 v + c] at b + q * ldb + 16 v + c,
// the last vector masked by `mlast`. Writes alpha * acc + beta * C (C not read when beta is 0).
template <int R, int V>
__attribute__((target("avx512f"))) void tile(int64_t k, const float* a, int64_t ra, int64_t qa, const float* b,
                                             int64_t ldb, __mmask16 mlast, float alpha, float beta, float* c,
                                             int64_t ldc) {
  __m512 acc[R][V];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t q = 0; q < k; ++q) {
    __m512 bv[V];
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v)
      bv[v] = v + 1 < V ? _mm512_loadu_ps(b + q * ldb + 16 * v) : _mm512_maskz_loadu_ps(mlast, b + q * ldb + 16 * v);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const __m512 av = _mm512_set1_ps(a[r * ra + q * qa]);
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) acc[r][v] = _mm512_fmadd_ps(av, bv[v], acc[r][v]);
    }
  }
  const __m512 va = _mm512_set1_ps(alpha), vb = _mm512_set1_ps(beta);
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) {
      const __mmask16 m = v + 1 < V ? __mmask16(0xffff) : mlast;
      float* out = c + r * ldc + 16 * v;
      __m512 y = _mm512_mul_ps(acc[r][v], va);
      if (beta != 0.0f) y = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, out), vb, y);
      _mm512_mask_storeu_ps(out, m, y);
    }
}

// The last rows < R of a panel.
template <int R, int V>
void tail_rows(int64_t rows, int64_t k, const float* a, int64_t ra, int64_t qa, const float* b, int64_t ldb,
               __mmask16 mlast, float alpha, float beta, float* c, int64_t ldc) {
  if constexpr (R > 1) {
    if (rows < R) return tail_rows<R - 1, V>(rows, k, a, ra, qa, b, ldb, mlast, alpha, beta, c, ldc);
  }
  tile<R, V>(k, a, ra, qa, b, ldb, mlast, alpha, beta, c, ldc);
}

// One panel of columns (at most NR) for all m rows: tiles of MR rows, then the rest.
template <int V>
void panel_rows(int64_t m, int64_t k, const float* a, int64_t ra, int64_t qa, const float* b, int64_t ldb,
                __mmask16 mlast, float alpha, float beta, float* c, int64_t ldc) {
  int64_t i = 0;
  for (; i + MR <= m; i += MR) tile<MR, V>(k, a + i * ra, ra, qa, b, ldb, mlast, alpha, beta, c + i * ldc, ldc);
  if (i < m) tail_rows<MR - 1, V>(m - i, k, a + i * ra, ra, qa, b, ldb, mlast, alpha, beta, c + i * ldc, ldc);
}

// The GEMM. A per-thread buffer holds a transposed B's current panel; call only where `supported()`.
inline void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
                 const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m <= 0 || n <= 0) return;
  const int64_t ra = ta ? 1 : lda, qa = ta ? lda : 1;
  thread_local std::vector<float> bbuf;
  if (tb) bbuf.resize(std::max<int64_t>(NR * k, 1));
  for (int64_t j0 = 0; j0 < n; j0 += NR) {
    const int64_t cols = std::min(NR, n - j0);
    if (tb) pack_bt(cols, k, b + j0 * ldb, ldb, bbuf.data());  // one panel at a time: it stays in L1
    const float* bp = tb ? bbuf.data() : b + j0;
    const int64_t ldp = tb ? NR : ldb;
    const __mmask16 mlast = lanes(cols - (cols - 1) / 16 * 16);
    float* cp = c + j0;
    for (int64_t k0 = 0; k0 == 0 || k0 < k; k0 += KC) {
      const int64_t kc = std::min(KC, k - k0);
      const float* ap = a + k0 * qa;
      const float* bk = bp + k0 * ldp;
      const float bc = k0 == 0 ? beta : 1.0f;
      switch ((cols + 15) / 16) {
        case 4: panel_rows<4>(m, kc, ap, ra, qa, bk, ldp, mlast, alpha, bc, cp, ldc); break;
        case 3: panel_rows<3>(m, kc, ap, ra, qa, bk, ldp, mlast, alpha, bc, cp, ldc); break;
        case 2: panel_rows<2>(m, kc, ap, ra, qa, bk, ldp, mlast, alpha, bc, cp, ldc); break;
        default: panel_rows<1>(m, kc, ap, ra, qa, bk, ldp, mlast, alpha, bc, cp, ldc); break;
      }
    }
  }
}

#else
inline bool supported() { return false; }
inline bool preferred() { return false; }
inline void gemm(bool, bool, int64_t, int64_t, int64_t, float, const float*, int64_t, const float*, int64_t, float,
                 float*, int64_t) {}
#endif

}  // namespace f32_gemm
