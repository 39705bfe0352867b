"""Attention of one new query per row over its cached keys: the op of a decode step.

The keys come from a `KVCache` window: the last `slots = capacity + 1` columns, oldest first, so the key
at index `a` is at distance `slots - 1 - a` from the query (the query's own key last). Which of them the
query sees, and the position bias, depend only on that distance and on the query's position within its
window (`position % w`): `score_table` builds them once per generation.
"""

from __future__ import annotations

import sys

import torch

from . import fused_cpu
from .dtypes import accumulation_dtype
from .finite import poison
from .spec import SELF_ATTN_SCORE, WindowSpec


def cache_capacity(spec: WindowSpec) -> int:
    """Most earlier keys a causal query can see through its window: `look_backward * w + w - 1` by the
    blocks, cut by the left token bound (`spec.bounds`: `look_backward * w` with exact windows, `left` with
    a `(left, right)` token window). Sink tokens are kept beside the ring (`KVCache`), not counted here."""
    w = spec.window_size
    capacity = spec.look_backward * w + w - 1
    left = spec.bounds[0]
    return capacity if left is None else min(capacity, left)


# Decoding a window far longer than the text decodes with the window cut to a length bound (`decode_window`),
# doubled as the text grows past it, starting here.
FIRST_DECODE_LIMIT = 1024


def decode_window(spec: WindowSpec, n: int) -> tuple[WindowSpec, int]:
    """`(rule, limit)`: the rule a cache decodes positions `< limit` with, for a text that will hold `n`
    positions: `spec.for_length(limit)` (the same result on those positions; `ops.spec`) with `limit` the
    power of two from `FIRST_DECODE_LIMIT` on that is `>= n`, so that the cache, the score table and the
    bias follow the text, not the window. `spec` itself (and no limit, `sys.maxsize`) once the cut changes
    nothing."""
    limit = max(FIRST_DECODE_LIMIT, 1 << max(n - 1, 0).bit_length())
    small = spec.for_length(limit)
    return (spec, sys.maxsize) if small == spec else (small, limit)


def score_table(spec: WindowSpec, attn_bias: torch.Tensor | None, device, dtype: torch.dtype,
                limit: int = sys.maxsize) -> torch.Tensor:
    """Additive scores `(R, heads or 1, slots)` by query residue `u = position % w` (`R = w`, or 1 when
    nothing depends on it) and key index `a` (distance `slots - 1 - a`): the position bias `attn_bias`
    `(heads, w, span * w)` (or 0) where the causal window rule lets the query see the key, -inf where not.

    Key `j = i - dist` of query `i` is visible when `dist <= look_backward * w + u` (its window is at most
    `look_backward` back) and `dist <= left` (`spec.bounds`: `look_backward * w` with exact windows, the
    token window's `left`; then the block condition adds nothing and nothing depends on `u`); its bias is
    `attn_bias[:, u, look_backward * w + u - dist]` (the layout of the op's `attn_bias`). When every
    position decoded with the table is below `limit <= w` (all in window 0), each existing key has
    `dist <= u`, so the first condition always holds and, without a bias, nothing depends on `u`.
    """
    w, back = spec.window_size, spec.look_backward * spec.window_size
    slots = cache_capacity(spec) + 1
    first_window = limit <= w
    residues = 1 if attn_bias is None and (not spec.has_block_condition() or first_window) else w
    u = torch.arange(residues, device=device)[:, None]
    dist = torch.arange(slots - 1, -1, -1, device=device)[None, :]  # (1, slots), oldest first
    visible = (dist <= back + u) | first_window
    left = spec.bounds[0]
    if left is not None:
        visible &= dist <= left
    if attn_bias is None:
        table = torch.zeros(residues, 1, slots, device=device, dtype=dtype)
    else:
        cols = (back + u - dist).clamp(0, attn_bias.shape[-1] - 1)  # (R, slots)
        table = attn_bias.to(dtype)[:, u, cols].permute(1, 0, 2)  # (R, heads, slots)
    return table.masked_fill(~visible[:, None, :], float("-inf")).contiguous()


def sink_row(spec: WindowSpec, positions: torch.Tensor, sink_tokens: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive scores `(b, 1, S)` of the sink tokens `j < S` (`S = sink_tokens`) for the new queries at
    `positions` `(b,)`: 0 where the query sees key `j` only as a sink (`j < position` and outside its window
    `spec`), -inf where not (not reached yet, or seen through the window: counted once, there, with its
    bias). A sink key gets no position bias."""
    i = positions[:, None]
    j = torch.arange(sink_tokens, device=positions.device)[None, :]
    only_sink = (j < i) & ~spec.window_visible(i, j, i + 1)
    return torch.zeros(only_sink.shape, dtype=dtype, device=positions.device).masked_fill(
        ~only_sink, float("-inf"))[:, None]


def attend_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, row: torch.Tensor, *, scale: float,
               shared_qk: bool, key_factors: torch.Tensor | None = None, softcap: float | None = None,
               sinks: torch.Tensor | None = None) -> torch.Tensor:
    """`q` `(b, h, 1, d)` over `k, v` `(b, h_kv, m, d)` (`h % h_kv == 0`: query head `i` uses kv head
    `i // (h // h_kv)`) with the additive `row` `(b or 1, h or 1, 1, m)`, in `accumulation_dtype`.

    Under `shared_qk` the query's own key (the last) gets the self score. `key_factors` `(m, d)`: per key
    and channel factors of the scores (xpos: `scale ** (distance / scale_base)`). `softcap`: the scores
    `scale * q.k` become `softcap * tanh(score / softcap)` before `row`. `sinks` `(h,)`: learned logits, one
    per query head, joining the softmax denominator with no value (unscaled).

    Keys the row hides (`-inf`) never reach the output, whatever they hold (`ops.finite`'s rule): the
    non-finite entries are zeroed, then put back where the query sees them, with no branch on the data
    (this path also runs on CUDA, and under autograd).
    """
    finite_k, finite_v = torch.isfinite(k), torch.isfinite(v)
    out = _attend_finite(q, torch.where(finite_k, k, 0), torch.where(finite_v, v, 0), row, scale=scale,
                         shared_qk=shared_qk, key_factors=key_factors, softcap=softcap, sinks=sinks)
    b, h, h_kv, m = q.shape[0], q.shape[1], k.shape[1], k.shape[2]
    seen = (row > float("-inf")).expand(b, h, 1, m)
    if shared_qk:  # the own key, seen when nothing else is
        alone = ~seen[..., :-1].any(dim=-1, keepdim=True)
        seen = torch.cat((seen[..., :-1] & ~alone, alone), dim=-1)
    seen = seen.reshape(b, h_kv, h // h_kv, m).to(out.dtype)
    counts = seen @ torch.cat((v.isnan(), v.isposinf(), v.isneginf(), ~finite_k.all(dim=-1, keepdim=True)),
                              dim=-1).to(out.dtype)  # (b, h_kv, h // h_kv, 3 d_v + 1): what each query sees
    counts = counts.reshape(b, h, 1, -1) > 0
    d_v = v.shape[-1]
    return poison(out, counts[..., :d_v], counts[..., d_v:2 * d_v], counts[..., 2 * d_v:3 * d_v],
                  counts[..., 3 * d_v:])


def _attend_finite(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, row: torch.Tensor, *, scale: float,
                   shared_qk: bool, key_factors: torch.Tensor | None, softcap: float | None,
                   sinks: torch.Tensor | None) -> torch.Tensor:
    """`attend_one` of finite keys and values."""
    b, h, _, d = q.shape
    h_kv, dtype = k.shape[1], q.dtype
    compute = accumulation_dtype(dtype)
    q, k, v = q.to(compute), k.to(compute), v.to(compute)
    if sinks is not None:
        sinks = sinks.to(compute).view(1, h, 1, 1)
    if h_kv != h:  # grouped queries: the g query heads of a kv head become g rows against its keys
        q = q.reshape(b, h_kv, h // h_kv, d)
        if row.shape[1] == h:
            row = row.reshape(row.shape[0], h_kv, h // h_kv, row.shape[-1])
        if sinks is not None:
            sinks = sinks.view(1, h_kv, h // h_kv, 1)
    if key_factors is None and not shared_qk and softcap is None and sinks is None:
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=row, scale=scale)
    else:
        if key_factors is not None:
            k = k * key_factors
        sim = (q * scale) @ k.transpose(-1, -2)
        if softcap is not None:
            sim = softcap * torch.tanh(sim / softcap)
        sim = sim + row
        if shared_qk:
            sim[..., -1] = SELF_ATTN_SCORE
        if sinks is None:
            weights = sim.softmax(dim=-1)
        else:
            sink = sinks.expand(*sim.shape[:-1], 1)
            weights = torch.cat((sim, sink), dim=-1).softmax(dim=-1)[..., :-1]
        if not shared_qk:  # a query that sees no key (a bias hid them all) outputs zeros, as sdpa's does
            weights = weights.masked_fill(sim.isneginf().all(dim=-1, keepdim=True), 0.0)
        out = weights @ v
    return out.reshape(b, h, 1, -1).to(dtype)


def _rotate_step(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """`x * cos + roll(x) * signed_sin` over the last dim (see `positional.rotate_step`)."""
    x = x.to(cos.dtype)
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), signed_sin)


def _decode_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor,
                   cos: torch.Tensor | None, sig: torch.Tensor | None, row: torch.Tensor, key_bias: torch.Tensor | None,
                   key_factors: torch.Tensor | None, slot: int, first: int, scale: float, shared_qk: bool,
                   softcap: float, sinks: torch.Tensor | None, sink_k: torch.Tensor | None,
                   sink_v: torch.Tensor | None, sink_row: torch.Tensor | None) -> torch.Tensor:
    """The decode kernel (`csrc/decode_cpu.cpp`: it writes the new, rotated `k`, `v` `(b, h_kv, d)` into the ring
    buffers at `slot` and `slot + slots` and attends over the window from `first`) as the op
    `windowed_attention::decode_attend`, which declares those writes: what torch.export sees (an op defined in
    Python, so an exported program loads without the kernel). torch.compile calls the kernel's own op,
    `windowed_attention_cpu::decode_attend` (the same schema, registered in C++ for CPU tensors: no Python
    between the graph and the kernel); eager steps call the kernel directly (one dispatch less)."""
    return fused_cpu.kernel().decode_attend(q, k, v, k_buf, v_buf, cos, sig, row, key_bias, key_factors, slot, first,
                                            scale, shared_qk, softcap, sinks, sink_k, sink_v, sink_row)


fused_cpu.LIBRARY.define("decode_attend" + torch.library.infer_schema(_decode_attend, mutates_args=("k_buf", "v_buf")))
fused_cpu.LIBRARY.impl("decode_attend", _decode_attend, "CPU")
decode_attend_op = torch.ops.windowed_attention.decode_attend.default


# The kernel's own op, `windowed_attention_cpu::decode_attend`: its schema (the same) and fake here, its CPU kernel
# registered in C++ (`csrc/decode_cpu.cpp`), so that a compiled graph calls the kernel with no Python between.
_KERNEL_LIBRARY = torch.library.Library("windowed_attention_cpu", "FRAGMENT")
_KERNEL_LIBRARY.define(str(decode_attend_op._schema).removeprefix("windowed_attention::"))


@torch.library.register_fake(decode_attend_op)
@torch.library.register_fake("windowed_attention_cpu::decode_attend", lib=_KERNEL_LIBRARY)
def _(q, k, v, k_buf, v_buf, *rest):
    return q.new_empty(q.shape[0], q.shape[1], v.shape[-1])


def attend_step(q, k, v, cache, rotation, row, *, scale: float, shared_qk: bool, key_factors=None, softcap=None,
                sinks=None, sink_spec: WindowSpec | None = None):
    """A decode step: rotate the new `q` `(b, h, 1, d)` and `k` `(b, h_kv, 1, d)` by `rotation`
    (`(cos, signed_sin)` `(b, d)` of each row's position, or None), write `k, v` into `cache` (a
    `KVCache`) and attend `q` over its window with the additive `row` `(b or 1, h or 1, slots)`.
    Returns the output `(b, h, 1, d_v)` and the new cache.

    `softcap` and `sinks` `(h,)` (learned sink logits): see `attend_one`. When the cache keeps sink tokens
    (`cache.sink_tokens > 0`), `sink_spec` is the window rule that says which of them a query sees only as
    sinks (`sink_row`); they join its keys (before the ring, so that its own key stays last).

    On CPU without autograd it is one call of our kernel (`csrc/decode_cpu.cpp`; it reads the sink tokens,
    and the new key joins them after it); elsewhere the torch ops below (the reference it is tested against).
    A step autograd records (grad mode, and any input or the cache requires grad) is the torch ops, and
    writes copies of the cache's buffers (`KVCache.update`), so it is differentiable through any number of
    steps.
    """
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                                 for t in (q, k, v, sinks, row, key_factors, *cache.buffers))
    if cache.sink_tokens and sink_spec is None:
        raise ValueError("sink_spec: a cache that keeps sink tokens needs the window rule that shows them")
    if cache.sink_tokens and key_factors is not None:
        raise ValueError("key_factors (xpos) cannot be combined with a cache that keeps sink tokens")
    positions = cache.positions
    if q.device.type == "cpu" and q.dtype in fused_cpu.DTYPES and not needs_grad and fused_cpu.available():
        sink_k = sink_v = seen_sinks = None
        if cache.sink_tokens:
            sink_k, sink_v = cache.sink_buffers
            seen_sinks = sink_row(sink_spec, positions, cache.sink_tokens, row.dtype)[:, 0].contiguous()  # (b, S)
        writes_sinks = cache.sinks_to_write
        cache, slot, first, key_bias = cache.advance(writes_sinks=writes_sinks)
        k_buf, v_buf = cache.buffers
        cos, sin = (None, None) if rotation is None else rotation
        if sinks is not None:
            sinks = sinks.detach().to(row.dtype).contiguous()
        if not torch.compiler.is_compiling():
            attend = fused_cpu.kernel().decode_attend
        else:  # the kernel is loaded (`available()` above)
            attend = torch.ops.windowed_attention_cpu.decode_attend.default
            if torch.compiler.is_exporting():
                attend = decode_attend_op
        out = attend(q[:, :, 0], k[:, :, 0], v[:, :, 0], k_buf, v_buf, cos, sin, row, key_bias, key_factors, slot,
                     first, scale, shared_qk, 0.0 if softcap is None else float(softcap), sinks, sink_k, sink_v,
                     seen_sinks)
        if writes_sinks:  # the new keys (rotated, as the kernel wrote them into the ring) of rows below S
            cache.write_sinks(positions, k_buf.select(2, slot), v_buf.select(2, slot))
        return out[:, :, None], cache
    dtype = q.dtype
    if rotation is not None:
        cos, sin = rotation[0][:, None, None], rotation[1][:, None, None]
        q, k = _rotate_step(q, cos, sin), _rotate_step(k, cos, sin).to(k.dtype)
    cache, keys, values, key_bias = cache.update(k, v)
    row = row[:, :, None] if key_bias is None else row[:, :, None] + key_bias
    if cache.sink_tokens:
        sink_k, sink_v = cache.sink_buffers
        extra = sink_row(sink_spec, positions, cache.sink_tokens, row.dtype)[:, :, None]  # (b, 1, 1, S)
        keys, values = torch.cat((sink_k, keys), dim=-2), torch.cat((sink_v, values), dim=-2)
        shape = (extra.shape[0], row.shape[1], 1)
        row = torch.cat((extra.expand(*shape, -1), row.expand(*shape, -1)), dim=-1)
    out = attend_one(q, keys, values, row, scale=scale, shared_qk=shared_qk, key_factors=key_factors,
                     softcap=softcap, sinks=sinks)
    return out.to(dtype), cache
