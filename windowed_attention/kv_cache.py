"""`KVCache`: the keys and values a causal local-attention layer still needs for decoding.

A query at position t sees at most `capacity = look_backward * w + w - 1` earlier keys (fewer with exact
windows), so the cache keeps only those: memory is O(window) per layer, however long generation runs.

Storage is a preallocated ring of `slots = capacity + 1` entries, written twice (at `p % slots` and
`p % slots + slots`) so that the most recent entries, oldest first, are always one contiguous slice: an
append is two small copies and hands back views, never a concatenation of the whole window.
"""

from __future__ import annotations

import torch


class KVCache:
    """Raw (pre-position-encoding) keys and values `(b, h, m, d)` of the last `m <= capacity` positions,
    and how many positions have been seen in total (`length`, the position of the next token).

    The one verb is `append`; it writes into the shared buffers, so after `cache.append(...)` only the
    returned cache is valid for further appends (decoding is a single line of history).
    """

    def __init__(self, k_buffer: torch.Tensor, v_buffer: torch.Tensor, length: int, capacity: int,
                 newest: list[int] | None = None):
        self._k, self._v = k_buffer, v_buffer  # (b, h, 2 * slots, d)
        self.length, self.capacity = length, capacity
        # The length of the newest cache on these buffers, shared by all of them: an older cache's
        # slots may have been overwritten, so appending to it again is refused.
        self._newest = [length] if newest is None else newest

    @property
    def slots(self) -> int:
        return self.capacity + 1

    @classmethod
    def from_prefill(cls, k: torch.Tensor, v: torch.Tensor, capacity: int, length: int | None = None) -> "KVCache":
        """Cache after a full forward over `k, v` `(b, h, n, d)`, keeping the last `capacity` positions.

        `length`: the position after the last of `k` when `k` holds only the last positions of a longer
        sequence (default `n`, i.e. `k` starts at position 0)."""
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
            raise ValueError(f"capacity must be an int >= 0, got {capacity!r}")
        n, slots = k.shape[-2], capacity + 1
        length = n if length is None else length
        if isinstance(length, bool) or not isinstance(length, int) or length < n:
            raise ValueError(f"length must be an int >= the number of positions given ({n}), got {length!r}")
        k_buffer = k.new_zeros(*k.shape[:-2], 2 * slots, k.shape[-1])
        v_buffer = v.new_zeros(*v.shape[:-2], 2 * slots, v.shape[-1])
        start = max(n - capacity, 0)
        index = torch.arange(length - (n - start), length, device=k.device) % slots
        for buffer, source in ((k_buffer, k), (v_buffer, v)):
            buffer[..., index, :] = source[..., start:, :]
            buffer[..., index + slots, :] = source[..., start:, :]
        return cls(k_buffer, v_buffer, length, capacity)

    def _window(self, buffer: torch.Tensor, end: int, count: int) -> torch.Tensor:
        """The entries of positions `end - count .. end - 1`, oldest first (a view)."""
        start = (end - count) % self.slots
        return buffer[..., start:start + count, :]

    @property
    def k(self) -> torch.Tensor:
        return self._window(self._k, self.length, min(self.length, self.capacity))

    @property
    def v(self) -> torch.Tensor:
        return self._window(self._v, self.length, min(self.length, self.capacity))

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple["KVCache", torch.Tensor, torch.Tensor]:
        """Add one position's `k, v` `(b, h, 1, d)`. Returns the new cache and the keys/values
        `(b, h, m, d)` that end with the new position (at most `capacity + 1` of them, oldest first)."""
        if self._newest[0] != self.length:
            raise ValueError(
                "cache was already appended to: its buffers now hold a later position; continue from the "
                "cache that append returned (one cache cannot branch into two generations)"
            )
        slot, slots = self.length % self.slots, self.slots
        self._k[..., slot:slot + 1, :] = k
        self._k[..., slot + slots:slot + slots + 1, :] = k
        self._v[..., slot:slot + 1, :] = v
        self._v[..., slot + slots:slot + slots + 1, :] = v
        length = self.length + 1
        count = min(length, slots)
        self._newest[0] = length
        cache = KVCache(self._k, self._v, length, self.capacity, self._newest)
        return cache, self._window(self._k, length, count), self._window(self._v, length, count)

    def nbytes(self) -> int:
        """Bytes held by the buffers (constant for the life of the cache)."""
        return self._k.numel() * self._k.element_size() + self._v.numel() * self._v.element_size()

    def __repr__(self) -> str:
        return f"KVCache(length={self.length}, capacity={self.capacity}, shape={tuple(self._k.shape)})"
