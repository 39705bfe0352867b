"""Which keys each rank needs from which: the halo geometry of a sharded sequence (pure arithmetic).

Rank `t` of `R` holds positions `[t * n_s, (t + 1) * n_s)` of a sequence of `n = R * n_s`. Its queries
see keys from `need_lo` (the first key any of them can see through a window) to `end` (one past the
last); the part of that range outside its own shard is its halo, at most `look_backward + 1` windows
before and `look_forward + 1` after (plus, not causal with sink tokens, the positions after the shard
where a document that starts in it keeps its sink tokens: at most `sink_tokens - 1`), whatever `n`.

Without documents the range is exact (the global window blocks of the shard's first and last queries).
With packed documents a query's windows count from its document's start, which the geometry does not
know (it is data); the range is then the widest any document start allows: `(look_backward + 1) * w - 1`
keys back and `(look_forward + 1) * w - 1` ahead (each cut by the token bounds), so the plan stays
static and every rank computes every rank's plan alike. `attention.attend_shard` lays the frame out so
that window blocks fall where the global rule puts them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..ops.spec import WindowSpec


@dataclass(frozen=True)
class Frame:
    """Rank `rank`'s frame of global positions `[need_lo, end)`: its shard at `[start, stop)`, the halo it
    needs at `[need_lo, start)` before and `[stop, end)` after."""

    rank: int
    need_lo: int
    start: int
    stop: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.need_lo


def _reach(bound: int | None, around: int, w: int) -> int:
    """How far a window reaches on one side whatever the document start: `(around + 1) * w - 1` keys of
    window blocks, cut by the token bound."""
    reach = (around + 1) * w - 1
    return reach if bound is None else min(bound, reach)


@functools.lru_cache(maxsize=256)
def frame(spec: WindowSpec, shard_len: int, world: int, rank: int, documents: bool = False) -> Frame:
    """The frame of `rank` (see the module docstring); `documents`: whether the call packs documents."""
    n = shard_len * world
    start, stop = rank * shard_len, (rank + 1) * shard_len
    if documents:
        left, right = spec.bounds
        need_lo = max(0, start - _reach(left, spec.look_backward, spec.window_size))
        need_hi = min(n, stop + _reach(right, spec.look_forward, spec.window_size))
    else:
        # both ends of the key range grow with the query: the shard's first and last queries bound it
        lo, hi = spec.key_range(torch.tensor([start, stop - 1]), n)
        need_lo, need_hi = int(lo[0]), int(hi[1]) + 1
    need_lo, need_hi = min(need_lo, start), max(need_hi, stop)
    if spec.sink_tokens and not spec.causal:
        # every query sees its document's sink tokens: those of a document that starts in the shard lie up to
        # sink_tokens - 1 positions after it (the sequence's own at [0, sink_tokens) without documents);
        # those before the frame are fetched apart (attention.attend_shard)
        need_hi = max(need_hi, min(n, stop + spec.sink_tokens - 1 if documents else spec.sink_tokens))
    return Frame(rank, need_lo, start, stop, need_hi)


@dataclass(frozen=True)
class Piece:
    """Positions `[lo, hi)` of rank `src`'s shard that rank `dst` needs."""

    src: int
    dst: int
    lo: int
    hi: int


@functools.lru_cache(maxsize=64)
def pieces(spec: WindowSpec, shard_len: int, world: int, documents: bool = False) -> tuple[Piece, ...]:
    """Every (src, dst) transfer of the halo exchange, in a fixed order all ranks agree on."""
    out = []
    for dst in range(world):
        f = frame(spec, shard_len, world, dst, documents)
        for lo, hi in ((f.need_lo, f.start), (f.stop, f.end)):
            for src in range(world):
                a, b = max(lo, src * shard_len), min(hi, (src + 1) * shard_len)
                if src != dst and a < b:
                    out.append(Piece(src, dst, a, b))
    return tuple(out)
