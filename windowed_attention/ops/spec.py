"""The window rule: which key each query may see, as a value every backend, kernel, cache and sharded path
reads (docs/semantics.md).

`WindowSpec` holds the positional part of a call: window blocks, causality, token bounds (exact windows and
flash-attn's `(left, right)`), the sink-token prefix and the score softcap. Per query it is one interval of
keys (`key_range`: the window blocks cut by the token bounds) joined with the prefix `[0, sink_tokens)`.
Per-call tensors (key masks, documents, biases, learned sinks) live with the call (`ops.call.AttentionCall`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

# Score that replaces a query's score with itself under shared_qk (as in local-attention).
SELF_ATTN_SCORE = -5e4
# Look-around standing for "every window" (a token window unbounded on that side); `for_length` cuts it to
# the windows a sequence holds before anything sizes a buffer by it.
UNBOUNDED = 1 << 31
# Widest window block of the layout a token-exact window is computed in (the kernel's query block).
TOKEN_BLOCK = 64


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
    # flash-attn's (left, right), -1 unbounded; the block fields are then only the layout (`token_window`)
    tokens: tuple[int, int] | None = None
    sink_tokens: int = 0  # the first positions (of each document), visible to every query besides its window
    softcap: float | None = None  # scores become softcap * tanh(score / softcap)

    @staticmethod
    def token_window(left: int, right: int, causal: bool, sink_tokens: int = 0, softcap: float | None = None):
        """The rule of flash-attn's `window_size=(left, right)` (-1 unbounded; `right` 0 when causal): query `i`
        sees `i - left <= j <= i + right`. Its layout is window blocks of `w = min(TOKEN_BLOCK, widest
        bounded side + 1)` looking `ceil(side / w)` blocks each way, which hold every key the bounds allow,
        so the block condition adds nothing and the kernel's block of rows computes exactly its range."""
        right = 0 if causal else right
        sides = [s for s in (left, right) if s >= 0]
        w = min(TOKEN_BLOCK, max(sides, default=TOKEN_BLOCK - 1) + 1) if len(sides) == 2 else TOKEN_BLOCK
        around = [UNBOUNDED if s < 0 else -(-s // w) for s in (left, right)]
        return WindowSpec(w, causal, around[0], around[1], False, (left, right), sink_tokens, softcap)

    @property
    def bounds(self) -> tuple[int | None, int | None]:
        """`(left, right)`: query `i` sees no key before `i - left` nor after `i + right` (None: no such bound
        beyond the blocks). Causality is `right == 0`; exact windows bound by `w * look_backward` back and
        `w * look_forward` ahead; a token window by its own pair."""
        if self.tokens is not None:
            left, right = (None if t < 0 else t for t in self.tokens)
        elif self.exact_windowsize:
            left, right = self.window_size * self.look_backward, self.window_size * self.look_forward
        else:
            left = right = None
        return left, 0 if self.causal else right

    @property
    def flash_bounds(self) -> tuple[int, int]:
        """`bounds` in flash-attn's convention (what the kernel and flash-attn take): -1 for no bound."""
        left, right = self.bounds
        return -1 if left is None else left, -1 if right is None else right

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
        """Boolean visibility of key positions `j` from query positions `i` (broadcasting) in a sequence (or
        document) of `n` positions: the window interval `key_range` or the sink-token prefix."""
        lo, hi = self.key_range(i, n)
        ok = (j >= lo) & (j <= hi)
        if self.sink_tokens:
            sink = (j >= 0) & (j < self.sink_tokens) & (j < n)
            ok = ok | (sink & (j <= i) if self.causal else sink)
        return ok

    def window_visible(self, i: torch.Tensor, j: torch.Tensor, n: int) -> torch.Tensor:
        """Visibility through the window alone (no sink tokens): `lo <= j <= hi` of `key_range`."""
        lo, hi = self.key_range(i, n)
        return (j >= lo) & (j <= hi)

    def key_range(self, i: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """First and last key query positions `i` see through the window (without sink tokens and key masks):
        blocks `i // w - look_backward .. i // w + look_forward` cut by `bounds` and the sequence (both ends
        non-decreasing in `i`; `lo > hi` where a query sees nothing)."""
        w = self.window_size
        block = torch.div(i, w, rounding_mode="floor")
        lo = ((block - self.look_backward) * w).clamp(min=0)
        hi = torch.clamp((block + self.look_forward + 1) * w - 1, max=n - 1)  # n: an int or a tensor (documents)
        left, right = self.bounds
        if left is not None:
            lo = torch.maximum(lo, i - left)
        if right is not None:
            hi = torch.minimum(hi, i + right)
        return lo, hi

    def sink_count(self, n: int) -> int:
        """How many sink tokens a sequence (or document) of `n` positions holds."""
        return min(self.sink_tokens, max(n, 0))

    def has_block_condition(self) -> bool:
        """Whether the window blocks cut anything the token bounds allow (a plain block window: not exact, not
        a token window). Backends that know only `(left, right)` windows (flash-attn) cannot compute it."""
        return self.tokens is None and not self.exact_windowsize

    def softcapped(self, scores: torch.Tensor) -> torch.Tensor:
        """`softcap * tanh(scores / softcap)` (scores unchanged without a softcap)."""
        return scores if self.softcap is None else self.softcap * torch.tanh(scores / self.softcap)
