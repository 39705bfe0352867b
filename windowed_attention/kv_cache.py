"""`KVCache`: the keys and values a causal local-attention layer still needs for decoding.

A query at position t sees at most `look_backward * w + w - 1` earlier keys (fewer with exact windows),
so the cache keeps only that many: memory is O(window) per layer, however long the generation runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class KVCache:
    """Raw (pre-position-encoding) keys and values `(b, h, m, d)` of the last `m` positions, and how many
    positions have been seen in total (`length`, the position of the next token)."""

    k: torch.Tensor
    v: torch.Tensor
    length: int
    capacity: int

    @classmethod
    def from_prefill(cls, k: torch.Tensor, v: torch.Tensor, capacity: int) -> "KVCache":
        """Cache after a full forward over `k, v` `(b, h, n, d)`."""
        n = k.shape[-2]
        start = max(n - capacity, 0)
        return cls(k[..., start:, :], v[..., start:, :], n, capacity)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple["KVCache", torch.Tensor, torch.Tensor]:
        """Add one position's `k, v` `(b, h, 1, d)`: the new cache (this one is left as it was) and the
        keys/values that end with the new position."""
        keys = torch.cat((self.k, k), dim=-2)
        values = torch.cat((self.v, v), dim=-2)
        start = max(keys.shape[-2] - self.capacity, 0)
        cache = KVCache(keys[..., start:, :], values[..., start:, :], self.length + 1, self.capacity)
        return cache, keys, values
