"""`windowed-attention bench`: time, memory and GFLOP/s of local attention implementations.

Sweep (default): N in 1k..64k, W in {64, 256, 1024}, forward and fwd+bwd, for ours (`auto`, the fused
CPU kernel), ours-sdpa (our `sdpa` backend), local-attention,
dense SDPA with a band mask (skipped when N > --dense-max) and compiled FlexAttention (forward only
on CPU; skipped when compiling fails). Writes `results.json` and PNG plots to `--out` (default
`runs/bench`), then prints the table. A folder that already holds results or plots is refused unless
`--overwrite` (which also removes plots this run does not draw; `--out benchmarks --overwrite` replaces
the committed figures). Every implementation or point left out is named with the reason, on stderr and in
`results.json`.
`--quick`: about a minute on an idle 2-core CPU (N = 2k and 8k, W = 256, memory at 8k only, dense SDPA
at 2k only, no compiled Flex).
`--headline`: the README's figures (interleaved medians, side by side) into `headline.json`.
Needs the `bench` extra: tqdm and matplotlib for the sweep, local-attention to compare against.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
from pathlib import Path

import torch

from ..cli_types import Parser, say
from ..extras import require
from . import headline, impls, machine, measure

SIZES = [1024, 2048, 4096, 8192, 16384, 32768, 65536]
WINDOWS = [64, 256, 1024]


QUICK_SIZES, QUICK_WINDOWS = [2048, 8192], [256]
DEFAULT_IMPLS = ["ours", "ours-sdpa", "local-attention", "dense-sdpa", "flex-compiled"]


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value
    return parse


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number of seconds > 0, got {text!r}")
    return value


def _one_line_error(prog: str):
    """argparse's error as one line on stderr (no usage block), exit code 2."""
    def error(message: str):
        print(f"{prog}: error: {message}", file=sys.stderr)
        sys.exit(2)
    return error


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.error = _one_line_error(parser.prog)
    pos, nonneg = _int_at_least(1), _int_at_least(0)
    parser.add_argument("--out", default="runs/bench",
                        help="folder for results.json, headline.json and the plots (default: %(default)s); a folder "
                             "that already holds them is refused unless --overwrite")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the results and plots already in --out, and remove plots this run does not "
                             "draw (--out benchmarks --overwrite replaces the committed figures)")
    parser.add_argument("--quick", action="store_true",
                        help="about a minute: N = 2k and 8k, W = 256, memory at the largest N only, dense SDPA at 2k only, "
                             "no compiled Flex")
    parser.add_argument("--headline", action="store_true", help="measure the README's headline figures only")
    parser.add_argument("--sizes", type=pos, nargs="+", default=None, help="sequence lengths N")
    parser.add_argument("--windows", type=pos, nargs="+", default=None, help="window sizes W")
    parser.add_argument("--impls", nargs="+", default=None, choices=list(impls.IMPLS),
                        help=f"implementations (default: {' '.join(DEFAULT_IMPLS)})")
    parser.add_argument("--reps", type=pos, default=3, help="timed repetitions per point (median)")
    parser.add_argument("--no-memory", action="store_true", help="skip the subprocess memory measurements")
    parser.add_argument("--dense-max", type=nonneg, default=None,
                        help="largest N for dense SDPA, O(N^2) (default: 8192; 2048 with --quick)")
    parser.add_argument("--flex-max", type=nonneg, default=16384, help="largest N for compiled flex (compile per shape)")
    parser.add_argument("--max-seconds", type=_seconds, default=20.0,
                        help="skip an implementation's larger N once a call takes this long")
    parser.add_argument("--no-train", action="store_true", help="headline: skip the LocalTransformer training step")


def check_args(args) -> None:
    """Flag combinations argparse cannot check (ValueError, one line)."""
    if args.headline and (args.quick or args.sizes or args.windows or args.impls):
        raise ValueError("--headline measures fixed figures: it takes no --quick, --sizes, --windows or --impls")
    if args.headline and not impls.installed("local-attention"):
        raise ValueError("--headline compares against local-attention, which is not installed "
                         "(pip install 'windowed-attention[bench]')")
    if not args.headline and not _points(args)[0]:
        raise ValueError(f"no point to measure: every N ({' '.join(map(str, _sizes(args)))}) is below twice "
                         f"every W ({' '.join(map(str, _windows(args)))})")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"--out {out}: cannot create the folder ({error.strerror})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out} is not writable")
    existing = [name for name in _outputs(args) if (out / name).exists()]
    if existing and not args.overwrite:
        raise ValueError(f"--out {out} already holds {', '.join(existing)} of an earlier run; choose another --out, "
                         "or pass --overwrite to replace them")


PLOTS = ("time_vs_n.png", "memory_vs_n.png")


def _outputs(args) -> list[str]:
    """The files this mode writes into --out (an earlier run's are refused without --overwrite)."""
    return ["headline.json"] if args.headline else ["results.json", *PLOTS]


def busy_warning() -> str | None:
    """A warning when the machine is busy (1-minute load average above the core count): timings then
    measure the competition as much as the code."""
    try:
        load, cores = os.getloadavg()[0], os.cpu_count() or 1
    except (AttributeError, OSError):  # no load average on this platform
        return None
    if load <= cores:
        return None
    return (f"warning: this machine is busy (load average {load:.1f} on {cores} cores): timings will be slower "
            "and noisier than on an idle machine; ratios of interleaved measurements hold up best")


def _sizes(args):
    return args.sizes or (QUICK_SIZES if args.quick else SIZES)


def _windows(args):
    return args.windows or (QUICK_WINDOWS if args.quick else WINDOWS)


def _dense_max(args) -> int:
    return args.dense_max if args.dense_max is not None else (2048 if args.quick else 8192)


def _points(args) -> tuple[list, list[str]]:
    """`(points, skipped)`: the (impl, w, n) to measure, and why implementations or points are left out."""
    chosen = args.impls or DEFAULT_IMPLS
    skipped = []
    if args.quick and "flex-compiled" in chosen and not args.impls:
        skipped.append("flex-compiled: compiling it takes minutes per shape (left out of --quick; "
                       "run without --quick or name it in --impls)")
        chosen = [i for i in chosen if i != "flex-compiled"]
    if "local-attention" in chosen and not impls.installed("local-attention"):
        skipped.append("local-attention: not installed (pip install 'windowed-attention[bench]')")
        chosen = [i for i in chosen if i != "local-attention"]
    sizes, windows, dense_max = _sizes(args), _windows(args), _dense_max(args)
    for impl, limit, flag in (("dense-sdpa", dense_max, "--dense-max"), ("flex-compiled", args.flex_max, "--flex-max")):
        over = [n for n in sizes if n > limit]
        if impl in chosen and over:
            skipped.append(f"{impl} at N = {' '.join(map(str, over))}: above {flag} {limit}")
    if "flex-compiled" in chosen:
        skipped.append("flex-compiled fwd+bwd: FlexAttention has no backward on CPU")
    points = [(impl, w, n) for impl in chosen for w in windows for n in sizes if n >= 2 * w
              and not (impl == "dense-sdpa" and n > dense_max) and not (impl == "flex-compiled" and n > args.flex_max)]
    return points, skipped


def sweep(args, skipped: list[str]) -> tuple[list[dict], float]:
    """Measure every point; what is left out on the way (a failure, a call past --max-seconds) joins `skipped`."""
    from tqdm import tqdm  # the bench extra, checked by run()

    peak = measure.matmul_peak()
    points, _ = _points(args)
    memory_sizes = {max(_sizes(args))} if args.quick else None  # --quick: memory at the largest N only
    rows, stopped = [], {}
    for impl, w, n in tqdm(points, desc="bench", unit="point"):
        for backward in (False, True):
            if (impl, w, backward) in stopped or (impl == "flex-compiled" and backward):
                continue
            row = dict(impl=impl, w=w, n=n, backward=backward, dtype="float32")
            try:
                fn = impls.IMPLS[impl](n, w)
                inputs = measure.make_inputs(n, torch.float32, backward)
                seconds = measure.median_time(measure.step(fn, inputs, backward), args.reps)
            except Exception as error:  # a failed compile or missing kernel skips the point, not the run
                reason = f"{type(error).__name__}: {error}".splitlines()[0][:200]
                stopped[impl, w, backward] = f"{impl} {'fwd+bwd' if backward else 'fwd'} W={w} from N={n}: {reason}"
                continue
            flops = impls.useful_flops(n, w, False, backward)
            row.update(ms=seconds * 1e3, us_per_token=seconds * 1e6 / n, gflops=flops / seconds / 1e9)
            row["pct_matmul_peak"] = 100 * row["gflops"] / peak
            if not args.no_memory and impl != "flex-compiled" and (memory_sizes is None or n in memory_sizes):
                row["peak_rise_mib"] = _mib(measure.peak_memory(impl, n, w, backward=backward))
            rows.append(row)
            if seconds > args.max_seconds and n < max(_sizes(args)):
                stopped[impl, w, backward] = (f"{impl} {'fwd+bwd' if backward else 'fwd'} W={w} above N={n}: "
                                              f"a call took {seconds:.1f} s (over --max-seconds {args.max_seconds:g})")
    skipped.extend(stopped.values())
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


def _size_label(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def plot(rows, out: Path) -> list[str]:
    """`time_vs_n.png` and `memory_vs_n.png`: one panel per W, one colour per implementation (solid fwd+bwd,
    dashed fwd), every measured N labelled on the x axis, the legend below the panels in as many rows as
    the figure's width needs. Each file is drawn aside and moved into place."""
    matplotlib = require("matplotlib", "bench", "the benchmark's plots")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker
    from matplotlib.lines import Line2D

    written = []
    names = list(dict.fromkeys(r["impl"] for r in rows))
    colours = {impl: f"C{i}" for i, impl in enumerate(names)}
    for key, label, name in (("ms", "time (ms)", "time"), ("peak_rise_mib", "peak memory rise (MiB)", "memory")):
        windows = sorted({r["w"] for r in rows if r.get(key) is not None})
        if not windows:
            continue
        shown = [impl for impl in names if any(r["impl"] == impl and r.get(key) is not None for r in rows)]
        handles = [Line2D([], [], color=colours[impl], marker="o", label=impl) for impl in shown]
        handles += [Line2D([], [], color="grey", linestyle="-", marker="o", label="fwd+bwd"),
                    Line2D([], [], color="grey", linestyle="--", marker="o", markerfacecolor="white", label="fwd")]
        width = max(5.0 * len(windows), 6.0)
        # a legend entry at 8 pt: the handle, a gap, about 0.075 in per character
        entry = 0.6 + 0.065 * max(len(h.get_label()) for h in handles)
        ncol = max(1, min(len(handles), int((width - 0.4) // entry)))
        legend_rows = -(-len(handles) // ncol)
        legend_height = 0.2 + 0.2 * legend_rows
        height = 4.0 + legend_height
        fig, axes = plt.subplots(1, len(windows), figsize=(width, height), squeeze=False)
        for ax, w in zip(axes[0], windows):
            sizes = set()
            for impl in names:
                for backward, style in ((False, "--"), (True, "-")):
                    pts = [(r["n"], r[key]) for r in rows if r["impl"] == impl and r["w"] == w
                           and r["backward"] == backward and r.get(key) is not None]
                    if pts:  # fwd hollow, fwd+bwd filled: told apart also where a line is one point
                        ax.plot(*zip(*pts), style, marker="o", color=colours[impl],
                                markerfacecolor=colours[impl] if backward else "white")
                        sizes.update(n for n, _ in pts)
            ax.set(xscale="log", yscale="log", xlabel="sequence length N", ylabel=label, title=f"W = {w}")
            # the measured lengths are the ticks: labelled whatever their span (one decade has no major tick)
            ax.xaxis.set_major_locator(ticker.FixedLocator(sorted(sizes)))
            ax.xaxis.set_major_formatter(ticker.FixedFormatter([_size_label(n) for n in sorted(sizes)]))
            ax.xaxis.set_minor_locator(ticker.NullLocator())
            if sizes and max(sizes) == min(sizes):
                ax.set_xlim(min(sizes) / 1.5, max(sizes) * 1.5)
            # plain numbers (600, not 6x10^2); within a decade or two the minor ticks are labelled too
            ax.yaxis.set_major_formatter(ticker.LogFormatter())
            ax.yaxis.set_minor_formatter(ticker.LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
            ax.grid(alpha=0.3, which="both")
        fig.legend(handles=handles, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
        fig.tight_layout(rect=(0, legend_height / height, 1, 1))
        path = out / f"{name}_vs_n.png"
        partial = out / f".{name}_vs_n.partial.png"
        try:
            fig.savefig(partial, dpi=110)
            os.replace(partial, path)
        finally:
            plt.close(fig)
            partial.unlink(missing_ok=True)
        written.append(str(path))
    return written


def environment() -> dict:
    return dict(torch=torch.__version__, python=platform.python_version(), machine=platform.machine(),
                threads=torch.get_num_threads(), processor=platform.processor(), cpu=machine.cpu(),
                cpu_capability=torch.backends.cpu.get_cpu_capability())


def run(args) -> int:
    if not args.headline:  # the sweep's progress bar and plots: the bench extra, checked before anything
        require("tqdm", "bench", "the benchmark")
        require("matplotlib", "bench", "the benchmark's plots")
    try:
        check_args(args)
    except ValueError as error:
        print(f"windowed-attention bench: error: {error}", file=sys.stderr)
        return 2
    out = Path(args.out)
    busy = busy_warning()
    if busy:
        say(sys.stderr, busy + "\n")
    if args.headline:
        result = headline.run(train=not args.no_train)
        result["environment"] = environment()
        (out / "headline.json").write_text(json.dumps(result, indent=2) + "\n")  # saved before anything is printed
        say(sys.stderr, f"wrote {out / 'headline.json'}\n")
        headline.report(result)
        return 0
    _, skipped = _points(args)
    for reason in skipped:  # known before measuring: said at once
        say(sys.stderr, f"skipped {reason}\n")
    known = len(skipped)
    rows, peak = sweep(args, skipped)
    for reason in skipped[known:]:
        say(sys.stderr, f"skipped {reason}\n")
    environment_info = environment()
    environment_info["busy_warning"] = busy or busy_warning()
    # results and plots are saved before the table is printed: a closed stdout cannot lose them
    (out / "results.json").write_text(json.dumps(
        dict(environment=environment_info, matmul_peak_gflops=peak,
             shapes="B=1 H=8 D=64 causal look_backward=1 fp32", memory_method=measure.__doc__.strip(),
             skipped=skipped, rows=rows), indent=2) + "\n")
    written = [str(out / "results.json"), *plot(rows, out)]
    for name in PLOTS:  # a plot this run does not draw (no memory measured) must not pass for one of its own
        if str(out / name) not in written and (out / name).exists():
            (out / name).unlink()
            say(sys.stderr, f"removed {out / name} of an earlier run (this run does not draw it)\n")
    for path in written:
        say(sys.stderr, f"wrote {path}\n")
    print_table(rows)
    sys.stdout.flush()
    return 0


def main(argv=None) -> int:
    parser = Parser(prog="python -m windowed_attention.bench", description=__doc__)
    add_arguments(parser)
    parser.set_defaults(run=run, command="bench")
    return parser.run(argv)


if __name__ == "__main__":
    sys.exit(main())
