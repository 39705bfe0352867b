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


def _trade(sources, targets, spec, group, rank: int, world: int, n_s: int, f, backward: bool,
           documents: bool = False) -> int:
    """Move every halo piece of `sources` into `targets`, point to point, and return the bytes sent.

    Forward a piece goes from its owner (`piece.src`, reading its shard, which starts at `f.start`) to the
    rank whose frame needs it (`piece.dst`, writing its frame, which starts at `f.need_lo`); backward the
    same piece's gradient goes the other way, frame to shard, and is added.
    """
    send_at, recv_at = (f.need_lo, f.start) if backward else (f.start, f.need_lo)
    ops, received, sent = [], [], 0
    for piece in pieces(spec, n_s, world, documents):
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


def exchange(xs: tuple[torch.Tensor, ...], spec, group, rank: int, world: int,
             documents: bool = False) -> tuple[torch.Tensor, ...]:
    """Each `x` `(P, n_s, c)` of `xs`, this rank's shard -> `(P, frame.length, c)`: its frame (`plan.frame`,
    with `documents` saying whether the call packs documents), the halo received from the ranks that own
    it. No autograd."""
    n_s = xs[0].shape[1]
    f = frame(spec, n_s, world, rank, documents)
    outs = []
    for x in xs:
        out = x.new_empty(x.shape[0], f.length, x.shape[2])
        out[:, f.start - f.need_lo:f.stop - f.need_lo] = x
        outs.append(out)
    traffic.forward_bytes += _trade(xs, outs, spec, group, rank, world, n_s, f, False, documents)
    traffic.calls += 1
    return tuple(outs)


def return_halo_gradients(grads: tuple[torch.Tensor, ...], spec, group, rank: int, world: int,
                          n_s: int, documents: bool = False) -> tuple[torch.Tensor, ...]:
    """The backward of `exchange`: each `grad` `(P, frame.length, c)` -> `(P, n_s, c)`, this rank's slice
    plus the gradients of its positions that other ranks used as their halo (sent back point to point)."""
    f = frame(spec, n_s, world, rank, documents)
    outs = tuple(grad[:, f.start - f.need_lo:f.stop - f.need_lo].clone() for grad in grads)
    traffic.backward_bytes += _trade(grads, outs, spec, group, rank, world, n_s, f, True, documents)
    return outs


class HaloExchange(torch.autograd.Function):
    """`exchange` of keys and values with its backward: the halo's gradients travel back to the ranks that
    own those positions. `k (P, n_s, d)`, `v (P, n_s, d_v)` -> their frames `(P, frame.length, .)`."""

    @staticmethod
    def forward(ctx, k, v, spec, group, rank: int, world: int, documents: bool = False):
        ctx.options = (spec, group, rank, world, k.shape[1], documents)
        return exchange((k, v), spec, group, rank, world, documents)

    @staticmethod
    def backward(ctx, grad_k, grad_v):
        spec, group, rank, world, n_s, documents = ctx.options
        grads = return_halo_gradients((grad_k.contiguous(), grad_v.contiguous()), spec, group, rank, world, n_s,
                                      documents)
        return *grads, None, None, None, None, None


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


def _requested(starts: torch.Tensor, counts: torch.Tensor, rows: int, n_s: int, owner: int, requester: int):
    """Which positions of `owner`'s shard `requester` asked for: `(row, position in the owner's shard, slot in
    the requester's buffer)` index tensors (CPU int64), in an order both sides compute alike. The request of
    row `i` is `[starts[requester, r], + counts[requester, r])`, `r = i // (rows // starts.shape[1])`."""
    per = rows // starts.shape[1]
    row_ids, positions, slots = [], [], []
    for r in range(starts.shape[1]):
        s, c = int(starts[requester, r]), int(counts[requester, r])
        lo, hi = max(s, owner * n_s), min(s + c, (owner + 1) * n_s)
        if lo >= hi:
            continue
        span = torch.arange(lo, hi)
        for i in range(r * per, (r + 1) * per):
            row_ids.append(torch.full((hi - lo,), i))
            positions.append(span - owner * n_s)
            slots.append(span - s)
    if not row_ids:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty, empty
    return torch.cat(row_ids), torch.cat(positions), torch.cat(slots)


def _fetch_trade(x: torch.Tensor, out: torch.Tensor, starts, counts, group, rank: int, world: int,
                 backward: bool) -> int:
    """Forward: fill `out (rows, C, c)` with the requested positions of the other ranks' `x (rows, n_s, c)`,
    point to point (and send theirs). Backward (`x` the buffer's gradient, `out` the shard's): the
    requested positions' gradients go back to their owners and are added. Returns the bytes sent."""
    rows, n_s = (x.shape[0], out.shape[1]) if backward else (x.shape[0], x.shape[1])
    ops, received, sent = [], [], 0
    for owner in range(world):
        for requester in range(world):
            if owner == requester or rank not in (owner, requester):
                continue
            row_ids, positions, slots = _requested(starts, counts, rows, n_s, owner, requester)
            if not len(row_ids):
                continue
            row_ids, positions, slots = (t.to(x.device) for t in (row_ids, positions, slots))
            sender, receiver = (requester, owner) if backward else (owner, requester)
            at_sender = slots if backward else positions
            at_receiver = positions if backward else slots
            if rank == sender:
                chunk = x[row_ids, at_sender].contiguous()
                ops.append(dist.P2POp(dist.isend, chunk, peer(group, receiver), group))
                sent += chunk.numel() * chunk.element_size()
            else:
                buffer = x.new_empty(len(row_ids), x.shape[2])
                ops.append(dist.P2POp(dist.irecv, buffer, peer(group, sender), group))
                received.append((row_ids, at_receiver, buffer))
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()
    for row_ids, places, buffer in received:
        if backward:
            out.index_put_((row_ids, places), buffer, accumulate=True)
        else:
            out[row_ids, places] = buffer
    return sent


def fetch(x: torch.Tensor, starts: torch.Tensor, counts: torch.Tensor, group, rank: int, world: int) -> torch.Tensor:
    """Positions other ranks own, by request: `x (rows, n_s, c)` this rank's shard, `starts, counts (world, R)`
    CPU int64, every rank's requests (the same table on every rank; `R | rows`, row `i` asking
    `[starts[t, i // (rows // R)], + counts[...])` of the global sequence for rank `t`, positions outside
    `t`'s own shard) -> `(rows, max(counts[rank]), c)`: row `i`'s first `count` slots hold those positions
    (zeros after). No autograd."""
    out = x.new_zeros(x.shape[0], int(counts[rank].max()) if counts.numel() else 0, x.shape[2])
    traffic.forward_bytes += _fetch_trade(x, out, starts, counts, group, rank, world, backward=False)
    return out


class Fetch(torch.autograd.Function):
    """`fetch` of keys and values with its backward: the fetched positions' gradients go back to their
    owners, point to point, and are added to their shards' gradients. `k (rows, n_s, d)`, `v (rows, n_s,
    d_v)` -> `(rows, C, d)`, `(rows, C, d_v)`."""

    @staticmethod
    def forward(ctx, k, v, starts, counts, group, rank: int, world: int):
        ctx.options = (starts, counts, group, rank, world, k.shape[1])
        return fetch(k, starts, counts, group, rank, world), fetch(v, starts, counts, group, rank, world)

    @staticmethod
    def backward(ctx, grad_k, grad_v):
        starts, counts, group, rank, world, n_s = ctx.options
        grads = []
        for grad in (grad_k, grad_v):
            out = grad.new_zeros(grad.shape[0], n_s, grad.shape[2])
            traffic.backward_bytes += _fetch_trade(grad.contiguous(), out, starts, counts, group, rank, world, True)
            grads.append(out)
        return *grads, None, None, None, None, None


def document_starts(documents: torch.Tensor, group, rank: int, world: int) -> torch.Tensor:
    """`documents (R, n_s)` int64, this rank's shard of the global ids -> `(R, n_s)` int64: the global position
    where each position's document starts (which may lie on an earlier rank). One small all_gather of
    each shard's first and last ids; ids that decrease across a shard boundary raise the same ValueError
    on every rank (as they would in one process)."""
    from ..ops.call import document_bounds

    R, n_s = documents.shape
    local = document_bounds(documents)[0]
    mine = torch.stack([documents[:, 0], documents[:, -1], local[:, -1]], dim=1)  # (R, 3)
    device = _device(group, documents.device)
    everyone = [torch.empty_like(mine, device=device) for _ in range(world)]
    dist.all_gather(everyone, mine.to(device).contiguous(), group=group)
    table = torch.stack(everyone).cpu()  # (world, R, 3): first id, last id, start of the last run (local)
    if world > 1 and bool((table[1:, :, 0] < table[:-1, :, 1]).any()):
        raise ValueError("documents must be non-decreasing along each row (every document one contiguous run): "
                         "the ids decrease across a shard boundary")
    # the first run of this shard starts where its document starts: walk back over the ranks it spans
    first = torch.full((R,), rank * n_s, dtype=torch.long)
    going = torch.ones(R, dtype=torch.bool)
    for t in range(rank - 1, -1, -1):
        same = going & (table[t, :, 1] == table[rank, :, 0])
        first = torch.where(same, table[t, :, 2] + t * n_s, first)
        going = same & (table[t, :, 2] == 0)  # all of rank t's shard is one run: the document may go on before
    first = first.to(documents.device)
    return torch.where(local == 0, first[:, None], local + rank * n_s)


def gather_rows(values: torch.Tensor, group, device: torch.device) -> torch.Tensor:
    """Every rank's `values (R,)` int64 -> `(world, R)` on the CPU, rank order (one all_gather)."""
    mine = values.to(_device(group, device)).contiguous()
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(everyone, mine, group=group)
    return torch.stack(everyone).cpu()
