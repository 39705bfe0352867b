"""`local_attention.local_attention` of local-attention 1.11.2: the module class and the helpers code
written for it imports from here (`exists`, `default`, `look_around`, `pad_to_multiple`, `max_neg_value`,
...), written for windowed-attention with local-attention's behaviour (see docs/compat.md for where
they differ: errors name the argument; `pad_to_multiple` pads the `dim` it is given, also a
non-negative one)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...attention import LocalAttention
from ...ops.spec import SELF_ATTN_SCORE
from ...ops.validation import check_int
from ...positional import SinusoidalEmbeddings, apply_rotary_pos_emb

__all__ = [
    "LocalAttention", "SinusoidalEmbeddings", "apply_rotary_pos_emb", "TOKEN_SELF_ATTN_VALUE",
    "exists", "default", "to", "max_neg_value", "l2norm", "pad_to_multiple", "look_around",
]

TOKEN_SELF_ATTN_VALUE = SELF_ATTN_SCORE  # a query's score with itself under shared_qk


def exists(val) -> bool:
    """`val is not None`."""
    return val is not None


def default(value, d):
    """`value`, or `d` when `value` is None."""
    return d if value is None else value


def to(t: torch.Tensor) -> dict:
    """`{'device': t.device, 'dtype': t.dtype}`, to build tensors like `t` (`torch.zeros(3, **to(t))`)."""
    return {"device": t.device, "dtype": t.dtype}


def max_neg_value(tensor: torch.Tensor) -> float:
    """The most negative finite value of `tensor`'s dtype (a float dtype)."""
    if not isinstance(tensor, torch.Tensor) or not tensor.dtype.is_floating_point:
        raise TypeError(f"tensor must be a float torch.Tensor, got {getattr(tensor, 'dtype', type(tensor).__name__)}")
    return -torch.finfo(tensor.dtype).max


def l2norm(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` scaled to unit l2 norm over its last dim, in its own dtype."""
    return F.normalize(tensor, dim=-1).type(tensor.dtype)


def _dim(x: torch.Tensor, dim, name: str = "dim") -> int:
    if isinstance(dim, bool) or not isinstance(dim, int) or not -x.ndim <= dim < x.ndim:
        raise ValueError(f"{name} must be an int in [{-x.ndim}, {x.ndim}) for a tensor of shape {tuple(x.shape)}, got {dim!r}")
    return dim % x.ndim


def pad_to_multiple(tensor: torch.Tensor, multiple: int, dim: int = -1, value=0):
    """`(padded, tensor)`: `tensor` padded with `value` at the end of `dim` to a multiple of `multiple`
    along it, and whether anything was added (when not, `tensor` itself comes back)."""
    multiple = check_int("multiple", multiple, 1)
    dim = _dim(tensor, dim)
    missing = -tensor.shape[dim] % multiple
    if missing == 0:
        return False, tensor
    # F.pad takes (before, after) pairs from the last dim backwards
    pad = (0, 0) * (tensor.ndim - 1 - dim) + (0, missing)
    return True, F.pad(tensor, pad, value=value)


def look_around(x: torch.Tensor, backward: int = 1, forward: int = 0, pad_value=-1, dim: int = 2) -> torch.Tensor:
    """Each window of `x` `(b, windows, ...)` (windows along dim 1) joined by its `backward` predecessors and
    `forward` successors, oldest first, concatenated along `dim` (2: the positions of a window `(b, w, n, ...)`
    -> `(b, w, (backward + 1 + forward) * n, ...)`); windows before the first and after the last are
    `pad_value`."""
    if not isinstance(x, torch.Tensor) or x.ndim < 3:
        raise ValueError(f"x must be a tensor of shape (b, windows, n, ...), got {getattr(x, 'shape', type(x).__name__)}")
    backward, forward = check_int("backward", backward, 0), check_int("forward", forward, 0)
    dim = _dim(x, dim)
    if dim < 2:
        raise ValueError(f"dim must name a dim after the batch and window dims (>= 2), got {dim}")
    windows = x.shape[1]
    padded = F.pad(x, (0, 0) * (x.ndim - 2) + (backward, forward), value=pad_value)
    return torch.cat([padded[:, shift : shift + windows] for shift in range(backward + forward + 1)], dim=dim)
