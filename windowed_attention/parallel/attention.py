"""Local attention of one shard of a sequence split over a process group (context parallelism).

The shard's keys and values are exchanged for their halos (`comm.HaloExchange`: point to point, only
the windows a neighbour's queries can see, gradients sent back in the backward); then the ordinary op
runs, with any backend, on a local frame that computes exactly the global rule:

    [prefix][halo before, shard, halo after]      (global positions [need_lo, end), `plan.frame`)

with the shard's queries at their place (zero query rows elsewhere, whose outputs are dropped). Window
blocks, `attn_bias` columns, xpos and sink tokens count from the start of each document (the sequence's
start without documents). A document that starts inside the frame is laid out as it is globally. The
one that holds the frame's first position may start before it, at `s` (per row; known from a small
all_gather, `comm.document_starts`): the prefix lays out that document's start so that the local op
sees the same relative positions modulo the window, i.e. the same blocks, as the global rule:

    [other document: filler][its first c = min(sink_tokens, need_lo - s) positions][gap of g]

`c` positions are its sink tokens fetched from the ranks that own them (`comm.Fetch`, point to point,
gradients sent back), and `g = (need_lo - s - c) mod w` zeros no query of the shard can see: the local
positions are the global ones (relative to the document) minus a multiple of `w`. With `c =
need_lo - s` the layout is exact; otherwise every sink token lies before any key the shard's queries see
through a window (they are `need_lo`-bounded), locally as globally. Rows whose prefix is shorter than
the longest start with a filler document of their own. Without documents and sink tokens the prefix is
`need_lo mod w` zeros: the frame starts on a global window boundary.

Token windows unbounded on the left (`window_size=(-1, right)`) are computed exactly, the whole prefix of
the sequence travelling as the halo (with documents too: the plan does not know where they start).
Shorter queries are refused with a group.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..ops.call import AttentionCall
from ..ops.reference import repeat_kv
from .comm import Fetch, HaloExchange, agree, document_starts, exchange, fetch, gather_rows
from .plan import frame

_DTYPES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}


# Options the sharded route does not compute: refused by name rather than computed wrong.
_NOT_SHARDED = {"short_queries": "q (shorter than k)"}


def check_shards(q, k, v, call: AttentionCall, group) -> None:
    """Every rank of `group` passes the same shard length, shapes and options (ValueError naming the
    argument otherwise, on every rank), and no option the sharded route refuses (`_NOT_SHARDED`)."""
    spec = call.spec
    requires_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    left, right = spec.flash_bounds
    tokens = spec.tokens is not None  # the block fields then derive from the (left, right) window_size

    def named(argument: str) -> str:
        return "window_size" if tokens else argument

    fields = {
        "the shard length n_s (q.shape[-2])": ("q", q.shape[1]),
        "the key shard length (k.shape[-2])": ("k", k.shape[1]),
        "the packed batch of q (its leading dims)": ("q", q.shape[0]),
        "the packed batch of k and v (fewer rows than q: grouped-query attention)": ("k", k.shape[0]),
        "the head dim of q and k": ("q", q.shape[2]),
        "the head dim of v": ("v", v.shape[2]),
        "the dtype of q, k, v": ("dtype", _DTYPES[q.dtype]),
        "whether q, k, v require gradients": ("q", int(requires_grad)),
        "window_size": ("window_size", spec.window_size),
        "whether window_size is a (left, right) token window": ("window_size", int(tokens)),
        "causal": ("causal", int(spec.causal)),
        "look_backward": (named("look_backward"), spec.look_backward),
        "look_forward": (named("look_forward"), spec.look_forward),
        "exact_windowsize": (named("exact_windowsize"), int(spec.exact_windowsize)),
        "the window's left bound": ("window_size", left),
        "the window's right bound": ("window_size", right),
        "sink_tokens": ("sink_tokens", spec.sink_tokens),
        "softcap": ("softcap", -1.0 if spec.softcap is None else spec.softcap),
        "the scale": ("scale", float(call.scale)),
        "whether a mask is given": ("mask", -1 if call.mask is None else call.mask.shape[0]),
        "whether documents are given": ("documents", -1 if call.documents is None else call.documents.shape[0]),
        "whether attn_bias is given": ("attn_bias", -1 if call.attn_bias is None else call.attn_bias.shape[0]),
        "whether sinks are given": ("sinks", -1 if call.sinks is None else call.sinks.shape[0]),
        "shared_qk": ("shared_qk", int(call.mask_self)),
        "xpos (key_scale)": ("use_xpos", int(call.key_scale is not None)),
        "dropout_p": ("dropout_p", float(call.dropout_p)),
    }
    agree(group, fields, q.device)
    # after the agreement, so that every rank refuses alike
    for feature, argument in _NOT_SHARDED.items():
        if feature in call.features():
            raise ValueError(f"{argument}: not supported with group= (context parallelism)")


def attend_shard(q, k, v, call: AttentionCall, *, group, rank: int, world: int, attend, backend: str) -> torch.Tensor:
    """`q, k` `(P, n_s, d)`, `v` `(P_kv, n_s, d_v)`: this rank's shard (already checked with `check_shards`),
    `call.mask` `(b, n_s)` and `call.documents` `(b', n_s)` its slices -> `(P, n_s, d_v)`, this rank's
    slice of the single-process output. `attend` is the op's local entry (`ops.api.attend`), called on
    the local frame (see the module docstring)."""
    spec = call.spec
    P, n_s = q.shape[:2]
    packed_documents = call.documents is not None
    f = frame(spec, n_s, world, rank, packed_documents)
    S, w = spec.sink_tokens, spec.window_size
    mask = call.mask
    if packed_documents:
        # one row layout per row of documents and mask together: R rows, R | P (q row p uses row p // (P // R))
        B = call.documents.shape[0]
        R = B if mask is None else math.lcm(B, mask.shape[0])
        documents = call.documents.repeat_interleave(R // B, dim=0)
        if mask is not None:
            mask = mask.repeat_interleave(R // mask.shape[0], dim=0)
        if k.shape[0] % R:  # key rows shared by query rows of different layouts: one key row per query row
            k, v = repeat_kv(k, P), repeat_kv(v, P)
        starts = document_starts(documents, group, rank, world)
        ids, starts = (t[..., 0] for t in exchange((documents[..., None], starts[..., None]), spec, group, rank,
                                                   world, True))
        first = starts[:, 0].cpu()  # (R,) where the document of the frame's first position starts
    else:
        R, first = 1, torch.zeros(1, dtype=torch.long)
    lead = f.need_lo - first  # (R,) positions of that document before the frame
    carried = lead.clamp(max=S)  # its sink tokens before the frame
    gap = (lead - carried) % w
    L = int((carried + gap).max())

    k_frame, v_frame = HaloExchange.apply(k, v, spec, group, rank, world, packed_documents)
    if S:
        # every rank's request: the starts and counts of the sink tokens before its frame
        if packed_documents:
            everyone = gather_rows(first, group, q.device)
            counts = (torch.tensor([frame(spec, n_s, world, t, True).need_lo for t in range(world)])[:, None]
                      - everyone).clamp(max=S)
        else:
            everyone = torch.zeros(world, 1, dtype=torch.long)
            counts = torch.tensor([frame(spec, n_s, world, t).need_lo for t in range(world)])[:, None].clamp(max=S)
    if S and bool(counts.any()):
        k_sinks, v_sinks = Fetch.apply(k, v, everyone, counts, group, rank, world)
        mask_sinks = None if mask is None else fetch(mask[..., None].to(torch.uint8), everyone, counts, group, rank,
                                                     world)[..., 0].bool()
    else:
        k_sinks, v_sinks = k.new_zeros(k.shape[0], 0, k.shape[2]), v.new_zeros(v.shape[0], 0, v.shape[2])
        mask_sinks = None if mask is None else mask.new_zeros(mask.shape[0], 0)

    # the prefix, per row: [filler: L - carried - gap][carried sink tokens][gap]
    slot = torch.arange(L)[None, :] - (L - carried - gap)[:, None]  # (R, L): the sink token a place holds
    valid = (slot >= 0) & (slot < carried[:, None])

    def prefixed(sinks: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
        """`[prefix, rest]`: `sinks (rows, C, c)` the fetched sink tokens (rows a multiple of R), `rest (rows,
        f.length, c)` the frame -> `(rows, L + f.length, c)`, zeros at the filler and the gap."""
        per = sinks.shape[0] // R
        index = torch.where(valid, slot, sinks.shape[1]).repeat_interleave(per, dim=0).to(sinks.device)
        source = torch.cat([sinks, sinks.new_zeros(sinks.shape[0], 1, sinks.shape[2])], dim=1)
        prefix = source.gather(1, index[..., None].expand(-1, -1, sinks.shape[2]))
        return torch.cat([prefix, rest], dim=1)

    k_local, v_local = prefixed(k_sinks, k_frame), prefixed(v_sinks, v_frame)
    before = L + f.start - f.need_lo
    q_local = F.pad(q, (0, 0, before, f.end - f.stop))
    if mask is not None:
        mask_frame = exchange((mask[..., None].to(torch.uint8),), spec, group, rank, world, packed_documents)[0]
        call = call.with_(mask=prefixed(mask_sinks[..., None].to(torch.uint8), mask_frame)[..., 0].bool())
    if packed_documents:
        # local ids: the filler, then a new document wherever the ids change (the frame's first document
        # starts where its carried sink tokens do)
        new = torch.zeros(R, L + f.length, dtype=torch.bool, device=ids.device)
        new[:, 0] = True
        new[torch.arange(R, device=ids.device), (L - carried - gap).to(ids.device)] = True
        new[:, L + 1:] = ids[:, 1:] != ids[:, :-1]
        call = call.with_(documents=new.long().cumsum(dim=1))
    if call.dropout_p > 0.0:
        # ranks draw their dropout from a stream of their own (ranks seeded alike would otherwise drop
        # alike at the same local positions); the seed still comes from torch's generator
        seed = int(torch.randint(0, 2**62, ()))
        devices = [q.device] if q.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed((seed + 0x9E3779B97F4A7C15 * (rank + 1)) % 2**63)
            out = attend(q_local, k_local, v_local, call, backend=backend)
    else:
        out = attend(q_local, k_local, v_local, call, backend=backend)
    return out[:, before:before + n_s]

