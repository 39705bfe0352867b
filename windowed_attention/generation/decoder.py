"""The fast decode step: one token through a `LocalTransformer` with per-generation constants hoisted.

`model(token, cache=...)` (the reference decode) recomputes, for every layer and every token, rotary
tables for all cached keys, rotates all of them, rebuilds the visibility mask and (with a dynamic
position bias) runs the bias MLP. None of that changes from token to token, so here:

- keys are cached already rotated to their absolute position (rotary scores depend only on `i - j`, so
  rotating q by `i` and k by `j` gives the same scores; the full forward does exactly this), so each
  step rotates one query and one key, with one `(1, d)` table shared by every layer;
- the visibility mask plus the position bias, as one additive `(heads, m)` row, depends only on
  `position % w` once the cache is full: built once per residue and reused;
- the dynamic position bias table is computed once per generation.

Used when the model has no xpos (whose window-relative factors need the reference path); tested
against the reference decode and against uncached generation (tests/test_generation.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from einops import rearrange

from ..kv_cache import KVCache
from ..ops.decode import attend_one, score_row
from ..ops.dtypes import accumulation_dtype
from ..positional import rotate
from ..transformer import LocalTransformer


def supported(model: LocalTransformer) -> bool:
    """Whether the fast step reproduces this model's decode: token models of one residual stream, without
    xpos (the others decode through the model's own cached forward)."""
    return (
        model.token_emb is not None and model.num_residual_streams == 1 and not model.has_global_layers
        and not any(attn.branch.attn_fn.use_xpos for attn, _ in model.layers)
    )


@dataclass
class DecodeState:
    """Per-layer caches of rotated keys and raw values, the next position, and hoisted constants."""

    caches: list[KVCache]
    position: int
    attn_bias: torch.Tensor | None
    row_cache: dict = field(default_factory=dict)

    @property
    def length(self) -> int:
        return self.position


def _attention(model: LocalTransformer):
    return model.layers[0][0].branch.attn_fn


def _rotary(model: LocalTransformer, positions: torch.Tensor):
    rel_pos = _attention(model).rel_pos
    if rel_pos is None:
        return None
    return rel_pos.rotation(positions)


def _prepare_keys(model: LocalTransformer, k: torch.Tensor, table) -> torch.Tensor:
    """Raw keys `(b, h, n, d)` -> what the fast cache holds: normalised (shared_qk), rotated by `table`
    (the `(cos, sin)` of their positions, or None without rotary)."""
    if _attention(model).shared_qk:
        k = F.normalize(k, dim=-1)
    return k if table is None else rotate(k, *table)


def from_reference(model: LocalTransformer, caches: list[KVCache]) -> DecodeState:
    """Turn the raw-key caches of a prefill (`model(x, return_cache=True)`) into a `DecodeState`."""
    length = caches[0].length
    converted = []
    for cache in caches:
        k, v = cache.k, cache.v
        positions = torch.arange(length - k.shape[-2], length, device=k.device)
        keys = _prepare_keys(model, k, _rotary(model, positions))
        converted.append(KVCache.from_prefill(keys, v, cache.capacity, length=length))
    return DecodeState(converted, length, model._attn_bias())


def _score_row(model: LocalTransformer, state: DecodeState, m: int, device, dtype) -> torch.Tensor:
    """Additive row `(heads or 1, 1, m)`: the position bias where visible, -inf where not."""
    spec, position = _attention(model).spec, state.position
    full = position - m + 1 >= 0 and m == state.caches[0].capacity + 1
    key = (position % spec.window_size, m) if full else None
    if key is not None and key in state.row_cache:
        return state.row_cache[key]
    row = score_row(spec, position, m, state.attn_bias, device, dtype)
    if key is not None:
        state.row_cache[key] = row
    return row


@torch.no_grad()
def step(model: LocalTransformer, token: torch.Tensor, state: DecodeState) -> tuple[torch.Tensor, DecodeState]:
    """Logits `(b, vocab)` of `token` `(b, 1)` at `state.position`, and the state one position later."""
    position = state.position
    device = token.device
    h = model.token_emb(token)
    if model.pos_emb is not None:
        h = h + model.pos_emb.weight[position]
    table = _rotary(model, torch.tensor([position], device=device))
    row = None
    new_caches = []
    for (attn_block, ff_block), cache in zip(model.layers, state.caches):
        attn, ff = attn_block.branch, ff_block.branch
        attn_fn = attn.attn_fn
        x = attn.norm(h) if attn.norm is not None else h
        q, k, v = attn._project(x)
        if attn.qk_rmsnorm:
            q = F.normalize(q, dim=-1) * attn.q_scale
            k = F.normalize(k, dim=-1) * attn.k_scale
        if table is not None:
            q = rotate(q, *table)
        cache, keys, values = cache.append(_prepare_keys(model, k, table), v)
        new_caches.append(cache)

        compute = accumulation_dtype(q.dtype)
        if row is None or row.shape[-1] != keys.shape[-2]:
            row = _score_row(model, state, keys.shape[-2], device, compute)
        scale = q.shape[-1] ** -0.5 if attn_fn.scale is None else attn_fn.scale
        out = attend_one(q, keys, values, row, scale=scale, shared_qk=attn_fn.shared_qk)

        if attn.to_v_gate is not None:
            out = out * rearrange(attn.to_v_gate(x), "b n h -> b h n 1").sigmoid()
        h = h + attn.to_out(rearrange(out, "b h n d -> b n (h d)"))
        h = h + ff(h)
    logits = model.to_logits(h)[:, -1]
    return logits, DecodeState(new_caches, position + 1, state.attn_bias, state.row_cache)
