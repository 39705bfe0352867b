"""What each modern option costs the fused CPU kernel: forward + backward of `local_attention` (backend
`fused`) with the option against the same call without it, side by side in one process.

fp32, B=1 H=8 N=8192 D=64, causal, window 256 (defaults). Each round times every variant once, in turn
(so load changes hit all alike); the medians of the rounds are compared with the plain call's:
documents (random lengths 64-2048) vs none, learned sinks, sink_tokens=4, softcap=30, and the token window
(256, 0) against its block twin (window_size=256, exact_windowsize=True). Prints the CPU beside the figures;
writes nothing.

Run: python examples/modern_options_speed.py [--rounds 7] [--seq-len 8192] [--heads 8] [--dim-head 64]
     [--window 256] [--threads T] [--cpu-time]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from windowed_attention import local_attention
from windowed_attention.bench.headline import document_ids, option_calls
from windowed_attention.bench.machine import cpu_label


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim-head", type=int, default=64)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time the process's CPU time instead of the wall clock (steadier on a shared machine)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    g = torch.Generator().manual_seed(0)
    H, n, d, w = args.heads, args.seq_len, args.dim_head, args.window
    q, k, v = (torch.randn(1, H, n, d, generator=g).requires_grad_() for _ in range(3))
    documents = document_ids(n)
    sinks = torch.randn(H, generator=g).requires_grad_()
    grad = torch.randn(1, H, n, d, generator=g)
    variants = option_calls(w, documents, sinks)

    clock = time.process_time if args.cpu_time else time.perf_counter

    def step(options) -> float:
        start = clock()
        out = local_attention(q, k, v, backend="fused", **options)
        out.backward(grad)
        elapsed = clock() - start
        for t in (q, k, v, sinks):
            t.grad = None
        return elapsed

    for options in variants.values():  # warm up (and build the kernel)
        step(options)
    times = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, options in variants.items():
            times[name].append(step(options))
    median = {name: statistics.median(values) for name, values in times.items()}

    print(f"CPU: {cpu_label()}; torch threads {torch.get_num_threads()}; fp32 B=1 H={H} N={n} D={d}, causal, "
          f"window {w}, forward + backward, medians of {args.rounds} rounds ({'CPU time' if args.cpu_time else 'wall clock'}); "
          f"{documents.max().item() + 1} documents")
    print(f"plain call: {median['plain'] * 1e3:.1f} ms")
    for name in variants:
        if name == "plain":
            continue
        base = "block_exact" if name == "token_window" else "plain"
        print(f"{name:>24}: {median[name] * 1e3:8.1f} ms  {median[name] / median[base]:.3f}x of {base}")


if __name__ == "__main__":
    main()
