// The work of one call of the attention kernel (`local_attention_cpu.cpp`): the window rule as numbers
// (`Geometry`), the forward's blocks of at most BLOCK_Q query rows, and the backward's units (groups of
// windows of one document) per phase.

#pragma once

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

namespace local_attention {

constexpr int64_t BLOCK_Q = 64;

struct Geometry {
  int64_t n, n_q, off, w, lb, lf, left, right;  // off = n - n_q: query row r is position r + off; -1: no bound
  bool causal;  // only for sink tokens (the window's causality is right == 0): not causal, a query sees all

  // Keys [lo, hi) that query i of the document [s, e) sees through its window (spec.key_range): the window
  // blocks counted from the document's start, cut by the token bounds and the document.
  void interval(int64_t i, int64_t s, int64_t e, int64_t& lo, int64_t& hi) const {
    const int64_t b = (i - s) / w;
    lo = s + std::max<int64_t>((b - lb) * w, 0);
    hi = s + std::min<int64_t>((b + lf + 1) * w, e - s);
    if (left >= 0) lo = std::max(lo, i - left);
    if (right >= 0) hi = std::min(hi, i + right + 1);
  }
};

// Query rows [r0, r1) (positions) of window `win` (counted from its document's start s) of document [s, e).
struct Span {
  int64_t s, e, win, r0, r1;
};

// Span of block j of window win of document [s, e), cut to the query positions (>= off); false if empty.
inline bool make_span(int64_t s, int64_t e, int64_t win, int64_t j, int64_t w, int64_t off, Span& sp) {
  sp = Span{s, e, win, s + win * w + j * BLOCK_Q, 0};
  sp.r1 = std::min({sp.r0 + BLOCK_Q, s + (win + 1) * w, e});
  sp.r0 = std::max(sp.r0, off);
  return sp.r0 < sp.r1;
}

// One block of query rows [r0, r1) of head p, the window keys [klo, khi) all of them may see, and the first
// nsb sink tokens of the document some of them see only as sinks (the columns before the window's).
struct Block {
  int64_t p, s, e, win, r0, r1, klo, khi, nsb;
  int64_t rows() const { return r1 - r0; }
  int64_t keys() const { return khi - klo; }
  int64_t cols() const { return nsb + keys(); }
};

// The work of one call: per row of `documents` (one row holding one document without them), its documents,
// the forward's blocks, and the backward's units (groups of windows of one document) per phase.
struct Plan {
  struct Unit {
    int64_t s, e, w0, w1, z0, z1;  // windows [w0, w1) of document [s, e); phase 0 zeroes dK, dV of [z0, z1)
  };
  std::vector<std::vector<std::pair<int64_t, int64_t>>> docs;
  std::vector<std::vector<Span>> spans;
  std::vector<std::vector<Unit>> units[2];
  int64_t per = 1;  // query rows per documents row
};

// Key windows whose dK, dV rows a phase-0 task of group `gi` zeroes before it accumulates into them: from
// the first key window it touches up to the first of the next phase-0 group (the last group: to the end).
// These ranges tile [0, nw), and no other phase-0 task touches them (phase-0 groups never share keys),
// so the gradients need no separate zeroing pass and their pages are first touched by the task using them.
inline void zeroed_windows(int64_t gi, int64_t group, int64_t groups, int64_t lb, int64_t nw, int64_t& from,
                           int64_t& to) {
  from = gi == 0 ? 0 : std::max<int64_t>(gi * group - lb, 0);
  to = gi + 2 >= groups ? nw : std::min<int64_t>((gi + 2) * group - lb, nw);
}

inline Plan make_plan(const Geometry& g, int64_t P, const int64_t* documents, int64_t rows) {
  Plan plan;
  plan.per = P / rows;
  const int64_t w = g.w, bpw = (w + BLOCK_Q - 1) / BLOCK_Q, group = std::max<int64_t>(std::min(g.lb + g.lf, g.n), 1);
  plan.docs.resize(rows);
  plan.spans.resize(rows);
  plan.units[0].resize(rows);
  plan.units[1].resize(rows);
  for (int64_t b = 0; b < rows; ++b) {
    auto& docs = plan.docs[b];
    if (documents == nullptr) {
      docs.emplace_back(0, g.n);
    } else {  // runs of equal ids
      const int64_t* ids = documents + b * g.n;
      for (int64_t i = 0, s = 0; i < g.n; ++i)
        if (i + 1 == g.n || ids[i + 1] != ids[i]) {
          docs.emplace_back(s, i + 1);
          s = i + 1;
        }
    }
    for (const auto& [s, e] : docs) {
      const int64_t nw = (e - s + w - 1) / w, groups = (nw + group - 1) / group;
      Span sp;
      for (int64_t win = std::max<int64_t>((std::max(g.off, s) - s) / w, 0); win < nw; ++win)
        for (int64_t j = 0; j < bpw; ++j)
          if (make_span(s, e, win, j, w, g.off, sp)) plan.spans[b].push_back(sp);
      for (int64_t gi = 0; gi < groups; ++gi) {
        int64_t from, to;
        zeroed_windows(gi, group, groups, g.lb, nw, from, to);
        plan.units[gi % 2][b].push_back(
            {s, e, gi * group, std::min((gi + 1) * group, nw), s + from * w, std::min(s + to * w, e)});
      }
    }
  }
  return plan;
}

}  // namespace local_attention
