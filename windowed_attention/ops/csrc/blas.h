// The matmuls of the attention kernel (`local_attention_cpu.cpp`): row-major GEMMs in float32 and float64,
// and bfloat16 / float16 operands with float32 results, through the Fortran BLAS interface of the MKL that
// PyTorch's x86 wheels bundle, or our own: float32 on AVX-512F or AVX2 with FMA (`f32_gemm.h`), bfloat16 on
// AVX512-BF16 (`bf16_gemm.h`).

#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <atomic>
#include <cstdint>

#include "bf16_gemm.h"
#include "f32_gemm.h"

extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
            const int*, const float*, const int*, const float*, float*, const int*);
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*, const double*,
            const int*, const double*, const int*, const double*, double*, const int*);
// MKL: bfloat16 operands, float32 result (AMX or AVX512-BF16 where the CPU has them).
void gemm_bf16bf16f32_(const char*, const char*, const int*, const int*, const int*, const float*,
                       const uint16_t*, const int*, const uint16_t*, const int*, const float*, float*, const int*);
// MKL: float16 operands, float32 result.
void gemm_f16f16f32_(const char*, const char*, const int*, const int*, const int*, const float*, const uint16_t*,
                     const int*, const uint16_t*, const int*, const float*, float*, const int*);
}

namespace local_attention {

using f32_gemm::Band;
using f32_gemm::Packed;

// Which float32 GEMM runs: our widest build the CPU runs (AVX-512F, else AVX2 with FMA; see f32_gemm.h), else
// MKL's. `use_f32_gemm_isa` switches it (for tests).
inline std::atomic<f32_gemm::Isa> f32_isa{f32_gemm::preferred()};

// Whether our float32 and bfloat16 GEMMs take the band and the kept packing (`use_f32_gemm_skips` turns them
// off, to measure what they save).
inline std::atomic<bool> f32_skips{true};

// Row-major C (m x n) = alpha * op(A) (m x k) * op(B) (k x n) + beta * C, through Fortran BLAS
// (column-major: C^T = op(B)^T op(A)^T). `band` and `packed` (f32_gemm.h) let our GEMM skip work; every
// other GEMM computes all of C, which is what the band allows too.
inline void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
                 const float* b, int64_t ldb, float beta, float* c, int64_t ldc, const Band* band = nullptr,
                 Packed* packed = nullptr) {
  const f32_gemm::Isa isa = f32_isa.load(std::memory_order_relaxed);
  if (isa != f32_gemm::Isa::none) {
    const bool skip = f32_skips.load(std::memory_order_relaxed);
    return f32_gemm::gemm(isa, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, skip ? band : nullptr,
                          skip ? packed : nullptr);
  }
  const char tra = ta ? 'T' : 'N', trb = tb ? 'T' : 'N';
  const int M = m, N = n, K = k, LDA = lda, LDB = ldb, LDC = ldc;
  sgemm_(&trb, &tra, &N, &M, &K, &alpha, b, &LDB, a, &LDA, &beta, c, &LDC);
}

inline void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, double alpha, const double* a, int64_t lda,
                 const double* b, int64_t ldb, double beta, double* c, int64_t ldc, const Band* = nullptr,
                 Packed* = nullptr) {
  const char tra = ta ? 'T' : 'N', trb = tb ? 'T' : 'N';
  const int M = m, N = n, K = k, LDA = lda, LDB = ldb, LDC = ldc;
  dgemm_(&trb, &tra, &N, &M, &K, &alpha, b, &LDB, a, &LDA, &beta, c, &LDC);
}

// Which bfloat16 GEMM runs: our AVX512-BF16 one where the CPU has those instructions but no AMX (see
// bf16_gemm.h), else MKL's. `use_own_bf16_gemm` switches it (for tests).
inline std::atomic<bool> own_bf16_gemm{bf16_gemm::preferred()};

inline void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const c10::BFloat16* a, int64_t lda,
                 const c10::BFloat16* b, int64_t ldb, float beta, float* c, int64_t ldc,
                 const Band* band = nullptr, Packed* packed = nullptr) {
  if (own_bf16_gemm.load(std::memory_order_relaxed)) {
    const bool skip = f32_skips.load(std::memory_order_relaxed);
    return bf16_gemm::gemm(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, skip ? packed : nullptr,
                           skip ? band : nullptr);
  }
  const char tra = ta ? 'T' : 'N', trb = tb ? 'T' : 'N';
  const int M = m, N = n, K = k, LDA = lda, LDB = ldb, LDC = ldc;
  gemm_bf16bf16f32_(&trb, &tra, &N, &M, &K, &alpha, reinterpret_cast<const uint16_t*>(b), &LDB,
                    reinterpret_cast<const uint16_t*>(a), &LDA, &beta, c, &LDC);
}

inline void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const c10::Half* a, int64_t lda,
                 const c10::Half* b, int64_t ldb, float beta, float* c, int64_t ldc, const Band* = nullptr,
                 Packed* = nullptr) {
  const char tra = ta ? 'T' : 'N', trb = tb ? 'T' : 'N';
  const int M = m, N = n, K = k, LDA = lda, LDB = ldb, LDC = ldc;
  gemm_f16f16f32_(&trb, &tra, &N, &M, &K, &alpha, reinterpret_cast<const uint16_t*>(b), &LDB,
                  reinterpret_cast<const uint16_t*>(a), &LDA, &beta, c, &LDC);
}

}  // namespace local_attention
