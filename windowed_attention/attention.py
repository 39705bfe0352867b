"""`LocalAttention`: the op as a module, with rotary/xpos positions, autopad and dropout."""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F
from torch import nn

from .ops import attend, make_spec
from .ops.api import pack_leading, unpack_leading
from .ops.decode import attend_one, score_row
from .ops.dtypes import accumulation_dtype
from .ops.validation import check_attn_bias, check_bool, check_mask, check_probability, check_qkv, check_scale
from .parallel.comm import group_info
from .positional import SinusoidalEmbeddings, apply_rotation, rotate, rotation_tables, xpos_factors


class LocalAttention(nn.Module):
    """Local windowed attention over `q, k, v` `(..., n, d)` (drop-in for local-attention's class).

    With `dim` (the head dim) and `use_rotary_pos_emb`, rotary embeddings (and xpos with `use_xpos`)
    are applied so that scores depend only on the true distance `i - j`. `autopad` accepts any `n`
    (padding is never attended to); without it `n` must be a multiple of `window_size`.
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
    ):
        super().__init__()
        self.spec = make_spec(window_size, causal, look_backward, look_forward, exact_windowsize)
        self.window_size, self.causal = self.spec.window_size, self.spec.causal
        self.look_backward, self.look_forward = self.spec.look_backward, self.spec.look_forward
        self.exact_windowsize = self.spec.exact_windowsize
        self.dropout = nn.Dropout(check_probability("dropout", dropout))
        self.shared_qk = check_bool("shared_qk", shared_qk)
        self.autopad = check_bool("autopad", autopad)
        self.scale = check_scale(scale)
        use_rotary_pos_emb = check_bool("use_rotary_pos_emb", use_rotary_pos_emb)
        self.use_xpos = check_bool("use_xpos", use_xpos)
        if xpos_scale_base is not None and (
            isinstance(xpos_scale_base, bool) or not isinstance(xpos_scale_base, numbers.Real) or xpos_scale_base <= 0
        ):
            raise ValueError(f"xpos_scale_base must be a positive number or None, got {xpos_scale_base!r}")

        if rel_pos_emb_config is not None:  # deprecated spelling of `dim` in local-attention
            dim = rel_pos_emb_config[0]
        self.rel_pos = None
        if use_rotary_pos_emb and dim is not None:
            self.rel_pos = SinusoidalEmbeddings(
                dim, use_xpos=self.use_xpos,
                scale_base=xpos_scale_base if xpos_scale_base is not None else self.window_size // 2 or 1,
            )
        elif self.use_xpos:
            raise ValueError("use_xpos needs rotary embeddings: give dim (the head dim) and keep use_rotary_pos_emb=True")
        self._rotation_cache = None  # (key, tables) of the last call: see `_rotation`

    def forward(self, q, k, v, mask=None, input_mask=None, attn_bias=None, window_size=None, group=None):
        """`q, k` `(..., n, d)`, `v` `(..., n, d_v)` -> `(..., n, d_v)`; `mask` `(b, n)` bool, True = attend.

        With a process `group`, `q, k, v` and `mask` are this rank's shard of the sequence (positions
        `r * n .. (r + 1) * n - 1`: rotary and xpos use them) and the output is this rank's slice.
        """
        if mask is not None and input_mask is not None:
            raise ValueError("give either mask or input_mask (its alias), not both")
        mask = input_mask if mask is None else mask
        spec = self.spec
        if window_size is not None:
            if not self.use_xpos:
                raise ValueError("window_size can be overridden in forward only with use_xpos=True (length extrapolation)")
            spec = make_spec(window_size, spec.causal, spec.look_backward, spec.look_forward, spec.exact_windowsize)

        check_qkv(q, k, v)
        rank, world = group_info(group) if group is not None else (0, 1)
        if q.shape[-2] == 0 and group is None:
            return q.new_zeros(*q.shape[:-1], v.shape[-1])
        lead, (q, k, v) = pack_leading(q, k, v)
        packed, n, d = q.shape
        if not self.autopad and (n * world) % spec.window_size:
            raise ValueError(
                f"sequence length {n * world} must be a multiple of window_size {spec.window_size}; pass autopad=True to allow any length"
            )
        if mask is not None:
            check_mask(mask, packed, n, q.device)
        if attn_bias is not None:
            check_attn_bias(attn_bias, packed, spec.window_size, spec.span, q.device)
        if self.rel_pos is not None and d != self.rel_pos.dim:
            raise ValueError(f"dim ({self.rel_pos.dim}) must equal the head dim of q and k ({d}) for rotary embeddings")

        if self.shared_qk:
            k = F.normalize(k, dim=-1)
        q, k, key_scale = self._positions(q, k, spec, offset=rank * n)
        out = attend(
            q, k, v, spec,
            scale=d**-0.5 if self.scale is None else self.scale,
            mask=mask, attn_bias=attn_bias, mask_self=self.shared_qk, key_scale=key_scale,
            dropout_p=self.dropout.p if self.training else 0.0, group=group,
        )
        return unpack_leading(out, lead)

    def _positions(self, q, k, spec, offset: int = 0):
        """Rotary (+ window-relative xpos) on `q, k` `(P, n, d)` at positions `offset .. offset + n - 1`;
        returns `q, k, key_scale`."""
        if self.rel_pos is None:
            return q, k, None
        q_tables, k_tables, key_scale = self._rotation(q.shape[-2], spec, q.device, q.dtype, offset)
        return apply_rotation(q, q_tables), apply_rotation(k, k_tables), key_scale

    def _rotation(self, n: int, spec, device, dtype, offset: int = 0):
        """The rotation tables of q and k and the xpos key scale for these positions and window, kept for
        the next call with the same ones (they depend on nothing learned)."""
        if torch.compiler.is_compiling():  # traced code computes them in the graph (no module state to guard)
            return self._rotation_tables(n, spec, device, dtype, offset)
        key = (n, offset, spec, device, dtype)
        if self._rotation_cache is None or self._rotation_cache[0] != key:
            self._rotation_cache = (key, self._rotation_tables(n, spec, device, dtype, offset))
        return self._rotation_cache[1]

    def _rotation_tables(self, n: int, spec, device, dtype, offset: int = 0):
        """`(q_tables, k_tables, key_scale)` at positions `offset .. offset + n - 1`: see
        `positional.rotation_tables` and `xpos_factors`."""
        cos, sin = self.rel_pos.rotation(torch.arange(offset, offset + n, device=device))
        q_factor = k_factor = key_scale = None
        if self.use_xpos:
            q_factor, k_factor, key_scale = xpos_factors(
                self.rel_pos, n, spec.window_size, spec.look_backward, spec.look_forward, device, offset
            )
        return rotation_tables(cos, sin, q_factor, dtype), rotation_tables(cos, sin, k_factor, dtype), key_scale

    def decode(self, q, k, v, position: int, attn_bias=None):
        """Attention of the one query at absolute `position` over its most recent keys.

        `q` `(..., 1, d)`; `k, v` `(..., m, d)` are the raw keys/values of positions
        `position - m + 1 .. position` (the query's own last). Gives what `forward` gives for that query
        in a causal model (keys before the window are simply not passed or are masked here).
        """
        m = k.shape[-2]
        if self.shared_qk:
            k = F.normalize(k, dim=-1)
        if self.rel_pos is not None:
            rel = torch.arange(1 - m, 1, device=q.device)  # key positions relative to the query's
            cos, sin = self.rel_pos.rotation(rel)
            factor = self.rel_pos.xpos_scale(-rel) if self.use_xpos else None
            k = rotate(k, cos, sin, factor)
        compute = accumulation_dtype(q.dtype)
        row = score_row(self.spec, position, m, attn_bias, q.device, compute)
        scale = q.shape[-1] ** -0.5 if self.scale is None else self.scale
        return attend_one(q, k, v, row, scale=scale, shared_qk=self.shared_qk)
