// y = x W^T (+ bias) for a few rows of x: the projections of a decode step, where x holds one token per
// row of the batch. A general GEMM at M = 16 spends most of its time packing W, which comes from memory
// at every step (the weights of all layers and the cache do not fit in the caches of the CPU together);
// here each row of W is read once, straight from where it lies, and used for every row of x.
//
//   x (M, K), weight (N, K), bias (N) or undefined: contiguous float32. Returns (M, N).
//
// One row (batch 1) is a matrix-vector product: `wa_vec::dots` (vec_dots.h, shared with the decode step),
// four rows of W at a time, each summed over k in vectors.
// More rows of x are taken L at a time (L = the vector width), transposed to xT (K, L), so that one vector
// holds one input channel of L rows; a block of NB output channels then accumulates, for each k,
// W[n, k] (broadcast) times that vector: NB vectors of L outputs in registers, no horizontal sums. Each
// output is then a sum over k in order (one multiply-add chain per output), in float32.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include "vec_dots.h"
#include "work_grain.h"

#include <utility>
#include <vector>

namespace {

using V = at::vec::Vectorized<float>;
constexpr int64_t L = V::size();
constexpr int64_t NB = L == 16 ? 16 : 8;  // accumulators: 16 of the 32 AVX-512 registers, 8 of the 16 AVX2 ones

// The multiply-adds of one block: acc[i] += W[n0 + i, k] * xT[k] over k, in registers (the accumulators
// are separate variables, expanded from `I`, so that the compiler never keeps them in memory)
template <size_t... I>
inline void accumulate(const float* xT, const float* w, int64_t K, const float* next, float (*lanes)[L],
                       std::index_sequence<I...>) {
  V acc[] = {(static_cast<void>(I), V(0.f))...};
  const float* row[] = {(w + static_cast<int64_t>(I) * K)...};
  for (int64_t k = 0; k < K; ++k) {
    if (next) __builtin_prefetch(next + k * NB);  // the next block's weights, a line (NB = 16) per k
    const V xk = V::loadu(xT + k * L);
    ((acc[I] = at::vec::fmadd(V(row[I][k]), xk, acc[I])), ...);
  }
  (acc[I].store(lanes[I]), ...);
}

// out[r][n0 + i] for the rows r of one group (xT (K, L)) and the outputs n0 .. n0 + nb - 1
void block(const float* xT, const float* w, int64_t K, int64_t N, int64_t n0, int64_t nb, int64_t rows, float* out,
           const float* next) {
  alignas(64) float lanes[NB][L];
  if (nb == NB) {
    accumulate(xT, w + n0 * K, K, next, lanes, std::make_index_sequence<NB>());
  } else {  // the last block: its rows copied into a full one (zeros past the end), then dropped
    std::vector<float> tail(NB * K, 0.f);
    std::copy(w + n0 * K, w + N * K, tail.begin());
    accumulate(xT, tail.data(), K, nullptr, lanes, std::make_index_sequence<NB>());
  }
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < nb; ++i) out[r * N + n0 + i] = lanes[i][r];
}

at::Tensor small_linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1), "x (M, K) and weight (N, K) must match");
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat && x.is_contiguous()
              && weight.is_contiguous() && x.is_cpu() && weight.is_cpu() && x.layout() == at::kStrided
              && weight.layout() == at::kStrided && !x.is_neg() && !weight.is_neg(),
              "x and weight must be contiguous float32 CPU tensors");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  const bool has_bias = bias.has_value() && bias->defined();
  TORCH_CHECK(!has_bias || (bias->scalar_type() == at::kFloat && bias->dim() == 1 && bias->size(0) == N
                            && bias->is_contiguous() && bias->is_cpu() && !bias->is_neg()),
              "bias must be a contiguous float32 CPU (N,)");
  auto out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;
  if (M == 1) {
    const int64_t groups = (N + 3) / 4;  // of four outputs, 4 K multiply-adds each
    at::parallel_for(0, groups, work_grain::grain_for(groups, double(N) * K), [&](int64_t begin, int64_t end) {
      wa_vec::dots(x.data_ptr<float>(), weight.data_ptr<float>(), K, begin * 4, std::min(end * 4, N), out.data_ptr<float>());
    });
    if (has_bias) out.add_(*bias);
    return out;
  }
  const int64_t groups = (M + L - 1) / L;
  std::vector<float> xT(groups * K * L, 0.f);  // group g: xT[g][k][l] = x[g * L + l][k]
  const float* xd = x.data_ptr<float>();
  for (int64_t r = 0; r < M; ++r)
    for (int64_t k = 0; k < K; ++k) xT[((r / L) * K + k) * L + r % L] = xd[r * K + k];
  const float* w = weight.data_ptr<float>();
  float* o = out.data_ptr<float>();
  const int64_t blocks = (N + NB - 1) / NB;
  at::parallel_for(0, blocks, work_grain::grain_for(blocks, double(M) * N * K), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t n0 = b * NB, nb = std::min(NB, N - n0);
      const float* next = b + 1 < end ? w + (n0 + NB) * K : nullptr;
      for (int64_t g = 0; g < groups; ++g)
        block(xT.data() + g * K * L, w, K, N, n0, nb, std::min(L, M - g * L), o + g * L * N, g == 0 ? next : nullptr);
    }
  });
  if (has_bias) out.add_(*bias);
  return out;
}

}  // namespace

// The op's schema and fake are defined in Python (ops/small_linear.py); the kernel is registered here for CPU
// tensors, so that a compiled decode step calls it with no Python in between.
TORCH_LIBRARY_IMPL(windowed_attention_cpu, CPU, m) { m.impl("small_linear", &small_linear); }
