// The float32 GEMM of `f32_gemm.h`, written once over a vector type `Vec` (lanes L, a micro-tile of MR rows
// x NV vectors) and included once per instruction set, inside that set's namespace and `#pragma GCC target`
// region: by `f32_gemm.h` for AVX-512F, by `f32_gemm_avx2.cpp` for AVX2 (so there is no include guard).
//
// A micro-tile of R rows and V vectors keeps R x V accumulators in registers (at most NREG vectors at a time:
// a wider tile is computed in blocks) over a chunk of at most KC
// steps of k (the chunks add into C, so rounding errors grow with the chunk, as MKL's do), each step
// broadcasting one element of op(A) per row and loading V vectors of a row of op(B). Rows of op(B) are read
// in place when B is not transposed (the columns beyond n masked off); a transposed B is packed into panels
// of NR columns (k x NR, zero beyond n) through L x L in-register transposes, one panel at a time (it stays
// in L1), or all of them into a `Packed` kept for the next product. Elements of op(A) are read in place
// either way: along a row of `a` when A is not transposed, across R consecutive columns of a row of `a`
// when it is.

#ifndef F32_GEMM_ENTRY  // how the entry `gemm` is defined: inline in the including source, unless it says
#define F32_GEMM_ENTRY __attribute__((noinline)) inline
#endif

constexpr int L = Vec::L, MR = Vec::MR, NV = Vec::NV;
constexpr int64_t NR = int64_t(L) * NV;  // columns of a micro-tile and of a packed panel of B
constexpr int64_t KC = 256;              // the longest sum over k kept in registers
static_assert(MR == 6, "tile_any dispatches on up to 6 rows");

// Panel of `cols` <= NR columns of op(B) = b^T (b holds them as rows, leading dimension ldb): for q < k, the
// NR values op(B)[q][c] at panel[q * NR + c], zero from cols to the next multiple of L (beyond: not read).
inline void pack_panel(int64_t cols, int64_t k, const float* b, int64_t ldb, float* panel) {
  for (int64_t j0 = 0; j0 < cols; j0 += L) {
    const int64_t count = std::min<int64_t>(L, cols - j0);
    for (int64_t q0 = 0; q0 < k; q0 += L) {
      const typename Vec::mask mq = Vec::lanes(k - q0);
      typename Vec::reg r[L];
      for (int c = 0; c < L; ++c) r[c] = c < count ? Vec::load(mq, b + (j0 + c) * ldb + q0) : Vec::zero();
      Vec::transpose(r);  // r[q]: column q0 + q of the L rows, row q0 + q of the panel
      for (int q = 0; q < L && q0 + q < k; ++q) Vec::store(panel + (q0 + q) * NR + j0, r[q]);
    }
  }
}

// R rows x V <= Vec::NREG vectors of C, in registers. op(A)[i][q] is at a + i * ra + q * qa; op(B)[q][L v + c]
// at b + q * ldb + L v + c, the last vector masked by `mlast` when `Partial`. Writes alpha * acc + beta * C (C
// not read when beta is 0). Masked loads and stores only where a vector is partial: on AMD CPUs AVX2's masked
// stores are microcoded.
template <int R, int V, bool Partial>
void block(int64_t k, const float* a, int64_t ra, int64_t qa, const float* b, int64_t ldb, typename Vec::mask mlast,
          float alpha, float beta, float* c, int64_t ldc) {
  typename Vec::reg acc[R][V];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) acc[r][v] = Vec::zero();
  for (int64_t q = 0; q < k; ++q) {
    typename Vec::reg bv[V];
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v)
      bv[v] = Partial && v + 1 == V ? Vec::load(mlast, b + q * ldb + L * v) : Vec::load(b + q * ldb + L * v);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const typename Vec::reg av = Vec::set1(a[r * ra + q * qa]);
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) acc[r][v] = Vec::fmadd(av, bv[v], acc[r][v]);
    }
  }
  const typename Vec::reg va = Vec::set1(alpha), vb = Vec::set1(beta);
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) {
      float* out = c + r * ldc + L * v;
      typename Vec::reg y = Vec::mul(acc[r][v], va);
      if (Partial && v + 1 == V) {
        if (beta != 0.0f) y = Vec::fmadd(Vec::load(mlast, out), vb, y);
        Vec::store(out, mlast, y);
      } else {
        if (beta != 0.0f) y = Vec::fmadd(Vec::load(out), vb, y);
        Vec::store(out, y);
      }
    }
}

// R rows x V vectors of C: blocks of Vec::NREG vectors one after another (a micro-tile wider than the registers
// hold, so that one call covers a panel).
template <int R, int V, bool Partial>
void tile(int64_t k, const float* a, int64_t ra, int64_t qa, const float* b, int64_t ldb, typename Vec::mask mlast,
          float alpha, float beta, float* c, int64_t ldc) {
  if constexpr (V > Vec::NREG) {
    block<R, Vec::NREG, false>(k, a, ra, qa, b, ldb, mlast, alpha, beta, c, ldc);
    tile<R, V - Vec::NREG, Partial>(k, a, ra, qa, b + Vec::NREG * L, ldb, mlast, alpha, beta, c + Vec::NREG * L, ldc);
  } else {
    block<R, V, Partial>(k, a, ra, qa, b, ldb, mlast, alpha, beta, c, ldc);
  }
}

template <int R, bool Partial>
void tile_rows(int vectors, int64_t k, const float* a, int64_t ra, int64_t qa, const float* b, int64_t ldb,
               typename Vec::mask mlast, float alpha, float beta, float* c, int64_t ldc) {
  switch (vectors) {
    case 1: return tile<R, 1, Partial>(k, a, ra, qa, b, ldb, mlast, alpha, beta, c, ldc);
    case 2: return tile<R, 2, Partial>(k, a, ra, qa, b, ldb, mlast, alpha, beta, c, ldc);
    case 3: if constexpr (NV >= 3) return tile<R, 3, Partial>(k, a, ra, qa, b, ldb, mlast, alpha, beta, c, ldc); break;
    case 4: if constexpr (NV >= 4) return tile<R, 4, Partial>(k, a, ra, qa, b, ldb, mlast, alpha, beta, c, ldc); break;
  }
}

template <bool Partial>
void tile_any(int rows, int vectors, int64_t k, const float* a, int64_t ra, int64_t qa, const float* b, int64_t ldb,
              typename Vec::mask mlast, float alpha, float beta, float* c, int64_t ldc) {
  switch (rows) {
    case 1: return tile_rows<1, Partial>(vectors, k, a, ra, qa, b, ldb, mlast, alpha, beta, c, ldc);
    case 2: return tile_rows<2, Partial>(vectors, k, a, ra, qa, b, ldb, mlast, alpha, beta, c, ldc);
    case 3: return tile_rows<3, Partial>(vectors, k, a, ra, qa, b, ldb, mlast, alpha, beta, c, ldc);
    case 4: return tile_rows<4, Partial>(vectors, k, a, ra, qa, b, ldb, mlast, alpha, beta, c, ldc);
    case 5: return tile_rows<5, Partial>(vectors, k, a, ra, qa, b, ldb, mlast, alpha, beta, c, ldc);
    default: return tile_rows<6, Partial>(vectors, k, a, ra, qa, b, ldb, mlast, alpha, beta, c, ldc);
  }
}

// A micro-tile of `rows` <= MR rows and `vectors` <= NV vectors, the last masked by `mlast` when `partial`.
inline void tile_any(bool partial, int rows, int vectors, int64_t k, const float* a, int64_t ra, int64_t qa,
                     const float* b, int64_t ldb, typename Vec::mask mlast, float alpha, float beta, float* c,
                     int64_t ldc) {
  if (partial) tile_any<true>(rows, vectors, k, a, ra, qa, b, ldb, mlast, alpha, beta, c, ldc);
  else tile_any<false>(rows, vectors, k, a, ra, qa, b, ldb, mlast, alpha, beta, c, ldc);
}

// The panels of a transposed B for n columns, in `packed` (those it holds for the same b, ldb and k kept).
inline const float* pack_all(int64_t n, int64_t k, const float* b, int64_t ldb, Packed& packed) {
  packed.hold(b, ldb, k);
  const int64_t panels = (n + NR - 1) / NR;
  if (static_cast<int64_t>(packed.buf.size()) < std::max<int64_t>(panels * NR * k, 1))
    packed.buf.resize(std::max<int64_t>(panels * NR * k, 1));  // keeps the panels packed so far
  for (int64_t p = packed.n / NR; p < panels; ++p)  // a panel packed in part is packed again, whole
    pack_panel(std::min(NR, n - p * NR), k, b + p * NR * ldb, ldb, packed.buf.data() + p * NR * k);
  packed.n = std::max(packed.n, n);
  return packed.buf.data();
}

// Not inlined into its callers, which are compiled for the CPU torch targets: this build's code stays within its
// own instruction set (what a CPU that has only that set runs). The AVX2 build defines it in its own source.
F32_GEMM_ENTRY void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
                         const float* b, int64_t ldb, float beta, float* c, int64_t ldc, const Band* band,
                         Packed* packed) {
  if (m <= 0 || n <= 0) return;
  const int64_t ra = ta ? 1 : lda, qa = ta ? lda : 1;
  thread_local std::vector<float> bbuf;
  const float* panels = tb && packed != nullptr ? pack_all(n, k, b, ldb, *packed) : nullptr;
  if (tb && panels == nullptr) bbuf.resize(std::max<int64_t>(NR * k, 1));
  for (int64_t j0 = 0; j0 < n; j0 += NR) {
    const int64_t cols = std::min(NR, n - j0);
    const float* bp = b + j0;
    int64_t ldp = ldb;
    if (tb) {
      ldp = NR;
      if (panels != nullptr) {
        bp = panels + j0 * k;
      } else {
        pack_panel(cols, k, b + j0 * ldb, ldb, bbuf.data());
        bp = bbuf.data();
      }
    }
    const int nvec = static_cast<int>((cols + L - 1) / L);
    const int64_t last = cols - (nvec - 1) * L;  // lanes of the panel's last vector
    const typename Vec::mask mlast = Vec::lanes(last);
    for (int64_t i = 0; i < m; i += MR) {
      const int rows = static_cast<int>(std::min<int64_t>(MR, m - i));
      int64_t v0 = 0, v1 = nvec, q0 = 0, q1 = k;  // the tile's vectors of the panel, and its range of k
      if (band != nullptr && band->kind == Band::cols) {
        const int64_t lo = std::max<int64_t>(band->lo[i] - j0, 0), hi = std::min(band->hi[i + rows - 1] - j0, cols);
        if (hi <= lo) continue;  // no row of the tile sees a column of the panel
        v0 = lo / L;
        v1 = (hi + L - 1) / L;
      } else if (band != nullptr && band->kind == Band::k_rows) {
        q0 = std::clamp<int64_t>(band->lo[i], 0, k);
        q1 = std::clamp<int64_t>(band->hi[i + rows - 1], q0, k);
      } else if (band != nullptr) {  // k_cols: C's rows [i, i + rows) are keys; k runs over the band's rows
        q0 = std::upper_bound(band->hi, band->hi + band->rows, i) - band->hi;  // first row reaching past key i
        q1 = std::lower_bound(band->lo, band->lo + band->rows, i + rows) - band->lo;  // first starting beyond
        q0 = std::min(q0, k);
        q1 = std::clamp<int64_t>(q1, q0, k);
      }
      const bool partial = v1 == nvec && last < L;
      const float* at = a + i * ra;
      const float* bt = bp + v0 * L;
      float* ct = c + i * ldc + j0 + v0 * L;
      for (int64_t k0 = q0; k0 == q0 || k0 < q1; k0 += KC)  // an empty range still writes beta C
        tile_any(partial, rows, static_cast<int>(v1 - v0), std::min(KC, q1 - k0), at + k0 * qa, ra, qa, bt + k0 * ldp,
                 ldp, mlast, alpha, k0 == q0 ? beta : 1.0f, ct, ldc);
    }
  }
}
