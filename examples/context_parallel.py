"""Context parallelism benchmark: one long sequence through the README's model on 1, 2 and 4 ranks.

Model: `LocalTransformer(dim 256, depth 4, heads 4, dim_head 64, window 256)`, rotary only
(`use_abs_pos_emb=False`: an absolute table for 1M positions would itself weigh 1 GiB), fp32, random
weights; one sequence of N tokens; the loss's forward and backward (`return_loss=True`). For every
(ranks R, N) it spawns R processes (gloo over a file store); each rank holds N / R tokens and reports

- its peak resident-memory rise over that step (after a warm-up at a small N, the fused kernel's pool
  and the heap's free memory returned to the OS, `VmHWM - VmRSS` from /proc/self/status: Linux only),
- the step's wall time,
- the bytes its halo exchange sent per layer (forward and backward; `parallel.traffic`).

The goals it checks: at R = 4 each rank's peak memory rise is at most 0.35 of the single process's, and
the bytes per layer do not grow with N. Results go to `--out` (default `runs/context_parallel`, which git
ignores): `context_parallel.json` and `context_parallel.png`. The committed figures were made with
`--out benchmarks`.

Run: python examples/context_parallel.py [--sizes 32768 65536 131072] [--ranks 1 2 4]
`--overhead --ranks 2 --sizes 16384` instead times each rank's sharded step against a step of its shard
alone (no group), in turns in the same process: what context parallelism adds to a rank's work.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from windowed_attention import LocalTransformer, parallel
from windowed_attention.bench.measure import proc_status
from windowed_attention.ops import fused_cpu
from windowed_attention.bench.machine import cpu_label

CONFIG = dict(num_tokens=256, max_seq_len=256, dim=256, depth=4, heads=4, dim_head=64, local_attn_window_size=256,
              use_abs_pos_emb=False, num_residual_streams=1)  # the figures were measured with one stream
WARMUP_TOKENS = 4096


def _step(model, tokens, group):
    loss = model(tokens, return_loss=True, group=group)
    loss.backward()
    return loss.item()


def _rank_main(rank: int, world: int, store: str, n: int, threads: int, out: str) -> None:
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    group = dist.group.WORLD if world > 1 else None
    torch.manual_seed(0)
    model = LocalTransformer(**CONFIG)
    generator = torch.Generator().manual_seed(1)
    full = torch.randint(0, 256, (1, n), generator=generator)
    tokens = parallel.shard(full, dist.group.WORLD) if world > 1 else full
    warm = torch.randint(0, 256, (1, WARMUP_TOKENS // world), generator=generator)
    _step(model, warm, group)  # builds the kernels, allocates the gradients
    fused_cpu.release_memory()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = proc_status("VmRSS")
    parallel.traffic.reset()
    dist.barrier()
    start = time.perf_counter()
    loss = _step(model, tokens, group)
    seconds = time.perf_counter() - start
    rise = proc_status("VmHWM") - before
    depth = CONFIG["depth"]
    record = dict(rank=rank, ranks=world, n=n, loss=loss, seconds=seconds, peak_rise_bytes=rise,
                  halo_bytes_per_layer_forward=parallel.traffic.forward_bytes / depth,
                  halo_bytes_per_layer_backward=parallel.traffic.backward_bytes / depth,
                  exchanges=parallel.traffic.calls)
    Path(out, f"rank{rank}.json").write_text(json.dumps(record))
    dist.barrier()
    dist.destroy_process_group()


def _overhead_main(rank: int, world: int, store: str, n: int, rounds: int, out: str) -> None:
    """Each rank times, in turns, a sharded step of N tokens (its N / R of them) and a single-process step
    of N / R tokens (no group): same process, same thread, same load."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = LocalTransformer(**CONFIG)
    full = torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(1))
    part = parallel.shard(full, dist.group.WORLD)
    steps = {"sharded": lambda: _step(model, part, dist.group.WORLD), "alone": lambda: _step(model, part, None)}
    times = {name: [] for name in steps}
    for _ in range(rounds + 1):  # the first round warms up
        for name, step in steps.items():
            dist.barrier()
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    record = {name: statistics.median(t[1:]) for name, t in times.items()}
    Path(out, f"rank{rank}.json").write_text(json.dumps(record))
    dist.barrier()
    dist.destroy_process_group()


def overhead(world: int, n: int, rounds: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_overhead_main, args=(world, os.path.join(tmp, "store"), n, rounds, tmp), nprocs=world, join=True)
        for rank in range(world):
            record = json.loads(Path(tmp, f"rank{rank}.json").read_text())
            print(f"rank {rank}: sharded step of {n} tokens {record['sharded']:.2f} s, a step of its {n // world} "
                  f"tokens alone {record['alone']:.2f} s, ratio {record['sharded'] / record['alone']:.3f}")


def measure(world: int, n: int, threads: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_rank_main, args=(world, os.path.join(tmp, "store"), n, threads, tmp), nprocs=world, join=True)
        return [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world)]


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for index, world in enumerate(sorted({r["ranks"] for r in rows})):
        mine = sorted((r for r in rows if r["ranks"] == world), key=lambda r: r["n"])
        ns, style = [r["n"] for r in mine], dict(marker="o", color=f"C{index}", label=f"{world} rank{'s' * (world > 1)}")
        axes[0].plot(ns, [r["max_peak_rise_mib"] for r in mine], **style)
        axes[1].plot(ns, [r["seconds"] for r in mine], **style)
        if world > 1:
            axes[2].plot(ns, [r["max_halo_kib_per_layer"] for r in mine], **style)
    titles = ("peak memory rise per rank (MiB, largest rank)", "forward+backward time (s, slowest rank)",
              "halo bytes sent per layer, fwd+bwd (KiB, largest rank)")
    for ax, title in zip(axes, titles):
        ax.set(xscale="log", xlabel="sequence length N", title=title)
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_yscale("log")
    axes[2].set_ylim(bottom=0)
    fig.suptitle("LocalTransformer dim 256, depth 4, heads 4, dim_head 64, window 256, one sequence, fp32")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[32768, 65536, 131072])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1,
                        help="cores shared by the ranks (threads per rank: cores / ranks, at least 1)")
    parser.add_argument("--out", default="runs/context_parallel", help="folder for the JSON and the plot")
    parser.add_argument("--replot", action="store_true", help="only redraw the plot from --out's JSON")
    parser.add_argument("--overhead", action="store_true",
                        help="instead: time each rank's sharded step against a step of its shard alone, in turns "
                             "(first of --ranks and --sizes; median of 3 rounds; prints only)")
    args = parser.parse_args()
    if args.overhead:
        overhead(args.ranks[0], args.sizes[0], rounds=3)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.replot:
        plot(json.loads((out / "context_parallel.json").read_text())["rows"], out / "context_parallel.png")
        return

    rows = []
    for n in args.sizes:
        for world in args.ranks:
            ranks = measure(world, n, max(1, args.cores // world))
            row = dict(ranks=world, n=n, loss=ranks[0]["loss"], seconds=max(r["seconds"] for r in ranks),
                       peak_rise_mib=[r["peak_rise_bytes"] / 2**20 for r in ranks],
                       halo_kib_per_layer=[(r["halo_bytes_per_layer_forward"] + r["halo_bytes_per_layer_backward"])
                                           / 1024 for r in ranks])
            row["max_peak_rise_mib"] = max(row["peak_rise_mib"])
            row["max_halo_kib_per_layer"] = max(row["halo_kib_per_layer"])
            rows.append(row)
            print(f"N={n:>8} ranks={world}: {row['seconds']:7.1f} s, peak rise per rank "
                  f"{', '.join(f'{m:.0f}' for m in row['peak_rise_mib'])} MiB, halo per layer "
                  f"{row['max_halo_kib_per_layer']:.0f} KiB, loss {row['loss']:.6f}", flush=True)
    for row in rows:
        single = next((r for r in rows if r["n"] == row["n"] and r["ranks"] == 1), None)
        if single is not None:
            row["peak_rise_ratio_to_single"] = row["max_peak_rise_mib"] / single["max_peak_rise_mib"]
            row["loss_difference_to_single"] = abs(row["loss"] - single["loss"])
    result = dict(model=CONFIG, cpu=cpu_label(), cores=args.cores, torch=torch.__version__,
                  method=" ".join(__doc__.split("\n\n")[1].split()), rows=rows)
    (out / "context_parallel.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(rows, out / "context_parallel.png")
    print(f"wrote {out / 'context_parallel.json'} and {out / 'context_parallel.png'}")
    for row in rows:
        if "peak_rise_ratio_to_single" in row and row["ranks"] > 1:
            print(f"N={row['n']} ranks={row['ranks']}: peak rise per rank / single = "
                  f"{row['peak_rise_ratio_to_single']:.3f}, |loss - single| = {row['loss_difference_to_single']:.2e}")


if __name__ == "__main__":
    main()
