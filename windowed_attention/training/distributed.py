"""Data and context parallelism with `torch.distributed`, set up from `torchrun`'s environment.

Run the same `windowed-attention train ...` under `torchrun --nproc-per-node N`: each process becomes
one rank (gloo on CPU, nccl on CUDA), the model is wrapped in DistributedDataParallel, every rank draws
different batches, and rank 0 alone logs and writes checkpoints. With `--context-parallel C` the N ranks
form a 2-D `DeviceMesh` of N / C data-parallel x C context-parallel ranks: the C ranks of a row share one
batch and each holds `seq_len / C` of every sequence (`windowed_attention.parallel`). With `--fsdp` the
model is not copied but sharded (FSDP2's `fully_shard`) over all N ranks of that mesh (its two dimensions
flattened, as torchtitan shards over `dp_shard x cp`): each rank holds 1/N of every parameter, gradient and
optimizer state. Without torchrun everything here is a no-op on a single process.
"""

from __future__ import annotations

import datetime
import os
import sys
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
    fsdp_mesh: object = None  # with --fsdp: the 1-D mesh of all ranks the parameters are sharded over

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def sharded(self) -> bool:
        """Whether the model is sharded with FSDP (`--fsdp` under torchrun with several processes)."""
        return self.fsdp_mesh is not None


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def setup(device_type: str, context_parallel: int = 1, fsdp: bool = False) -> DistInfo:
    """Join the process group when launched by torchrun; returns this process's rank info.

    `context_parallel` C > 1 needs a world size that C divides: the mesh is (world / C) x C. With `fsdp` the
    parameters are sharded over the whole mesh (`DistInfo.fsdp_mesh`, its dimensions flattened); on one
    process there is nothing to shard.
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
    if context_parallel == 1 and not fsdp:
        return DistInfo(rank, world_size, local_rank, dp_rank=rank, dp_size=world_size)
    from torch.distributed.device_mesh import init_device_mesh

    if context_parallel == 1:
        mesh = init_device_mesh(device_type, (world_size,), mesh_dim_names=("dp",))
        return DistInfo(rank, world_size, local_rank, dp_rank=rank, dp_size=world_size, fsdp_mesh=mesh)
    mesh = init_device_mesh(device_type, (world_size // context_parallel, context_parallel),
                            mesh_dim_names=("dp", "cp"))
    # the C ranks of a row hold the same parameters (each its shard of the sequence) and their gradients
    # add up, so FSDP shards over rows and columns together: one reduce-scatter over all ranks
    fsdp_mesh = mesh["dp", "cp"]._flatten("dp_cp") if fsdp else None
    return DistInfo(rank, world_size, local_rank, context_parallel, mesh.get_group("cp"),
                    mesh.get_local_rank("dp"), world_size // context_parallel, fsdp_mesh)


def teardown(info: DistInfo, finished: bool = False) -> None:
    """Leave the process group. On gloo, after a run that `finished` on this rank, the ranks first meet at a
    barrier, so that none tears its group down while another still flushes its last collectives (a rank
    aborted at exit once in CI, "terminate called without an active exception", after a run that had
    finished). A rank that does not come within a minute (it failed after the last collective, in work of
    rank 0 alone) is named on stderr, and this rank's finished run still counts. NCCL leaves at once, as
    before: a barrier there would wait out the group's timeout for a rank that failed."""
    if not (info.enabled and dist.is_initialized()):
        return
    try:
        if finished and dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=60))
    except RuntimeError as error:
        first_line = (str(error).strip().splitlines() or [""])[0]
        print(f"rank {info.rank}: another rank did not reach the end of the run ({first_line})", file=sys.stderr)
    finally:
        dist.destroy_process_group()


def device_for(device_type: str, info: DistInfo) -> torch.device:
    return torch.device("cuda", info.local_rank) if device_type == "cuda" else torch.device("cpu")


def wrap(model: torch.nn.Module, info: DistInfo, device: torch.device, bf16: bool = False) -> torch.nn.Module:
    """DistributedDataParallel around `model` when there are several ranks; with `--fsdp` (`info.sharded`)
    `model` itself sharded instead (`shard`), and returned."""
    if info.sharded:
        return shard(model, info.fsdp_mesh, bf16)
    if not info.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def shard(model: torch.nn.Module, mesh, bf16: bool = False) -> torch.nn.Module:
    """Shard `model` (a `LocalTransformer`) in place with FSDP2 over the 1-D `mesh`: each residual branch
    (attention, feedforward) is one unit, all-gathered just before its forward and freed again after it
    (reshard-after-forward, as torchtitan does; the backward gathers it once more); the root holds the rest
    (embedding, output head, position bias). Gradients are reduce-scattered in fp32, averaged over the
    mesh as DDP averages them. With `bf16` the units are gathered and computed in bf16
    (`MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)`); the sharded parameters, the
    gradients and the optimizer stay fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    scalar = next((name for name, p in model.named_parameters() if p.ndim == 0), None)
    if scalar is not None:  # fully_shard cannot split a 0-d tensor
        raise ValueError(f"FSDP cannot shard the scalar parameter {scalar} (hyper-connections: --residual-streams 1)")
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
    for layer in model.layers:
        for branch in layer:
            fully_shard(branch, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def whole_state(model: torch.nn.Module) -> dict:
    """The whole (unsharded) state dict of the sharded `model`, on CPU, on rank 0 (empty elsewhere); every
    rank must call it (it gathers)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def local_value(value: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a (replicated) DTensor such as `clip_grad_norm_`'s total over sharded gradients."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value


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
