"""What a call of the op costs beyond the attention itself (issue #22), on CPU, in process time, interleaved
rounds in one process, medians. Prints only.

1. A tiny call (B=1, one head, n=128, d=16, causal, window 128: every query sees every earlier key, as in a
   dense causal call), `backend="auto"` (the fused kernel) against one dense causal
   `scaled_dot_product_attention` call, at 1 and 2 threads.
2. `backend="flex"` forward against FlexAttention called by hand (`torch.compile(flex_attention)` with its
   own `create_block_mask`), B=1 H=4 N=2048 D=64, sliding causal window of 128 keys back.
3. `backend="flex"` with a key padding mask that hides the last quarter of the keys against no mask.

    python examples/call_overhead.py [--rounds 9] [--reps 200] [--skip-flex]

Compiling FlexAttention on CPU takes about 45 s per graph here (three graphs: ours, ours with a key mask,
by hand).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings

import torch
import torch.nn.functional as F

from windowed_attention import local_attention
from windowed_attention.bench.machine import cpu_label


def per_call(fn, reps: int) -> float:
    """Process seconds per call of `fn` over `reps` calls."""
    start = time.process_time()
    for _ in range(reps):
        fn()
    return (time.process_time() - start) / reps


def compare(fns: dict, rounds: int, reps: int) -> dict:
    """Median per-call process time of each function, the functions' order alternating round by round."""
    for fn in fns.values():  # warm-up (and compilation)
        for _ in range(3):
            fn()
    times = {name: [] for name in fns}
    names = list(fns)
    for index in range(rounds):
        for name in (names if index % 2 == 0 else names[::-1]):
            times[name].append(per_call(fns[name], reps))
    return {name: statistics.median(values) for name, values in times.items()}


def tiny(rounds: int, reps: int) -> None:
    q, k, v = (torch.randn(1, 1, 128, 16) for _ in range(3))
    fns = {
        "ours": lambda: local_attention(q, k, v, window_size=128, causal=True),
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
    }
    torch.testing.assert_close(fns["ours"](), fns["sdpa"](), rtol=1e-4, atol=1e-5)
    for threads in (1, 2):
        torch.set_num_threads(threads)
        t = compare(fns, rounds, reps)
        print(f"  tiny call, {threads} thread(s): ours (auto) {t['ours'] * 1e6:.1f} us, dense causal SDPA "
              f"{t['sdpa'] * 1e6:.1f} us: ratio {t['ours'] / t['sdpa']:.2f} (bound 2)")
    torch.set_num_threads(1)


def flex(rounds: int, reps: int) -> None:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    B, H, N, D, W = 1, 4, 2048, 64, 128
    q, k, v = (torch.randn(B, H, N, D) for _ in range(3))

    def sliding_causal(b, h, i, j):
        return (j <= i) & (i - j <= W)

    by_hand = torch.compile(flex_attention)
    block_mask = create_block_mask(sliding_causal, None, None, N, N, device="cpu")
    padded = (torch.arange(N) < N - N // 4)[None]
    fns = {
        "ours": lambda: local_attention(q, k, v, window_size=(W, 0), causal=True, backend="flex"),
        "by hand": lambda: by_hand(q, k, v, block_mask=block_mask),
        "ours, last quarter padded": lambda: local_attention(q, k, v, window_size=(W, 0), causal=True, mask=padded,
                                                             backend="flex"),
    }
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(fns["ours"](), fns["by hand"](), rtol=1e-4, atol=1e-5)
        reference = local_attention(q, k, v, window_size=(W, 0), causal=True, mask=padded, backend="reference")
        torch.testing.assert_close(fns["ours, last quarter padded"](), reference, rtol=1e-4, atol=1e-5)
        t = compare(fns, rounds, reps)
    ours, hand, masked = t["ours"], t["by hand"], t["ours, last quarter padded"]
    print(f"  flex forward B={B} H={H} N={N} D={D}, sliding causal window {W}: ours {ours * 1e3:.2f} ms, "
          f"FlexAttention by hand {hand * 1e3:.2f} ms: ratio {ours / hand:.3f} (bound 1.15)")
    print(f"  flex forward, last quarter of the keys padded: {masked * 1e3:.2f} ms against {ours * 1e3:.2f} ms "
          f"without a mask: ratio {masked / ours:.3f} (bound 1.25)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--reps", type=int, default=200, help="calls per round of the tiny call")
    parser.add_argument("--flex-reps", type=int, default=5, help="calls per round of the flex calls")
    parser.add_argument("--skip-flex", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    print(f"{cpu_label()}; fp32, process time, median of {args.rounds} interleaved rounds; load average "
          f"{os.getloadavg()[0]:.1f} at the start")
    tiny(args.rounds, args.reps)
    if not args.skip_flex:
        flex(args.rounds, args.flex_reps)
    print(f"  load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
