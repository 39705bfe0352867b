"""Attention of one new query over its cached keys: the op of a decode step.

Both decode paths use it: `LocalAttention.decode` (the reference decode, keys rotated per step) and
`generation.decoder.step` (the fast one, keys cached rotated). The query sits at absolute `position`;
the keys are those of positions `position - m + 1 .. position`, its own last.
"""

from __future__ import annotations

import torch

from .dtypes import accumulation_dtype
from .spec import SELF_ATTN_SCORE, WindowSpec


def score_row(spec: WindowSpec, position: int, m: int, attn_bias: torch.Tensor | None, device,
              dtype: torch.dtype) -> torch.Tensor:
    """Additive scores `(heads or 1, 1, m)`: the position bias `attn_bias` `(heads, w, span * w)` (or 0)
    where the window rule lets the query see the key, -inf where not."""
    w = spec.window_size
    key_pos = torch.arange(position - m + 1, position + 1, device=device)
    visible = spec.visible(torch.tensor(position, device=device), key_pos, position + 1)
    if attn_bias is None:
        row = torch.zeros(1, 1, m, device=device, dtype=dtype)
    else:
        first_key = (position // w - spec.look_backward) * w
        cols = (key_pos - first_key).clamp(0, attn_bias.shape[-1] - 1)
        row = attn_bias[:, position % w, cols].to(dtype)[:, None]
    return row.masked_fill(~visible, float("-inf"))


def attend_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, row: torch.Tensor, *, scale: float,
               shared_qk: bool) -> torch.Tensor:
    """`q` `(..., h, 1, d)` over `k, v` `(..., h_kv, m, d)` (`h_kv | h`: grouped-query attention, query
    head `i` on kv head `i // (h // h_kv)`) with the additive `row` `(heads or 1, 1, m)` of `score_row`,
    in `accumulation_dtype`; under `shared_qk` the query's own key (the last) gets the self score."""
    compute = accumulation_dtype(q.dtype)
    heads, kv_heads = q.shape[-3], k.shape[-3]
    grouped = heads != kv_heads
    if grouped:  # the queries sharing a kv head become rows of one product: (..., h_kv, g, d)
        q = q.reshape(*q.shape[:-3], kv_heads, heads // kv_heads, q.shape[-1])
        if row.shape[0] > 1:
            row = row.repeat(heads // row.shape[0], 1, 1).reshape(kv_heads, heads // kv_heads, row.shape[-1])
    sim = (q.to(compute) * scale) @ k.to(compute).transpose(-1, -2) + row
    if shared_qk:
        sim[..., -1] = SELF_ATTN_SCORE
    out = (sim.softmax(dim=-1) @ v.to(compute)).to(q.dtype)
    return out.reshape(*out.shape[:-3], heads, 1, out.shape[-1]) if grouped else out
