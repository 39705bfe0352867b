"""The plain forward + backward of the op (fp32, B=1 H=8 N=8192 D=64, causal, window 256: the headline's
shapes) against local-attention's, with each float32 GEMM the fused kernel can use, side by side in one
process: our widest build with its band and kept packing (`ops/csrc/f32_gemm.h`), the same build without
them, and MKL's sgemm.

`--as-avx2` runs everything as on a CPU without AVX-512: torch's vector code at AVX2
(`ATEN_CPU_CAPABILITY=avx2`, set before torch is imported; local-attention's softmax and the rest run
there too), MKL's at AVX2 (`MKL_ENABLE_INSTRUCTIONS=AVX2`: local-attention's matmuls; on AMD CPUs MKL
keeps to its AVX2 code anyway), the kernel compiled for AVX2 and our AVX2 build of the GEMM. Each round times every variant
once, in turn; medians of the rounds. One thread is timed by process CPU time (less disturbed by other
processes), more by wall time. Prints the CPU, the fp32 matmul rate of the same run and the ratios;
writes nothing. Needs local-attention (the test extra).

Run: python examples/gemm_builds_speed.py [--threads 2] [--rounds 9] [--as-avx2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--as-avx2", action="store_true", help="run as an AVX2-only CPU would (see above)")
    args = parser.parse_args()
    if args.as_avx2:  # set before torch (and MKL) load
        os.environ["ATEN_CPU_CAPABILITY"] = "avx2"
        os.environ["MKL_ENABLE_INSTRUCTIONS"] = "AVX2"
    import torch

    from windowed_attention.bench import impls, measure
    from windowed_attention.bench.machine import cpu_label
    from windowed_attention.ops import fused_cpu

    if not impls.installed("local-attention"):
        sys.exit("gemm_builds_speed.py compares against local-attention: pip install local-attention")
    torch.set_num_threads(args.threads)
    kernel = fused_cpu.kernel()
    build = "avx2" if args.as_avx2 else kernel.f32_gemm_isa()
    if build == "mkl" or kernel.use_f32_gemm_isa(build) != build:
        sys.exit(f"this CPU runs no {'AVX2' if args.as_avx2 else 'own'} build of the float32 GEMM")
    n, w = 8192, 256
    inputs = measure.make_inputs(n, torch.float32, True)
    ours = measure.step(impls.ours(n, w), inputs, True)

    def with_gemm(name: str, skips: bool):
        def run():
            kernel.use_f32_gemm_isa(name)
            kernel.use_f32_gemm_skips(skips)
            return ours()
        return run

    variants = {f"ours, {build} GEMM": with_gemm(build, True), f"ours, {build} GEMM without band and packing":
                with_gemm(build, False), "ours, MKL sgemm": with_gemm("mkl", True),
                "local-attention": measure.step(impls.theirs(n, w), inputs, True)}
    clock = time.process_time if args.threads == 1 else time.perf_counter
    try:
        for run in variants.values():
            run()
        times = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, run in variants.items():
                started = clock()
                run()
                times[name].append(clock() - started)
    finally:
        kernel.use_f32_gemm_isa(build)
        kernel.use_f32_gemm_skips(True)
    median = {name: statistics.median(values) for name, values in times.items()}
    measure.matmul_peak(reps=1)  # warm-up
    peak = measure.matmul_peak()  # GFLOP/s
    print(f"{cpu_label()}; torch vector code {torch.backends.cpu.get_cpu_capability()}, {args.threads} thread(s), "
          f"{'process CPU' if args.threads == 1 else 'wall'} time, medians of {args.rounds} rounds; fp32 matmul "
          f"{peak:.0f} GFLOP/s")
    theirs = median["local-attention"]
    for name, seconds in median.items():
        line = f"{name}: {seconds * 1e3:.1f} ms"
        if name != "local-attention":
            line += f", local-attention / this = {theirs / seconds:.2f}x"
        print(line)
    useful = impls.useful_flops(n, w, False, True) / median[f"ours, {build} GEMM"] / 1e9
    print(f"ours computes the visible pairs at {useful:.0f} GFLOP/s ({useful / peak:.0%} of the matmul rate); "
          f"the band and packing save {median[f'ours, {build} GEMM without band and packing'] / median[f'ours, {build} GEMM']:.3f}x")


if __name__ == "__main__":
    main()
