"""`LocalMHA`: multi-head local attention with projections, optional prenorm, qk-rmsnorm and value gates."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import LocalAttention
from .kv_cache import KVCache, Weights
from .linear import Linear
from .ops.decode import cache_capacity
from .ops.validation import MAX_SCALE, check_bool, check_int, check_positive_real, check_probability


class LocalMHA(nn.Module):
    """Multi-head local attention on `x` `(b, n, dim)` (drop-in for local-attention's class).

    `exact_windowsize` defaults to True. `qk_rmsnorm` l2-normalises q and k, multiplies them by learned
    per-channel scales and uses `qk_scale` as the attention scale. `dropout` drops attention weights.
    `kv_heads` (default `heads`, must divide it) is grouped-query attention: keys and values get
    `kv_heads` heads, query head `i` uses kv head `i // (heads // kv_heads)`, and the cache holds `kv_heads`.
    With `return_cache=True` (causal only) the forward also returns a `KVCache`; passing it back as
    `cache` with the next single token `x` `(b, 1, dim)` gives exactly that token's output of a full
    forward over the whole sequence, in O(window) time and memory. Rows may hold sequences of different
    lengths: give the prefill a right-padding `mask`. The cache belongs to this layer and its weights as
    they were: another layer, or this one after its parameters changed (an optimizer step,
    `load_state_dict`), refuses it (`KVCache.check_weights`; `cache.detach()` renews it). `autopad`
    (default True: any length) is passed to `LocalAttention`.

    Modern options: `window_size` may be a `(left, right)` token window (`exact_windowsize` then defaults to
    False, the only value it takes); `sink_tokens` and `softcap` go to `LocalAttention`; `attn_sinks=True`
    gives the layer a learned parameter `sinks` `(heads,)` (zeros at init: one logit per query head, also
    with `kv_heads`) that joins every softmax denominator, in the forward and in decode steps. Without it
    the layer has no such parameter (state dicts of local-attention load with `strict=True`).
    """

    def __init__(
        self,
        *,
        dim: int,
        window_size: int | tuple[int, int],
        dim_head: int = 64,
        heads: int = 8,
        dropout: float = 0.0,
        causal: bool = False,
        prenorm: bool = False,
        qk_rmsnorm: bool = False,
        qk_scale: float = 8,
        use_xpos: bool = False,
        xpos_scale_base=None,
        exact_windowsize: bool | None = None,
        gate_values_per_head: bool = False,
        kv_heads: int | None = None,
        autopad: bool = True,
        attn_sinks: bool = False,
        sink_tokens: int = 0,
        softcap: float | None = None,
        **kwargs,
    ):
        super().__init__()
        dim, dim_head, heads = check_int("dim", dim, 1), check_int("dim_head", dim_head, 1), check_int("heads", heads, 1)
        prenorm, self.qk_rmsnorm = check_bool("prenorm", prenorm), check_bool("qk_rmsnorm", qk_rmsnorm)
        gate_values_per_head = check_bool("gate_values_per_head", gate_values_per_head)
        qk_scale = check_positive_real("qk_scale", qk_scale, MAX_SCALE)
        if kwargs.get("use_rotary_pos_emb", True) and dim_head % 2:
            raise ValueError(f"dim_head must be even for rotary embeddings (or pass use_rotary_pos_emb=False), got {dim_head}")
        kv_heads = heads if kv_heads is None else check_int("kv_heads", kv_heads, 1)
        if heads % kv_heads:
            raise ValueError(f"kv_heads must divide heads ({heads}), got {kv_heads}")
        attn_sinks = check_bool("attn_sinks", attn_sinks)
        if exact_windowsize is None:  # True for block windows; a token window says it all itself
            exact_windowsize = not isinstance(window_size, (tuple, list))
        inner = dim_head * heads

        self.heads, self.kv_heads, self.causal = heads, kv_heads, causal
        self.norm = nn.LayerNorm(dim) if prenorm else None
        # one projection for q, k, v ((heads + 2 kv_heads) * dim_head outputs: local-attention's layout when
        # kv_heads == heads)
        self.to_qkv = Linear(dim, dim_head * (heads + 2 * kv_heads), bias=False)
        if self.qk_rmsnorm:
            self.q_scale = nn.Parameter(torch.ones(dim_head))
            self.k_scale = nn.Parameter(torch.ones(dim_head))
        self.attn_fn = LocalAttention(
            dim=dim_head, window_size=window_size, causal=causal, autopad=check_bool("autopad", autopad),
            dropout=check_probability("dropout", dropout),
            scale=float(qk_scale) if self.qk_rmsnorm else None,
            exact_windowsize=exact_windowsize, use_xpos=use_xpos, xpos_scale_base=xpos_scale_base,
            sink_tokens=sink_tokens, softcap=softcap, **kwargs,
        )
        # learned sink logits, one per query head (gpt-oss); absent unless asked for
        self.sinks = nn.Parameter(torch.zeros(heads)) if attn_sinks else None
        self.window_size, self.exact_windowsize = self.attn_fn.window_size, self.attn_fn.exact_windowsize
        self.to_v_gate = nn.Sequential(Linear(dim, heads)) if gate_values_per_head else None
        self.to_out = Linear(inner, dim, bias=False)

    def _project(self, h):
        """`h` `(b, n, dim)` -> `q` `(b, heads, n, d)`, `k, v` `(b, kv_heads, n, d)`."""
        qkv = self.to_qkv(h)
        if self.kv_heads == self.heads:
            return qkv.unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)  # 3 x (b, h, n, d)
        d = qkv.shape[-1] // (self.heads + 2 * self.kv_heads)
        q, k, v = qkv.split((self.heads * d, self.kv_heads * d, self.kv_heads * d), dim=-1)
        q = q.unflatten(-1, (self.heads, d)).transpose(1, 2)  # (b, h, n, d)
        k, v = (t.unflatten(-1, (self.kv_heads, d)).transpose(1, 2) for t in (k, v))
        return q, k, v

    @property
    def cache_capacity(self) -> int | None:
        """Most earlier keys any next query can see (what a `KVCache` of this layer holds at most, besides its
        sink tokens; a window longer than the text is cut to a bound on its length while decoding, see
        `ops.decode.decode_window`). None for a token window unbounded on the left (`(-1, 0)`): its cache
        grows with the text."""
        spec = self.attn_fn.spec
        if spec.tokens is not None and spec.tokens[0] < 0:
            return None
        return cache_capacity(spec)

    def forward(self, x, mask=None, attn_bias=None, cache: KVCache | None = None, return_cache: bool = False,
                group=None, cache_dtype=None, documents=None):
        """`x` `(b, n, dim)` -> `(b, n, dim)` (and the `KVCache` with `return_cache`). With a process `group`,
        `x` and `mask` are this rank's shard of the sequence and the output is this rank's slice.

        Prefill and decode are this one forward: with `return_cache` the attention also returns its
        cache (`mask` may then mark right padding: rows of different lengths); with `cache`, `x`
        `(b, 1, dim)` is the next position of every row (no einops here: a decode step is a few dozen
        small ops, and their overhead is the step's cost). `cache_dtype`: see `LocalAttention.forward`.
        `documents` `(b, n)`: non-decreasing ids of packed documents, each computed as if alone (positions
        restart at its start; not with `cache`/`return_cache`).
        """
        if not isinstance(x, torch.Tensor) or x.ndim != 3 or x.shape[-1] != self.to_qkv.in_features:
            raise ValueError(
                f"x must be a tensor of shape (b, n, dim = {self.to_qkv.in_features}), got {getattr(x, 'shape', type(x).__name__)}"
            )
        if cache is not None and x.shape[1] != 1:
            raise ValueError(f"with cache, x must hold exactly one new position (b, 1, dim), got {tuple(x.shape)}")
        if isinstance(cache, KVCache):  # anything else: the attention names it
            cache.check_weights(self)

        h = self.norm(x) if self.norm is not None else x
        q, k, v = self._project(h)
        if self.qk_rmsnorm:
            q = F.normalize(q, dim=-1) * self.q_scale
            k = F.normalize(k, dim=-1) * self.k_scale

        out = self.attn_fn(q, k, v, mask=mask, attn_bias=attn_bias, cache=cache, return_cache=return_cache,
                           group=group, cache_dtype=cache_dtype, documents=documents, sinks=self.sinks)
        if return_cache:
            out, new_cache = out
            cache = new_cache.tie(Weights(self)) if cache is None else new_cache
        if self.to_v_gate is not None:
            out = out * self.to_v_gate(h).transpose(1, 2)[..., None].sigmoid()  # gate (b, n, h) -> (b, h, n, 1)
        out = self.to_out(out.transpose(1, 2).flatten(2))  # (b, h, n, d) -> (b, n, h d)
        return (out, cache) if return_cache else out
