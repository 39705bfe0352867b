// A bfloat16 x bfloat16 -> float32 GEMM on AVX512-BF16 (vdpbf16ps), for CPUs that have those instructions
// but no AMX. There MKL's bf16 GEMM (what the kernel calls otherwise) ran at the float32 rate (AMD Zen 4:
// 89 vs 96 GFLOP/s per core at 64 x 512 x 64), so bfloat16 attention was no faster than float32.
//
// Row-major, the contract of the kernel's `gemm` wrappers: C (m x n) = alpha op(A) (m x k) op(B) (k x n)
// + beta C, op(X) = X^T when transposed. vdpbf16ps multiplies pairs of bf16 along k and adds both
// products into one fp32 lane, so B is packed into panels of 32 columns holding (B[2t][j], B[2t+1][j])
// pairs, and each row of A contributes the pair (A[i][2t], A[i][2t+1]) broadcast to all lanes. An odd k
// gets a zero partner. Each k-pair is summed in fp32 (the same precision as MKL's bf16 -> fp32 kernels).
// Packing runs in vector code; like the float32 GEMM (f32_gemm.h) this one takes the attention kernel's
// `Band` (down to 8-row tiles, 32-column panels and pairs of k) and keeps a transposed B's panels in `Packed`.

#pragma once

#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_features.h"
#include "f32_gemm.h"  // its AVX-512 16 x 16 transpose (32-bit lanes) packs transposed operands here

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define BF16_GEMM_AVAILABLE 1
#else
#define BF16_GEMM_AVAILABLE 0
#endif

namespace bf16_gemm {

#if BF16_GEMM_AVAILABLE

constexpr int64_t NR = 32;  // columns of a micro-tile: two vectors of 16 floats
constexpr int64_t MR = 8;   // rows of a micro-tile

// Whether this CPU and OS run this GEMM: AVX512F and AVX512-BF16, with the OS saving the AVX-512 state.
inline bool supported() { return cpu_features::avx512f() && cpu_features::avx512_bf16(); }

// Whether it should be used: supported, and no AMX-BF16 (with AMX, MKL's bf16 GEMM is far faster).
inline bool preferred() { return supported() && !cpu_features::amx_bf16(); }

inline uint32_t pair(uint16_t lo, uint16_t hi) { return uint32_t(lo) | (uint32_t(hi) << 16); }

inline uint16_t bits(const c10::BFloat16& x) { return x.x; }

// 16-lane masks of the first `count` lanes (none for count <= 0) and the 16 x 16 transpose: the AVX-512 float32
// GEMM's vector type
using Lanes = f32_gemm::avx512::Vec;

#if defined(__clang__) && __clang_major__ >= 18  // 512-bit vectors also need evex512 there
#define BF16_GEMM_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,evex512")))
#else
#define BF16_GEMM_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
#endif

// out[j] = pair(lo[j], hi[j]) for j < count <= 32 (hi null: zero partners); nothing written beyond count.
BF16_GEMM_TARGET inline void interleave(const c10::BFloat16* lo, const c10::BFloat16* hi, int64_t count,
                                        uint32_t* out) {
  // 16-bit lane 2j of the first result takes lo[j], lane 2j + 1 hi[j] (index 32 + j: the second source)
  alignas(64) static constexpr uint16_t first[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                                     8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  alignas(64) static constexpr uint16_t second[32] = {16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55,
                                                      24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63};
  const __mmask32 m = count >= 32 ? ~__mmask32(0) : (__mmask32(1) << count) - 1;
  const __m512i l = _mm512_maskz_loadu_epi16(m, lo);
  const __m512i h = hi != nullptr ? _mm512_maskz_loadu_epi16(m, hi) : _mm512_setzero_si512();
  const __mmask16 m0 = Lanes::lanes(count), m1 = Lanes::lanes(count - 16);
  _mm512_mask_storeu_epi32(out, m0, _mm512_permutex2var_epi16(l, _mm512_load_si512(first), h));
  _mm512_mask_storeu_epi32(out + 16, m1, _mm512_permutex2var_epi16(l, _mm512_load_si512(second), h));
}

// Panel columns [c0, c0 + 16) of a transposed B: for pairs t < full, panel[t * NR + c0 + c] = the 32-bit pair
// at b + (c0 + c) * ldb + 2t, for c < cols - c0 (zero beyond), 16 x 16 blocks transposed in registers.
BF16_GEMM_TARGET inline void pack_transposed(const c10::BFloat16* b, int64_t ldb, int64_t c0, int64_t cols,
                                             int64_t full, uint32_t* panel) {
  for (int64_t t0 = 0; t0 < full; t0 += 16) {
    const int64_t count = std::min<int64_t>(16, full - t0);
    const __mmask16 mt = Lanes::lanes(count);
    __m512 r[16];
    for (int c = 0; c < 16; ++c)
      r[c] = c0 + c < cols ? _mm512_castsi512_ps(_mm512_maskz_loadu_epi32(mt, b + (c0 + c) * ldb + 2 * t0))
                           : _mm512_setzero_ps();
    Lanes::transpose(r);  // r[t]: pair t0 + t of the 16 columns
    for (int64_t t = 0; t < count; ++t) _mm512_storeu_ps(reinterpret_cast<float*>(panel + (t0 + t) * NR + c0), r[t]);
  }
}

// op(B) (k x n) as panels of NR columns: panel p holds, for t < ceil(k / 2), NR pairs (op(B)[2t][j],
// op(B)[2t+1][j]) for j = p * NR + c; zero beyond n and k.
// Panels from `first` on (the ones before are in `out` already).
BF16_GEMM_TARGET inline void pack_b(bool tb, int64_t n, int64_t k, const c10::BFloat16* b, int64_t ldb,
                                    uint32_t* out, int64_t first = 0) {
  const int64_t kt = (k + 1) / 2;
  for (int64_t p0 = first * NR; p0 < n; p0 += NR) {
    uint32_t* panel = out + (p0 / NR) * kt * NR;
    const int64_t cols = std::min(NR, n - p0);
    if (tb) {  // op(B)[q][j] = b[j * ldb + q]: column j of op(B) is a contiguous row of b
      for (int64_t c0 = 0; c0 < NR; c0 += 16) pack_transposed(b + p0 * ldb, ldb, c0, cols, k / 2, panel);
      if (k % 2)
        for (int64_t c = 0; c < NR; ++c)
          panel[(kt - 1) * NR + c] = c < cols ? pair(bits(b[(p0 + c) * ldb + k - 1]), 0) : 0;
    } else {  // op(B)[q][j] = b[q * ldb + j]: rows 2t and 2t+1 interleave
      for (int64_t t = 0; t < kt; ++t) {
        const c10::BFloat16* lo = b + (2 * t) * ldb + p0;
        uint32_t* dst = panel + t * NR;
        interleave(lo, 2 * t + 1 < k ? lo + ldb : nullptr, cols, dst);
        for (int64_t c = cols; c < NR; ++c) dst[c] = 0;
      }
    }
  }
}

// Where the k-pairs of A's rows are: pair t of row r starts at a + r * row + t * step (bf16 elements);
// `full` whole pairs, then, when `odd`, one element whose partner is taken as zero.
struct PairsA {
  const c10::BFloat16* a;
  int64_t row, step, full;
  bool odd;
};

// R rows of A times one packed panel; writes alpha * acc + beta * C to `cols` columns of C.
template <int R>
BF16_GEMM_TARGET void tile(
    const PairsA& A, const uint32_t* panel, float alpha, float beta, float* c, int64_t ldc, int64_t cols) {
  __m512 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  const int64_t steps = A.full + (A.odd ? 1 : 0);
  for (int64_t t = 0; t < steps; ++t) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(panel + t * NR);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(panel + t * NR + 16);
    for (int r = 0; r < R; ++r) {
      const c10::BFloat16* at = A.a + r * A.row + t * A.step;
      uint32_t v;
      if (t < A.full) {
        std::memcpy(&v, at, sizeof v);
      } else {
        v = pair(bits(*at), 0);
      }
      const __m512bh av = (__m512bh)_mm512_set1_epi32(static_cast<int>(v));
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], av, b0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], av, b1);
    }
  }
  const __mmask16 m0 = Lanes::lanes(cols), m1 = Lanes::lanes(cols - 16);
  const __m512 va = _mm512_set1_ps(alpha), vb = _mm512_set1_ps(beta);
  for (int r = 0; r < R; ++r) {
    float* row = c + r * ldc;
    __m512 y0 = _mm512_mul_ps(acc[r][0], va), y1 = _mm512_mul_ps(acc[r][1], va);
    if (beta != 0.0f) {
      y0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m0, row), vb, y0);
      y1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m1, row + 16), vb, y1);
    }
    _mm512_mask_storeu_ps(row, m0, y0);
    _mm512_mask_storeu_ps(row + 16, m1, y1);
  }
}

template <int R>
void tile_rows(int rows, const PairsA& A, const uint32_t* panel, float alpha, float beta, float* c, int64_t ldc,
               int64_t cols) {
  if constexpr (R > 1) {
    if (rows < R) return tile_rows<R - 1>(rows, A, panel, alpha, beta, c, ldc, cols);
  }
  tile<R>(A, panel, alpha, beta, c, ldc, cols);
}

// The panels of a transposed B for n columns, in `packed` (those it holds for the same b, ldb and k kept, as
// f32_gemm.h's `pack_all` keeps its own).
inline const uint32_t* pack_kept(int64_t n, int64_t k, const c10::BFloat16* b, int64_t ldb, f32_gemm::Packed& packed) {
  packed.hold(b, ldb, k);
  const int64_t kt = (k + 1) / 2, panels = (n + NR - 1) / NR;
  if (static_cast<int64_t>(packed.pairs.size()) < std::max<int64_t>(panels * kt * NR, 1))
    packed.pairs.resize(std::max<int64_t>(panels * kt * NR, 1));  // keeps the panels packed so far
  if (n > packed.n) pack_b(true, n, k, b, ldb, packed.pairs.data(), packed.n / NR);  // a part-packed panel whole
  packed.n = std::max(packed.n, n);
  return packed.pairs.data();
}

// The pairs [t0, t1) of a micro-tile's k range [q0, q1) (whole pairs: a half-used pair's other element is zero
// in op(A) outside the band, as f32_gemm.h's `Band` promises, or the zero partner of an odd k).
inline void pair_range(int64_t q0, int64_t q1, int64_t kt, int64_t& t0, int64_t& t1) {
  t0 = std::min(q0 / 2, kt);
  t1 = std::clamp<int64_t>((q1 + 1) / 2, t0, kt);
}

// The GEMM. Per-thread packing buffers, or a transposed B's panels kept in `packed`; `band` as for the
// float32 GEMM (f32_gemm.h), here down to 8-row micro-tiles and 32-column panels. Call only where
// `preferred()` (the CPU has AVX512-BF16).
inline void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const c10::BFloat16* a, int64_t lda,
                 const c10::BFloat16* b, int64_t ldb, float beta, float* c, int64_t ldc,
                 f32_gemm::Packed* packed = nullptr, const f32_gemm::Band* band = nullptr) {
  if (m <= 0 || n <= 0) return;
  thread_local std::vector<uint32_t> bbuf, abuf;
  const int64_t kt = (k + 1) / 2, panels = (n + NR - 1) / NR;
  const uint32_t* bp = nullptr;
  if (tb && packed != nullptr) {
    bp = pack_kept(n, k, b, ldb, *packed);
  } else {
    bbuf.resize(std::max<int64_t>(panels * kt * NR, 1));
    pack_b(tb, n, k, b, ldb, bbuf.data());
    bp = bbuf.data();
  }
  PairsA A{a, lda, 2, k / 2, k % 2 == 1};  // rows of op(A) are rows of a: pairs in place
  if (ta) {  // op(A)[i][q] = a[q * lda + i]: pairs (a[2t][i], a[2t+1][i]) packed as [t][i], rows 2t, 2t+1 read along i
    abuf.resize(std::max<int64_t>(kt * m, 1));
    for (int64_t t = 0; t < kt; ++t) {
      const c10::BFloat16* lo = a + (2 * t) * lda;
      const c10::BFloat16* hi = 2 * t + 1 < k ? lo + lda : nullptr;
      for (int64_t i = 0; i < m; i += 32) interleave(lo + i, hi ? hi + i : nullptr, std::min<int64_t>(32, m - i),
                                                      abuf.data() + t * m + i);
    }
    A = PairsA{reinterpret_cast<const c10::BFloat16*>(abuf.data()), 2, 2 * m, kt, false};
  }
  for (int64_t p = 0; p < panels; ++p) {
    const int64_t j0 = p * NR, cols = std::min(NR, n - j0);
    for (int64_t i0 = 0; i0 < m; i0 += MR) {
      const int rows = static_cast<int>(std::min(MR, m - i0));
      int64_t t0 = 0, t1 = kt;  // the tile's pairs of k
      if (band != nullptr && band->kind == f32_gemm::Band::cols) {
        if (std::min(band->hi[i0 + rows - 1] - j0, cols) <= std::max<int64_t>(band->lo[i0] - j0, 0))
          continue;  // no row of the tile sees a column of the panel
      } else if (band != nullptr && band->kind == f32_gemm::Band::k_rows) {
        const int64_t q0 = std::clamp<int64_t>(band->lo[i0], 0, k);
        pair_range(q0, std::clamp<int64_t>(band->hi[i0 + rows - 1], q0, k), kt, t0, t1);
      } else if (band != nullptr) {  // k_cols: C's rows are keys; k runs over the band's rows
        const int64_t q0 = std::min<int64_t>(std::upper_bound(band->hi, band->hi + band->rows, i0) - band->hi, k);
        const int64_t q1 = std::lower_bound(band->lo, band->lo + band->rows, i0 + rows) - band->lo;
        pair_range(q0, std::clamp<int64_t>(q1, q0, k), kt, t0, t1);
      }
      // pairs [t0, t1): the whole ones of A, then its half pair when the range ends at an odd k's last
      const int64_t full = std::max<int64_t>(std::min(t1, A.full) - t0, 0);
      const PairsA rows_of_a{A.a + i0 * A.row + t0 * A.step, A.row, A.step, full, A.odd && t1 == kt};
      tile_rows<MR>(rows, rows_of_a, bp + (p * kt + t0) * NR, alpha, beta, c + i0 * ldc + j0, ldc, cols);
    }
  }
}

#else
inline bool supported() { return false; }
inline bool preferred() { return false; }
inline void gemm(bool, bool, int64_t, int64_t, int64_t, float, const c10::BFloat16*, int64_t, const c10::BFloat16*, int64_t,
                 float, float*, int64_t, f32_gemm::Packed* = nullptr, const f32_gemm::Band* = nullptr) {}
#endif

}  // namespace bf16_gemm
