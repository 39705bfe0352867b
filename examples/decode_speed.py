"""Cached decoding speed: windowed-attention against local-attention, side by side in one process.

Both models: dim 256, depth 4, heads 4, dim_head 64, window 256, byte vocabulary, random weights, eval
mode, `generate` with its default arguments (temperature 1, filter_thres 0.9). For each batch size B and
context length C the prime holds B x C tokens; `generate` makes `--tokens` T tokens, and a wrapper around
the model's `forward` notes when each call ends: the first is the prefill, each later one a decode step
(both libraries' `generate` call `forward` once per token), so the prefill is counted out:

    rate(B, C) = B * (T - 1) / (end of the last forward - end of the first)    [tokens/s]

The libraries take turns within each round (interleaved), and each figure is the median over `--rounds`
rounds. `--cache-dtypes float32 bfloat16` also times ours with a bfloat16 KV cache (`cache_dtype`: half the
bytes a step reads, not exact), in the same turns; batch-16-over-batch-1 ratios compare like with like.
Run: python examples/decode_speed.py [--batches 1 16] [--contexts 512 8192] [--rounds 5] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from windowed_attention import LocalTransformer

CONFIG = dict(num_tokens=256, dim=256, depth=4, heads=4, dim_head=64, local_attn_window_size=256)


@torch.no_grad()
def decode_rate(model, prime, n: int, **options) -> float:
    """Tokens/s of the decode steps of `model.generate(prime, n, **options)` (the prefill left out)."""
    ends, forward = [], model.forward

    def timed(*args, **kwargs):  # local-attention's generate calls self.forward, so no hook would see it
        out = forward(*args, **kwargs)
        ends.append(time.perf_counter())
        return out

    model.forward = timed
    try:
        model.generate(prime, n, **options)
    finally:
        del model.forward
    if len(ends) != n:
        raise RuntimeError(f"expected one forward per token, got {len(ends)} for {n} tokens")
    return prime.shape[0] * (n - 1) / (ends[-1] - ends[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 8192])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=257, help="tokens generated per run (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--their-batches", type=int, nargs="*", default=[1],
                        help="batch sizes at which local-attention is timed too (default: 1; none: skip it)")
    parser.add_argument("--cache-dtypes", nargs="+", choices=["float32", "bfloat16"], default=["float32"],
                        help="our KV cache dtypes to time (default: %(default)s, the exact cache)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    max_seq_len = max(args.contexts) + args.tokens + 1

    torch.manual_seed(0)
    ours = LocalTransformer(max_seq_len=max_seq_len, num_residual_streams=1, **CONFIG).eval()  # as theirs
    models = {}  # name -> (model, generate options)
    for cache_dtype in args.cache_dtypes:
        name = "windowed-attention" + ("" if cache_dtype == "float32" else f" {cache_dtype} cache")
        models[name] = (ours, {} if cache_dtype == "float32" else {"cache_dtype": getattr(torch, cache_dtype)})
    if args.their_batches:
        import local_attention

        models["local-attention"] = (local_attention.LocalTransformer(
            max_seq_len=max_seq_len, causal=True, num_residual_streams=1, **CONFIG).eval(), {})

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; model {CONFIG}")
    print(f"rate = B * {args.tokens - 1} decode steps / their time (prefill left out), median of {args.rounds} rounds")
    points = [(b, c) for b in args.batches for c in args.contexts]
    primes = {(b, c): torch.randint(0, 256, (b, c), generator=torch.Generator().manual_seed(c)) for b, c in points}
    mine = [name for name in models if name.startswith("windowed-attention")]
    runs = [(name, b, c) for b, c in points for name in models if name in mine or b in args.their_batches]
    for name, b, c in runs:  # warm-up: builds the kernel, first-touches the caches
        decode_rate(models[name][0], primes[b, c], 2, **models[name][1])
    rates: dict[tuple, list[float]] = {run: [] for run in runs}
    for _ in range(args.rounds):
        for name, b, c in runs:
            rates[name, b, c].append(decode_rate(models[name][0], primes[b, c], args.tokens, **models[name][1]))
    median = {run: statistics.median(values) for run, values in rates.items()}
    for (name, b, c), rate in median.items():
        spread = f"{min(rates[name, b, c]):.0f}-{max(rates[name, b, c]):.0f}"
        print(f"{name:>20} batch {b:>3} context {c:>6}: {rate:8.1f} tokens/s (rounds {spread})", flush=True)

    short, long = min(args.contexts), max(args.contexts)
    for name in mine:
        rate = {(b, c): median[name, b, c] for b, c in points}
        for b in args.batches:
            print(f"{name} batch {b}: flatness rate({long}) / rate({short}) = {rate[b, long] / rate[b, short]:.2f}")
            for c in args.contexts:
                if ("local-attention", b, c) in median:
                    print(f"{name} batch {b} context {c}: {rate[b, c] / median['local-attention', b, c]:.2f}x local-attention")
        if 1 in args.batches:
            for b in args.batches:
                if b != 1:
                    for c in args.contexts:
                        print(f"{name} context {c}: batch {b} decodes {rate[b, c] / rate[1, c]:.2f}x the tokens/s of batch 1")


if __name__ == "__main__":
    main()
