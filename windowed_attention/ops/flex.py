"""Local attention on FlexAttention (backend "flex", CUDA): a block mask skips every empty tile.

The window rule becomes a `mask_mod` (block mask cached per shape when no key padding mask is given),
`attn_bias` and the shared-qk rule become a `score_mod`. Compiled once per process on CUDA; eager
(slow, for tests only) elsewhere. No `key_scale` (xpos) and no dropout.
"""

from __future__ import annotations

import functools

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


@functools.lru_cache(maxsize=32)
def _cached_block_mask(spec: WindowSpec, n: int, device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(_window_mod(spec, n, None, 1), None, None, n, n, device=device)


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


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
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if key_scale is not None or dropout_p > 0.0:
        raise ValueError("backend 'flex' supports neither xpos (key_scale) nor dropout; use backend='auto'")
    P, n, _ = q.shape
    w, lb = spec.window_size, spec.look_backward
    if mask is None:
        block_mask = _cached_block_mask(spec, n, str(q.device))
    else:
        block_mask = create_block_mask(_window_mod(spec, n, mask, P // mask.shape[0]), None, P, n, n, device=q.device)

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
    # grouped-query attention (fewer kv rows): flex maps query head h to kv head h // (P // P_kv)
    out = attend(q[None], k[None], v[None], score_mod=score_mod, block_mask=block_mask, scale=scale,
                 enable_gqa=k.shape[0] != P)
    return out[0]
