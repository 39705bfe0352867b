"""Local attention on FlexAttention (backend "flex", CUDA): a block mask skips every empty tile.

The window rule becomes a `mask_mod` (block mask cached per shape when no key padding mask is given),
`attn_bias` and the shared-qk rule become a `score_mod`. Compiled once per process on CUDA; eager
(slow, for tests only) elsewhere. No `key_scale` (xpos) and no dropout.
"""

from __future__ import annotations

import functools
import inspect

import torch

from .spec import SELF_ATTN_SCORE, WindowSpec


def available() -> bool:
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def supports(device_type: str, dtype: torch.dtype, *, key_scale: bool, dropout: bool) -> bool:
    """Whether this backend computes these options on this device (a pure function of its inputs)."""
    return device_type == "cuda" and dtype in (torch.float32, torch.bfloat16, torch.float16) and not (key_scale or dropout)


def _window_mod(spec: WindowSpec, n: int, key_ok: torch.Tensor | None, per_row: int):
    w, lb, lf = spec.window_size, spec.look_backward, spec.look_forward

    def mask_mod(b, h, i, j):
        bi, bj = i // w, j // w
        ok = (bj >= bi - lb) & (bj <= bi + lf) & (j < n) & (i < n)
        if spec.causal:
            ok = ok & (j <= i)
            if spec.exact_windowsize:
                ok = ok & (i - j <= w * lb)
        elif spec.exact_windowsize:
            ok = ok & (j >= i - w * lb) & (j <= i + w * lf)
        if key_ok is not None:
            ok = ok & key_ok[h // per_row, j]
        return ok

    return mask_mod


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


def flex_attention_backend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    spec: WindowSpec,
    *,
    scale: float,
    mask: torch.Tensor | None = None,
    attn_bias: torch.Tensor | None = None,
    mask_self: bool = False,
    key_scale: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Same contract as `reference_attention`: `q, k (P, n, d)`, `v (P, n, d_v)` -> `(P, n, d_v)`."""
    from torch.nn.attention.flex_attention import flex_attention

    if key_scale is not None or dropout_p > 0.0:
        raise ValueError("backend 'flex' supports neither xpos (key_scale) nor dropout; use backend='auto'")
    P, n, _ = q.shape
    w, lb = spec.window_size, spec.look_backward
    if mask is None:
        block_mask = _cached_block_mask(spec, n, str(q.device))
    else:
        block_mask = _block_mask(spec, n, _window_mod(spec, n, mask, P // mask.shape[0]), False, q.device)

    score_mod = None
    if attn_bias is not None or mask_self:
        heads = 1 if attn_bias is None else attn_bias.shape[0]
        span_w = spec.span * w

        def score_mod(score, b, h, i, j):
            if attn_bias is not None:
                # Masked-out (i, j) are evaluated too: clamp so the gather stays in bounds.
                rel = (j - (i // w - lb) * w).clamp(0, span_w - 1)
                score = score + attn_bias[h % heads, i % w, rel].to(score.dtype)
            if mask_self:
                score = torch.where(i == j, SELF_ATTN_SCORE, score)
            return score

    attend = _compiled_flex() if q.is_cuda else flex_attention
    # the kernels read rows as contiguous vectors: other layouts are copied
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    # grouped-query attention (fewer kv rows): flex maps query head h to kv head h // (P // P_kv)
    out = attend(q[None], k[None], v[None], score_mod=score_mod, block_mask=block_mask, scale=scale,
                 enable_gqa=k.shape[0] != P)
    return out[0]
