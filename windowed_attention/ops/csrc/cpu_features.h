// What the CPU and its OS let the kernels' own GEMMs (`f32_gemm.h`, `bf16_gemm.h`) run, asked at run time.

#pragma once

#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#define CPU_FEATURES_X86 1
#else
#define CPU_FEATURES_X86 0
#endif

namespace cpu_features {

#if CPU_FEATURES_X86

// AVX512F, with the OS saving the AVX-512 state (XMM, YMM, opmask and ZMM).
inline bool avx512f() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid(1, &a, &b, &c, &d) || !((c >> 27) & 1)) return false;  // OSXSAVE
  unsigned lo = 0, hi = 0;
  __asm__("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  if ((lo & 0xe6) != 0xe6) return false;
  return __get_cpuid_count(7, 0, &a, &b, &c, &d) && ((b >> 16) & 1);
}

// AVX2 and FMA, with the OS saving the YMM state.
inline bool avx2_fma() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid(1, &a, &b, &c, &d) || !((c >> 27) & 1) || !((c >> 12) & 1)) return false;  // OSXSAVE, FMA
  unsigned lo = 0, hi = 0;
  __asm__("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  if ((lo & 0x6) != 0x6) return false;
  return __get_cpuid_count(7, 0, &a, &b, &c, &d) && ((b >> 5) & 1);
}

// AVX512-BF16 (vdpbf16ps); meaningful where avx512f() holds.
inline bool avx512_bf16() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  return __get_cpuid_count(7, 1, &a, &b, &c, &d) && ((a >> 5) & 1);
}

// AMX-BF16 tiles (where MKL's bf16 GEMM is far faster than any AVX-512 one).
inline bool amx_bf16() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  return __get_cpuid_count(7, 0, &a, &b, &c, &d) && ((d >> 22) & 1);
}

#else

inline bool avx512f() { return false; }
inline bool avx2_fma() { return false; }
inline bool avx512_bf16() { return false; }
inline bool amx_bf16() { return false; }

#endif

}  // namespace cpu_features
