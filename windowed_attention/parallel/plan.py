"""Which keys each rank needs from which: the halo geometry of a sharded sequence (pure arithmetic).

Rank `t` of `R` holds positions `[t * n_s, (t + 1) * n_s)` of a sequence of `n = R * n_s`. Its queries
see keys from `need_lo` (the first key any of them can see) to `need_hi` (one past the last); the part
of that range outside its own shard is its halo, at most `look_backward + 1` windows before and
`look_forward + 1` after, whatever `n`. The shard is computed in a local frame that starts at
`origin = need_lo // w * w`, so window boundaries fall on the same (global) multiples of `w`: the window
rule, `attn_bias` and xpos are unchanged by the shift. Keys in `[origin, need_lo)` are never visible to
the shard's queries; the frame holds zeros there.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..ops.spec import WindowSpec


@dataclass(frozen=True)
class Frame:
    """Rank `rank`'s local frame: global positions `[origin, end)`, its shard at `[start, stop)`, and the
    halo it needs: `[need_lo, start)` before and `[stop, end)` after."""

    rank: int
    origin: int
    need_lo: int
    start: int
    stop: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.origin


@dataclass(frozen=True)
class Piece:
    """Positions `[lo, hi)` of rank `src`'s shard that rank `dst` needs."""

    src: int
    dst: int
    lo: int
    hi: int


@functools.lru_cache(maxsize=256)
def frame(spec: WindowSpec, shard_len: int, world: int, rank: int) -> Frame:
    """The local frame of `rank` (see the module docstring)."""
    w, n = spec.window_size, shard_len * world
    start, stop = rank * shard_len, (rank + 1) * shard_len
    # both ends of the key range grow with the query: the shard's first and last queries bound it
    lo, hi = spec.key_range(torch.tensor([start, stop - 1]), n)
    need_lo, need_hi = int(lo[0]), int(hi[1]) + 1
    return Frame(rank, need_lo // w * w, need_lo, start, stop, need_hi)


@functools.lru_cache(maxsize=64)
def pieces(spec: WindowSpec, shard_len: int, world: int) -> tuple[Piece, ...]:
    """Every (src, dst) transfer of the halo exchange, in a fixed order all ranks agree on."""
    out = []
    for dst in range(world):
        f = frame(spec, shard_len, world, dst)
        for lo, hi in ((f.need_lo, f.start), (f.stop, f.end)):
            for src in range(world):
                a, b = max(lo, src * shard_len), min(hi, (src + 1) * shard_len)
                if src != dst and a < b:
                    out.append(Piece(src, dst, a, b))
    return tuple(out)
