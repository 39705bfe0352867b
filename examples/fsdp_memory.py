"""FSDP memory benchmark: what one rank holds with `train --fsdp` against plain DDP, at 4 ranks.

Model: the README's (`train`'s default `ModelConfig`: dim 128, depth 4, heads 4, dim_head 32, window 64,
rotary, one residual stream), fp32, AdamW as `train` makes it (`trainer.make_optimizer`), a batch of
`train`'s defaults per rank (32 sequences of 128 bytes, random; `--batch-size` changes the 32). For each mode (DDP: the model wrapped in
DistributedDataParallel as `train` wraps it; FSDP: sharded by `distributed.shard` as `train --fsdp`
shards it) it spawns R processes (gloo over a file store, one thread each) that run two training steps
(forward, backward, clipping, AdamW) and report, per rank:

- the bytes of its parameters, gradients and optimizer state (the local shards under FSDP: what the rank
  keeps between steps), counted tensor by tensor after the steps;
- the peak resident-memory rise of the second step (`VmHWM - VmRSS` from /proc/self/status after
  `clear_refs`, the heap trimmed first: Linux only): activations, DDP's gradient buckets, FSDP's gathered
  units, the optimizer's temporaries; and the peak resident memory itself (`VmHWM`: the libraries, the
  model state and that rise).

The goal it checks: at R = 4 a rank's parameter + gradient + optimizer bytes under FSDP are at most 0.3 of
DDP's. Results go to `--out` (default `runs/fsdp_memory`, which git ignores) as `fsdp_memory.json`.

Run: python examples/fsdp_memory.py [--ranks 4] [--batch-size 32] [--out DIR]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from windowed_attention.bench.machine import cpu_label
from windowed_attention.bench.measure import proc_status
from windowed_attention.ops import fused_cpu
from windowed_attention.training import distributed
from windowed_attention.training.config import ModelConfig, TrainConfig
from windowed_attention.training.trainer import make_optimizer


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _bytes(tensors) -> int:
    return sum(_local(t).numel() * _local(t).element_size() for t in tensors if isinstance(t, torch.Tensor))


def _rank_main(rank: int, world: int, store: str, mode: str, batch_size: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    model_config, config = ModelConfig(), TrainConfig()
    torch.manual_seed(0)
    model = model_config.build()
    if mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh

        train_model = distributed.shard(model, init_device_mesh("cpu", (world,), mesh_dim_names=("dp",)))
    else:
        train_model = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = make_optimizer(model, config)
    generator = torch.Generator().manual_seed(1 + rank)

    def step() -> float:
        batch = torch.randint(0, 256, (batch_size, config.seq_len + 1), generator=generator)
        loss = train_model(batch, return_loss=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # keep the gradients' memory: it is counted below
        return loss.item()

    step()  # builds the kernels, the optimizer state, the gradients (and DDP's buckets)
    fused_cpu.release_memory()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = proc_status("VmRSS")
    dist.barrier()
    loss = step()
    peak = proc_status("VmHWM")
    rise = peak - before
    params = list(model.parameters())
    state = [value for per_param in optimizer.state.values() for value in per_param.values()]
    record = dict(rank=rank, ranks=world, mode=mode, loss=loss, parameters=sum(p.numel() for p in params),
                  param_bytes=_bytes(params), grad_bytes=_bytes(p.grad for p in params),
                  optimizer_bytes=_bytes(state), peak_rise_bytes=rise,
                  resident_before_bytes=before, peak_resident_bytes=peak)
    Path(out, f"{mode}_rank{rank}.json").write_text(json.dumps(record))
    dist.barrier()
    dist.destroy_process_group()


def measure(world: int, mode: str, batch_size: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        mp.spawn(_rank_main, args=(world, store, mode, batch_size, tmp), nprocs=world, join=True)
        return [json.loads(Path(tmp, f"{mode}_rank{rank}.json").read_text()) for rank in range(world)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=4, help="processes (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=TrainConfig().batch_size,
                        help="sequences of 128 bytes per rank and step (default: train's, %(default)s)")
    parser.add_argument("--out", default="runs/fsdp_memory", help="folder for the JSON (default: %(default)s)")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    results = {mode: measure(args.ranks, mode, args.batch_size) for mode in ("ddp", "fsdp")}
    mib = 2**20
    print(f"{args.ranks} ranks, {results['ddp'][0]['parameters'] / 1e6:.2f}M parameters, batch {args.batch_size} "
          f"per rank, {cpu_label()}")
    print("mode | params | grads | optimizer | total | peak rise of a step | peak resident (largest rank each)")
    totals = {}
    for mode, ranks in results.items():
        worst = max(ranks, key=lambda r: r["param_bytes"] + r["grad_bytes"] + r["optimizer_bytes"])
        totals[mode] = worst["param_bytes"] + worst["grad_bytes"] + worst["optimizer_bytes"]
        rise, peak = (max(r[key] for r in ranks) for key in ("peak_rise_bytes", "peak_resident_bytes"))
        print(f"{mode} | {worst['param_bytes'] / mib:.2f} MiB | {worst['grad_bytes'] / mib:.2f} MiB | "
              f"{worst['optimizer_bytes'] / mib:.2f} MiB | {totals[mode] / mib:.2f} MiB | {rise / mib:.1f} MiB | "
              f"{peak / mib:.0f} MiB")
    ratio = totals["fsdp"] / totals["ddp"]
    print(f"FSDP / DDP parameter + gradient + optimizer bytes per rank: {ratio:.3f} (goal: at most 0.3)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "fsdp_memory.json" if args.batch_size == TrainConfig().batch_size else f"fsdp_memory_b{args.batch_size}.json"
    (out / name).write_text(json.dumps({"cpu": cpu_label(), "ranks": args.ranks, "batch_size": args.batch_size,
                                        "ratio": ratio, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
