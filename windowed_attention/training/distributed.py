"""Data and context parallelism with `torch.distributed`, set up from `torchrun`'s environment.

Run the same `windowed-attention train ...` under `torchrun --nproc-per-node N`: each process becomes
one rank (gloo on CPU, nccl on CUDA), the model is wrapped in DistributedDataParallel, every rank draws
different batches, and rank 0 alone logs and writes checkpoints. With `--context-parallel C` the N ranks
form a 2-D `DeviceMesh` of N / C data-parallel x C context-parallel ranks: the C ranks of a row share one
batch and each holds `seq_len / C` of every sequence (`windowed_attention.parallel`). Without torchrun
everything here is a no-op on a single process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    context_parallel: int = 1  # ranks per sequence (the mesh's "cp" dim)
    cp_group: object = None  # their process group (None without context parallelism)
    dp_rank: int = 0  # this rank's row of the mesh: which batches it draws
    dp_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def setup(device_type: str, context_parallel: int = 1) -> DistInfo:
    """Join the process group when launched by torchrun; returns this process's rank info.

    `context_parallel` C > 1 needs a world size that C divides: the mesh is (world / C) x C.
    """
    world_size = int(os.environ["WORLD_SIZE"]) if launched_by_torchrun() else 1
    if world_size % context_parallel:
        where = f"a world of {world_size}" if launched_by_torchrun() else "a single process (run it under torchrun)"
        raise ValueError(f"--context-parallel {context_parallel} must divide the number of processes, got {where}")
    if world_size == 1:
        return DistInfo()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    if context_parallel == 1:
        return DistInfo(rank, world_size, local_rank, dp_rank=rank, dp_size=world_size)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device_type, (world_size // context_parallel, context_parallel),
                            mesh_dim_names=("dp", "cp"))
    return DistInfo(rank, world_size, local_rank, context_parallel, mesh.get_group("cp"),
                    mesh.get_local_rank("dp"), world_size // context_parallel)


def teardown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def device_for(device_type: str, info: DistInfo) -> torch.device:
    return torch.device("cuda", info.local_rank) if device_type == "cuda" else torch.device("cpu")


def wrap(model: torch.nn.Module, info: DistInfo, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel around `model` when there are several ranks."""
    if not info.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def mean(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The mean of a scalar tensor over ranks (the tensor itself on one process)."""
    if not info.enabled:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / info.world_size


def any_rank(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """True on every rank when `flag` is true on any (ranks stop at the same step)."""
    if not info.enabled:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()
