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

// Whether the OS saves every register state in `states` (bits of XCR0) and the CPU has the leaf-1 ECX bits
// `ecx` and the leaf-7 EBX bit `ebx7`.
inline bool runs(unsigned states, unsigned ecx, unsigned ebx7) {
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid(1, &a, &b, &c, &d) || !((c >> 27) & 1) || (c & ecx) != ecx) return false;  // OSXSAVE
  unsigned lo = 0, hi = 0;
  __asm__("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (lo & states) == states && __get_cpuid_count(7, 0, &a, &b, &c, &d) && ((b >> ebx7) & 1);
}

// AVX512F, with the OS saving the AVX-512 state (XMM, YMM, opmask and ZMM).
inline bool avx512f() { return runs(0xe6, 0, 16); }

// AVX2 and FMA (leaf-1 ECX bit 12), with the OS saving the XMM and YMM state.
inline bool avx2_fma() { return runs(0x6, 1u << 12, 5); }

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
