"""Communication over a `torch.distributed` process group: checks that never hang, the halo exchange
(point to point, inside an autograd Function that sends halo gradients back to their owners), and the
two collectives the context-parallel model needs (a global sum and a gather).

`traffic` counts what the halo exchange sends, for the benchmark.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from .plan import frame, pieces


def group_info(group, name: str = "group") -> tuple[int, int]:
    """`(rank, world_size)` of this process in `group`; ValueError naming `name` when that is impossible."""
    if not dist.is_available():
        raise ValueError(f"{name}: torch.distributed is not available in this build of torch")
    if not dist.is_initialized():
        raise ValueError(f"{name}: no process group is initialised; call torch.distributed.init_process_group first")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"{name} must be a torch.distributed ProcessGroup (or None), got {type(group).__name__}")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(f"{name}: this process (global rank {dist.get_rank()}) is not a member of the group")
    return rank, dist.get_world_size(group)


def _device(group, like: torch.device) -> torch.device:
    """Where small control tensors go: CUDA for nccl groups, CPU otherwise."""
    return like if dist.get_backend(group) == "nccl" else torch.device("cpu")


def agree(group, fields: dict[str, tuple[str, float]], device: torch.device) -> None:
    """Check that every rank passed the same values (one small all_gather); otherwise every rank raises
    the same ValueError naming the first argument that differs, instead of hanging later.

    `fields`: what -> (argument name, value as a float).
    """
    world = dist.get_world_size(group)
    mine = torch.tensor([value for _, value in fields.values()], dtype=torch.float64, device=_device(group, device))
    everyone = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(everyone, mine, group=group)
    table = torch.stack(everyone).cpu()
    for column, (what, (argument, _)) in enumerate(fields.items()):
        values = table[:, column]
        if not bool((values == values[0]).all()):
            shown = [int(v) if float(v).is_integer() else float(v) for v in values.tolist()]
            raise ValueError(f"{argument}: the ranks of the group disagree on {what} (by rank: {shown}); "
                             "every rank must pass the same shard length and options")


@dataclass
class Traffic:
    """Bytes the halo exchange sent from this process (forward and backward) and how often it ran."""

    calls: int = 0
    forward_bytes: int = 0
    backward_bytes: int = 0

    def reset(self) -> None:
        self.calls = self.forward_bytes = self.backward_bytes = 0


traffic = Traffic()


def peer(group, rank: int) -> int:
    """The global rank of `rank` in `group` (what point-to-point ops address)."""
    return dist.get_global_rank(group, rank)


def _trade(sources, targets, spec, group, rank: int, world: int, n_s: int, f, backward: bool) -> int:
    """Move every halo piece of `sources` into `targets`, point to point, and return the bytes sent.

    Forward a piece goes from its owner (`piece.src`, reading its shard, which starts at `f.start`) to the
    rank whose frame needs it (`piece.dst`, writing its frame, which starts at `f.origin`); backward the
    same piece's gradient goes the other way, frame to shard, and is added.
    """
    send_at, recv_at = (f.origin, f.start) if backward else (f.start, f.origin)
    ops, received, sent = [], [], 0
    for piece in pieces(spec, n_s, world):
        sender, receiver = (piece.dst, piece.src) if backward else (piece.src, piece.dst)
        for source, target in zip(sources, targets):
            if sender == rank:
                chunk = source[:, piece.lo - send_at:piece.hi - send_at].contiguous()
                ops.append(dist.P2POp(dist.isend, chunk, peer(group, receiver), group))
                sent += chunk.numel() * chunk.element_size()
            elif receiver == rank:
                buffer = source.new_empty(source.shape[0], piece.hi - piece.lo, source.shape[2])
                ops.append(dist.P2POp(dist.irecv, buffer, peer(group, sender), group))
                received.append((target[:, piece.lo - recv_at:piece.hi - recv_at], buffer))
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()
    for place, buffer in received:
        if backward:
            place.add_(buffer)
        else:
            place.copy_(buffer)
    return sent


def exchange(xs: tuple[torch.Tensor, ...], spec, group, rank: int, world: int) -> tuple[torch.Tensor, ...]:
    """Each `x` `(P, n_s, c)` of `xs`, this rank's shard -> `(P, frame.length, c)`: the local frame with the
    halo received from the ranks that own it (zeros where the frame holds nothing). No autograd."""
    n_s = xs[0].shape[1]
    f = frame(spec, n_s, world, rank)
    outs = []
    for x in xs:
        out = x.new_empty(x.shape[0], f.length, x.shape[2])
        out[:, :f.need_lo - f.origin].zero_()
        out[:, f.start - f.origin:f.stop - f.origin] = x
        outs.append(out)
    traffic.forward_bytes += _trade(xs, outs, spec, group, rank, world, n_s, f, backward=False)
    traffic.calls += 1
    return tuple(outs)


def return_halo_gradients(grads: tuple[torch.Tensor, ...], spec, group, rank: int, world: int,
                          n_s: int) -> tuple[torch.Tensor, ...]:
    """The backward of `exchange`: each `grad` `(P, frame.length, c)` -> `(P, n_s, c)`, this rank's slice
    plus the gradients of its positions that other ranks used as their halo (sent back point to point)."""
    f = frame(spec, n_s, world, rank)
    outs = tuple(grad[:, f.start - f.origin:f.stop - f.origin].clone() for grad in grads)
    traffic.backward_bytes += _trade(grads, outs, spec, group, rank, world, n_s, f, backward=True)
    return outs


class HaloExchange(torch.autograd.Function):
    """`exchange` of keys and values with its backward: the halo's gradients travel back to the ranks that
    own those positions. `k (P, n_s, d)`, `v (P, n_s, d_v)` -> their frames `(P, frame.length, .)`."""

    @staticmethod
    def forward(ctx, k, v, spec, group, rank: int, world: int):
        ctx.options = (spec, group, rank, world, k.shape[1])
        return exchange((k, v), spec, group, rank, world)

    @staticmethod
    def backward(ctx, grad_k, grad_v):
        spec, group, rank, world, n_s = ctx.options
        grads = return_halo_gradients((grad_k.contiguous(), grad_v.contiguous()), spec, group, rank, world, n_s)
        return *grads, None, None, None, None


class SumOverRanks(torch.autograd.Function):
    """The sum of `x` over the group, whose backward passes the upstream gradient to this rank's `x` only.

    Every rank computes the same replicated value from it; the gradient each rank then gets is its own
    share, so gradients summed over the group are those of the single-process computation.
    """

    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class GatherAlong(torch.autograd.Function):
    """All ranks' shards concatenated along `dim`; the backward keeps this rank's slice of the gradient
    (every rank holds the same replicated result, and its share is its own slice)."""

    @staticmethod
    def forward(ctx, x, group, dim: int):
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        ctx.options = (rank, x.shape[dim], dim)
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx, grad):
        rank, size, dim = ctx.options
        return grad.narrow(dim, rank * size, size), None, None
