"""`LocalMHA`: multi-head local attention with projections, optional prenorm, qk-rmsnorm and value gates."""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .attention import LocalAttention
from .kv_cache import KVCache
from .ops.validation import check_bool, check_int, check_probability


class LocalMHA(nn.Module):
    """Multi-head local attention on `x` `(b, n, dim)` (drop-in for local-attention's class).

    `exact_windowsize` defaults to True. `qk_rmsnorm` l2-normalises q and k, multiplies them by learned
    per-channel scales and uses `qk_scale` as the attention scale. `dropout` drops attention weights.
    `kv_heads` (default `heads`, must divide it) is grouped-query attention: keys and values get
    `kv_heads` heads, query head `i` uses kv head `i // (heads // kv_heads)`, and the cache holds `kv_heads`.
    With `return_cache=True` (causal only) the forward also returns a `KVCache`; passing it back as
    `cache` with the next single token `x` `(b, 1, dim)` gives exactly that token's output of a full
    forward over the whole sequence, in O(window) time and memory.
    """

    def __init__(
        self,
        *,
        dim: int,
        window_size: int,
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
        **kwargs,
    ):
        super().__init__()
        dim, dim_head, heads = check_int("dim", dim, 1), check_int("dim_head", dim_head, 1), check_int("heads", heads, 1)
        prenorm, self.qk_rmsnorm = check_bool("prenorm", prenorm), check_bool("qk_rmsnorm", qk_rmsnorm)
        gate_values_per_head = check_bool("gate_values_per_head", gate_values_per_head)
        if isinstance(qk_scale, bool) or not isinstance(qk_scale, numbers.Real) or qk_scale <= 0:
            raise ValueError(f"qk_scale must be a positive number, got {qk_scale!r}")
        if kwargs.get("use_rotary_pos_emb", True) and dim_head % 2:
            raise ValueError(f"dim_head must be even for rotary embeddings (or pass use_rotary_pos_emb=False), got {dim_head}")
        kv_heads = heads if kv_heads is None else check_int("kv_heads", kv_heads, 1)
        if heads % kv_heads:
            raise ValueError(f"kv_heads must divide heads ({heads}), got {kv_heads}")
        exact_windowsize = True if exact_windowsize is None else exact_windowsize
        inner = dim_head * heads

        self.heads, self.kv_heads, self.causal = heads, kv_heads, causal
        self.norm = nn.LayerNorm(dim) if prenorm else None
        # one projection for q, k, v ((heads + 2 kv_heads) * dim_head outputs: local-attention's layout when
        # kv_heads == heads)
        self.to_qkv = nn.Linear(dim, dim_head * (heads + 2 * kv_heads), bias=False)
        if self.qk_rmsnorm:
            self.q_scale = nn.Parameter(torch.ones(dim_head))
            self.k_scale = nn.Parameter(torch.ones(dim_head))
        self.attn_fn = LocalAttention(
            dim=dim_head, window_size=window_size, causal=causal, autopad=True,
            dropout=check_probability("dropout", dropout),
            scale=float(qk_scale) if self.qk_rmsnorm else None,
            exact_windowsize=exact_windowsize, use_xpos=use_xpos, xpos_scale_base=xpos_scale_base, **kwargs,
        )
        self.window_size, self.exact_windowsize = self.attn_fn.window_size, self.attn_fn.exact_windowsize
        self.to_v_gate = nn.Sequential(nn.Linear(dim, heads)) if gate_values_per_head else None
        self.to_out = nn.Linear(inner, dim, bias=False)

    def _project(self, h):
        """`h` `(b, n, dim)` -> `q` `(b, heads, n, d)`, `k, v` `(b, kv_heads, n, d)`."""
        qkv = self.to_qkv(h)
        if self.kv_heads == self.heads:
            return rearrange(qkv, "b n (qkv h d) -> qkv b h n d", qkv=3, h=self.heads)
        d = qkv.shape[-1] // (self.heads + 2 * self.kv_heads)
        q, k, v = qkv.split((self.heads * d, self.kv_heads * d, self.kv_heads * d), dim=-1)
        q = rearrange(q, "b n (h d) -> b h n d", h=self.heads)
        k, v = (rearrange(t, "b n (h d) -> b h n d", h=self.kv_heads) for t in (k, v))
        return q, k, v

    @property
    def cache_capacity(self) -> int:
        """Most earlier keys any next query can see."""
        spec = self.attn_fn.spec
        return spec.look_backward * spec.window_size + spec.window_size - 1

    def forward(self, x, mask=None, attn_bias=None, cache: KVCache | None = None, return_cache: bool = False,
                group=None):
        """`x` `(b, n, dim)` -> `(b, n, dim)` (and the `KVCache` with `return_cache`). With a process `group`,
        `x` and `mask` are this rank's shard of the sequence and the output is this rank's slice."""
        if not isinstance(x, torch.Tensor) or x.ndim != 3 or x.shape[-1] != self.to_qkv.in_features:
            raise ValueError(
                f"x must be a tensor of shape (b, n, dim = {self.to_qkv.in_features}), got {getattr(x, 'shape', type(x).__name__)}"
            )
        return_cache = check_bool("return_cache", return_cache)
        if group is not None and (cache is not None or return_cache):
            raise ValueError("group cannot be combined with cache or return_cache (decoding runs in one process)")
        if (cache is not None or return_cache) and not self.causal:
            raise ValueError("cache and return_cache need causal=True (decoding one token at a time)")
        if return_cache and mask is not None:
            raise ValueError("mask cannot be combined with return_cache (the cache keeps no key mask)")
        if cache is not None:
            if not isinstance(cache, KVCache):
                raise TypeError(f"cache must be the KVCache returned with return_cache=True, got {type(cache).__name__}")
            if x.shape[1] != 1:
                raise ValueError(f"with cache, x must hold exactly one new position (b, 1, dim), got {tuple(x.shape)}")
            if mask is not None:
                raise ValueError("mask cannot be combined with cache (the cache keeps no key mask)")

        h = self.norm(x) if self.norm is not None else x
        q, k, v = self._project(h)
        if self.qk_rmsnorm:
            q = F.normalize(q, dim=-1) * self.q_scale
            k = F.normalize(k, dim=-1) * self.k_scale

        if cache is None:
            out = self.attn_fn(q, k, v, mask=mask, attn_bias=attn_bias, group=group)
            new_cache = KVCache.from_prefill(k, v, self.cache_capacity) if return_cache else None
        else:
            new_cache, keys, values = cache.append(k, v)
            out = self.attn_fn.decode(q, keys, values, position=cache.length, attn_bias=attn_bias)

        if self.to_v_gate is not None:
            out = out * rearrange(self.to_v_gate(h), "b n h -> b h n 1").sigmoid()
        out = self.to_out(rearrange(out, "b h n d -> b n (h d)"))
        return (out, new_cache) if return_cache else out
