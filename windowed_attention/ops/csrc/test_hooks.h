// For tests: which bfloat16 and float32 GEMMs run, switches between ours (only where the CPU has AVX512-BF16;
// AVX-512F or AVX2 with FMA) and MKL's that return the one in use, and the GEMMs themselves: c = alpha op(a) op(b) + beta c,
// 2-D tensors with unit column stride (bf16 or float32 a, b; float32 c). `f32_gemm` calls whichever float32
// GEMM is switched on.

#pragma once

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cstdint>
#include <string>
#include <vector>

#include "blas.h"

namespace local_attention {

// c = alpha op(a) op(b) + beta c through the kernel's `gemm` for operands of type S.
template <typename S>
inline at::Tensor small_gemm(bool ta, bool tb, const at::Tensor& a, const at::Tensor& b, double alpha, double beta, at::Tensor c,
                             const Band* band = nullptr, Packed* packed = nullptr) {
  TORCH_CHECK(a.scalar_type() == c10::CppTypeToScalarType<S>::value && b.scalar_type() == a.scalar_type() &&
              c.scalar_type() == at::kFloat, "a and b of the GEMM's operand type, float32 c");
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && c.dim() == 2 && a.stride(1) == 1 && b.stride(1) == 1 && c.stride(1) == 1,
              "2-D a, b, c with unit column stride");
  const int64_t k = ta ? a.size(0) : a.size(1);
  TORCH_CHECK((ta ? a.size(1) : a.size(0)) == c.size(0) && (tb ? b.size(1) : b.size(0)) == k &&
              (tb ? b.size(0) : b.size(1)) == c.size(1), "shapes of op(a), op(b) and c do not match");
  gemm(ta, tb, c.size(0), c.size(1), k, static_cast<float>(alpha), a.data_ptr<S>(), a.stride(0), b.data_ptr<S>(),
       b.stride(0), static_cast<float>(beta), c.data_ptr<float>(), c.stride(0), band, packed);
  return c;
}

// `small_gemm` in the operands' type: bfloat16, else float32.
inline at::Tensor gemm_of_operands(bool ta, bool tb, const at::Tensor& a, const at::Tensor& b, double alpha,
                                   double beta, at::Tensor c, const Band* band, Packed* packed = nullptr) {
  if (a.scalar_type() == at::kBFloat16) return small_gemm<c10::BFloat16>(ta, tb, a, b, alpha, beta, c, band, packed);
  return small_gemm<float>(ta, tb, a, b, alpha, beta, c, band, packed);
}

inline constexpr const char* ISA_NAMES[] = {"mkl", "avx2", "avx512"};  // by f32_gemm::Isa

inline void define_test_hooks(torch::Library& m) {
  m.def("own_bf16_gemm", [] { return own_bf16_gemm.load(); });
  m.def("use_own_bf16_gemm", [](bool on) {
    own_bf16_gemm = on && bf16_gemm::supported();
    return own_bf16_gemm.load();
  });
  // the float32 GEMM by name: "mkl", "avx2" or "avx512" (ours); a build the CPU cannot run is not switched to
  m.def("f32_gemm_isa", [] { return std::string(ISA_NAMES[static_cast<int>(f32_isa.load())]); });
  m.def("use_f32_gemm_isa", [](const std::string& name) {
    for (int i = 0; i < 3; ++i)
      if (name == ISA_NAMES[i] && f32_gemm::supported(static_cast<f32_gemm::Isa>(i))) f32_isa = static_cast<f32_gemm::Isa>(i);
    return std::string(ISA_NAMES[static_cast<int>(f32_isa.load())]);
  });
  m.def("bf16_gemm", [](bool ta, bool tb, const at::Tensor& a, const at::Tensor& b, double alpha, double beta, at::Tensor c) {
    return small_gemm<c10::BFloat16>(ta, tb, a, b, alpha, beta, c);
  });
  m.def("f32_gemm", [](bool ta, bool tb, const at::Tensor& a, const at::Tensor& b, double alpha, double beta, at::Tensor c) {
    return small_gemm<float>(ta, tb, a, b, alpha, beta, c);
  });
  m.def("use_f32_gemm_skips", [](bool on) {
    f32_skips = on;
    return f32_skips.load();
  });
  // The float32 or bfloat16 GEMM (the operands' type) with a band (kind 0 cols, 1 k_rows, 2 k_cols; int64 lo, hi:
  // one entry per row of the block)
  m.def("gemm_band", [](int64_t kind, const at::Tensor& lo, const at::Tensor& hi, bool ta, bool tb, const at::Tensor& a,
                            const at::Tensor& b, double alpha, double beta, at::Tensor c) {
    TORCH_CHECK(kind >= 0 && kind <= 2 && lo.scalar_type() == at::kLong && hi.scalar_type() == at::kLong &&
                lo.is_contiguous() && hi.is_contiguous() && lo.numel() == hi.numel(), "kind 0-2, int64 lo and hi");
    TORCH_CHECK(lo.numel() == (kind == 2 ? (ta ? a.size(0) : a.size(1)) : c.size(0)), "a band entry per row of the block");
    const Band band{static_cast<Band::Kind>(kind), lo.data_ptr<int64_t>(), hi.data_ptr<int64_t>(), lo.numel()};
    return gemm_of_operands(ta, tb, a, b, alpha, beta, c, &band);
  });
  // c_i = a b[:n_i]^T for each c_i (n_i: its columns), in turn, through one kept `Packed` (as a kernel call's
  // blocks do), in float32 or bfloat16 (the operands' type)
  m.def("gemm_packed", [](const at::Tensor& a, const at::Tensor& b, std::vector<at::Tensor> cs) {
    Packed packed;
    for (auto& c : cs) {
      TORCH_CHECK(c.dim() == 2 && c.size(1) <= b.size(0), "c_i: (m, n_i), n_i <= rows of b");
      gemm_of_operands(false, true, a, b.narrow(0, 0, c.size(1)), 1.0, 0.0, c, nullptr, &packed);
    }
    return cs;
  });
}

}  // namespace local_attention
