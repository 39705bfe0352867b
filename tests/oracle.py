"""A dense O(n^2) oracle for local attention, written from docs/semantics.md alone.

It deliberately shares no code (and no structure) with `windowed_attention`: no blocks, no look-around,
no padding. Every query is compared with every key of the sequence through an `(n, n)` visibility
matrix built from the definition. Everything is computed in float64 and stays differentiable, so
gradients can be compared too. Only meant for small `n`.

Positional encodings (rotary, xpos) are applied densely with absolute positions; the attention result
then depends on positions only through `i - j`, which is what the modules must reproduce.
"""

from __future__ import annotations

import torch

SELF_SCORE = -5e4
ROTARY_THETA = 10000.0


def visibility(
    n: int,
    window_size,
    *,
    causal: bool = False,
    look_backward: int = 1,
    look_forward: int | None = None,
    exact_windowsize: bool = False,
    device=None,
) -> torch.Tensor:
    """`(n, n)` bool: entry `[i, j]` is True when query `i` may see key `j` through its window (ignoring the key
    mask and sink tokens). A `(left, right)` window: `i - left <= j <= i + right`, -1 unbounded."""
    i = torch.arange(n, device=device)[:, None]
    j = torch.arange(n, device=device)[None, :]
    if isinstance(window_size, tuple):
        left, right = window_size
        vis = torch.ones(n, n, dtype=torch.bool, device=device)
        if left >= 0:
            vis &= i - j <= left
        if right >= 0:
            vis &= j - i <= right
        if causal:
            vis &= j <= i
        return vis
    if look_forward is None:
        look_forward = 0 if causal else 1
    w = window_size
    block_i, block_j = i // w, j // w
    vis = (block_j >= block_i - look_backward) & (block_j <= block_i + look_forward)
    if causal:
        vis = vis & (j <= i)
        if exact_windowsize:
            vis = vis & (i - j <= w * look_backward)
    elif exact_windowsize:
        vis = vis & (i - w * look_backward <= j) & (j <= i + w * look_forward)
    return vis


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """`[x1, x2] -> [-x2, x1]` over the halves of the last dim (local-attention's convention)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotary_angles(positions: torch.Tensor, dim: int, theta: float = ROTARY_THETA) -> torch.Tensor:
    """`(n,) -> (n, dim)` float64 angles `cat(t * inv_freq, t * inv_freq)`."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=positions.device) / dim))
    freqs = positions.to(torch.float64)[:, None] * inv_freq[None, :]
    return torch.cat((freqs, freqs), dim=-1)


def apply_rotary(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rotate `(..., n, d)` (float64) by absolute `positions` `(n,)`."""
    angles = rotary_angles(positions, x.shape[-1])
    return x * angles.cos() + rotate_half(x) * angles.sin()


def xpos_scale(dim: int) -> torch.Tensor:
    """`(dim,)` float64 per-feature xpos base, `(arange(0, d, 2) + 0.4 d) / (1.4 d)` twice."""
    half = (torch.arange(0, dim, 2, dtype=torch.float64) + 0.4 * dim) / (1.4 * dim)
    return torch.cat((half, half))


def apply_xpos(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, scale_base: float):
    """q_i * s**(i / scale_base), k_j * s**(-j / scale_base): the q.k factor is s**((i - j) / scale_base)."""
    s = xpos_scale(q.shape[-1]).to(q.device)
    power = positions.to(torch.float64)[:, None] / scale_base
    return q * s ** power, k * s ** (-power)


def oracle_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    window_size: int,
    causal: bool = False,
    look_backward: int = 1,
    look_forward: int | None = None,
    exact_windowsize: bool = False,
    mask: torch.Tensor | None = None,
    attn_bias: torch.Tensor | None = None,
    scale: float | None = None,
    shared_qk: bool = False,
    rotary: bool = False,
    xpos_scale_base: float | None = None,
) -> torch.Tensor:
    """Dense local attention. `q, k`: `(..., n, d)`, `v`: `(..., n, d_v)` -> float64 `(..., n, d_v)`.

    `rotary` rotates q and k with their absolute positions (after the shared-qk normalisation of k);
    `xpos_scale_base` additionally applies xpos (requires `rotary`).
    """
    if look_forward is None:
        look_forward = 0 if causal else 1
    lead, n, d = q.shape[:-2], q.shape[-2], q.shape[-1]
    dv = v.shape[-1]
    q, k, v = (t.to(torch.float64).reshape(-1, n, t.shape[-1]) for t in (q, k, v))
    P = q.shape[0]
    w = window_size
    if scale is None:
        scale = d ** -0.5

    if shared_qk:
        k = k / k.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    device = q.device
    positions = torch.arange(n, device=device)
    if rotary:
        q, k = apply_rotary(q, positions), apply_rotary(k, positions)
        if xpos_scale_base is not None:
            q, k = apply_xpos(q, k, positions, xpos_scale_base)
    elif xpos_scale_base is not None:
        raise ValueError("xpos needs rotary")

    scores = (q @ k.transpose(-1, -2)) * scale  # (P, n, n)

    vis = visibility(n, w, causal=causal, look_backward=look_backward, look_forward=look_forward,
                     exact_windowsize=exact_windowsize, device=device)
    vis = vis[None].expand(P, n, n)

    if attn_bias is not None:
        heads = attn_bias.shape[0]
        i = torch.arange(n, device=device)[:, None].expand(n, n)
        j = torch.arange(n, device=device)[None, :].expand(n, n)
        col = j - (i // w - look_backward) * w
        col = col.clamp(0, attn_bias.shape[-1] - 1)  # only read where visible (then already in range)
        bias64 = attn_bias.to(torch.float64)
        rows = []
        for p in range(P):
            rows.append(bias64[p % heads][i % w, col])
        scores = scores + torch.stack(rows)

    if shared_qk:
        eye = torch.eye(n, dtype=torch.bool, device=device)[None]
        scores = torch.where(eye, torch.full_like(scores, SELF_SCORE), scores)

    if mask is not None:
        b = mask.shape[0]
        per = P // b
        key_ok = torch.stack([mask[p // per] for p in range(P)]).to(device=device, dtype=torch.bool)  # (P, n)
        vis = vis & key_ok[:, None, :]

    # softmax over visible keys only, written out: rows that see nothing get all-zero weights
    neg_inf = torch.tensor(float("-inf"), dtype=torch.float64, device=device)
    row_max = torch.where(vis, scores, neg_inf).amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max)).detach()
    e = torch.where(vis, torch.exp(torch.where(vis, scores - row_max, torch.zeros_like(scores))),
                    torch.zeros_like(scores))
    denom = e.sum(dim=-1, keepdim=True)
    denom = torch.where(denom > 0, denom, torch.ones_like(denom))
    weights = e / denom

    out = weights @ v
    return out.reshape(*lead, n, dv)



def oracle_modern(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    window_size,
    causal: bool = False,
    look_backward: int = 1,
    look_forward: int | None = None,
    exact_windowsize: bool = False,
    mask: torch.Tensor | None = None,
    attn_bias: torch.Tensor | None = None,
    scale: float | None = None,
    shared_qk: bool = False,
    documents: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
    sink_tokens: int = 0,
    softcap: float | None = None,
    seen: bool = False,
) -> torch.Tensor:
    """Dense local attention with the modern options, one row and one document at a time, in float64.

    `seen=True` returns instead which keys each query sees `(..., n_q, n)` bool (under `shared_qk` its own
    key only when it sees no other).

    `q (..., n_q, d)` are the last `n_q` of the `n` positions of `k, v (..., h_kv, n, d)` (grouped heads:
    query head `i` uses kv head `i // (h // h_kv)`). Inside a document positions count from its start: query
    `i` sees key `j` of its own document when the window shows it, or when `j` is one of the document's
    first `sink_tokens` (and `j <= i` when causal), and the key mask keeps it. Scores: `scale * q.k`, then
    `softcap * tanh(. / softcap)`, then `attn_bias` (only for keys the window shows), then the shared-qk
    self score. `exp(sinks[p % h])` joins the denominator. Rows that see nothing output zeros.
    """
    n_q, n, d = q.shape[-2], k.shape[-2], q.shape[-1]
    lead = q.shape[:-2]
    offset = n - n_q
    q64 = q.to(torch.float64).reshape(-1, n_q, d)
    k64 = k.to(torch.float64).reshape(-1, n, d)
    v64 = v.to(torch.float64).reshape(-1, n, v.shape[-1])
    P, P_kv = q64.shape[0], k64.shape[0]
    if scale is None:
        scale = d ** -0.5
    if shared_qk:
        k64 = k64 / k64.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    if look_forward is None:
        look_forward = 0 if causal else 1
    rows, seen_rows = [], []
    for p in range(P):
        kp, vp = k64[p // (P // P_kv)], v64[p // (P // P_kv)]
        ids = torch.zeros(n, dtype=torch.long) if documents is None else documents[p // (P // documents.shape[0])].cpu()
        keep = torch.ones(n, dtype=torch.bool) if mask is None else mask[p // (P // mask.shape[0])].cpu()
        out = torch.zeros(n, v.shape[-1], dtype=torch.float64)
        sees = torch.zeros(n, n, dtype=torch.bool)
        for doc in torch.unique(ids).tolist():
            where = torch.nonzero(ids == doc).flatten()
            s, m = int(where[0]), len(where)
            qd = torch.zeros(m, d, dtype=torch.float64)
            lo = max(offset - s, 0)  # the document's positions that are queries
            if s + m <= offset:
                continue
            qd[lo:] = q64[p, s + lo - offset : s + m - offset]
            scores = (qd @ kp[s : s + m].T) * scale
            if softcap is not None:
                scores = softcap * torch.tanh(scores / softcap)
            win = visibility(m, window_size, causal=causal, look_backward=look_backward, look_forward=look_forward,
                             exact_windowsize=exact_windowsize)
            i = torch.arange(m)[:, None]
            j = torch.arange(m)[None, :]
            if attn_bias is not None:
                w = window_size
                col = (j - (i // w - look_backward) * w).clamp(0, attn_bias.shape[-1] - 1)
                bias = attn_bias.to(torch.float64)[p % attn_bias.shape[0]][i % w, col]
                scores = scores + torch.where(win, bias, torch.zeros_like(bias))
            if shared_qk:
                scores = torch.where(i == j, torch.full_like(scores, SELF_SCORE), scores)
            sink_vis = (j < sink_tokens) & ((j <= i) if causal else torch.ones_like(win))
            vis = (win | sink_vis) & keep[s : s + m][None, :]
            others = vis & (i != j)
            sees[s : s + m, s : s + m] = others | (vis & (i == j) & ~others.any(dim=-1, keepdim=True)) if shared_qk else vis
            masked = torch.where(vis, scores, torch.full_like(scores, float("-inf")))
            top = masked.amax(dim=-1, keepdim=True)
            if sinks is not None:
                top = torch.maximum(top, sinks.to(torch.float64)[p % sinks.shape[0]].detach().expand_as(top))
            top = torch.where(torch.isfinite(top), top, torch.zeros_like(top)).detach()
            e = torch.where(vis, torch.exp(torch.where(vis, scores - top, torch.zeros_like(scores))), torch.zeros_like(scores))
            denom = e.sum(dim=-1, keepdim=True)
            if sinks is not None:
                sink_e = torch.exp(sinks.to(torch.float64)[p % sinks.shape[0]] - top)
                denom = denom + torch.where(vis.any(dim=-1, keepdim=True), sink_e, torch.zeros_like(sink_e))
            denom = torch.where(denom > 0, denom, torch.ones_like(denom))
            out = out.index_put((torch.arange(s, s + m),), (e / denom) @ vp[s : s + m])
        rows.append(out[offset:])
        seen_rows.append(sees[offset:])
    if seen:
        return torch.stack(seen_rows).reshape(*lead, n_q, n)
    return torch.stack(rows).reshape(*lead, n_q, v.shape[-1])
