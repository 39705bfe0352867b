"""Non-finite keys and values reach only the rows that see them.

Every backend computes a row's output as the probabilities times the values, and a key a row cannot see
(masked, outside its window, later under `causal`) has probability 0 — but `0 * nan` is NaN, and a NaN or
infinite key makes the scores of its whole block NaN in kernels that mask by adding `-inf`. So a
non-finite value behind a mask would leak into rows that never see it.

The rule (docs/semantics.md): a row's output depends only on the keys it sees. A row that sees a key
holding a non-finite entry outputs NaN in every column; a row that sees a non-finite value outputs, in
that value's column, what IEEE arithmetic gives for a positive probability times it (NaN for NaN, or for
`+inf` and `-inf` both seen; `+inf` or `-inf` otherwise); everything else is exact. Gradients are those of
the same call with the non-finite entries set to zero: the non-finite entries themselves receive zero
gradient and the output entries they make non-finite pass none back.

Finite inputs pay one reduction of `k` and `v` per call (`all_finite`); only a call that holds a
non-finite entry takes the exact route (`attend_nonfinite`): the call again with those entries zeroed,
and one more call on the same backend's rule with zero queries and keys, whose weights are positive
exactly on the keys each row sees, over 0/1 indicators of what is non-finite. Traced code (torch.compile,
export) cannot branch on data: it zeroes the keys and values that the `mask` hides, so padding never
leaks, and leaves other non-finite entries to IEEE arithmetic (they may then spread NaN to rows of
their block that do not see them, never silently to a finite value).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Callable

import torch

from .call import AttentionCall


def all_finite(*tensors: torch.Tensor) -> bool:
    """Whether every entry of `tensors` is finite (a sum per tensor, accumulated in float32 or wider: an
    overflow of the sum only sends a finite call down the exact route).

    On CPU each sum is read as a Python float (a third of the time of a tensor `isfinite` and `bool` on a small
    call); elsewhere the sums are added on the device and read once (one synchronisation)."""
    sums = [t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32) for t in tensors]
    if tensors and tensors[0].device.type == "cpu":
        return math.isfinite(sum(s.item() for s in sums))
    return bool(torch.isfinite(sum(sums)))


def zero_hidden(k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """`k, v` `(P_kv, n, d)` with the positions `mask` `(B, n)` hides set to zero (traced code's rule)."""
    if mask is None:
        return k, v
    rows = mask.shape[0]
    if k.shape[0] % rows == 0:  # each key row belongs to one mask row
        keep = mask.repeat_interleave(k.shape[0] // rows, dim=0)
    else:  # key rows shared by query rows of different masks (grouped-query heads): hidden from all of them
        keep = mask.any(dim=0, keepdim=True)
    keep = keep[..., None]
    return torch.where(keep, k, 0), torch.where(keep, v, 0)


def visibility_call(call: AttentionCall) -> AttentionCall:
    """The call whose weights, for zero queries and keys, are positive exactly on the keys each row sees:
    the same window, mask, documents, sink tokens and self rule; no scores to speak of (no softcap,
    xpos, sinks or dropout), and an `attn_bias` that keeps only where it hides a key (`-inf`)."""
    bias = call.attn_bias
    if bias is not None:
        bias = torch.zeros_like(bias).masked_fill(bias == float("-inf"), float("-inf"))
    return call.with_(spec=replace(call.spec, softcap=None), attn_bias=bias, key_scale=None, sinks=None,
                      dropout_p=0.0)


def poison(out: torch.Tensor, nan: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor,
           bad_key: torch.Tensor) -> torch.Tensor:
    """`out` `(..., d_v)` with what the non-finite entries a row sees make of it: `nan, pos, neg` `(..., d_v)`
    whether the row sees a NaN, `+inf`, `-inf` value in that column, `bad_key` `(..., 1)` whether it sees a
    key with a non-finite entry (module docstring)."""
    out = out.masked_fill(pos & ~neg, float("inf")).masked_fill(neg & ~pos, float("-inf"))
    return out.masked_fill(nan | (pos & neg) | bad_key, float("nan"))


def attend_nonfinite(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall,
                     compute: Callable[..., torch.Tensor], attend: Callable[..., torch.Tensor]) -> torch.Tensor:
    """The exact route for a call whose `k` or `v` hold a non-finite entry: `compute(q, k, v, call)` is the
    backend the call chose, `attend(q, k, v, call)` the op's local entry (`ops.api.attend`), which computes
    the visibility call on whatever backend takes its shapes (module docstring)."""
    finite_k, finite_v = torch.isfinite(k), torch.isfinite(v)
    out = compute(q, torch.where(finite_k, k, 0), torch.where(finite_v, v, 0), call)
    indicators = torch.cat((v.isnan(), v.isposinf(), v.isneginf(), ~finite_k.all(dim=-1, keepdim=True)), dim=-1)
    seen = attend(q.new_zeros(q.shape), k.new_zeros(k.shape), indicators.to(q.dtype), visibility_call(call)) > 0
    d_v = v.shape[-1]
    return poison(out, seen[..., :d_v], seen[..., d_v:2 * d_v], seen[..., 2 * d_v:3 * d_v], seen[..., 3 * d_v:])
