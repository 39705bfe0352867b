"""`DynamicPositionBias`: a small MLP from signed distance to a per-head attention bias."""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from .ops.validation import check_int


class DynamicPositionBias(nn.Module):
    """Bias `(heads, i, j)` for `i` queries against `j` keys, a learned function of the distance.

    Query `r` sits at position `offset + r` of the key positions `0 .. j - 1`; the MLP sees the signed
    distance `query - key` (positive for keys in the past). `offset` defaults to `j - i` (the queries are
    the last `i` keys, local-attention's assumption); for a local-attention layout with
    `look_backward` windows before and `look_forward` after, pass `offset = look_backward * w` (the
    transformer does).
    """

    def __init__(self, dim: int, heads: int):
        super().__init__()
        dim, heads = check_int("dim", dim, 1), check_int("heads", heads, 1)
        self.mlp = nn.Sequential(
            nn.Linear(1, dim), nn.SiLU(), nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, heads),
        )

    @property
    def device(self):
        return next(self.parameters()).device

    def forward(self, i: int, j: int, offset: int | None = None) -> torch.Tensor:
        i, j = check_int("i", i, 1), check_int("j", j, 1)
        offset = j - i if offset is None else check_int("offset", offset, 0)
        query_pos = torch.arange(i, device=self.device) + offset
        key_pos = torch.arange(j, device=self.device)
        # Every distinct distance once through the MLP, then gathered.
        lo, hi = offset - (j - 1), offset + i - 1
        distances = torch.arange(lo, hi + 1, device=self.device, dtype=self.mlp[0].weight.dtype)
        bias = self.mlp(rearrange(distances, "r -> r 1"))  # (distances, heads)
        index = rearrange(query_pos, "i -> i 1") - rearrange(key_pos, "j -> 1 j") - lo
        return rearrange(bias[index], "i j h -> h i j")
