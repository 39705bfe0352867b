"""The window pattern: which key each query may see, as a value every backend shares.

`WindowSpec` holds the positional part of the contract (API.md, "The op"): window blocks, causality and
exact windows. Key padding masks, biases and `shared_qk` are per-call inputs and live with the op.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

# Score that replaces a query's score with itself under shared_qk (as in local-attention).
SELF_ATTN_SCORE = -5e4


@dataclass(frozen=True)
class WindowSpec:
    """Positional visibility rule of local attention.

    Query `i` sees key `j` when `j // w` lies in `[i // w - look_backward, i // w + look_forward]`,
    `0 <= j < n`, and
    - causal: `j <= i`; with `exact_windowsize` also `i - j <= w * look_backward`;
    - not causal with `exact_windowsize`: `i - w * look_backward <= j <= i + w * look_forward`.
    """

    window_size: int
    causal: bool
    look_backward: int
    look_forward: int
    exact_windowsize: bool

    @property
    def span(self) -> int:
        """Number of windows a query window looks at."""
        return self.look_backward + self.look_forward + 1

    def for_length(self, n: int) -> "WindowSpec":
        """The same rule on a sequence of `n` positions with the window `min(window_size, n)` and at most
        as many windows of look-around as the sequence holds, so that cost never follows a window (or a
        look-around) longer than the sequence.

        With `w >= n` every position lies in window 0 and each condition holds alike for `w` and `n`: the
        block bounds always, `i - j <= w * look_backward` (and `j - i <= w * look_forward`) always when
        the look-around is >= 1 and as `i - j <= 0` (`j - i <= 0`) when it is 0. A look-around of
        `windows = ceil(n / w)` or more sees every window in that direction and bounds `|i - j| < n <=
        w * windows`, so it equals `windows`.
        """
        w = min(self.window_size, max(n, 1))
        windows = -(-max(n, 1) // w)
        lb, lf = min(self.look_backward, windows), min(self.look_forward, windows)
        if (w, lb, lf) == (self.window_size, self.look_backward, self.look_forward):
            return self
        return replace(self, window_size=w, look_backward=lb, look_forward=lf)

    def with_bias_shape(self, rows: int, cols: int) -> "WindowSpec | None":
        """The rule `for_length(m)` (for some `m`) whose bias `(heads, w', span' * w')` has these last two
        dims, or None when no such rule exists. (A candidate whose look-around no length gives comes back
        too: callers check `for_length(n)` of the result against their own.)

        A window cut below `window_size` holds every position in window 0 and looks at most one window each
        way; at the full window the look-around `min(look_backward, W) + min(look_forward, W)` grows with
        the number of windows `W`, so `span'` names `W`.
        """
        w = self.window_size
        if rows < 1 or rows > w or cols % rows:
            return None
        around = cols // rows - 1
        if rows < w:
            windows = 1
        else:
            lo, hi = sorted((self.look_backward, self.look_forward))
            windows = hi if around >= lo + hi else around // 2 if around <= 2 * lo else around - lo
        lb, lf = min(self.look_backward, windows), min(self.look_forward, windows)
        if lb + lf != around:
            return None
        return replace(self, window_size=rows, look_backward=lb, look_forward=lf)

    def covers(self, other: "WindowSpec", n: int) -> bool:
        """Whether `other` (a `for_length` of this rule) gives this rule's result on sequences of `n`
        positions: `other.for_length(n) == self.for_length(n)`."""
        return other.for_length(n) == self.for_length(n)

    def visible(self, i: torch.Tensor, j: torch.Tensor, n: int) -> torch.Tensor:
        """Boolean visibility of key positions `j` from query positions `i` (broadcasting)."""
        w = self.window_size
        bi, bj = torch.div(i, w, rounding_mode="floor"), torch.div(j, w, rounding_mode="floor")
        ok = (bj >= bi - self.look_backward) & (bj <= bi + self.look_forward) & (j >= 0) & (j < n)
        if self.causal:
            ok &= j <= i
            if self.exact_windowsize:
                ok &= i - j <= w * self.look_backward
        elif self.exact_windowsize:
            ok &= (j >= i - w * self.look_backward) & (j <= i + w * self.look_forward)
        return ok

    def key_range(self, i: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """First and last key query positions `i` see, ignoring key masks: `visible(i, j, n)` is exactly
        `lo <= j <= hi` (both non-decreasing in `i`; `lo > hi` where a query sees nothing)."""
        w = self.window_size
        block = torch.div(i, w, rounding_mode="floor")
        lo = ((block - self.look_backward) * w).clamp(min=0)
        hi = ((block + self.look_forward + 1) * w - 1).clamp(max=n - 1)
        if self.exact_windowsize:
            lo = torch.maximum(lo, i - w * self.look_backward)
        if self.causal:
            hi = torch.minimum(hi, i)
        elif self.exact_windowsize:
            hi = torch.minimum(hi, i + w * self.look_forward)
        return lo, hi
