"""Cached decoding speed at short and long context: windowed-attention vs local-attention, side by side.

Both models: dim 256, depth 4, heads 4, dim_head 64, window 256, byte vocabulary, random weights. For each
context length C the prime holds C tokens; we time generating 64 and 320 tokens after the same prime and
divide the difference (256 tokens) by the difference in time, so the prefill is counted out:

    rate(C) = (320 - 64) / (t(320) - t(64))    [tokens/s]

Each timing is the best of `--repeats` runs. Run: python examples/decode_speed.py [--contexts 512 8192]
"""

from __future__ import annotations

import argparse
import time

import torch

from windowed_attention import LocalTransformer
from windowed_attention.generation import generate

CONFIG = dict(num_tokens=256, dim=256, depth=4, heads=4, dim_head=64, local_attn_window_size=256)
SHORT, LONG = 64, 320


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def decode_rate(run, prime, repeats: int) -> float:
    """Tokens/s of decoding alone: (LONG - SHORT) tokens over the extra time they take."""
    run(prime, 4)  # warm-up
    t_short = best_time(lambda: run(prime, SHORT), repeats)
    t_long = best_time(lambda: run(prime, LONG), repeats)
    return (LONG - SHORT) / (t_long - t_short)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 8192])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--skip-theirs", action="store_true", help="do not time local-attention")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    max_seq_len = max(args.contexts) + LONG + 1

    torch.manual_seed(0)
    ours = LocalTransformer(max_seq_len=max_seq_len, num_residual_streams=1, **CONFIG).eval()  # as theirs below

    def run_ours(prime, n):
        return generate(ours, prime, n, temperature=1.0, filter_thres=0.9)

    runners = {"windowed-attention": run_ours}
    if not args.skip_theirs:
        import local_attention

        theirs = local_attention.LocalTransformer(max_seq_len=max_seq_len, causal=True, num_residual_streams=1,
                                                  **CONFIG).eval()

        @torch.no_grad()
        def run_theirs(prime, n):
            return theirs.generate(prime, n, temperature=1.0, filter_thres=0.9, use_kv_cache=True)

        runners["local-attention"] = run_theirs

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; model {CONFIG}")
    print(f"rate = {LONG - SHORT} tokens / (t({LONG}) - t({SHORT})), best of {args.repeats}")
    rates: dict[str, dict[int, float]] = {name: {} for name in runners}
    for context in args.contexts:
        prime = torch.randint(0, 256, (1, context))
        for name, run in runners.items():
            rates[name][context] = rate = decode_rate(run, prime, args.repeats)
            print(f"{name:>20} context {context:>6}: {rate:8.1f} tokens/s ({1000 / rate:.2f} ms/token)", flush=True)

    short, long = min(args.contexts), max(args.contexts)
    ours_rates = rates["windowed-attention"]
    print(f"windowed-attention flatness: rate({long}) / rate({short}) = {ours_rates[long] / ours_rates[short]:.2f}")
    if "local-attention" in rates:
        theirs_rates = rates["local-attention"]
        print(f"local-attention flatness:    rate({long}) / rate({short}) = {theirs_rates[long] / theirs_rates[short]:.2f}")
        for context in args.contexts:
            print(f"speed-up at context {context}: {ours_rates[context] / theirs_rates[context]:.2f}x")


if __name__ == "__main__":
    main()
