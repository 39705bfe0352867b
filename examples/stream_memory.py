"""Generate far past `max_seq_len` in constant memory: a rotary-only model (`use_abs_pos_emb=False`)
streams 100,000 tokens with the rolling KV cache while we sample the process's resident memory (RSS).

Run: python examples/stream_memory.py [--tokens 100000] [--every 10000]
Prints RSS and the caches' size every `--every` tokens; both stay flat.
"""

from __future__ import annotations

import argparse
import os
import resource
import time

import torch

from windowed_attention import LocalTransformer
from windowed_attention.generation import cache_nbytes, stream


def rss_mib() -> float:
    """Current resident set size in MiB (Linux /proc; falls back to the peak from getrusage)."""
    try:
        with open(f"/proc/{os.getpid()}/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=100_000)
    parser.add_argument("--every", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = LocalTransformer(num_tokens=256, max_seq_len=512, dim=args.dim, depth=args.depth, heads=4, dim_head=64,
                             local_attn_window_size=args.window, use_abs_pos_emb=False, num_residual_streams=1).eval()
    prompt = torch.randint(0, 256, (1, 64))
    state = {}

    def watch(step, caches):
        state["cache"], state["length"] = cache_nbytes(caches), caches[0].length

    print(f"model: dim {args.dim}, depth {args.depth}, window {args.window}, max_seq_len {model.max_seq_len} "
          f"(rotary only); generating {args.tokens:,} tokens")
    print(f"{'tokens':>9} {'context':>9} {'RSS MiB':>9} {'cache KiB':>10} {'tokens/s':>9}")
    start = last = time.perf_counter()
    samples = []
    for count, _ in enumerate(stream(model, prompt, args.tokens, temperature=1.0, on_caches=watch), start=1):
        if count % args.every == 0 or count == 1:
            now = time.perf_counter()
            rate = (args.every if count > 1 else 1) / (now - last)
            last = now
            samples.append(rss_mib())
            print(f"{count:>9,} {state.get('length', prompt.shape[1]):>9,} {samples[-1]:>9.1f} "
                  f"{state.get('cache', 0) / 1024:>10.1f} {rate:>9.1f}", flush=True)
    later = samples[1:] or samples
    print(f"done in {time.perf_counter() - start:.0f} s; RSS from the first checkpoint on: min {min(later):.1f} MiB, "
          f"max {max(later):.1f} MiB (spread {max(later) - min(later):.1f} MiB)")


if __name__ == "__main__":
    main()
