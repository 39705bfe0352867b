"""`LocalAttention`: the op as a module, with rotary/xpos positions, autopad and dropout."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .ops import attend, make_spec
from .kv_cache import KVCache
from .ops.api import fit_bias, pack_leading, unpack_leading
from .ops.call import AttentionCall, document_bounds
from .ops.decode import attend_step, cache_capacity, decode_window, score_table
from .ops.dtypes import accumulation_dtype, result_dtype
from .ops.spec import WindowSpec
from .ops.validation import (
    check_attn_bias,
    check_bool,
    check_documents,
    check_mask,
    check_positive_real,
    check_probability,
    check_qkv,
    check_scale,
    check_sinks,
)
from .parallel.comm import group_info
from .positional import SinusoidalEmbeddings, apply_rotation, rotation_tables, step_rotation, xpos_factors

ROTATION_CHUNK = 256  # decode steps whose rotation tables are computed at once


@dataclass
class DecodeConstants:
    """What a decode step needs that is fixed for a generation, kept in the cache (see `KVCache`).

    `spec` is the rule the cache decodes positions below `limit` with (`ops.decode.decode_window`: the
    layer's, or its window cut to a length bound that grows with the text, the cache with it); `table`
    is `ops.decode.score_table` for it and the cache's `attn_bias` (a step given another tensor rebuilds
    it); `key_factors` `(slots, d)` the xpos factors by key index; the rotation tables
    of the next `ROTATION_CHUNK` columns are computed together (`cos`, `sin` `(C, b, d)`, from column
    `base`), as are the query residues `(C, b)` that pick each row's line of `table`.
    """

    spec: WindowSpec
    limit: int
    table: torch.Tensor
    key_factors: torch.Tensor | None
    base: int | None = None
    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None
    residues: torch.Tensor | None = None


class LocalAttention(nn.Module):
    """Local windowed attention over `q, k, v` `(..., n, d)` (drop-in for local-attention's class).

    With `dim` (the head dim) and `use_rotary_pos_emb`, rotary embeddings (and xpos with `use_xpos`)
    are applied so that scores depend only on the true distance `i - j`. `autopad` accepts any `n`
    (padding is never attended to); without it `n` must be a multiple of `window_size`.

    Modern options (`ops.api.local_attention`): `window_size=(left, right)` is a token window (flash-attn's
    convention, -1 unbounded; `self.window_size` is then that pair). It takes any length (no multiple of a
    block: `autopad` changes nothing), rotary embeddings (relative: they need no window), no `attn_bias`
    (its layout is the blocks') and no xpos (its decay is measured from window blocks). `sink_tokens=S`:
    the first `S` positions (of each document) are visible to every query (a `KVCache` keeps them
    forever beside its ring); xpos is refused with them (a sink is seen at any distance, and xpos decays
    scores with distance). `softcap`: scores become `softcap * tanh(score / softcap)` before any bias.
    `forward(..., documents=None, sinks=None)`: packed documents (rotary and xpos positions restart at
    each document's start, so a packed row equals each document alone) and learned sink logits `(h,)`.
    `autopad` never materialises padding (the op takes any length and computes no position past `n`), so
    documents need no padding id.
    """

    def __init__(
        self,
        window_size: int,
        causal: bool = False,
        look_backward: int = 1,
        look_forward: int | None = None,
        dropout: float = 0.0,
        shared_qk: bool = False,
        rel_pos_emb_config=None,
        dim: int | None = None,
        autopad: bool = False,
        exact_windowsize: bool = False,
        scale: float | None = None,
        use_rotary_pos_emb: bool = True,
        use_xpos: bool = False,
        xpos_scale_base: float | None = None,
        sink_tokens: int = 0,
        softcap: float | None = None,
    ):
        super().__init__()
        self.spec = make_spec(window_size, causal, look_backward, look_forward, exact_windowsize, sink_tokens, softcap)
        self.causal = self.spec.causal
        # the block window, or the (left, right) token window as given
        self.window_size = self.spec.window_size if self.spec.tokens is None else self.spec.tokens
        self.sink_tokens, self.softcap = self.spec.sink_tokens, self.spec.softcap
        self.look_backward, self.look_forward = self.spec.look_backward, self.spec.look_forward
        self.exact_windowsize = self.spec.exact_windowsize
        self.dropout = nn.Dropout(check_probability("dropout", dropout))
        self.shared_qk = check_bool("shared_qk", shared_qk)
        self.autopad = check_bool("autopad", autopad)
        self.scale = check_scale(scale)
        use_rotary_pos_emb = check_bool("use_rotary_pos_emb", use_rotary_pos_emb)
        self.use_xpos = check_bool("use_xpos", use_xpos)
        if xpos_scale_base is not None:
            xpos_scale_base = check_positive_real("xpos_scale_base", xpos_scale_base)

        if rel_pos_emb_config is not None:  # deprecated spelling of `dim` in local-attention
            dim = rel_pos_emb_config[0]
        self.rel_pos = None
        if self.use_xpos and self.spec.tokens is not None:
            raise ValueError("use_xpos: xpos measures its decay from window blocks; a (left, right) token "
                             "window_size takes rotary embeddings without xpos")
        if self.use_xpos and self.spec.sink_tokens:
            raise ValueError("use_xpos cannot be combined with sink_tokens (xpos decays scores with distance; a "
                             "sink token is seen at any distance)")
        if use_rotary_pos_emb and dim is not None:
            self.rel_pos = SinusoidalEmbeddings(
                dim, use_xpos=self.use_xpos,
                scale_base=xpos_scale_base if xpos_scale_base is not None else self.spec.window_size // 2 or 1,
            )
        elif self.use_xpos:
            raise ValueError("use_xpos needs rotary embeddings: give dim (the head dim) and keep use_rotary_pos_emb=True")
        self._rotation_cache = None  # (key, tables) of the last call: see `_rotation`

    def forward(self, q, k, v, mask=None, input_mask=None, attn_bias=None, window_size=None,
                cache: KVCache | None = None, return_cache: bool = False, group=None, cache_dtype=None,
                documents=None, sinks=None):
        """`q, k` `(..., n, d)`, `v` `(..., n, d_v)` -> `(..., n, d_v)`; `mask` `(b, n)` bool, True = attend.

        Decoding (causal only, `q, k, v` `(b, h, n, d)`): `return_cache=True` also returns a `KVCache` of
        the keys the next query can see; `mask` may then mark right padding (each row's real positions
        first: the rows hold prompts of different lengths). With that `cache`, `q, k, v` `(b, h, 1, d)`
        are the next position of every row and the output is what `forward` gives it over the whole
        sequence, in O(window) time; the new cache comes back with it. `cache_dtype` (with `return_cache`
        and no `cache`): what the cache stores keys and values in, see `kv_cache.storage_dtype` (default:
        the keys' dtype, exact).

        With a process `group`, `q, k, v` and `mask` are this rank's shard of the sequence (positions
        `r * n .. (r + 1) * n - 1`: rotary and xpos use them) and the output is this rank's slice
        (decoding runs in one process).

        `documents` `(b, n)` non-decreasing integer ids of packed documents: each is computed as if alone,
        rotary (and xpos) positions counting from its start (with a `group`, rotary keeps the global
        positions: its scores depend only on `i - j`, equal within a document; xpos is refused there). Not
        with `cache`/`return_cache` (decoding is one document per row). `sinks` `(h,)`: learned sink
        logits, one per query head (row `p` of the packed `(..., n, d)` uses `sinks[p % h]`), also in decode
        steps.
        """
        if mask is not None and input_mask is not None:
            raise ValueError("give either mask or input_mask (its alias), not both")
        mask = input_mask if mask is None else mask
        return_cache = check_bool("return_cache", return_cache)
        if cache_dtype is not None and (cache is not None or not return_cache):
            raise ValueError("cache_dtype applies when a cache is built (return_cache=True without cache)")
        if cache is not None or return_cache:
            if documents is not None:
                raise ValueError("documents cannot be combined with cache or return_cache (decoding is one "
                                 "document per row: give each document its own row)")
            if not self.causal:
                raise ValueError("cache and return_cache need causal=True (decoding one position at a time)")
            if window_size is not None:
                raise ValueError("window_size cannot be overridden with cache or return_cache")
            if group is not None:
                raise ValueError("group cannot be combined with cache or return_cache (decoding runs in one process)")
        if cache is not None:
            if mask is not None:
                raise ValueError("mask cannot be combined with cache (the cache knows each row's length)")
            out, cache = self._decode(q, k, v, cache, attn_bias, sinks)
            return (out, cache) if return_cache else out
        spec = self.spec
        if window_size is not None:
            if not self.use_xpos:
                raise ValueError("window_size can be overridden in forward only with use_xpos=True (length extrapolation)")
            spec = make_spec(window_size, spec.causal, spec.look_backward, spec.look_forward, spec.exact_windowsize,
                             spec.sink_tokens, spec.softcap)

        check_qkv(q, k, v)
        rank, world = group_info(group) if group is not None else (0, 1)
        if q.shape[-2] == 0 and group is None:
            return q.new_zeros(*q.shape[:-1], v.shape[-1], dtype=result_dtype(q.dtype, q.device.type))
        kv_lead = tuple(k.shape[:-2])  # fewer heads than q with grouped-query attention
        lead, (q, k, v) = pack_leading(q, k, v)
        packed, n, d = q.shape
        if spec.tokens is None and not self.autopad and (n * world) % spec.window_size:
            raise ValueError(
                f"sequence length {n * world} must be a multiple of window_size {spec.window_size}; pass autopad=True to allow any length"
            )
        if mask is not None:
            check_mask(mask, packed, n, q.device)
        if attn_bias is not None:
            if spec.tokens is not None:
                raise ValueError("attn_bias: a (left, right) token window_size takes no attn_bias (its layout is "
                                 "the window blocks'); use an int window_size")
            check_attn_bias(attn_bias, packed, spec, n * world, q.device)
        if documents is not None:
            check_documents(documents, packed, n, q.device)
            documents = documents.long()
            if group is not None and self.use_xpos:
                raise ValueError("documents with a group cannot restart xpos positions per document (a document "
                                 "may start on another rank); use rotary without xpos")
        if sinks is not None:
            check_sinks(sinks, packed, q)
        if self.rel_pos is not None and d != self.rel_pos.dim:
            raise ValueError(f"dim ({self.rel_pos.dim}) must equal the head dim of q and k ({d}) for rotary embeddings")

        if return_cache and (len(lead) != 2 or (mask is not None and mask.shape[0] != lead[0])):
            raise ValueError("return_cache needs q, k, v of shape (b, h, n, d) and a mask of shape (b, n)")

        # The attention runs the window cut to the whole sequence (all ranks' shards; xpos tables too):
        # its cost follows min(window, length). A cache keeps the layer's own window and bias.
        window, window_bias, _ = fit_bias(spec, n * world, attn_bias)
        if self.shared_qk:
            k = F.normalize(k, dim=-1)
        # Rotary alone is relative (a score depends on the distance only) and no score crosses a document, so
        # the plain positions (cached tables, the fused rotation) give every document its restarted positions'
        # scores; xpos scales keys by their position (restarted per document) and needs them per row.
        if documents is not None and group is None and self.rel_pos is not None and self.use_xpos:
            q, k_at, key_scale = self._document_positions(q, k, window, documents)
        else:
            q, k_at, key_scale = self._positions(q, k, window, offset=rank * n)
        call = AttentionCall(
            window, d**-0.5 if self.scale is None else self.scale, mask=mask, attn_bias=window_bias,
            mask_self=self.shared_qk, key_scale=key_scale, dropout_p=self.dropout.p if self.training else 0.0,
            documents=documents, sinks=sinks,
        )
        out = attend(q, k_at, v, call, group=group)
        out = unpack_leading(out, lead)
        if not return_cache:
            return out
        # the cache holds keys at their positions: rotated, without xpos (applied by distance when attending)
        k_at = k_at if key_scale is None else self._positions(k, k, spec, xpos=False)[1]
        return out, self._new_cache(unpack_leading(k_at, kv_lead), unpack_leading(v, kv_lead), mask, attn_bias, packed,
                                    cache_dtype)

    def _signature(self, dtype, device) -> tuple:
        """What a cache built by this layer depends on: another layer with the same one can use it."""
        rel = self.rel_pos
        rotary = None if rel is None else (rel.dim, rel.theta, rel.use_xpos, rel.scale_base)
        return (self.spec, self.shared_qk, self.scale, rotary, dtype, device)

    def _new_cache(self, k, v, mask, attn_bias, packed: int, cache_dtype=None) -> KVCache:
        """The cache after a prefill of positioned keys `k` and values `v` `(b, h_kv, n, d)` (`packed`: b times
        the query heads), stored in `cache_dtype` (`kv_cache.storage_dtype`)."""
        lengths, length = None, k.shape[-2]
        if mask is not None:
            lengths = mask.sum(dim=-1)
            positions = torch.arange(length, device=mask.device)
            if not torch.equal(mask, positions < lengths[:, None]):
                raise ValueError("mask must mark a prefix of each row (right padding) to build a cache")
            if int(lengths.min()) < 1:
                raise ValueError("mask must keep at least one position of every row to build a cache")
            length = int(lengths.max())
        constants = self._decode_constants(length + 1, attn_bias, packed, k.dtype, k.device)
        return KVCache.from_prefill(
            k, v, cache_capacity(constants.spec), lengths, constants=constants,
            signature=self._signature(k.dtype, k.device), attn_bias=attn_bias, compute_dtype=accumulation_dtype(k.dtype),
            dtype=cache_dtype, sink_tokens=self.spec.sink_tokens,
        )

    def _decode_constants(self, n: int, attn_bias, packed: int, dtype, device) -> DecodeConstants:
        """The constants for decoding a text of `n` positions (so far) with `attn_bias` (for the layer's
        window or, when that is cut for decoding, for a cut that covers it)."""
        spec, limit = decode_window(self.spec, n)
        if attn_bias is not None:
            check_attn_bias(attn_bias, packed, self.spec, None if limit == sys.maxsize else limit, device)
            attn_bias = fit_bias(self.spec, limit, attn_bias)[1]
        compute = accumulation_dtype(dtype)
        key_factors = None
        if self.use_xpos:
            slots = cache_capacity(spec) + 1
            key_factors = self.rel_pos.xpos_scale(torch.arange(slots - 1, -1, -1, device=device)).to(compute)
        return DecodeConstants(spec, limit, score_table(spec, attn_bias, device, compute, limit), key_factors)

    def _check_cache(self, cache, q, k, v) -> None:
        if not isinstance(cache, KVCache):
            raise TypeError(f"cache must be the KVCache returned with return_cache=True, got {type(cache).__name__}")
        if q.ndim != 4 or q.shape[-2] != 1 or k.shape[:-1] != v.shape[:-1] or k.ndim != 4:
            raise ValueError(f"with cache, q, k, v must hold one position (b, h, 1, d), got q {tuple(q.shape)}")
        if cache.signature != self._signature(k.dtype, k.device):
            raise ValueError(
                "cache was built by a layer with another window, position encoding, dtype or device "
                f"({cache.signature}) than this one ({self._signature(k.dtype, k.device)})"
            )
        if (cache.batch, cache.heads, cache.head_dims) != (k.shape[0], k.shape[1], (k.shape[-1], v.shape[-1])):
            raise ValueError(
                f"cache holds batch {cache.batch}, {cache.heads} heads of dims {cache.head_dims}, but the "
                f"keys/values are {tuple(k.shape)} / {tuple(v.shape)}"
            )
        if q.shape[0] != k.shape[0] or q.shape[1] % k.shape[1]:
            raise ValueError(f"q {tuple(q.shape)} does not match the cached keys {tuple(k.shape)}")

    def _decode(self, q, k, v, cache: KVCache, attn_bias, sinks=None):
        """One position per row against `cache`: the output `(b, h, 1, d_v)` and the new cache (`sinks` `(h',)`
        with `h'` dividing the query heads `h`: head `i` uses `sinks[i % h']`)."""
        self._check_cache(cache, q, k, v)
        if sinks is not None:
            check_sinks(sinks, q.shape[1], q)
            if sinks.shape[0] != q.shape[1]:
                sinks = sinks.repeat(q.shape[1] // sinks.shape[0])
        # another bias than the cache's: its table, once; a text past the limit of a cut window: a longer
        # cut, in a ring as long as its window; none (a detached cache), or built in inference mode for a step
        # autograd records (it would save them): from the current weights
        constants = cache.constants
        if (constants is None or cache.attn_bias is not attn_bias or cache.length >= constants.limit
                or (torch.is_grad_enabled() and constants.table.is_inference())):
            constants = self._decode_constants(cache.length + 1, attn_bias, q.shape[0] * q.shape[1], k.dtype, k.device)
            cache = cache.resized(cache_capacity(constants.spec)).with_constants(constants, attn_bias)
        constants = cache.constants
        table = constants.table
        if torch.compiler.is_compiling():  # traced code: this step's rotation and residues in the graph (no chunk
            positions = cache.positions     # state, whose refresh would be a branch that recompiles)
            rotation = None if self.rel_pos is None else step_rotation(self.rel_pos, positions, table.dtype)
            residues = positions % constants.spec.window_size
        else:
            if constants.base is None or not constants.base <= cache.column < constants.base + ROTATION_CHUNK:
                self._next_chunk(constants, cache)
            step = cache.column - constants.base
            rotation = None if self.rel_pos is None else (constants.cos[step], constants.sin[step])
            residues = constants.residues[step]
        if self.shared_qk:
            k = F.normalize(k, dim=-1)
        row = table if table.shape[0] == 1 else table[residues]  # (b or 1, heads or 1, slots)
        scale = q.shape[-1] ** -0.5 if self.scale is None else self.scale
        return attend_step(q, k, v, cache, rotation, row, scale=scale, shared_qk=self.shared_qk,
                           key_factors=constants.key_factors, softcap=self.spec.softcap, sinks=sinks,
                           sink_spec=constants.spec)

    def _next_chunk(self, constants: DecodeConstants, cache: KVCache) -> None:
        """Rotation tables and residues of the `ROTATION_CHUNK` columns from `cache.column` on."""
        positions = cache.positions[None, :] + torch.arange(ROTATION_CHUNK, device=cache.device)[:, None]  # (C, b)
        constants.base = cache.column
        constants.residues = positions % constants.spec.window_size
        if self.rel_pos is not None:
            constants.cos, constants.sin = step_rotation(self.rel_pos, positions, constants.table.dtype)  # (C, b, d)

    def _positions(self, q, k, spec, offset: int = 0, xpos: bool = True):
        """Rotary (+ window-relative xpos unless `xpos=False`) on `q, k` `(P, n, d)` at positions
        `offset .. offset + n - 1`; returns `q, k, key_scale`."""
        if self.rel_pos is None:
            return q, k, None
        q_tables, k_tables, key_scale = self._rotation(q.shape[-2], spec, q.device, q.dtype, offset, xpos)
        return apply_rotation(q, q_tables), apply_rotation(k, k_tables), key_scale

    def _document_positions(self, q, k, spec, documents):
        """Rotary (+ xpos) on `q` `(P, n, d)`, `k` `(P_kv, n, d)` at positions counted from the start of each
        position's document (`documents` `(b, n)`, `b | P_kv`); returns `q, k, key_scale`."""
        b, n = documents.shape
        positions = torch.arange(n, device=documents.device) - document_bounds(documents)[0]  # (b, n)
        q_tables, k_tables, key_scale = self._rotation_tables(positions.flatten(), spec, q.dtype)
        rotated = []
        for x, (c, s) in ((q, q_tables), (k, k_tables)):  # tables (b * n, d / 2) -> (b, 1, n, d / 2)
            tables = (c.view(b, 1, n, -1), s.view(b, 1, n, -1))
            rotated.append(apply_rotation(x.reshape(b, -1, n, x.shape[-1]), tables).reshape(x.shape))
        return rotated[0], rotated[1], key_scale

    def _rotation(self, n: int, spec, device, dtype, offset: int = 0, xpos: bool = True):
        """The rotation tables of q and k and the xpos key scale for these positions and window, kept for
        the next call with the same ones (they depend on nothing learned)."""
        if torch.compiler.is_compiling():  # traced code computes them in the graph (no module state to guard)
            return self._rotation_tables(torch.arange(offset, offset + n, device=device), spec, dtype, xpos)
        key = (n, offset, spec, device, dtype, xpos)
        if self._rotation_cache is None or self._rotation_cache[0] != key:
            positions = torch.arange(offset, offset + n, device=device)
            self._rotation_cache = (key, self._rotation_tables(positions, spec, dtype, xpos))
        return self._rotation_cache[1]

    def _rotation_tables(self, positions: torch.Tensor, spec, dtype, xpos: bool = True):
        """`(q_tables, k_tables, key_scale)` at integer `positions` `(n,)`: see `positional.rotation_tables`
        and `xpos_factors` (left out with `xpos=False`)."""
        cos, sin = self.rel_pos.rotation(positions)
        q_factor = k_factor = key_scale = None
        if self.use_xpos and xpos:
            q_factor, k_factor, key_scale = xpos_factors(
                self.rel_pos, positions, spec.window_size, spec.look_backward, spec.look_forward
            )
        return rotation_tables(cos, sin, q_factor, dtype), rotation_tables(cos, sin, k_factor, dtype), key_scale
