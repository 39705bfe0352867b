"""Local attention on FlexAttention (backend "flex"): a block mask skips every empty tile.

The call's rule becomes a `mask_mod` and a block mask built from key ranges (`_block_mask`: key masks,
documents and sink tokens folded in, so only the partial tiles evaluate the `mask_mod`; cached per geometry
when there is no key mask or documents), softcap, `attn_bias` and the shared-qk rule become a `score_mod`,
learned sinks renormalise the output by the log-sum-exp.
Compiled once per process (torch.compile), on CUDA and on CPU; on CPU it computes the forward only
(torch 2.13's FlexAttention has no CPU backward): a CPU call that needs gradients is refused by name, and
`auto` never picks flex there. No `key_scale` (xpos) and no dropout.
"""

from __future__ import annotations

import functools
import inspect
import math

import torch

from ..compiling import inductor_options
from .call import AttentionCall, document_bounds
from .reference import repeat_kv
from .spec import SELF_ATTN_SCORE, WindowSpec


def available() -> bool:
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# What it computes (`ops.call.ALL_FEATURES`): everything but xpos and dropout. Learned sinks renormalise
# the output with the log-sum-exp.
FEATURES = frozenset({
    "mask", "attn_bias", "shared_qk", "block_window", "token_window", "documents", "sinks", "sink_tokens",
    "softcap", "short_queries",
})


def takes_head_dims(head_dim: int, value_dim: int) -> bool:
    return True


def _rule_mod(spec: WindowSpec, n: int, offset: int = 0, key_ok: torch.Tensor | None = None,
              starts: torch.Tensor | None = None, ends: torch.Tensor | None = None):
    """The call's rule as FlexAttention's `mask_mod` (a plain function): query `i` is position `i + offset`,
    visible keys by `spec.visible`, inside the query's document (`starts`, `ends` `(B, n)`, `document_bounds`),
    where `key_ok` `(B, n)` is True; row `b` of the batch reads row `b` of each."""

    def mask_mod(b, h, i, j):
        pos = i + offset
        if starts is None:
            ok = spec.visible(pos, j, n) & (pos < n)
        else:
            start = starts[b, pos]
            ok = (starts[b, j] == start) & spec.visible(pos - start, j - start, ends[b, pos] - start)
        if key_ok is not None:
            ok = ok & key_ok[b, j]
        return ok

    return mask_mod


class _Layout:
    """A call whose rule varies by row (documents) or is not the plain window (sink tokens, shorter queries):
    the packed rows as `(B', P / B')` with `B'` the rows of `mask` and `documents` (their least common
    multiple), so that `mask_mod(b, h, i, j)` reads row `b` of each, and query `i` is position
    `i + query_offset`. Positions inside a document count from its start."""

    def __init__(self, call: AttentionCall, P: int, n: int, device):
        rows = [t.shape[0] for t in (call.mask, call.documents) if t is not None]
        self.B = math.lcm(*rows) if rows else 1
        self.spec, self.n, self.offset, self.call = call.spec, n, call.query_offset, call
        self.key_ok = None if call.mask is None else call.mask.repeat_interleave(self.B // call.mask.shape[0], 0)
        self.starts = self.ends = None
        if call.documents is not None:
            starts, ends = document_bounds(call.documents)
            per = self.B // call.documents.shape[0]
            self.starts, self.ends = starts.repeat_interleave(per, 0), ends.repeat_interleave(per, 0)

    def relative(self, b, i, j):
        """`(i', j', length, same document)`: positions inside query `i`'s document and its length."""
        pos = i + self.offset
        if self.starts is None:
            return pos, j, self.n, pos < self.n
        start = self.starts[b, pos]
        return pos - start, j - start, self.ends[b, pos] - start, self.starts[b, j] == start


def _score_mod(spec: WindowSpec, call: AttentionCall, layout: "_Layout | None", heads_per_row: int):
    """Softcap, then `attn_bias` (for keys the window shows), then the shared-qk rule, as a `score_mod`."""
    attn_bias, w, lb = call.attn_bias, spec.window_size, spec.look_backward
    if attn_bias is None and not call.mask_self and spec.softcap is None:
        return None
    span_w = spec.span * w
    heads = 1 if attn_bias is None else attn_bias.shape[0]

    def score_mod(score, b, h, i, j):
        score = spec.softcapped(score)
        if layout is None:
            i_rel, j_rel, length, pos = i, j, None, i
        else:
            i_rel, j_rel, length, _ = layout.relative(b, i, j)
            pos = i + layout.offset
        if attn_bias is not None:
            # masked-out (i, j) are evaluated too: clamp so the gather stays in bounds
            rel = (j_rel - (i_rel // w - lb) * w).clamp(0, span_w - 1)
            bias = attn_bias[(b * heads_per_row + h) % heads, i_rel % w, rel].to(score.dtype)
            if spec.sink_tokens:  # a key seen only as a sink token takes no bias (sink tokens come with a layout)
                bias = torch.where(spec.window_visible(i_rel, j_rel, length), bias, 0.0)
            score = score + bias
        if call.mask_self:
            score = torch.where(pos == j, SELF_ATTN_SCORE, score)
        return score

    return score_mod


BLOCK = 128  # FlexAttention's default tile, in query rows and in keys


def _window_tiles(spec: WindowSpec, n: int) -> int:
    """How many key tiles the window keys of one query tile can span at most (a static bound, from the rule
    alone): its 128 queries see from `back` keys before the first to `ahead` keys after the last."""
    left, right = spec.bounds
    w = spec.window_size
    back = (spec.look_backward + 1) * w - 1
    ahead = (spec.look_forward + 1) * w - 1
    back = back if left is None else min(back, left)
    ahead = ahead if right is None else min(ahead, right)
    keys = min(n, BLOCK + back + ahead)
    return min(-(-n // BLOCK), -(-keys // BLOCK) + 1)


@functools.cache
def _from_kv_blocks_parameters() -> frozenset[str]:
    """The keywords `BlockMask.from_kv_blocks` takes in this torch (`seq_lengths`, `compute_q_blocks` are newer):
    read once, not per block mask."""
    from torch.nn.attention.flex_attention import BlockMask

    return frozenset(inspect.signature(BlockMask.from_kv_blocks).parameters)


def _block_mask(spec: WindowSpec, n_q: int, n: int, offset: int, mask_mod, device, key_ok: torch.Tensor | None = None,
                starts: torch.Tensor | None = None, ends: torch.Tensor | None = None, q_blocks: bool = True):
    """The `BlockMask` of the call's rule, built from each query tile's key ranges (`WindowSpec.key_range`), on
    the device, with no synchronisation: `(B, 1, n_q / 128, n / 128)`, `B` the rows of `key_ok` / `starts`, `ends`
    (1 without them).

    `create_block_mask` evaluates `mask_mod` at all n_q * n pairs (eagerly that allocates n * n, 128 GiB at
    n = 131072); here the cost is FlexAttention's own tile layout. Every query sees itself, so the keys of a
    tile's queries form one range, from the first query's first key to the last query's last (both ends of
    `key_range` grow with the query, across documents too); sink tokens add the first and the last query's
    documents' prefixes (a document between them lies inside the tile). A tile is *full* (the kernel calls no
    `mask_mod` there) when every query of a whole tile sees all of its keys through the window: key tile
    `[t0, t1]` with `t0 >= lo(last query)` and `t1 <= hi(first query)`, and, with a key mask, every key of
    the tile kept. A key tile the mask hides entirely is dropped; the others are *partial*. So a right-padded
    mask costs only the tile its padding starts in, and a mask of any other shape stays exact.
    `q_blocks=False` skips the transposed lists only the backward reads.
    """
    from torch.nn.attention.flex_attention import BlockMask

    q_tiles, k_tiles = -(-n_q // BLOCK), -(-n // BLOCK)
    first = torch.arange(q_tiles, device=device) * BLOCK
    last = (first + BLOCK - 1).clamp(max=n_q - 1)
    whole = last - first == BLOCK - 1  # a ragged last tile's rows past n_q are masked: never full
    first, last = first + offset, last + offset  # positions

    def ranges(pos):
        """`(lo, hi, start, end)` `(B, q_tiles)`: the window's keys and the document of query position `pos`."""
        if starts is None:
            lo, hi = spec.key_range(pos, n)
            zero = torch.zeros_like(pos)
            return lo[None], hi[None], zero[None], (zero + n)[None]
        start, end = starts[:, pos], ends[:, pos]
        lo, hi = spec.key_range(pos - start, end - start)
        return lo + start, hi + start, start, end

    lo_first, hi_first, start_first, end_first = ranges(first)
    lo_last, hi_last, start_last, end_last = ranges(last)
    rows = lo_first.shape[0]
    width = _window_tiles(spec, n)
    t = lo_first[..., None] // BLOCK + torch.arange(width, device=device)  # (B, q_tiles, width) candidate key tiles
    listed = t <= (hi_last // BLOCK)[..., None]
    full = listed & (t * BLOCK >= lo_last[..., None]) & ((t + 1) * BLOCK - 1 <= hi_first[..., None]) & whole[:, None]
    tiles, seen, fulls = [t], [listed], [full]
    if spec.sink_tokens:
        window_lo, window_hi = lo_first // BLOCK, hi_last // BLOCK
        sink_width = min(k_tiles, -(-spec.sink_tokens // BLOCK) + 1)
        before = []  # tile ranges already listed
        for start, end in ((start_first, end_first), (start_last, end_last)):
            hi = start + torch.clamp(end - start, max=spec.sink_tokens) - 1
            if spec.causal:
                hi = torch.minimum(hi, last)
            s = start[..., None] // BLOCK + torch.arange(sink_width, device=device)
            ok = (s <= (hi // BLOCK)[..., None]) & ~((s >= window_lo[..., None]) & (s <= window_hi[..., None]))
            for a, b in before:
                ok = ok & ~((s >= a[..., None]) & (s <= b[..., None]))
            before.append((start // BLOCK, hi // BLOCK))
            tiles.append(s), seen.append(ok), fulls.append(torch.zeros_like(ok))
    t, listed, full = torch.cat(tiles, -1), torch.cat(seen, -1), torch.cat(fulls, -1)
    listed = listed & (t < k_tiles)
    full = full & listed
    if key_ok is not None:  # per key tile: any key kept (else dropped), every key kept (else not full)
        kept = torch.nn.functional.pad(key_ok, (0, k_tiles * BLOCK - n)).view(key_ok.shape[0], k_tiles, BLOCK)
        index = t.clamp(max=k_tiles - 1).flatten(1)
        rows = max(rows, key_ok.shape[0])
        index = index.expand(rows, -1)
        listed = listed & kept.any(-1).gather(1, index).view(rows, q_tiles, -1)
        full = full & kept.all(-1).gather(1, index).view(rows, q_tiles, -1)
    partial = listed & ~full

    def ordered(chosen):
        """`(count (B, 1, q_tiles), indices (B, 1, q_tiles, k_tiles))` int32 of the chosen tiles, ascending."""
        count = chosen.sum(-1)
        index = torch.where(chosen, t, k_tiles).sort(-1).values
        index = torch.where(index < k_tiles, index, 0)
        columns = index.shape[-1]
        index = index[..., :k_tiles] if columns >= k_tiles else torch.nn.functional.pad(index, (0, k_tiles - columns))
        return count.to(torch.int32)[:, None], index.to(torch.int32)[:, None]

    count, index = ordered(partial.expand(rows, -1, -1))
    full_count, full_index = ordered(full.expand(rows, -1, -1))
    takes = _from_kv_blocks_parameters()
    extra = {"seq_lengths": (n_q, n)} if "seq_lengths" in takes else {}
    if not q_blocks and "compute_q_blocks" in takes:
        extra["compute_q_blocks"] = False
    return BlockMask.from_kv_blocks(count, index, full_count, full_index, BLOCK_SIZE=BLOCK, mask_mod=mask_mod, **extra)


@functools.lru_cache(maxsize=32)
def _cached_block_mask(spec: WindowSpec, n_q: int, n: int, offset: int, device: str):
    """The block mask of a call without key mask or documents: a function of the rule and the lengths alone
    (its `mask_mod` holds no tensor), so it is built once per such geometry and device."""
    return _block_mask(spec, n_q, n, offset, _rule_mod(spec, n, offset), device)


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    # Shapes left to dynamo's automatic dynamic: a static compile per sequence length (and grad mode)
    # reaches the recompile limit (8) after a few lengths, and dynamo then runs flex_attention eagerly,
    # which materialises the n x n scores (32 TiB at n = 2**20).
    return torch.compile(flex_attention, options=inductor_options())


def flex_attention_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall) -> torch.Tensor:
    """Same contract as `reference_attention`: `q (P, n_q, d)`, `k, v (P_kv, n, d)` -> `(P, n_q, d_v)`."""
    call.require("flex", FEATURES)
    if not q.is_cuda and torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (q, k, v, call.sinks, call.attn_bias)):
        raise ValueError("backend 'flex' computes no gradients on CPU (FlexAttention has no CPU backward); use "
                         "backend='auto' (or 'fused'), or call it under torch.no_grad()")
    spec, scale = call.spec, call.scale
    P, n_q, _ = q.shape
    n = k.shape[1]
    plain = call.documents is None and not spec.sink_tokens and call.query_offset == 0
    layout = None if plain and call.mask is None else _Layout(call, P, n, q.device)
    if call.mask is None and call.documents is None:  # the rule alone: one block mask per geometry
        B = 1
        block_mask = _cached_block_mask(spec, n_q, n, call.query_offset, str(q.device))
    else:  # the rows of the masks and documents as FlexAttention's batch (attention-gym's document mask)
        B = layout.B
        needs_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (q, k, v, call.sinks, call.attn_bias))
        block_mask = _block_mask(spec, n_q, n, call.query_offset,
                                 _rule_mod(spec, n, call.query_offset, layout.key_ok, layout.starts, layout.ends),
                                 q.device, layout.key_ok, layout.starts, layout.ends, q_blocks=needs_grad)
    score_mod = _score_mod(spec, call, None if plain else layout, P // B)

    attend = _compiled_flex()
    # the kernels read rows as contiguous vectors: other layouts are copied
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if k.shape[0] % B:  # kv rows that do not split by the batch rows: one per query row
        k, v = repeat_kv(k, P), repeat_kv(v, P)
    q4, k4, v4 = (t.reshape(B, t.shape[0] // B, *t.shape[1:]) for t in (q, k, v))
    # grouped-query attention (fewer kv rows): flex maps query head h to kv head h // (H / H_kv)
    result = attend(q4, k4, v4, score_mod=score_mod, block_mask=block_mask, scale=scale,
                    enable_gqa=k4.shape[1] != q4.shape[1], return_lse=call.sinks is not None)
    if call.sinks is None:
        return result.reshape(P, n_q, -1)
    out, lse = result
    # the sink's exp(s) joins each denominator: weights shrink by exp(lse) / (exp(lse) + exp(s)); a row that sees
    # no key (lse = -inf, out = 0) stays zero
    sinks = call.sinks.to(lse.dtype).repeat(P // call.sinks.shape[0]).reshape(B, P // B, 1)
    factor = torch.exp(lse - torch.logaddexp(lse, sinks))
    return (out * factor[..., None].to(out.dtype)).reshape(P, n_q, -1)
