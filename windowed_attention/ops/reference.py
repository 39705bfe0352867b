"""The blocked reference implementation: the executable specification of the op.

Readable first, fast never. Every other backend is tested against this one (and this one against a dense
O(n^2) oracle written independently in the tests).

Shapes: `q` is `(P, n_q, d)`, `k, v` are `(P_kv, n, d)` (leading dims already packed; `P_kv | P`: with
grouped-query attention query row `p` uses key row `p // (P // P_kv)`); the per-call inputs come in an
`AttentionCall` (`ops.call`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange, repeat

from .call import ALL_FEATURES, AttentionCall, segments
from .dtypes import accumulation_dtype, autocast_inputs, without_autocast
from .spec import SELF_ATTN_SCORE, WindowSpec
from .validation import FLOAT_DTYPES


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


FEATURES = ALL_FEATURES  # the specification computes every option
DTYPES = FLOAT_DTYPES


def takes_head_dims(head_dim: int, value_dim: int) -> bool:
    return True


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall) -> torch.Tensor:
    """Local attention over windows, materialising the `(P, windows, w, span * w)` scores (and the sink-token
    columns); `q (P, n_q, d)`, `k, v (P_kv, n, d)` -> `(P, n_q, d_v)` (`ops.call`).

    Documents are computed one at a time, each as a sequence of its own (windows, `attn_bias` columns and
    sink tokens count from its start). Under autocast, float32 inputs compute in the autocast dtype, as in
    every backend."""
    q, k, v = autocast_inputs(q, k, v)
    with without_autocast(q.device.type):
        P = q.shape[0]
        if call.query_offset:  # the queries are the last n_q positions: computed as zero rows before them
            q = F.pad(q, (0, 0, call.query_offset, 0))
        k, v = repeat_kv(k, P), repeat_kv(v, P)
        mask = None if call.mask is None else repeat(call.mask, "b n -> (b g) n", g=P // call.mask.shape[0])
        sinks = None if call.sinks is None else call.sinks.repeat(P // call.sinks.shape[0])
        bias = call.attn_bias
        if call.documents is None:
            out = _blocked(q, k, v, call, mask, bias, sinks)
        else:
            if bias is not None:  # one bias per row, so that rows can be taken apart
                bias = bias.repeat(P // bias.shape[0], 1, 1)
            documents = call.documents
            per = P // documents.shape[0]
            pieces = []
            for b in range(documents.shape[0]):
                rows = slice(b * per, (b + 1) * per)
                pick = lambda t: None if t is None else t[rows]  # noqa: E731
                parts = [
                    _blocked(q[rows, s:e], k[rows, s:e], v[rows, s:e], call, None if mask is None else mask[rows, s:e],
                             pick(bias), pick(sinks))
                    for s, e in segments(documents[b])
                ]
                pieces.append(torch.cat(parts, dim=1))
            out = torch.cat(pieces, dim=0)
        return out[:, call.query_offset:]


def _blocked(q, k, v, call: AttentionCall, mask, attn_bias, sinks) -> torch.Tensor:
    """One sequence (or document) of `n` positions: `q, k, v (P, n, d)` (kv already repeated), `mask (P, n)`,
    `sinks (P,)` per row or None."""
    spec, scale = call.spec, call.scale
    P, n, d = q.shape
    w, out_dtype = spec.window_size, q.dtype
    compute_dtype = accumulation_dtype(q.dtype)
    q, k, v = (t.to(compute_dtype) for t in (q, k, v))

    windows = -(-n // w)
    pad = windows * w - n
    qp, kp, vp = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))

    bq = rearrange(qp, "p (nw w) d -> p nw w d", w=w)
    bk = look_around(rearrange(kp, "p (nw w) d -> p nw w d", w=w), spec.look_backward, spec.look_forward)
    bv = look_around(rearrange(vp, "p (nw w) d -> p nw w d", w=w), spec.look_backward, spec.look_forward)
    if call.key_scale is not None:
        bk = bk * repeat(call.key_scale.to(compute_dtype), "s d -> (s w) d", w=w)

    sim = spec.softcapped(torch.einsum("pnid,pnjd->pnij", bq * scale, bk))

    if attn_bias is not None:
        heads = attn_bias.shape[0]
        sim = sim + repeat(attn_bias.to(compute_dtype), "h i j -> (b h) 1 i j", b=P // heads)

    q_pos, k_pos = block_positions(spec, n, q.device)
    q_pos, k_pos = q_pos[:, :, None], k_pos[:, None, :]
    visible = spec.window_visible(q_pos, k_pos, n)[None]  # (1, nw, w, span*w)

    if mask is not None:
        padded = F.pad(mask, (0, pad), value=False)
        key_ok = look_around(rearrange(padded, "p (nw w) -> p nw w", w=w), spec.look_backward, spec.look_forward, False)
        visible = visible & key_ok[:, :, None, :]

    if call.mask_self:
        sim = sim.masked_fill(q_pos == k_pos, SELF_ATTN_SCORE)

    # sink tokens: the first keys as columns of their own, for the queries that see them only as sinks
    # (a sink key inside the window is seen there, with its bias, and not twice)
    sinks_n = spec.sink_count(n)
    sink_pos = torch.arange(sinks_n, device=q.device)
    sink_visible = (spec.visible(q_pos, sink_pos, n) & ~spec.window_visible(q_pos, sink_pos, n))[None]
    if mask is not None:
        sink_visible = sink_visible & mask[:, None, None, :sinks_n]
    sink_sim = spec.softcapped(torch.einsum("pnid,pjd->pnij", bq * scale, k[:, :sinks_n]))
    sim = torch.cat([sim, sink_sim], dim=-1)
    visible = torch.cat([visible.expand(P, -1, -1, -1), sink_visible.expand(P, -1, -1, -1)], dim=-1)
    values = torch.cat([bv, v[:, None, :sinks_n].expand(-1, windows, -1, -1)], dim=2)

    sim = sim.masked_fill(~visible, float("-inf"))
    # A query that sees no key outputs zeros: its row would be all -inf (NaN softmax, NaN gradients), so
    # it is replaced by zeros before the softmax and its weights are zeroed after. A row that `attn_bias`
    # sets to -inf at every visible key is such a row too (a NaN score still propagates as NaN).
    sees_any = (sim != float("-inf")).any(dim=-1, keepdim=True)
    if sinks is None:
        attn = torch.softmax(torch.where(sees_any, sim, 0.0), dim=-1) * sees_any
    else:  # the learned sink joins the denominator as one more logit, with no value
        sink = sinks.to(compute_dtype)[:, None, None, None].expand(P, windows, w, 1)
        attn = torch.softmax(torch.cat([torch.where(sees_any, sim, 0.0), sink], dim=-1), dim=-1)[..., :-1] * sees_any
    if call.dropout_p > 0.0:
        attn = F.dropout(attn, p=call.dropout_p)

    out = torch.einsum("pnij,pnjd->pnid", attn, values)
    out = rearrange(out, "p nw w d -> p (nw w) d")[:, :n]
    return out.to(out_dtype)
