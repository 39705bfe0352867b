"""Next-token targets and the mean cross-entropy of a sequence split over a process group."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange

from .comm import SumOverRanks, peer


def next_tokens(x: torch.Tensor, group, rank: int, world: int, fill: int) -> torch.Tensor:
    """`x` `(b, n_s)` shard of tokens -> its next-token targets `(b, n_s)`: `x[:, 1:]` followed by the first
    token of the next rank's shard (one point-to-point message); the last rank's last target is `fill`."""
    first = x[:, :1].contiguous()
    following = torch.full_like(first, fill)
    ops = []
    if rank > 0:
        ops.append(dist.P2POp(dist.isend, first, peer(group, rank - 1), group))
    if rank < world - 1:
        ops.append(dist.P2POp(dist.irecv, following, peer(group, rank + 1), group))
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()
    return torch.cat((x[:, 1:], following), dim=1)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, group, ignore_index: int = -100) -> torch.Tensor:
    """The mean cross-entropy over every rank's targets (ignoring `ignore_index`), the same value on every
    rank. `logits` `(b, n_s, c)`, `targets` `(b, n_s)`. Its gradient on each rank is that rank's share:
    summed over the group, parameter gradients are those of the single-process mean."""
    total = F.cross_entropy(rearrange(logits, "b n c -> b c n"), targets.long(), ignore_index=ignore_index,
                            reduction="sum")
    count = (targets != ignore_index).sum().to(total.dtype)
    total = SumOverRanks.apply(total, group)
    count = count.clone()
    dist.all_reduce(count, op=dist.ReduceOp.SUM, group=group)
    return total / count
