"""The window pattern: which key each query may see, as a value every backend shares.

`WindowSpec` holds the positional part of the contract (API.md, "The op"): window blocks, causality and
exact windows. Key padding masks, biases and `shared_qk` are per-call inputs and live with the op.
"""

from __future__ import annotations

from dataclasses import dataclass

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
