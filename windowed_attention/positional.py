"""Rotary position embeddings and xpos, applied so that scores depend only on the distance i - j.

Rotary: q_i and k_j are rotated by angles `i * f` and `j * f`; their dot product depends on `i - j`
only. Angles are computed in float64 so that the rotation stays exact at any length.

xpos: q_i is scaled by `s ** (i / b)` and k_j by `s ** (-j / b)` (per channel, `s < 1`, `b` the scale
base), so a score decays as `s ** ((i - j) / b)`. Absolute exponents overflow on long sequences, so we
measure positions from a point inside each window (see `xpos_factors`): exponents stay bounded by a few
windows whatever the length.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from .ops import fused_cpu
from .ops.dtypes import accumulation_dtype
from .ops.validation import check_bool, check_int, check_positive_real


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """`[x1, x2] -> [-x2, x1]` over the last dim (halves)."""
    x1, x2 = rearrange(x, "... (r d) -> r ... d", r=2)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, freqs, scale=1):
    """local-attention's helper: rotate `q` and `k` by `freqs` `(n, d)`; xpos `scale` on q, its inverse on k.

    `q` takes the last `q.shape[-2]` rows of `freqs` (queries are the last positions of the keys).
    """
    q_len = q.shape[-2]
    q_freqs = freqs[..., -q_len:, :]
    inv_scale = scale**-1
    if isinstance(scale, torch.Tensor) and scale.ndim == 2:
        scale = scale[-q_len:, :]
    q = q * q_freqs.cos() * scale + rotate_half(q) * q_freqs.sin() * scale
    k = k * freqs.cos() * inv_scale + rotate_half(k) * freqs.sin() * inv_scale
    return q, k


class SinusoidalEmbeddings(nn.Module):
    """Rotary frequencies for head dim `dim` (even), optionally with xpos decay (`scale_base` required)."""

    def __init__(self, dim: int, scale_base=None, use_xpos: bool = False, theta: float = 10000):
        super().__init__()
        dim = check_int("dim", dim, 2)
        if dim % 2:
            raise ValueError(f"dim must be even for rotary embeddings, got {dim}")
        use_xpos = check_bool("use_xpos", use_xpos)
        if use_xpos and scale_base is None:
            raise ValueError("scale_base must be given when use_xpos=True")
        if scale_base is not None:
            scale_base = check_positive_real("scale_base", scale_base)
        self.dim, self.use_xpos, self.scale_base = dim, use_xpos, scale_base
        self.theta = check_positive_real("theta", theta)
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        self.register_buffer("inv_freq", inv_freq.float())
        scale = (torch.arange(0, dim, 2, dtype=torch.float64) + 0.4 * dim) / (1.4 * dim)
        self.register_buffer("scale", scale.float(), persistent=False)

    def _inv_freq64(self) -> torch.Tensor:
        return 1.0 / (self.theta ** (torch.arange(0, self.dim, 2, dtype=torch.float64, device=self.inv_freq.device) / self.dim))

    def forward(self, x: torch.Tensor):
        """local-attention's interface: `(freqs, scale)` for positions `0 .. x.shape[-2] - 1`, each `(n, dim)`.

        xpos exponents are centred on `n // 2`; without xpos `scale` is `ones(1)`.
        """
        n = x.shape[-2]
        t = torch.arange(n, device=x.device, dtype=torch.float64)
        freqs = torch.outer(t, self._inv_freq64())
        freqs = torch.cat((freqs, freqs), dim=-1).float()
        if not self.use_xpos:
            return freqs, torch.ones(1, device=x.device)
        return freqs, self.xpos_scale(t - n // 2).float()

    def rotation(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`cos, sin` of shape `(n, dim)` (float64; `rotate` casts) for integer `positions` `(n,)`."""
        angles = torch.outer(positions.to(torch.float64), self._inv_freq64())
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos(), angles.sin()

    def xpos_scale(self, power: torch.Tensor) -> torch.Tensor:
        """`scale ** (power / scale_base)` `(n, dim)` (float64) for positions `power` `(n,)`."""
        base = (torch.arange(0, self.dim, 2, dtype=torch.float64, device=self.scale.device) + 0.4 * self.dim) / (1.4 * self.dim)
        scale = base ** rearrange(power.to(torch.float64) / self.scale_base, "n -> n 1")
        return torch.cat((scale, scale), dim=-1)


def rotation_tables(cos: torch.Tensor, sin: torch.Tensor, factor: torch.Tensor | None, dtype: torch.dtype):
    """`(c, s)` `(n, d / 2)`: `cos, sin` `(n, d)` (float64, both halves equal) times `factor` `(n, d)`, in the
    dtype the rotation of `dtype` inputs computes in (float64 for float64, else float32)."""
    if factor is not None:
        cos, sin = cos * factor, sin * factor
    compute = accumulation_dtype(dtype)
    h = cos.shape[-1] // 2
    return cos[..., :h].to(compute).contiguous(), sin[..., :h].to(compute).contiguous()


KERNEL_MIN_NUMEL = 4096


def apply_rotation(x: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate `x` `(..., n, d)` by `rotation_tables` `(c, s)`: `x1 c - x2 s`, `x2 c + x1 s` over the halves of
    the last dim (local-attention's `x * cos + rotate_half(x) * sin`), computed in the tables' dtype and
    returned in x's. Tables of more dims (per-row positions, e.g. `(b, 1, n, d / 2)`) broadcast against `x`
    in the torch expression. On CPU our kernel does it in one pass each way (`fused_cpu.rotate`, a custom op that
    torch.compile traces; for tensors of `KERNEL_MIN_NUMEL` elements and more: a decoding step's single
    token is faster as the torch expression); elsewhere, and for small tensors, the torch expression."""
    c, s = tables
    if x.device.type == "cpu" and c.ndim == 2 and x.numel() >= KERNEL_MIN_NUMEL and fused_cpu.available():
        return fused_cpu.rotate(x.reshape(-1, *x.shape[-2:]), c, s).view(x.shape)
    dtype = x.dtype
    x = x.to(c.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(dtype)


def step_rotation(emb: SinusoidalEmbeddings, positions: torch.Tensor, dtype: torch.dtype):
    """Tables `(cos, signed_sin)` `(*positions.shape, d)` for a decode step (`ops.decode.attend_step`):
    `cat(cos, cos)` and `cat(-sin, sin)` of `positions`' angles (float64), in the compute dtype of `dtype`."""
    angles = positions.to(torch.float64)[..., None] * emb._inv_freq64()
    cos, sin = angles.cos(), angles.sin()
    compute = accumulation_dtype(dtype)
    return torch.cat((cos, cos), dim=-1).to(compute), torch.cat((-sin, sin), dim=-1).to(compute)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, factor: torch.Tensor | None = None) -> torch.Tensor:
    """Rotate `x` `(..., n, d)` by `cos, sin` `(n, d)`, optionally times `factor` `(n, d)`; in float32 or wider."""
    return apply_rotation(x, rotation_tables(cos, sin, factor, x.dtype))


def xpos_factors(emb: SinusoidalEmbeddings, positions: torch.Tensor, window_size: int, look_backward: int,
                 look_forward: int):
    """Window-relative xpos factors for integer `positions` `(n,)` of a blocked sequence.

    Returns `(q_factor (n, d), k_factor (n, d), key_scale (span, d))`. Position `i` in window `b` is
    measured from the window's centre `c_b`: q_i gets `s ** ((i - c_b) / base)`, k_j gets
    `s ** (-(j - c_b') / base)`, and keys of the neighbour window at offset `delta = b' - b` get the extra
    factor `s ** (-delta * w / base)`, so a score is scaled by `s ** ((i - j) / base)` exactly while every
    exponent stays within a few windows.
    """
    local = (positions % window_size).to(torch.float64) - window_size / 2
    q_factor = emb.xpos_scale(local)
    k_factor = emb.xpos_scale(-local)
    deltas = torch.arange(-look_backward, look_forward + 1, device=positions.device, dtype=torch.float64)
    key_scale = emb.xpos_scale(-deltas * window_size)
    return q_factor, k_factor, key_scale
