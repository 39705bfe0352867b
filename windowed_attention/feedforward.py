"""The position-wise feed-forward block: pre-norm, GEGLU, projection back."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .linear import Linear
from .ops.geglu import geglu
from .ops.validation import check_int, check_positive_real, check_probability


class GEGLU(nn.Module):
    """`(..., 2e) -> (..., e)`: first half times GELU of the second half."""

    def forward(self, x):
        if torch.jit.is_scripting():  # TorchScript compiles only this branch
            x, gate = x.chunk(2, dim=-1)
            return x * F.gelu(gate)
        return geglu(x)


def FeedForward(dim: int, mult: float = 4, dropout: float = 0.0) -> nn.Sequential:
    """LayerNorm -> Linear(dim, 2 * inner) -> GEGLU -> Dropout -> Linear(inner, dim), `inner = dim * mult * 2/3`.

    A function returning `nn.Sequential` (as in local-attention), so state dicts load either way.
    """
    dim = check_int("dim", dim, 1)
    mult = check_positive_real("mult", mult)
    inner = int(dim * mult * 2 / 3)
    if inner < 1:
        raise ValueError(f"dim * mult * 2 / 3 must be at least 1, got dim={dim}, mult={mult}")
    return nn.Sequential(
        nn.LayerNorm(dim),
        Linear(dim, inner * 2, bias=False),
        GEGLU(),
        nn.Dropout(check_probability("dropout", dropout)),
        Linear(inner, dim, bias=False),
    )
