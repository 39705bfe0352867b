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

from dataclasses import dataclass

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


def frame(spec: WindowSpec, shard_len: int, world: int, rank: int) -> Frame:
    """The local frame of `rank` (see the module docstring)."""
    w, n = spec.window_size, shard_len * world
    start, stop = rank * shard_len, (rank + 1) * shard_len
    first, last = start, stop - 1
    if spec.exact_windowsize:
        need_lo = first - spec.look_backward * w
    else:
        need_lo = (first // w - spec.look_backward) * w
    if spec.causal:
        need_hi = last + 1
    elif spec.exact_windowsize:
        need_hi = last + spec.look_forward * w + 1
    else:
        need_hi = (last // w + spec.look_forward + 1) * w
    need_lo, need_hi = max(need_lo, 0), min(need_hi, n)
    return Frame(rank, need_lo // w * w, need_lo, start, stop, need_hi)


def pieces(spec: WindowSpec, shard_len: int, world: int) -> list[Piece]:
    """Every (src, dst) transfer of the halo exchange, in a fixed order all ranks agree on."""
    out = []
    for dst in range(world):
        f = frame(spec, shard_len, world, dst)
        for lo, hi in ((f.need_lo, f.start), (f.stop, f.end)):
            for src in range(world):
                a, b = max(lo, src * shard_len), min(hi, (src + 1) * shard_len)
                if src != dst and a < b:
                    out.append(Piece(src, dst, a, b))
    return out
