// The AVX2 + FMA build of the float32 GEMM (`f32_gemm.h`), in a source of its own: the library's build
// (`ops/fused_cpu.py`) compiles it without the instruction-set flags of the CPU torch targets, so that its code
// is AVX2's alone, on every CPU (the one an AVX2-only CPU runs, and the one tests run everywhere).

#include "f32_gemm.h"

#if F32_GEMM_AVAILABLE

#ifdef __clang__  // as in f32_gemm.h
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif
namespace f32_gemm::avx2 {

struct Vec {
  using reg = __m256;
  using mask = __m256i;
  static constexpr int L = 8, MR = 6, NV = 4, NREG = 2;
  static reg zero() { return _mm256_setzero_ps(); }
  static reg set1(float x) { return _mm256_set1_ps(x); }
  static reg load(const float* p) { return _mm256_loadu_ps(p); }
  static reg load(mask m, const float* p) { return _mm256_maskload_ps(p, m); }
  static void store(float* p, mask m, reg x) { _mm256_maskstore_ps(p, m, x); }
  static void store(float* p, reg x) { _mm256_storeu_ps(p, x); }
  static reg fmadd(reg a, reg b, reg c) { return _mm256_fmadd_ps(a, b, c); }
  static reg mul(reg a, reg b) { return _mm256_mul_ps(a, b); }
  static mask lanes(int64_t count) {  // lane j on (all ones) when j < count
    const int c = static_cast<int>(std::clamp<int64_t>(count, 0, 8));
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(c), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  // The 8 x 8 transpose in registers: r[c][q] -> r[q][c].
  static void transpose(reg* r) {
    reg t[8], u[8];
    for (int i = 0; i < 8; i += 2) {
      t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
      t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {
      u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
      u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xee);
      u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
      u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xee);
    }
    for (int i = 0; i < 4; ++i) {
      r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
      r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
    }
  }
};

#undef F32_GEMM_ENTRY  // f32_gemm.h's AVX-512 build defined it
#define F32_GEMM_ENTRY  // the `gemm` declared in f32_gemm.h: defined here, called from the other sources
#include "f32_gemm_kernel.h"

}  // namespace f32_gemm::avx2
#ifdef __clang__
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#endif
