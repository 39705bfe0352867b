"""Exact sliding windows on the `flash_attn` package (backend "flash", CUDA, fp16/bf16).

Exact windows (`exact_windowsize=True`: `i - w*look_backward <= j <= i + w*look_forward`, the window-block
bound following from it) and token windows are flash-attn's `window_size=(left, right)` (the rule's
`bounds`). Only those patterns, with softcap, dropout and shorter queries (`FEATURES`), and only the head
dims flash-attn 2 takes: values as wide as queries, at most 256.
"""

from __future__ import annotations

import importlib.util

import torch

from .call import AttentionCall


def available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


MAX_HEAD_DIM = 256
DTYPES = (torch.float16, torch.bfloat16)
# What flash-attn computes (`ops.call.ALL_FEATURES`): sliding windows `(left, right)` (exact and token
# windows; not window blocks), softcap, dropout and bottom-right aligned shorter queries.
FEATURES = frozenset({"token_window", "softcap", "short_queries", "dropout"})


def takes_head_dims(head_dim: int, value_dim: int) -> bool:
    """flash-attn 2 takes values as wide as queries, at most 256."""
    return head_dim == value_dim <= MAX_HEAD_DIM


def flash_attn_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall) -> torch.Tensor:
    """Same contract as `reference_attention` for sliding windows: `(P, n_q, d)` -> `(P, n_q, d_v)`."""
    from flash_attn import flash_attn_func

    call.require("flash", FEATURES)
    spec = call.spec
    left, right = spec.flash_bounds
    # flash-attn wants (batch, seqlen, heads, dim): the packed P rows become heads of one batch (with
    # fewer kv rows, flash-attn's own grouped-query rule maps query head p to kv head p // (P // P_kv)).
    # flash-attn needs the last dim contiguous: other layouts are copied. Shorter queries are the last
    # positions (flash-attn aligns them bottom-right, as we do).
    q4, k4, v4 = ((t if t.stride(-1) == 1 else t.contiguous()).transpose(0, 1)[None] for t in (q, k, v))
    softcap = {} if spec.softcap is None else {"softcap": spec.softcap}  # flash-attn 2.6+ takes it
    out = flash_attn_func(q4, k4, v4, dropout_p=call.dropout_p, softmax_scale=call.scale, causal=spec.causal,
                          window_size=(left, right), **softcap)
    return out[0].transpose(0, 1)
