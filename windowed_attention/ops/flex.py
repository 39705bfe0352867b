"""Local attention on FlexAttention (backend "flex"): a block mask skips every empty tile.

The window rule becomes a `mask_mod` (block mask cached per shape when no key padding mask is given;
documents, sink tokens and shorter queries build theirs with `create_block_mask`), softcap, `attn_bias`
and the shared-qk rule become a `score_mod`, learned sinks renormalise the output by the log-sum-exp.
Compiled once per process (torch.compile), on CUDA and on CPU; on CPU it computes the forward only
(torch 2.13's FlexAttention has no CPU backward): a CPU call that needs gradients is refused by name, and
`auto` never picks flex there. No `key_scale` (xpos) and no dropout.
"""

from __future__ import annotations

import functools
import inspect
import math

import torch

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


def _window_mod(spec: WindowSpec, n: int, key_ok: torch.Tensor | None, per_row: int):
    """The rule as a `mask_mod` over rows `h` of one batch: `spec.visible`, and the key mask."""

    def mask_mod(b, h, i, j):
        ok = spec.visible(i, j, n) & (i < n)
        if key_ok is not None:
            ok = ok & key_ok[h // per_row, j]
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

    def mask_mod(self):
        """The rule per row of the batch, as FlexAttention's `mask_mod` (a plain function)."""

        def mask_mod(b, h, i, j):
            i_rel, j_rel, length, same = self.relative(b, i, j)
            ok = same & self.spec.visible(i_rel, j_rel, length)
            if self.key_ok is not None:
                ok = ok & self.key_ok[b, j]
            return ok

        return mask_mod


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


def _block_mask(spec: WindowSpec, n: int, mask_mod, full_blocks: bool, device):
    """The `BlockMask` of the window rule, built from each 128-row block's key range (`WindowSpec.key_range`).

    `create_block_mask` evaluates `mask_mod` at all n * n pairs (eagerly that allocates n * n, 128 GiB at
    n = 131072); here the cost is FlexAttention's own `(n / 128)^2` block layout. A tile is *full*
    (no `mask_mod` call in the kernel) when every one of its pairs is visible; with `full_blocks=False`
    (key padding masks) every tile the window touches is partial, so `mask_mod` sees them all.
    """
    from torch.nn.attention.flex_attention import BlockMask

    blocks = -(-n // BLOCK)
    first = torch.arange(blocks, device=device) * BLOCK
    last = (first + BLOCK - 1).clamp(max=n - 1)
    lo_first, hi_first = spec.key_range(first, n)
    lo_last, hi_last = spec.key_range(last, n)
    touched_lo, touched_hi = lo_first // BLOCK, hi_last // BLOCK  # tiles any row of the block touches
    empty = hi_last < lo_first
    touched_hi = torch.where(empty, touched_lo - 1, touched_hi)
    if full_blocks:  # tiles inside every row's range: start >= lo_last, end <= hi_first
        full_lo = -(-lo_last // BLOCK)
        full_hi = torch.div(hi_first + 1, BLOCK, rounding_mode="floor") - 1
        # as create_block_mask counts it: the rows past n of a ragged last block are masked, so none of its tiles is full
        full_count = torch.where(last - first == BLOCK - 1, (full_hi - full_lo + 1).clamp(min=0), 0)
    else:
        full_lo, full_count = touched_hi + 1, torch.zeros_like(touched_lo)
    full_lo = torch.where(full_count > 0, full_lo, touched_hi + 1)
    count = (touched_hi - touched_lo + 1).clamp(min=0) - full_count
    p = torch.arange(blocks, device=device)[None]
    before = (full_lo - touched_lo)[:, None]  # partial tiles before the full ones
    partial = torch.where(p < before, touched_lo[:, None] + p, touched_lo[:, None] + p + full_count[:, None])
    partial = torch.where(p < count[:, None], partial, 0).to(torch.int32)
    full = torch.where(p < full_count[:, None], full_lo[:, None] + p, 0).to(torch.int32)
    extra = {"seq_lengths": (n, n)} if "seq_lengths" in inspect.signature(BlockMask.from_kv_blocks).parameters else {}
    return BlockMask.from_kv_blocks(
        count.to(torch.int32)[None, None], partial[None, None],
        full_count.to(torch.int32)[None, None], full[None, None],
        BLOCK_SIZE=BLOCK, mask_mod=mask_mod, **extra,
    )


@functools.lru_cache(maxsize=32)
def _cached_block_mask(spec: WindowSpec, n: int, device: str):
    return _block_mask(spec, n, _window_mod(spec, n, None, 1), True, device)


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    # Shapes left to dynamo's automatic dynamic: a static compile per sequence length (and grad mode)
    # reaches the recompile limit (8) after a few lengths, and dynamo then runs flex_attention eagerly,
    # which materialises the n x n scores (32 TiB at n = 2**20).
    return torch.compile(flex_attention)


def flex_attention_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall) -> torch.Tensor:
    """Same contract as `reference_attention`: `q (P, n_q, d)`, `k, v (P_kv, n, d)` -> `(P, n_q, d_v)`."""
    from torch.nn.attention.flex_attention import create_block_mask

    call.require("flex", FEATURES)
    if not q.is_cuda and torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (q, k, v, call.sinks, call.attn_bias)):
        raise ValueError("backend 'flex' computes no gradients on CPU (FlexAttention has no CPU backward); use "
                         "backend='auto' (or 'fused'), or call it under torch.no_grad()")
    spec, scale = call.spec, call.scale
    P, n_q, _ = q.shape
    n = k.shape[1]
    plain = call.documents is None and not spec.sink_tokens and call.query_offset == 0
    if plain:  # one row of FlexAttention's batch, the packed rows as its heads
        layout, B = None, 1
        if call.mask is None:
            block_mask = _cached_block_mask(spec, n, str(q.device))
        else:
            block_mask = _block_mask(spec, n, _window_mod(spec, n, call.mask, P // call.mask.shape[0]), False, q.device)
    else:  # the rows of the masks and documents as FlexAttention's batch (attention-gym's document mask)
        layout = _Layout(call, P, n, q.device)
        B = layout.B
        block_mask = create_block_mask(layout.mask_mod(), B, None, n_q, n, device=q.device)
    score_mod = _score_mod(spec, call, layout, P // B)

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
