// The stream mixing of a hyper-connection (`residual.HyperConnection`) in one pass over the streams per
// token, forward and backward, instead of the norm, projection, batched matmuls and their backwards that
// torch runs as separate passes (each a read of all `s` streams). Per token, streams h_i (i < s) of D:
//
//   inv_i   = scale / max(|h_i|, eps)
//   p_ij    = h_i . w_j                        (j < s + 2; w (D, s + 2), the gain folded in)
//   y_ij    = tanh(p_ij inv_i)
//   alpha_ij = static_alpha_ij + y_ij alpha_scale      (j < s + 1)
//   beta_i  = static_beta_i + y_i,s+1 beta_scale
//   x       = sum_i alpha_i0 h_i,   remixed_k = sum_i alpha_i,1+k h_i
//
// Forward returns x (T, D), remixed (T, s, D), beta (T, s), and for the backward y and p (T, s, s + 2) and
// the norms (T, s). float32 and float64.

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <vector>

namespace {

constexpr double NORM_EPS = 1e-12;  // as F.normalize (residual.NORM_EPS)

// out[j] = a . b[j] for j < count (rows of n): one pass over `a` for up to 8 of them at a time, their
// reductions overlapping
template <typename T>
void dots(const T* a, const T* const* b, int64_t count, int64_t n, T* out) {
  using V = at::vec::Vectorized<T>;
  constexpr int64_t G = 8;
  for (int64_t j0 = 0; j0 < count; j0 += G) {
    const int64_t m = std::min(G, count - j0);
    V acc[G];
    for (int64_t j = 0; j < m; ++j) acc[j] = V(T(0));
    int64_t c = 0;
    for (; c + V::size() <= n; c += V::size()) {
      const V x = V::loadu(a + c);
      for (int64_t j = 0; j < m; ++j) acc[j] = at::vec::fmadd(x, V::loadu(b[j0 + j] + c), acc[j]);
    }
    for (int64_t j = 0; j < m; ++j) {
      T sum = at::vec::vec_reduce_all<T>([](V x, V y) { return x + y; }, acc[j]);
      for (int64_t e = c; e < n; ++e) sum += a[e] * b[j0 + j][e];
      out[j0 + j] = sum;
    }
  }
}

// out_k = sum_i m[i * ld + k] x_i for k < outs (x_i rows of n at stride `stride`); with `add`, out_k += ...
template <typename T>
void combine(const T* m, int64_t ld, const T* x, int64_t stride, int64_t rows, T* const* out, int64_t outs,
             int64_t n, bool add) {
  using V = at::vec::Vectorized<T>;
  int64_t c = 0;
  for (; c + V::size() <= n; c += V::size()) {
    for (int64_t k = 0; k < outs; ++k) {
      V acc = add ? V::loadu(out[k] + c) : V(T(0));
      for (int64_t i = 0; i < rows; ++i) acc = at::vec::fmadd(V(m[i * ld + k]), V::loadu(x + i * stride + c), acc);
      acc.store(out[k] + c);
    }
  }
  for (; c < n; ++c) {
    for (int64_t k = 0; k < outs; ++k) {
      T acc = add ? out[k][c] : T(0);
      for (int64_t i = 0; i < rows; ++i) acc += m[i * ld + k] * x[i * stride + c];
      out[k][c] = acc;
    }
  }
}

template <typename T>
void forward_tokens(const at::Tensor& h, const at::Tensor& wt, const at::Tensor& static_alpha, T alpha_scale,
                    const at::Tensor& static_beta, T beta_scale, T scale, at::Tensor& x, at::Tensor& remixed,
                    at::Tensor& beta, at::Tensor& y, at::Tensor& p, at::Tensor& norm) {
  const int64_t tokens = h.size(0), s = h.size(1), D = h.size(2), k = wt.size(0);  // k = s + 2
  const T* hd = h.data_ptr<T>();
  const T* wd = wt.data_ptr<T>();
  const T* sa = static_alpha.data_ptr<T>();
  const T* sb = static_beta.data_ptr<T>();
  T *xd = x.data_ptr<T>(), *rd = remixed.data_ptr<T>(), *bd = beta.data_ptr<T>(), *yd = y.data_ptr<T>(),
    *pd = p.data_ptr<T>(), *nd = norm.data_ptr<T>();
  at::parallel_for(0, tokens, 64, [&](int64_t begin, int64_t end) {
    using V = at::vec::Vectorized<T>;
    std::vector<T> alpha(s * (s + 1)), products(k + 1);
    std::vector<T*> outs(s + 1);
    std::vector<const T*> rows(k + 1);
    for (int64_t j = 0; j < k; ++j) rows[j] = wd + j * D;
    for (int64_t t = begin; t < end; ++t) {
      const T* ht = hd + t * s * D;
      T* pt = pd + t * s * k;
      T* yt = yd + t * s * k;
      for (int64_t i = 0; i < s; ++i) {
        const T* hi = ht + i * D;
        rows[k] = hi;
        dots(hi, rows.data(), k + 1, D, products.data());  // h_i . w_j, then h_i . h_i
        const T n = std::sqrt(products[k]);
        const T inv = scale / std::max(n, static_cast<T>(NORM_EPS));
        nd[t * s + i] = n;
        for (int64_t j = 0; j < k; ++j) pt[i * k + j] = products[j], yt[i * k + j] = products[j] * inv;
      }
      int64_t e = 0;  // tanh over the token's s (s + 2) values
      for (; e + V::size() <= s * k; e += V::size()) V::loadu(yt + e).tanh().store(yt + e);
      for (; e < s * k; ++e) yt[e] = std::tanh(yt[e]);
      for (int64_t i = 0; i < s; ++i) {
        for (int64_t j = 0; j < s + 1; ++j) alpha[i * (s + 1) + j] = sa[i * (s + 1) + j] + yt[i * k + j] * alpha_scale;
        bd[t * s + i] = sb[i] + yt[i * k + s + 1] * beta_scale;
      }
      outs[0] = xd + t * D;
      for (int64_t j = 0; j < s; ++j) outs[1 + j] = rd + (t * s + j) * D;
      combine(alpha.data(), s + 1, ht, D, s, outs.data(), s + 1, D, false);
    }
  });
}

template <typename T>
void backward_tokens(const at::Tensor& grad_x, const at::Tensor& grad_remixed, const at::Tensor& grad_beta,
                     const at::Tensor& h, const at::Tensor& wt, const at::Tensor& static_alpha, T alpha_scale,
                     T beta_scale, T scale, const at::Tensor& y, const at::Tensor& p, const at::Tensor& norm,
                     at::Tensor& grad_h, at::Tensor& grad_wt, at::Tensor& grad_sa, at::Tensor& grad_as,
                     at::Tensor& grad_sb, at::Tensor& grad_bs) {
  const int64_t tokens = h.size(0), s = h.size(1), D = h.size(2), k = wt.size(0);
  const T *gx = grad_x.data_ptr<T>(), *gr = grad_remixed.data_ptr<T>(), *gb = grad_beta.data_ptr<T>(),
          *hd = h.data_ptr<T>(), *wd = wt.data_ptr<T>(), *sa = static_alpha.data_ptr<T>(), *yd = y.data_ptr<T>(),
          *pd = p.data_ptr<T>(), *nd = norm.data_ptr<T>();
  T* ghd = grad_h.data_ptr<T>();
  // parameter gradients: one accumulator per thread, summed at the end (in thread order: deterministic for
  // a given number of threads)
  const int64_t threads = at::get_num_threads();
  const int64_t per = k * D + s * (s + 1) + 1 + s + 1;  // grad w^T, grad static_alpha, alpha_scale, static_beta, beta_scale
  std::vector<T> partial(threads * per, T(0));
  at::parallel_for(0, tokens, 64, [&](int64_t begin, int64_t end) {
    T* acc = partial.data() + at::get_thread_num() * per;
    T *acc_w = acc, *acc_sa = acc + k * D, *acc_as = acc_sa + s * (s + 1), *acc_sb = acc_as + 1, *acc_bs = acc_sb + s;
    std::vector<T> alpha(s * (s + 1)), q(s * k), ga(s + 1);
    std::vector<const T*> grads(s + 1);
    std::vector<T*> rows(k);
    for (int64_t j = 0; j < k; ++j) rows[j] = acc_w + j * D;
    for (int64_t t = begin; t < end; ++t) {
      const T* ht = hd + t * s * D;
      grads[0] = gx + t * D;
      for (int64_t j = 0; j < s; ++j) grads[1 + j] = gr + (t * s + j) * D;
      T* gh = ghd + t * s * D;
      for (int64_t i = 0; i < s; ++i) {
        const T* hi = ht + i * D;
        const T* yi = yd + (t * s + i) * k;
        const T* pi = pd + (t * s + i) * k;
        const T n = nd[t * s + i];
        const T inv = scale / std::max(n, static_cast<T>(NORM_EPS));
        T coef = 0;  // d/d inv_i of the loss
        dots(hi, grads.data(), s + 1, D, ga.data());  // d loss / d alpha_ij = h_i . G_j
        for (int64_t j = 0; j < k; ++j) {
          T gy;  // d loss / d y_ij
          if (j < s + 1) {
            alpha[i * (s + 1) + j] = sa[i * (s + 1) + j] + yi[j] * alpha_scale;
            acc_sa[i * (s + 1) + j] += ga[j];
            *acc_as += ga[j] * yi[j];
            gy = ga[j] * alpha_scale;
          } else {
            const T g = gb[t * s + i];
            acc_sb[i] += g;
            *acc_bs += g * yi[j];
            gy = g * beta_scale;
          }
          const T gpre = gy * (T(1) - yi[j] * yi[j]);  // through tanh: d loss / d (p_ij inv_i)
          q[i * k + j] = gpre * inv;                     // d loss / d p_ij
          coef += gpre * pi[j];
        }
        // inv_i = scale / |h_i| where |h_i| > eps (flat below): d inv_i / d h_i = -(inv_i / |h_i|^2) h_i
        coef = n > static_cast<T>(NORM_EPS) ? -coef * inv / (n * n) : T(0);
        T* ghi = gh + i * D;
        // grad h_i = coef h_i + sum_j q_ij w_j + sum_j alpha_ij G_j
        using V = at::vec::Vectorized<T>;
        int64_t c = 0;
        for (; c + V::size() <= D; c += V::size()) {
          V a = V(coef) * V::loadu(hi + c);
          for (int64_t j = 0; j < k; ++j) a = at::vec::fmadd(V(q[i * k + j]), V::loadu(wd + j * D + c), a);
          for (int64_t j = 0; j < s + 1; ++j) a = at::vec::fmadd(V(alpha[i * (s + 1) + j]), V::loadu(grads[j] + c), a);
          a.store(ghi + c);
        }
        for (; c < D; ++c) {
          T a = coef * hi[c];
          for (int64_t j = 0; j < k; ++j) a += q[i * k + j] * wd[j * D + c];
          for (int64_t j = 0; j < s + 1; ++j) a += alpha[i * (s + 1) + j] * grads[j][c];
          ghi[c] = a;
        }
      }
      // grad w_j += sum_i q_ij h_i
      combine(q.data(), k, ht, D, s, rows.data(), k, D, true);
    }
  });
  std::vector<T> total(per, T(0));
  for (int64_t r = 0; r < threads; ++r)
    for (int64_t e = 0; e < per; ++e) total[e] += partial[r * per + e];
  std::copy(total.begin(), total.begin() + k * D, grad_wt.data_ptr<T>());
  std::copy(total.begin() + k * D, total.begin() + k * D + s * (s + 1), grad_sa.data_ptr<T>());
  grad_as.data_ptr<T>()[0] = total[k * D + s * (s + 1)];
  std::copy(total.begin() + k * D + s * (s + 1) + 1, total.begin() + k * D + s * (s + 1) + 1 + s, grad_sb.data_ptr<T>());
  grad_bs.data_ptr<T>()[0] = total[per - 1];
}

void check(const at::Tensor& h, const at::Tensor& w, const at::Tensor& static_alpha, const at::Tensor& static_beta,
           const at::Tensor& alpha_scale, const at::Tensor& beta_scale) {
  TORCH_CHECK(h.dim() == 3 && h.is_contiguous(), "h must be contiguous (tokens, s, D)");
  const int64_t s = h.size(1), D = h.size(2);
  TORCH_CHECK(w.dim() == 2 && w.size(0) == D && w.size(1) == s + 2, "w must be (D, s + 2)");
  TORCH_CHECK(static_alpha.is_contiguous() && static_alpha.sizes() == at::IntArrayRef({s, s + 1}), "static_alpha must be (s, s + 1)");
  TORCH_CHECK(static_beta.is_contiguous() && static_beta.sizes() == at::IntArrayRef({s}), "static_beta must be (s,)");
  TORCH_CHECK(alpha_scale.numel() == 1 && beta_scale.numel() == 1, "alpha_scale and beta_scale must hold one value");
  for (const at::Tensor* t : {&w, &static_alpha, &static_beta, &alpha_scale, &beta_scale})
    TORCH_CHECK(t->scalar_type() == h.scalar_type(), "every tensor must share h's dtype");
  TORCH_CHECK(h.scalar_type() == at::kFloat || h.scalar_type() == at::kDouble, "float32 or float64 only");
}

using Six = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Six hyper_forward(const at::Tensor& h, const at::Tensor& w, const at::Tensor& static_alpha,
                  const at::Tensor& alpha_scale, const at::Tensor& static_beta, const at::Tensor& beta_scale,
                  double scale) {
  check(h, w, static_alpha, static_beta, alpha_scale, beta_scale);
  const int64_t tokens = h.size(0), s = h.size(1), D = h.size(2);
  const at::Tensor wt = w.t().contiguous();
  auto x = at::empty({tokens, D}, h.options()), remixed = at::empty({tokens, s, D}, h.options()),
       beta = at::empty({tokens, s}, h.options()), y = at::empty({tokens, s, s + 2}, h.options()),
       p = at::empty({tokens, s, s + 2}, h.options()), norm = at::empty({tokens, s}, h.options());
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "windowed_attention_hyper_forward", [&] {
    forward_tokens<scalar_t>(h, wt, static_alpha, alpha_scale.item<scalar_t>(), static_beta, beta_scale.item<scalar_t>(),
                             scale, x, remixed, beta, y, p, norm);
  });
  return {x, remixed, beta, y, p, norm};
}

std::vector<at::Tensor> hyper_backward(const at::Tensor& grad_x, const at::Tensor& grad_remixed, const at::Tensor& grad_beta,
                                       const at::Tensor& h, const at::Tensor& w, const at::Tensor& static_alpha,
                                       const at::Tensor& alpha_scale, const at::Tensor& static_beta,
                                       const at::Tensor& beta_scale, double scale, const at::Tensor& y,
                                       const at::Tensor& p, const at::Tensor& norm) {
  check(h, w, static_alpha, static_beta, alpha_scale, beta_scale);
  const int64_t tokens = h.size(0), s = h.size(1), D = h.size(2);
  TORCH_CHECK(grad_x.is_contiguous() && grad_x.sizes() == at::IntArrayRef({tokens, D}), "grad_x must be contiguous (tokens, D)");
  TORCH_CHECK(grad_remixed.is_contiguous() && grad_remixed.sizes() == h.sizes(), "grad_remixed must be contiguous like h");
  TORCH_CHECK(grad_beta.is_contiguous() && grad_beta.sizes() == at::IntArrayRef({tokens, s}), "grad_beta must be contiguous (tokens, s)");
  TORCH_CHECK(y.is_contiguous() && p.is_contiguous() && y.sizes() == at::IntArrayRef({tokens, s, s + 2}) && p.sizes() == y.sizes()
              && norm.is_contiguous() && norm.sizes() == at::IntArrayRef({tokens, s}), "y, p, norm must be the forward's");
  for (const at::Tensor* t : {&grad_x, &grad_remixed, &grad_beta, &y, &p, &norm})
    TORCH_CHECK(t->scalar_type() == h.scalar_type(), "every tensor must share h's dtype");
  const at::Tensor wt = w.t().contiguous();
  auto grad_h = at::empty_like(h), grad_wt = at::empty({s + 2, D}, h.options()),
       grad_sa = at::empty({s, s + 1}, h.options()), grad_as = at::empty({}, h.options()),
       grad_sb = at::empty({s}, h.options()), grad_bs = at::empty({}, h.options());
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "windowed_attention_hyper_backward", [&] {
    backward_tokens<scalar_t>(grad_x, grad_remixed, grad_beta, h, wt, static_alpha, alpha_scale.item<scalar_t>(),
                              beta_scale.item<scalar_t>(), scale, y, p, norm, grad_h, grad_wt, grad_sa, grad_as, grad_sb, grad_bs);
  });
  return {grad_h, grad_wt.t().contiguous(), grad_sa, grad_as, grad_sb, grad_bs};
}

// The write-back after the block: h_next_i = remixed_i + beta_i out (out (T, D), the block's output), and its
// backward: d out = sum_i beta_i g_i, d beta_i = g_i . out (the remixed streams' gradient is g itself). One
// pass each, where a batched matmul of (s, 1) @ (1, D) per token runs as a per-token loop both ways.
at::Tensor hyper_write(const at::Tensor& remixed, const at::Tensor& beta, const at::Tensor& out) {
  TORCH_CHECK(remixed.dim() == 3 && remixed.is_contiguous() && beta.is_contiguous() && out.is_contiguous()
              && beta.sizes() == remixed.sizes().slice(0, 2) && out.dim() == 2 && out.size(0) == remixed.size(0)
              && out.size(1) == remixed.size(2), "remixed (T, s, D), beta (T, s), out (T, D), contiguous");
  TORCH_CHECK(beta.scalar_type() == remixed.scalar_type() && out.scalar_type() == remixed.scalar_type(), "one dtype");
  const int64_t tokens = remixed.size(0), s = remixed.size(1), D = remixed.size(2);
  auto h = at::empty_like(remixed);
  AT_DISPATCH_FLOATING_TYPES(remixed.scalar_type(), "windowed_attention_hyper_write", [&] {
    using V = at::vec::Vectorized<scalar_t>;
    const scalar_t *rd = remixed.data_ptr<scalar_t>(), *bd = beta.data_ptr<scalar_t>(), *od = out.data_ptr<scalar_t>();
    scalar_t* hd = h.data_ptr<scalar_t>();
    at::parallel_for(0, tokens * s, 256, [&](int64_t begin, int64_t end) {
      for (int64_t ti = begin; ti < end; ++ti) {
        const scalar_t* o = od + (ti / s) * D;
        const V b(bd[ti]);
        int64_t c = 0;
        for (; c + V::size() <= D; c += V::size())
          at::vec::fmadd(b, V::loadu(o + c), V::loadu(rd + ti * D + c)).store(hd + ti * D + c);
        for (; c < D; ++c) hd[ti * D + c] = rd[ti * D + c] + bd[ti] * o[c];
      }
    });
  });
  return h;
}

std::vector<at::Tensor> hyper_write_backward(const at::Tensor& grad, const at::Tensor& beta, const at::Tensor& out) {
  TORCH_CHECK(grad.dim() == 3 && grad.is_contiguous() && beta.is_contiguous() && out.is_contiguous()
              && beta.sizes() == grad.sizes().slice(0, 2) && out.dim() == 2 && out.size(0) == grad.size(0)
              && out.size(1) == grad.size(2), "grad (T, s, D), beta (T, s), out (T, D), contiguous");
  TORCH_CHECK(beta.scalar_type() == grad.scalar_type() && out.scalar_type() == grad.scalar_type(), "one dtype");
  const int64_t tokens = grad.size(0), s = grad.size(1), D = grad.size(2);
  auto grad_beta = at::empty_like(beta), grad_out = at::empty_like(out);
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "windowed_attention_hyper_write_backward", [&] {
    using T = scalar_t;
    const T *gd = grad.data_ptr<T>(), *bd = beta.data_ptr<T>(), *od = out.data_ptr<T>();
    T *gbd = grad_beta.data_ptr<T>(), *god = grad_out.data_ptr<T>();
    at::parallel_for(0, tokens, 64, [&](int64_t begin, int64_t end) {
      std::vector<const T*> rows(s);
      std::vector<T*> sink{nullptr};
      for (int64_t t = begin; t < end; ++t) {
        for (int64_t i = 0; i < s; ++i) rows[i] = gd + (t * s + i) * D;
        dots(od + t * D, rows.data(), s, D, gbd + t * s);
        sink[0] = god + t * D;
        combine(bd + t * s, 1, gd + t * s * D, D, s, sink.data(), 1, D, false);
      }
    });
  });
  return {grad_beta, grad_out};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(windowed_attention_cpu, m) {
  m.def("hyper_backward", &hyper_backward);
  m.def("hyper_write_backward", &hyper_write_backward);
}

// The schemas and fakes of the forward and the write-back are defined in Python (ops/hyper.py); their kernels are
// registered here for CPU tensors, so that a compiled decode step calls them with no Python in between.
TORCH_LIBRARY_IMPL(windowed_attention_cpu, CPU, m) {
  m.impl("hyper_forward", &hyper_forward);
  m.impl("hyper_write", &hyper_write);
}
