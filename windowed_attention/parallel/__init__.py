"""Context parallelism: one sequence split over the ranks of a `torch.distributed` process group.

Rank `r` of a group of `R` holds the contiguous shard `[r * n_s, (r + 1) * n_s)` of the positions. The op,
the modules and the transformer take `group=` and then compute exactly this rank's slice of the
single-process result; between ranks only window halos (and the sink tokens of documents that start
before a rank's halo) travel, point to point (`plan`, `comm`, `attention`); the transformer's loss is the global mean (`loss`). `shard` and `gather` move whole
tensors between the two views.
"""

from __future__ import annotations

import zlib

import torch

from .comm import GatherAlong, agree, group_info, traffic
from .loss import cross_entropy, next_tokens

__all__ = ["shard", "gather", "group_info", "agree", "cross_entropy", "next_tokens", "traffic"]


def shard(x: torch.Tensor, group, dim: int = 1) -> torch.Tensor:
    """This rank's contiguous shard of `x` along `dim` (`x.shape[dim]` must divide by the group size): the
    positions `[r * n_s, (r + 1) * n_s)`. A view; its gradient flows back into `x`."""
    rank, world = group_info(group)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not -x.ndim <= dim < x.ndim:
        raise ValueError(f"dim must be in [{-x.ndim}, {x.ndim}) for x of shape {tuple(x.shape)}, got {dim}")
    size = x.shape[dim]
    if size % world:
        raise ValueError(f"x: its size {size} along dim {dim} must divide by the group size {world}")
    return x.narrow(dim, rank * (size // world), size // world)


def gather(x: torch.Tensor, group, dim: int = 1) -> torch.Tensor:
    """Every rank's shard concatenated along `dim` in rank order (the inverse of `shard`), on every rank.
    Differentiable: each rank's gradient is its own slice of the upstream gradient (the gathered value is
    replicated, so that is its share)."""
    rank, world = group_info(group)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not -x.ndim <= dim < x.ndim:
        raise ValueError(f"dim must be in [{-x.ndim}, {x.ndim}) for x of shape {tuple(x.shape)}, got {dim}")
    shape = 0
    for size in (*x.shape, zlib.crc32(str(x.dtype).encode())):
        shape = (shape * 1_000_003 + size) % (1 << 52)  # a fingerprint of the shape and dtype
    agree(group, {"the number of dims of x": ("x", x.ndim), "the shape and dtype of x": ("x", shape)}, x.device)
    return GatherAlong.apply(x, group, dim % x.ndim)
