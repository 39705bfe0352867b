"""Cached decoding of a hybrid local/global model stays flat as the context grows.

The model is the README's (the Quickstart's `train` defaults, `training.config.ModelConfig`: dim 128,
depth 4, heads 4, dim_head 32, window 64, one residual stream, rotary positions) with one global layer in
four: `layer_windows=[64, 64, 64, None]`. Beside it, the same model all local (`[64] * 4`). Random
weights, eval mode, float32, batch 1, `generate` with temperature 0 (greedy). For each context length C
the prime holds C tokens; `generate` makes `--tokens` T tokens, and a wrapper around the model's
`forward` notes when each call ends: the first is the prefill, each later one a decode step, so the
prefill is counted out:

    ms/token(C) = 1000 * (end of the last forward - end of the first) / (T - 1)

The global layer's cache holds the whole text (a step reads C keys there, and 64 in each local layer);
nothing recomputes the sequence. Models and contexts take turns within each round (interleaved) and each
figure is the median over `--rounds` rounds. `--cpu-time` times the process's CPU time instead of the wall
clock (with `--threads 1`: what a step costs, not how long it waited for a core on a shared machine).
Prints only.
Run: python examples/hybrid_decode_speed.py [--contexts 256 2048] [--tokens 129] [--rounds 7] [--threads N]
     [--cpu-time]
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import torch

from windowed_attention.training.config import ModelConfig
from windowed_attention.bench.machine import cpu_label


@torch.no_grad()
def ms_per_token(model, prime: torch.Tensor, n: int, clock=time.perf_counter) -> float:
    """Milliseconds per decode step of `model.generate(prime, n, temperature=0)` (the prefill left out)."""
    ends, forward = [], model.forward

    def timed(*args, **kwargs):
        out = forward(*args, **kwargs)
        ends.append(clock())
        return out

    model.forward = timed
    try:
        model.generate(prime, n, temperature=0.0)
    finally:
        del model.forward
    if len(ends) != n:
        raise RuntimeError(f"expected one forward per token, got {len(ends)} for {n} tokens")
    return 1000 * (ends[-1] - ends[0]) / (n - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[256, 2048])
    parser.add_argument("--tokens", type=int, default=129, help="tokens generated per run (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--cpu-time", action="store_true", help="time CPU time, not the wall clock")
    args = parser.parse_args()
    clock = time.process_time if args.cpu_time else time.perf_counter
    if args.threads:
        torch.set_num_threads(args.threads)

    base = ModelConfig()
    w = base.local_attn_window_size
    models = {}
    for name, windows in (("hybrid [64, 64, 64, global]", [w, w, w, None]), ("local  [64] * 4", [w] * 4)):
        torch.manual_seed(0)
        models[name] = replace(base, layer_windows=windows).build().eval()
    generator = torch.Generator().manual_seed(0)
    primes = {c: torch.randint(0, base.num_tokens, (1, c), generator=generator) for c in args.contexts}

    print(f"{cpu_label()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"model: dim {base.dim}, depth {base.depth}, heads {base.heads}, dim_head {base.dim_head}, window {w}, "
          f"{base.num_residual_streams} residual stream; batch 1, float32, greedy")
    print(f"ms/token = {'CPU' if args.cpu_time else 'wall'} time of the decode steps of {args.tokens - 1} tokens "
          f"after the prefill, median of {args.rounds} rounds")
    for model in models.values():  # warm-up: first calls build kernels and tables
        ms_per_token(model, primes[args.contexts[0]], 8)
    times = {(name, c): [] for name in models for c in args.contexts}
    for _ in range(args.rounds):
        for name, model in models.items():
            for c in args.contexts:
                times[name, c].append(ms_per_token(model, primes[c], args.tokens, clock))
    header = "model".ljust(30) + "".join(f"C={c}".rjust(12) for c in args.contexts)
    first, last = args.contexts[0], args.contexts[-1]
    print(header + f"{'ratio':>10}")
    for name in models:
        medians = [statistics.median(times[name, c]) for c in args.contexts]
        cells = "".join(f"{m:9.3f} ms" for m in medians)
        print(f"{name:<30}{cells}{medians[-1] / medians[0]:>9.2f}x   (C={last} over C={first})")


if __name__ == "__main__":
    main()
