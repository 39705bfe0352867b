"""`train --compile` against eager: compile time and training-step speed, side by side in one process.

Two copies of the same model (the `train` defaults: the Quickstart's dim 128, depth 4, heads 4, dim_head 32,
window 64; batch 32 x 128 tokens; AdamW as `train` makes it), one wrapped in `torch.compile` as
`train --compile` does. The compile time is the first compiled step's time minus an eager step's; then
eager and compiled steps alternate (so load changes hit both alike) and the medians are compared.

Run: python examples/compile_speed.py [--rounds 20] [--seq-len 128] [--batch-size 32] [--precision fp32|bf16]
     [--threads T]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from windowed_attention.compiling import inductor_options
from windowed_attention.training.config import ModelConfig, TrainConfig
from windowed_attention.training.trainer import make_optimizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--seq-len", type=int, default=TrainConfig.seq_len)
    parser.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    config = ModelConfig(max_seq_len=args.seq_len)
    models, steps = {}, {}
    for name in ("eager", "compiled"):
        torch.manual_seed(0)
        model = config.build()
        optimizer = make_optimizer(model, TrainConfig())
        run = torch.compile(model, options=inductor_options()) if name == "compiled" else model

        def step(run=run, model=model, optimizer=optimizer):
            batch = torch.randint(0, 256, (args.batch_size, args.seq_len + 1))
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16"):
                loss = run(batch, return_loss=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        models[name], steps[name] = model, step

    def timed(fn) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    eager_first = timed(steps["eager"])
    compiled_first = timed(steps["compiled"])
    times = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, fn in steps.items():
            times[name].append(timed(fn))
    median = {name: statistics.median(t) for name, t in times.items()}
    tokens = args.batch_size * args.seq_len
    print(f"model {sum(p.numel() for p in models['eager'].parameters()) / 1e6:.2f}M parameters, batch "
          f"{args.batch_size}x{args.seq_len}, {args.precision}, {torch.get_num_threads()} threads")
    print(f"first step: eager {eager_first:.2f} s, compiled {compiled_first:.2f} s "
          f"(compile time about {compiled_first - median['eager']:.1f} s)")
    for name in steps:
        print(f"{name:9} median step {median[name] * 1e3:.1f} ms, {tokens / median[name]:,.0f} tokens/s "
              f"(quartiles {statistics.quantiles(times[name], n=4)[0] * 1e3:.1f}-"
              f"{statistics.quantiles(times[name], n=4)[2] * 1e3:.1f} ms)")
    print(f"compiled / eager speed: {median['eager'] / median['compiled']:.2f}x")


if __name__ == "__main__":
    main()
