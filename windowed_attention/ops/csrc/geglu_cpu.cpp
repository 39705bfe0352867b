// GEGLU, y = a * gelu(g) for x = [a | g] split in halves along its last dimension: the feed-forward's gate,
// in one pass, for the eager calls without autograd (`feedforward.py`: decode steps and inference).
//
//   x (M, 2e) contiguous float32 -> y (M, e).
//
// gelu(g) = g / 2 * (1 + erf(g / sqrt 2)), written as torch's own CPU kernel writes it (vectors of
// at::vec::Vectorized, the row's tail one element at a time). Why not `x * F.gelu(g)`: torch sends a
// contiguous float32 gelu to oneDNN, which opens a parallel region for every call however small; a decode
// step of one row then woke every OpenMP thread once per layer, and on a machine where another process kept
// a core busy those threads waited to be scheduled (a 4-layer model's step at 2 threads ran 3x slower than at
// one). Here the rows split among threads only by the work rule of `work_grain.h`.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <cmath>

#include "work_grain.h"

namespace {

using V = at::vec::Vectorized<float>;

at::Tensor geglu(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) % 2 == 0, "x must be (M, 2e)");
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.is_cpu() && x.layout() == at::kStrided
              && !x.is_neg(), "x must be a contiguous float32 CPU tensor");
  const int64_t M = x.size(0), e = x.size(1) / 2;
  auto y = at::empty({M, e}, x.options());
  if (M == 0 || e == 0) return y;
  const float* xd = x.data_ptr<float>();
  float* yd = y.data_ptr<float>();
  // about 20 multiply-adds' worth of work per element (erf's polynomial)
  at::parallel_for(0, M, work_grain::grain_for(M, 20.0 * double(M) * double(e)), [&](int64_t begin, int64_t end) {
    const V half(0.5f), one(1.f), alpha(static_cast<float>(M_SQRT1_2));
    for (int64_t r = begin; r < end; ++r) {
      const float* a = xd + r * 2 * e;
      const float* g = a + e;
      float* out = yd + r * e;
      int64_t c = 0;
      for (; c + V::size() <= e; c += V::size()) {
        const V gv = V::loadu(g + c);
        (V::loadu(a + c) * (gv * half * (one + (gv * alpha).erf()))).store(out + c);
      }
      for (; c < e; ++c)
        out[c] = a[c] * (g[c] * 0.5f * (1.f + std::erf(g[c] * static_cast<float>(M_SQRT1_2))));
    }
  });
  return y;
}

}  // namespace

// The op's schema and fake are defined in Python (ops/geglu.py), its kernel registered here for CPU tensors: a
// tracer (make_fx, fake tensors) sees the op, not its body.
TORCH_LIBRARY_IMPL(windowed_attention_cpu, CPU, m) { m.impl("geglu", &geglu); }
