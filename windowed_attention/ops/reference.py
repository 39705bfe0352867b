"""The blocked reference implementation: the executable specification of the op.

Readable first, fast never. Every other backend is tested against this one (and this one against a dense
O(n^2) oracle written independently in the tests).

Shapes: `q` is `(P, n, d)`, `k, v` are `(P_kv, n, d)` (leading dims already packed; `P_kv | P`: with
grouped-query attention query row `p` uses key row `p // (P // P_kv)`), `mask` is `(B, n)` bool with `B | P`,
`attn_bias` is `(H, w, span * w)` with `H | P`, `key_scale` is `(span, d)` or None.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange, repeat

from .dtypes import accumulation_dtype, autocast_inputs, without_autocast
from .spec import SELF_ATTN_SCORE, WindowSpec


def look_around(x: torch.Tensor, backward: int, forward: int, pad_value=0) -> torch.Tensor:
    """`(P, windows, w, ...) -> (P, windows, (backward + 1 + forward) * w, ...)`: each window's neighbours."""
    windows = x.shape[1]
    pad = [0, 0] * (x.ndim - 2) + [backward, forward]
    padded = F.pad(x, pad, value=pad_value)
    neighbours = [padded[:, offset : offset + windows] for offset in range(backward + forward + 1)]
    return torch.cat(neighbours, dim=2)


def block_positions(spec: WindowSpec, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Query positions `(windows, w)` and key positions `(windows, span * w)` of the blocked layout.

    Key slots that fall before the sequence start get negative positions (never visible).
    """
    w = spec.window_size
    windows = -(-n // w)
    q_pos = torch.arange(windows * w, device=device).view(windows, w)
    first_key = (torch.arange(windows, device=device) - spec.look_backward) * w
    k_pos = first_key[:, None] + torch.arange(spec.span * w, device=device)
    return q_pos, k_pos


def repeat_kv(t: torch.Tensor, packed: int) -> torch.Tensor:
    """Key or value rows `(P_kv, n, d)` repeated for the `packed` query rows that use them: `(P, n, d)`."""
    return t if t.shape[0] == packed else repeat(t, "p n d -> (p g) n d", g=packed // t.shape[0])


def reference_attention(
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
    """Local attention over windows, materialising the `(P, windows, w, span * w)` scores.

    Under autocast, float32 inputs compute in the autocast dtype, as in every backend."""
    q, k, v = autocast_inputs(q, k, v)
    with without_autocast(q.device.type):
        return _blocked(q, k, v, spec, scale, mask, attn_bias, mask_self, key_scale, dropout_p)


def _blocked(q, k, v, spec: WindowSpec, scale, mask, attn_bias, mask_self, key_scale, dropout_p) -> torch.Tensor:
    P, n, d = q.shape
    k, v = repeat_kv(k, P), repeat_kv(v, P)
    w, out_dtype = spec.window_size, q.dtype
    compute_dtype = accumulation_dtype(q.dtype)
    q, k, v = (t.to(compute_dtype) for t in (q, k, v))

    windows = -(-n // w)
    pad = windows * w - n
    q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))

    bq = rearrange(q, "p (nw w) d -> p nw w d", w=w)
    bk = look_around(rearrange(k, "p (nw w) d -> p nw w d", w=w), spec.look_backward, spec.look_forward)
    bv = look_around(rearrange(v, "p (nw w) d -> p nw w d", w=w), spec.look_backward, spec.look_forward)
    if key_scale is not None:
        bk = bk * repeat(key_scale.to(compute_dtype), "s d -> (s w) d", w=w)

    sim = torch.einsum("pnid,pnjd->pnij", bq * scale, bk)

    if attn_bias is not None:
        heads = attn_bias.shape[0]
        sim = sim + repeat(attn_bias.to(compute_dtype), "h i j -> (b h) 1 i j", b=P // heads)

    q_pos, k_pos = block_positions(spec, n, q.device)
    q_pos, k_pos = q_pos[:, :, None], k_pos[:, None, :]
    visible = spec.visible(q_pos, k_pos, n)[None]  # (1, nw, w, span*w)

    if mask is not None:
        padded = F.pad(mask, (0, pad), value=False)
        key_ok = look_around(rearrange(padded, "b (nw w) -> b nw w", w=w), spec.look_backward, spec.look_forward, False)
        key_ok = repeat(key_ok, "b nw j -> (b h) nw 1 j", h=P // mask.shape[0])
        visible = visible & key_ok

    if mask_self:
        sim = sim.masked_fill(q_pos == k_pos, SELF_ATTN_SCORE)

    sim = sim.masked_fill(~visible, float("-inf"))
    # A query that sees no key outputs zeros: its row would be all -inf (NaN softmax, NaN gradients), so
    # it is replaced by zeros before the softmax and its weights are zeroed after. A row that `attn_bias`
    # sets to -inf at every visible key is such a row too (a NaN score still propagates as NaN).
    sees_any = (sim != float("-inf")).any(dim=-1, keepdim=True)
    attn = torch.softmax(torch.where(sees_any, sim, 0.0), dim=-1) * sees_any
    if dropout_p > 0.0:
        attn = F.dropout(attn, p=dropout_p)

    out = torch.einsum("pnij,pnjd->pnid", attn, bv)
    out = rearrange(out, "p nw w d -> p (nw w) d")[:, :n]
    return out.to(out_dtype)
