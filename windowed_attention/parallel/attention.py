"""Local attention of one shard of a sequence split over a process group (context parallelism).

The shard's keys and values are exchanged for their halos (`comm.HaloExchange`: point to point, only
the `look_backward`/`look_forward` windows a neighbour's queries can see, gradients sent back in the
backward); then the ordinary op runs, with any backend, on the local frame
`[zeros, halo before, shard, halo after]` with the shard's queries at their place in it (zero query rows
for the halo positions, whose outputs are dropped). The frame starts on a window boundary, so windows,
`attn_bias` and xpos are those of the global positions; the waste is bounded by the halo.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops.call import AttentionCall
from .comm import HaloExchange, agree, exchange
from .plan import frame

_DTYPES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}


# Options the sharded route does not compute yet: refused by name rather than computed wrong.
_NOT_SHARDED = {"documents": "documents", "sink_tokens": "sink_tokens", "short_queries": "q (shorter than k)"}


def check_shards(q, k, v, call: AttentionCall, group) -> None:
    """Every rank of `group` passes the same shard length, shapes and options (ValueError naming the
    argument otherwise, on every rank)."""
    for feature, argument in _NOT_SHARDED.items():
        if feature in call.features():
            raise ValueError(f"{argument}: not supported with group= (context parallelism) yet")
    spec = call.spec
    requires_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    left, right = (-1 if t is None else t for t in spec.bounds)
    fields = {
        "the shard length n_s (q.shape[-2])": ("q", q.shape[1]),
        "the packed batch of q (its leading dims)": ("q", q.shape[0]),
        "the packed batch of k and v (fewer rows than q: grouped-query attention)": ("k", k.shape[0]),
        "the head dim of q and k": ("q", q.shape[2]),
        "the head dim of v": ("v", v.shape[2]),
        "the dtype of q, k, v": ("dtype", _DTYPES[q.dtype]),
        "whether q, k, v require gradients": ("q", int(requires_grad)),
        "window_size": ("window_size", spec.window_size),
        "causal": ("causal", int(spec.causal)),
        "look_backward": ("look_backward", spec.look_backward),
        "look_forward": ("look_forward", spec.look_forward),
        "exact_windowsize": ("exact_windowsize", int(spec.exact_windowsize)),
        "the window's left bound": ("window_size", left),
        "the window's right bound": ("window_size", right),
        "softcap": ("softcap", -1.0 if spec.softcap is None else spec.softcap),
        "the scale": ("scale", float(call.scale)),
        "whether a mask is given": ("mask", -1 if call.mask is None else call.mask.shape[0]),
        "whether attn_bias is given": ("attn_bias", -1 if call.attn_bias is None else call.attn_bias.shape[0]),
        "whether sinks are given": ("sinks", -1 if call.sinks is None else call.sinks.shape[0]),
        "shared_qk": ("shared_qk", int(call.mask_self)),
        "xpos (key_scale)": ("use_xpos", int(call.key_scale is not None)),
        "dropout_p": ("dropout_p", float(call.dropout_p)),
    }
    agree(group, fields, q.device)


def attend_shard(q, k, v, call: AttentionCall, *, group, rank: int, world: int, attend, backend: str) -> torch.Tensor:
    """`q, k` `(P, n_s, d)`, `v` `(P, n_s, d_v)`: this rank's shard (already checked with `check_shards`)
    -> `(P, n_s, d_v)`, this rank's slice of the single-process output. `attend` is the op's local entry
    (`ops.api.attend`), called on the local frame."""
    spec = call.spec
    n_s = q.shape[1]
    f = frame(spec, n_s, world, rank)
    before, after = f.start - f.origin, f.end - f.stop
    k_frame, v_frame = HaloExchange.apply(k, v, spec, group, rank, world)
    q_frame = F.pad(q, (0, 0, before, after))
    if call.mask is not None:
        mask = exchange((call.mask[..., None].to(torch.uint8),), spec, group, rank, world)[0][..., 0].bool()
        call = call.with_(mask=mask)
    if call.dropout_p > 0.0:
        # ranks draw their dropout from a stream of their own (ranks seeded alike would otherwise drop
        # alike at the same local positions); the seed still comes from torch's generator
        seed = int(torch.randint(0, 2**62, ()))
        devices = [q.device] if q.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed((seed + 0x9E3779B97F4A7C15 * (rank + 1)) % 2**63)
            out = attend(q_frame, k_frame, v_frame, call, backend=backend)
    else:
        out = attend(q_frame, k_frame, v_frame, call, backend=backend)
    return out[:, before:before + n_s]
