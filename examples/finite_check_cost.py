"""What finite inputs pay for `ops.finite` (a row never depends on a key it cannot see): the fused kernel's
forward+backward with the per-call finiteness sum against the same call with the check skipped (the code
before it), interleaved in one process, medians of several rounds. Prints only.

    python examples/finite_check_cost.py [--n 8192] [--window 256] [--rounds 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from windowed_attention import local_attention
from windowed_attention.ops import api
from windowed_attention.bench.machine import cpu_label


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8192)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 8, args.n, 64, requires_grad=True) for _ in range(3))
    checked = api.all_finite

    def step(check: bool) -> float:
        api.all_finite = checked if check else (lambda *tensors: True)
        try:
            start = time.perf_counter()
            local_attention(q, k, v, window_size=args.window, causal=True, backend="fused").sum().backward()
            return time.perf_counter() - start
        finally:
            api.all_finite = checked

    step(True), step(False)  # warm-up
    times = {True: [], False: []}
    for index in range(args.rounds):
        for check in ((False, True) if index % 2 else (True, False)):  # the order alternates
            times[check].append(step(check))
    with_check, without = statistics.median(times[True]), statistics.median(times[False])
    sums = []
    with torch.no_grad():
        for _ in range(5 * args.rounds):
            start = time.perf_counter()
            checked(k, v)
            sums.append(time.perf_counter() - start)
    alone = statistics.median(sums)
    print(f"{cpu_label()}; fp32 B=1 H=8 N={args.n} D=64 causal window {args.window}, fused forward+backward, "
          f"median of {args.rounds} interleaved rounds")
    print(f"  without the check {without * 1e3:.1f} ms, with it {with_check * 1e3:.1f} ms: "
          f"ratio {with_check / without:.4f}")
    print(f"  the check alone (all_finite(k, v)) {alone * 1e3:.2f} ms: {alone / without:.2%} of the call")


if __name__ == "__main__":
    main()
