"""`windowed-attention bench`: time, memory and GFLOP/s of local attention implementations.

Sweep (default): N in 1k..64k, W in {64, 256, 1024}, forward and fwd+bwd, for ours (`auto`, the fused
CPU kernel), ours-sdpa (our `sdpa` backend), local-attention,
dense SDPA with a band mask (skipped when N > --dense-max) and compiled FlexAttention (forward only
on CPU; skipped when compiling fails). Writes `results.json` and PNG plots to `--out`.
`--headline`: the issue's figures (interleaved medians, side by side) into `headline.json`.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from . import headline, impls, measure

SIZES = [1024, 2048, 4096, 8192, 16384, 32768, 65536]
WINDOWS = [64, 256, 1024]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="benchmarks", help="folder for results.json, headline.json and plots")
    parser.add_argument("--quick", action="store_true", help="a ~1 minute subset (N <= 8k, W = 256)")
    parser.add_argument("--headline", action="store_true", help="measure the issue's headline figures only")
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="sequence lengths N")
    parser.add_argument("--windows", type=int, nargs="+", default=None, help="window sizes W")
    parser.add_argument("--impls", nargs="+", default=["ours", "ours-sdpa", "local-attention", "dense-sdpa", "flex-compiled"],
                        choices=list(impls.IMPLS))
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions per point (median)")
    parser.add_argument("--no-memory", action="store_true", help="skip the subprocess memory measurements")
    parser.add_argument("--dense-max", type=int, default=8192, help="largest N for dense SDPA")
    parser.add_argument("--flex-max", type=int, default=16384, help="largest N for compiled flex (compile per shape)")
    parser.add_argument("--max-seconds", type=float, default=20.0, help="skip an implementation's larger N once a call takes this long")
    parser.add_argument("--no-train", action="store_true", help="headline: skip the LocalTransformer training step")


def _points(args):
    sizes = args.sizes or ([1024, 2048, 4096, 8192] if args.quick else SIZES)
    windows = args.windows or ([256] if args.quick else WINDOWS)
    chosen = [i for i in args.impls if not (args.quick and i == "flex-compiled")]
    return [(impl, w, n) for impl in chosen for w in windows for n in sizes if n >= 2 * w]


def sweep(args) -> list[dict]:
    peak = measure.matmul_peak()
    rows, too_slow = [], set()
    for impl, w, n in tqdm(_points(args), desc="bench", unit="point"):
        if (impl == "dense-sdpa" and n > args.dense_max) or (impl == "flex-compiled" and n > args.flex_max):
            continue
        if impl == "local-attention" and not impls.installed(impl):
            continue
        for backward in (False, True):
            if (impl, w, backward) in too_slow or (impl == "flex-compiled" and backward):
                continue
            row = dict(impl=impl, w=w, n=n, backward=backward, dtype="float32")
            try:
                fn = impls.IMPLS[impl](n, w)
                inputs = measure.make_inputs(n, torch.float32, backward)
                seconds = measure.median_time(measure.step(fn, inputs, backward), args.reps)
            except Exception as error:  # a failed compile or missing kernel skips the point, not the run
                tqdm.write(f"skip {impl} w={w} n={n} backward={backward}: {type(error).__name__}: {error}"[:200])
                too_slow.add((impl, w, backward))
                continue
            flops = impls.useful_flops(n, w, False, backward)
            row.update(ms=seconds * 1e3, us_per_token=seconds * 1e6 / n, gflops=flops / seconds / 1e9)
            row["pct_matmul_peak"] = 100 * row["gflops"] / peak
            if not args.no_memory and impl != "flex-compiled":
                row["peak_rise_mib"] = _mib(measure.peak_memory(impl, n, w, backward=backward))
            rows.append(row)
            if seconds > args.max_seconds:
                too_slow.add((impl, w, backward))
    return rows, peak


def _mib(value):
    return None if value is None else value / 2**20


def print_table(rows) -> None:
    print(f"{'impl':16} {'W':>5} {'N':>6} {'pass':8} {'ms':>9} {'us/tok':>7} {'GFLOP/s':>8} {'%peak':>6} {'MiB':>8}")
    for r in rows:
        mem = r.get("peak_rise_mib")
        print(f"{r['impl']:16} {r['w']:>5} {r['n']:>6} {'fwd+bwd' if r['backward'] else 'fwd':8} {r['ms']:>9.1f} "
              f"{r['us_per_token']:>7.2f} {r['gflops']:>8.1f} {r['pct_matmul_peak']:>6.1f} "
              f"{'-' if mem is None else f'{mem:.0f}':>8}")


def plot(rows, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401

    written = []
    for key, label, name in (("ms", "time (ms)", "time"), ("peak_rise_mib", "peak memory rise (MiB)", "memory")):
        windows = sorted({r["w"] for r in rows})
        fig, axes = plt.subplots(1, len(windows), figsize=(5 * len(windows), 4), squeeze=False)
        for ax, w in zip(axes[0], windows):
            for impl in dict.fromkeys(r["impl"] for r in rows):
                for backward, style in ((False, "--"), (True, "-")):
                    pts = [(r["n"], r[key]) for r in rows if r["impl"] == impl and r["w"] == w
                           and r["backward"] == backward and r.get(key) is not None]
                    if pts:
                        ax.plot(*zip(*pts), style, marker="o", label=f"{impl} {'fwd+bwd' if backward else 'fwd'}")
            ax.set(xscale="log", yscale="log", xlabel="sequence length N", ylabel=label, title=f"W = {w}")
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"{name}_vs_n.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(str(path))
    return written


def _cpu() -> dict:
    """The CPU as /proc/cpuinfo names it, and the instruction sets that decide which kernels run."""
    info = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())
    except OSError:
        return {}
    flags = set(info.get("flags", "").split())
    return dict(vendor=info.get("vendor_id"), model=info.get("model name"), family=info.get("cpu family"),
                isa=[f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags])


def environment() -> dict:
    return dict(torch=torch.__version__, python=platform.python_version(), machine=platform.machine(),
                threads=torch.get_num_threads(), processor=platform.processor(), cpu=_cpu(),
                cpu_capability=torch.backends.cpu.get_cpu_capability())


def run(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.headline:
        result = headline.run(train=not args.no_train)
        result["environment"] = environment()
        (out / "headline.json").write_text(json.dumps(result, indent=2) + "\n")
        headline.report(result)
        return 0
    rows, peak = sweep(args)
    print_table(rows)
    (out / "results.json").write_text(json.dumps(
        dict(environment=environment(), matmul_peak_gflops=peak, shapes="B=1 H=8 D=64 causal look_backward=1 fp32",
             memory_method=measure.__doc__.strip(), rows=rows), indent=2) + "\n")
    for path in plot(rows, out):
        print("wrote", path)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m windowed_attention.bench", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
