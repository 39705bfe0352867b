"""The functional op `local_attention`: validation at the boundary, then a backend does the work."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..parallel.attention import attend_shard, check_shards
from ..parallel.comm import group_info
from . import backends
from .dtypes import autocast_inputs, result_dtype, without_autocast
from .finite import all_finite, attend_nonfinite, zero_hidden
from .call import AttentionCall
from .spec import WindowSpec
from .validation import (
    check_attn_bias,
    check_bool,
    check_document_order,
    check_documents,
    check_int,
    check_look,
    check_mask,
    check_positive_real,
    check_probability,
    check_qkv,
    check_scale,
    check_sinks,
    check_token_window,
)


def pack_leading(*tensors: torch.Tensor) -> tuple[tuple[int, ...], list[torch.Tensor]]:
    """`(..., n, d) -> (P, n, d)` for each tensor (a view when possible; einops.pack would always copy)."""
    lead = tuple(tensors[0].shape[:-2])
    if len(lead) == 1:
        return lead, list(tensors)
    return lead, [t.reshape(-1, t.shape[-2], t.shape[-1]) for t in tensors]


def unpack_leading(out: torch.Tensor, lead: tuple[int, ...]) -> torch.Tensor:
    """`(P, n, d) -> (..., n, d)`: undo `pack_leading`."""
    return out if len(lead) == 1 else out.reshape(*lead, *out.shape[-2:])


def make_spec(window_size, causal, look_backward, look_forward, exact_windowsize, sink_tokens=0,
              softcap=None) -> WindowSpec:
    """Validated `WindowSpec` from the public keywords (`look_forward=None` resolved; `window_size` an int
    for window blocks or a `(left, right)` token window)."""
    causal = check_bool("causal", causal)
    exact_windowsize = check_bool("exact_windowsize", exact_windowsize)
    sink_tokens = check_int("sink_tokens", sink_tokens, 0)
    softcap = None if softcap is None else check_positive_real("softcap", softcap)
    if isinstance(window_size, (tuple, list)):
        left, right = check_token_window(window_size, causal)
        if look_backward != 1 or look_forward is not None or exact_windowsize:
            raise ValueError("window_size: a (left, right) token window takes look_backward, look_forward and "
                             "exact_windowsize at their defaults (1, None, False); the tuple says it all")
        return WindowSpec.token_window(left, right, causal, sink_tokens, softcap)
    window_size = check_int("window_size", window_size, 1)
    look_backward, look_forward = check_look(causal, look_backward, look_forward)
    return WindowSpec(window_size, causal, look_backward, look_forward, exact_windowsize, None, sink_tokens, softcap)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall, *, backend: str = "auto",
           group=None) -> torch.Tensor:
    """Trusted internal entry: `q (P, n_q, d)`, `k, v (P_kv, n, d)` and the `call` (`ops.call`), everything
    already validated.

    With a process `group`, `q, k, v`, `mask` and `documents` are this rank's shard of the sequence and the
    result is this rank's slice (`windowed_attention.parallel`); the ranks' agreement is checked here,
    collectively.
    """
    if group is not None:
        rank, world = group_info(group)
        check_shards(q, k, v, call, group)  # collective: every rank raises alike, none hangs
        if q.shape[1] == 0:
            raise ValueError("q: with group, every rank's shard must hold n_s >= 1 positions, got 0")
        if world > 1:
            # the window is cut to the whole sequence's length (all shards), never to one shard's
            call = fit_window(call, q.shape[1] * world)
            return attend_shard(q, k, v, call, group=group, rank=rank, world=world, attend=attend, backend=backend)
    n = k.shape[1]
    if q.numel() == 0 or k.numel() == 0:
        return empty_result(q, k, v, call.sinks)
    call = fit_window(call, n)
    # Under autocast every backend computes float32 inputs in the autocast dtype and returns it, so the
    # result's dtype never depends on the backend.
    device_type = q.device.type
    q, k, v = autocast_inputs(q, k, v)
    with without_autocast(device_type):
        name = backends.choose(q, call, value_dim=v.shape[-1]) if backend == "auto" else backends.check_call(backend, call)
        compute = backends.get(name)
        # a row depends only on the keys it sees, whatever the others hold (`ops.finite`)
        if torch.compiler.is_compiling():  # no branch on data in traced code: padding is zeroed, always
            return compute(q, *zero_hidden(k, v, call.mask), call)
        if all_finite(k, v):
            return compute(q, k, v, call)
        return attend_nonfinite(q, k, v, call, compute, attend)


def empty_result(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """The result of a call with nothing to compute (no rows, no queries or no keys): zeros `(..., n_q, d_v)`,
    differentiable (zero gradients of the inputs' shapes, learned `sinks` too). Every query sees no key, so every output row is zero."""
    out = q.new_zeros(*q.shape[:-1], v.shape[-1], dtype=result_dtype(q.dtype, q.device.type))
    inputs = [t for t in (q, k, v, sinks) if t is not None and t.requires_grad]
    if inputs and torch.is_grad_enabled():  # connect the (zero) result to the inputs, for their gradients
        out = out + sum(t.sum() for t in inputs).to(out.dtype) * 0
    return out


def normalize_keys(k: torch.Tensor) -> torch.Tensor:
    """`k` l2-normalised (shared-qk); a key with a non-finite entry stays non-finite (NaN) with finite
    gradients everywhere (`ops.finite`)."""
    if torch.compiler.is_compiling() or all_finite(k):
        return F.normalize(k, dim=-1)
    bad = ~torch.isfinite(k).all(dim=-1, keepdim=True)
    return F.normalize(k.masked_fill(bad, 0), dim=-1).masked_fill(bad, float("nan"))


def fit_window(call: AttentionCall, n: int) -> AttentionCall:
    """The call with the rule `call.spec.for_length(n)` (window `min(window_size, n)`, look-around at most the
    sequence's windows): the same result on a sequence of `n` positions (or documents no longer), at a
    cost that follows the sequence, not the window. (With a process group, `n` is the whole sequence's
    length.) Its `attn_bias` and `key_scale` are cut alike (`fit_bias`)."""
    spec, attn_bias, key_scale = fit_bias(call.spec, n, call.attn_bias, call.key_scale)
    if spec is call.spec:
        return call
    return call.with_(spec=spec, attn_bias=attn_bias, key_scale=key_scale)


def fit_bias(spec: WindowSpec, n: int, attn_bias: torch.Tensor | None, key_scale: torch.Tensor | None = None):
    """`(spec, attn_bias, key_scale)` for `spec.for_length(n)`.

    `attn_bias` may come for `spec` or for any `spec.for_length(m)` with `m >= n` (`check_attn_bias`) and is
    cut to the smaller one. Its column of key `j` for a query in window `b` is `j - (b - look_backward) *
    w`: a shorter look-back drops the first `(look_backward - lb) * w` columns. With `w > n` every key
    lies in the query's own window (slot `look_backward`), so only that slot's first `n` columns are kept;
    the other slots lie outside the sequence and are never seen. `key_scale` `(span, d)` (xpos, one row
    per neighbour window of `spec`) keeps the rows of the windows that remain.
    """
    small = spec.for_length(n)
    if small is spec:
        return spec, attn_bias, key_scale
    m, span = small.window_size, small.span
    if key_scale is not None:
        lb = spec.look_backward
        key_scale = key_scale[lb - small.look_backward : lb - small.look_backward + span]
    if attn_bias is None or tuple(attn_bias.shape[-2:]) == (m, span * m):
        return small, attn_bias, key_scale
    source = spec.with_bias_shape(*attn_bias.shape[-2:])
    w, lb = source.window_size, source.look_backward
    if m == w:
        start = (lb - small.look_backward) * w
        return small, attn_bias[:, :, start : start + span * w], key_scale
    own = attn_bias[:, :m, lb * w : lb * w + m]
    return small, F.pad(own, (small.look_backward * m, small.look_forward * m)), key_scale


def local_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    window_size: int | tuple[int, int],
    causal: bool = False,
    look_backward: int = 1,
    look_forward: int | None = None,
    exact_windowsize: bool = False,
    mask: torch.Tensor | None = None,
    attn_bias: torch.Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    shared_qk: bool = False,
    backend: str = "auto",
    group=None,
    documents: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
    sink_tokens: int = 0,
    softcap: float | None = None,
) -> torch.Tensor:
    """Local windowed attention. `q`: `(..., n_q, d)`, `k`: `(..., n, d)`, `v`: `(..., n, d_v)` -> `(..., n_q, d_v)`.

    Positions are cut into windows of `window_size`; query `i` sees keys of windows
    `i // w - look_backward ... i // w + look_forward` (and `j <= i` when causal; within
    `w * look_backward` back and `w * look_forward` ahead with `exact_windowsize`), where `mask`
    `(b, n)` is True. `window_size=(left, right)` is a token window instead: `i - left <= j <= i + right`
    (-1 unbounded; flash-attn's convention). `attn_bias` `(heads, w, (look_backward + look_forward + 1) * w)`
    is added to the scores (when `w > n` it may also be given for the window `n`: cost follows `min(w, n)`).
    `shared_qk` l2-normalises keys and lets a query see itself only when nothing else is visible. A query
    that sees no key (or only keys whose bias is -inf) outputs zeros. Any `n` works (no padding needed).

    Modern options (docs/semantics.md): `documents` `(b, n)` non-decreasing integer ids of packed documents,
    each computed as if alone; `sinks` `(h,)` learned sink logits, one per query head, joining each softmax
    denominator; `sink_tokens` the first positions (of each document) visible to every query; `softcap`
    scores become `softcap * tanh(score / softcap)`. `q` may hold fewer positions than `k, v`: the last
    `n_q` (bottom-right aligned).

    `group` (a `torch.distributed` process group): the sequence is split over its ranks; `q, k, v` and
    `mask` are this rank's contiguous shard (rank `r` holds positions `[r * n_s, (r + 1) * n_s)`, the same
    `n_s >= 1` and options on every rank) and the result, and the q, k, v gradients, are this rank's
    slices of the single-process ones; the `attn_bias` and `sinks` gradients are this rank's share.
    `documents` is this rank's slice of the global ids (documents may cross shards). Only window halos (and
    the sink tokens a rank's queries see) travel between ranks, point to point. Shorter queries are refused
    with a group.
    """
    # cached unless traced (traced code validates once, when traced) or with a group (the halo exchange checks
    # the ranks agree; the bias is for the whole sequence)
    cached = group is None and not torch.compiler.is_compiling()
    key = plan = None
    if cached:
        key = _plan_key(q, k, v, window_size, causal, look_backward, look_forward, exact_windowsize, mask, attn_bias,
                        scale, dropout_p, shared_qk, backend, documents, sinks, sink_tokens, softcap)
        plan = PLANS.get(key)
    if plan is None:
        plan = _check(q, k, v, window_size, causal, look_backward, look_forward, exact_windowsize, mask, attn_bias,
                      scale, dropout_p, shared_qk, backend, group, documents, sinks, sink_tokens, softcap)
        if cached:
            PLANS.put(key, plan)
    else:  # availability may change (a failed build): the explicit name is checked every call, cheaply
        backends.check_name(backend, q.device)
    # the fused kernel's plain entry (docs/design.md, "Per-call overhead"): what autograd and autocast would
    # change is checked here, every call; None back means a non-finite k or v, for the exact route below
    if plan.plain is not None and not torch.is_autocast_enabled("cpu") and not (
            torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
        out = backends.plain_forward(q, k, v, plan.plain)
        if out is not None:
            return out
    if plan.empty:  # nothing to attend (no batch size can be inferred)
        return empty_result(q, k, v, sinks)
    if documents is not None:  # reads the values: every call
        check_document_order(documents)
    lead, (q, k, v) = pack_leading(q, k, v)
    if plan.shared_qk:
        k = normalize_keys(k)
    call = AttentionCall(
        plan.spec, plan.scale, mask=mask, attn_bias=attn_bias, mask_self=plan.shared_qk, dropout_p=plan.dropout_p,
        documents=None if documents is None else documents.long(), sinks=sinks, query_offset=plan.query_offset,
    )
    out = attend(q, k, v, call, backend=backend, group=group)
    return unpack_leading(out, lead)


@dataclass(frozen=True)
class Plan:
    """What `local_attention`'s validation makes of a call's metadata (shapes, dtypes, devices and the
    options' types and values): a pure function of them, so `PLANS` caches it (`_plan_key`)."""

    spec: WindowSpec
    scale: float
    shared_qk: bool
    dropout_p: float
    query_offset: int
    empty: bool  # no queries or no keys: the result is `empty_result`
    plain: tuple | None = None  # the options of the fused kernel's plain entry, where it computes the call


def _check(q, k, v, window_size, causal, look_backward, look_forward, exact_windowsize, mask, attn_bias, scale,
           dropout_p, shared_qk, backend, group, documents, sinks, sink_tokens, softcap) -> Plan:
    """Every check of `local_attention`'s arguments that reads no tensor's values (errors name the argument),
    and the fused kernel's plain entry's options where it computes the call (`backends.plain_route`)."""
    check_qkv(q, k, v)
    spec = make_spec(window_size, causal, look_backward, look_forward, exact_windowsize, sink_tokens, softcap)
    shared_qk = check_bool("shared_qk", shared_qk)
    dropout_p = check_probability("dropout_p", dropout_p)
    scale = check_scale(scale)
    backends.check_name(backend, q.device)
    n_q, n = q.shape[-2], k.shape[-2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if group is None and (q.numel() == 0 or k.numel() == 0):
        if sinks is not None:
            check_sinks(sinks, 0, q)
        return Plan(spec, scale, shared_qk, dropout_p, n - n_q, True)
    packed = q.shape[:-2].numel()
    if mask is not None:
        check_mask(mask, packed, n, q.device)
    if attn_bias is not None:  # for the window of the whole sequence (all shards with a group)
        if spec.tokens is not None:
            raise ValueError("attn_bias: a (left, right) token window takes no attn_bias (its layout is the window "
                             "blocks'); use an int window_size with look_backward/look_forward")
        check_attn_bias(attn_bias, packed, spec, n if group is None else n * group_info(group)[1], q.device)
    if documents is not None:
        check_documents(documents, packed, n, q.device, order=False)
    if sinks is not None:
        check_sinks(sinks, packed, q)
    plain = None
    if group is None and not torch.compiler.is_compiling():  # only a cached plan's route is taken
        call = AttentionCall(spec, scale, mask=mask, attn_bias=attn_bias, mask_self=shared_qk, dropout_p=dropout_p,
                             documents=documents, sinks=sinks, query_offset=n - n_q)
        plain = backends.plain_route(q, k, v, fit_window(call, n), backend)
    return Plan(spec, scale, shared_qk, dropout_p, n - n_q, False, plain)


def _plan_key(q, k, v, window_size, causal, look_backward, look_forward, exact_windowsize, mask, attn_bias, scale,
              dropout_p, shared_qk, backend, documents, sinks, sink_tokens, softcap) -> tuple | None:
    """The cache key of a call's `Plan`: every tensor argument as its type, shape, dtype and device (never its
    values, which `_check` does not read) and every other one as its type beside its value (`True == 1 == 1.0`
    must not share an entry; a `window_size` pair element by element). None for a tensor argument that is
    not a tensor, and an unhashable key for an unhashable argument: neither is cached, and `_check` refuses
    them."""
    try:
        tensors = tuple(None if t is None else (type(t), t.shape, t.dtype, t.device)
                        for t in (q, k, v, mask, attn_bias, documents, sinks))
        if isinstance(window_size, (tuple, list)):
            window_size = type(window_size), tuple(map(type, window_size)), tuple(window_size)
        options = (window_size, causal, look_backward, look_forward, exact_windowsize, scale, dropout_p, shared_qk,
                   backend, sink_tokens, softcap)
    except AttributeError:
        return None
    return tensors, tuple(map(type, options)), options


class PlanCache:
    """A small least-recently-used map from `_plan_key` to `Plan` (`size` entries), safe across threads; the
    key None and an unhashable key are never stored and always miss."""

    def __init__(self, size: int = 64):
        self.size, self.entries = size, OrderedDict()
        self.hits = self.misses = 0
        self._lock = threading.Lock()

    def get(self, key) -> Plan | None:
        with self._lock:
            try:
                plan = None if key is None else self.entries.get(key)
            except TypeError:  # unhashable
                plan = None
            if plan is None:
                self.misses += 1
                return None
            self.hits += 1
            self.entries.move_to_end(key)
            return plan

    def put(self, key, plan: Plan) -> None:
        with self._lock:
            try:
                if key is not None:
                    self.entries[key] = plan
            except TypeError:  # unhashable
                return
            if len(self.entries) > self.size:
                self.entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self.entries.clear()
            self.hits = self.misses = 0


# Validation results by call metadata (docs/design.md, "Per-call overhead").
PLANS = PlanCache()
