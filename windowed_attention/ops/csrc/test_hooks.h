// For tests: which bfloat16 and float32 GEMMs run, switches between ours (only where the CPU has AVX512-BF16,
// AVX-512F) and MKL's that return the one in use, and the GEMMs themselves: c = alpha op(a) op(b) + beta c,
// 2-D tensors with unit column stride (bf16 or float32 a, b; float32 c). `f32_gemm` calls whichever float32
// GEMM is switched on.

#pragma once

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cstdint>

#include "blas.h"

namespace local_attention {

// c = alpha op(a) op(b) + beta c through the kernel's `gemm` for operands of type S.
template <typename S>
inline at::Tensor small_gemm(bool ta, bool tb, const at::Tensor& a, const at::Tensor& b, double alpha, double beta, at::Tensor c) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && c.dim() == 2 && a.stride(1) == 1 && b.stride(1) == 1 && c.stride(1) == 1,
              "2-D a, b, c with unit column stride");
  const int64_t k = ta ? a.size(0) : a.size(1);
  TORCH_CHECK((ta ? a.size(1) : a.size(0)) == c.size(0) && (tb ? b.size(1) : b.size(0)) == k &&
              (tb ? b.size(0) : b.size(1)) == c.size(1), "shapes of op(a), op(b) and c do not match");
  gemm(ta, tb, c.size(0), c.size(1), k, static_cast<float>(alpha), a.data_ptr<S>(), a.stride(0), b.data_ptr<S>(),
       b.stride(0), static_cast<float>(beta), c.data_ptr<float>(), c.stride(0));
  return c;
}

inline void define_test_hooks(torch::Library& m) {
  m.def("own_bf16_gemm", [] { return own_bf16_gemm.load(); });
  m.def("use_own_bf16_gemm", [](bool on) {
    own_bf16_gemm = on && bf16_gemm::supported();
    return own_bf16_gemm.load();
  });
  m.def("own_f32_gemm", [] { return own_f32_gemm.load(); });
  m.def("use_own_f32_gemm", [](bool on) {
    own_f32_gemm = on && f32_gemm::supported();
    return own_f32_gemm.load();
  });
  m.def("bf16_gemm", [](bool ta, bool tb, const at::Tensor& a, const at::Tensor& b, double alpha, double beta, at::Tensor c) {
    TORCH_CHECK(a.scalar_type() == at::kBFloat16 && b.scalar_type() == at::kBFloat16 && c.scalar_type() == at::kFloat,
                "bf16 a, b and float32 c");
    return small_gemm<c10::BFloat16>(ta, tb, a, b, alpha, beta, c);
  });
  m.def("f32_gemm", [](bool ta, bool tb, const at::Tensor& a, const at::Tensor& b, double alpha, double beta, at::Tensor c) {
    TORCH_CHECK(a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat && c.scalar_type() == at::kFloat,
                "float32 a, b and c");
    return small_gemm<float>(ta, tb, a, b, alpha, beta, c);
  });
}

}  // namespace local_attention
