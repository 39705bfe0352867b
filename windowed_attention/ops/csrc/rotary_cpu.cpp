// Rotary embedding on CPU in one pass (forward) and one pass (backward), instead of the half a dozen
// elementwise passes and temporaries of `x * cos + rotate_half(x) * sin` under autograd.
//
// x (P, n, d) with halves x1, x2 of the last dim; tables c, s (n, d/2) in the compute dtype (float64 for
// float64 inputs, else float32; any xpos factor already multiplied in):
//   forward:  y1 = x1 c - x2 s,  y2 = x2 c + x1 s
//   backward: the transpose, dx1 = g1 c + g2 s,  dx2 = g2 c - g1 s.
// 16-bit inputs are computed in float32 and rounded once on the way out, as the torch expression does.

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <torch/library.h>

#include <vector>

namespace {

template <typename S>
void rotate_rows(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool transpose, at::Tensor& y) {
  using T = at::opmath_type<S>;
  constexpr bool same = std::is_same_v<S, T>;
  const int64_t P = x.size(0), n = x.size(1), h = x.size(2) / 2;
  const S* xd = x.data_ptr<S>();
  const T* cd = cos.data_ptr<T>();
  const T* sd = sin.data_ptr<T>();
  S* yd = y.data_ptr<S>();
  const int64_t sp = x.stride(0), sn = x.stride(1);
  const T sign = transpose ? T(-1) : T(1);  // the sign of the s terms: y1 = x1 c - sign x2 s, y2 = x2 c + sign x1 s
  at::parallel_for(0, P * n, 256, [&](int64_t begin, int64_t end) {
    std::vector<T> in(same ? 0 : 2 * h), out(same ? 0 : 2 * h);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t p = row / n, i = row % n;
      const T* c = cd + i * h;
      const T* s = sd + i * h;
      const S* xs = xd + p * sp + i * sn;
      S* ys = yd + row * 2 * h;
      const T* a;
      T* b;
      if constexpr (same) {
        a = xs;
        b = ys;
      } else {
        at::vec::convert(xs, in.data(), 2 * h);
        a = in.data();
        b = out.data();
      }
      for (int64_t j = 0; j < h; ++j) {
        const T x1 = a[j], x2 = a[j + h], sj = sign * s[j];
        b[j] = x1 * c[j] - x2 * sj;
        b[j + h] = x2 * c[j] + x1 * sj;
      }
      if constexpr (!same) at::vec::convert(out.data(), ys, 2 * h);
    }
  });
}

// x (P, n, d) -> y (P, n, d) contiguous, in x's dtype; `transpose` for the backward.
at::Tensor rotate(const at::Tensor& x_in, const at::Tensor& cos, const at::Tensor& sin, bool transpose) {
  TORCH_CHECK(x_in.dim() == 3 && x_in.size(2) % 2 == 0, "x must be (P, n, d) with d even");
  const auto acc = at::toOpMathType(x_in.scalar_type());  // the type the rows compute in (rotate_rows)
  TORCH_CHECK(cos.scalar_type() == acc && sin.scalar_type() == acc && cos.is_contiguous() && sin.is_contiguous(),
              "cos and sin must be contiguous, float64 for float64 x and float32 otherwise");
  TORCH_CHECK(cos.dim() == 2 && cos.size(0) == x_in.size(1) && cos.size(1) == x_in.size(2) / 2 && sin.sizes() == cos.sizes(),
              "cos and sin must be (n, d / 2)");
  const at::Tensor x = x_in.stride(2) == 1 ? x_in : x_in.contiguous();
  auto y = at::empty(x.sizes(), x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "windowed_attention_rotate",
                                  [&] { rotate_rows<scalar_t>(x, cos, sin, transpose, y); });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(windowed_attention_cpu, m) { m.def("rotate", &rotate); }
