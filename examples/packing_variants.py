"""What packing documents buys: the Quickstart model trained in variants, side by side.

Every variant is the Quickstart's model and recipe (`ModelConfig()`, `TrainConfig()`: 600 steps of 32 x 128
bytes of the built-in corpus) from the same seed: the same initial weights and the same training windows.
The variants differ only in what `VARIANTS` says: whether batches carry their document ids (`pack`: no
attention and no target crosses a source file) and extra model fields (learned attention sinks, hybrid layer windows). The
runs are interleaved step by step (the order rotating each step), so a machine that other work slows
slows every variant alike; the table reports the median time per step (and the median ratio of each step's
time to the first variant's same step, which ran next to it) and the validation bits/byte under both
rules (documents concatenated; packed: no target crosses a document), on the same fixed windows.

    python examples/packing_variants.py                    # all variants, 600 steps, seed 0
    python examples/packing_variants.py --steps 100 --seeds 0 1 --variants unpacked packed

Prints a markdown table; writes nothing. A variant is one line in `VARIANTS` (a hybrid model: its
`ModelConfig` fields, e.g. `layer_windows=...`).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from dataclasses import replace

import torch

from windowed_attention.training.config import ModelConfig, TrainConfig
from windowed_attention.training.data import BatchSampler, builtin_corpus, eval_batches
from windowed_attention.training.distributed import DistInfo
from windowed_attention.training.metrics import bits_per_byte
from windowed_attention.training.trainer import batch_loss, evaluate, learning_rate, make_optimizer

# name -> (pack, extra ModelConfig fields)
VARIANTS = {
    "unpacked": (False, {}),
    "packed": (True, {}),
    "unpacked + learned sinks": (False, {"attn_sinks": True}),
    "packed + learned sinks": (True, {"attn_sinks": True}),
    "hybrid (3 local : 1 global)": (False, {"layer_windows": [64, 64, 64, None]}),
    "packed hybrid": (True, {"layer_windows": [64, 64, 64, None]}),
}


class Run:
    """One variant's model, optimizer and sampler, stepped from outside so that variants interleave."""

    def __init__(self, name: str, corpus, model_config: ModelConfig, config: TrainConfig, seed: int):
        self.name, self.config = name, config
        self.pack, extra = VARIANTS[name]
        torch.manual_seed(seed)  # the same initial weights in every variant (sinks start at zero, drawing none)
        self.model = replace(model_config, **extra).build()
        self.optimizer = make_optimizer(self.model, config)
        self.sampler = BatchSampler(corpus.train, config.seq_len, config.batch_size, seed,
                                    documents=corpus.train_documents if self.pack else None)
        self.seconds: list[float] = []

    def step(self, step: int) -> None:
        tick = time.perf_counter()
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(step, self.config)
        batch, documents = self.sampler.next()
        batch_loss(self.model, batch, DistInfo(), self.model.ignore_index, documents).backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.seconds.append(time.perf_counter() - tick)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=TrainConfig().steps)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--eval-batches", type=int, default=TrainConfig().eval_batches,
                        help="validation batches of 32 x 128 bytes (default: the Quickstart's)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model_config, config = ModelConfig(), TrainConfig(steps=args.steps)
    corpus = builtin_corpus()
    rules = {"concatenated": None, "packed": corpus.val_documents}
    val = {rule: eval_batches(corpus.val, config.seq_len, config.batch_size, args.eval_batches, documents)
           for rule, documents in rules.items()}
    results = {name: {"seconds": [], "concatenated": [], "packed": []} for name in args.variants}
    for seed in args.seeds:
        runs = [Run(name, corpus, model_config, config, seed) for name in args.variants]
        for step in range(config.steps):
            shift = step % len(runs)  # rotate who goes first
            for run in runs[shift:] + runs[:shift]:
                run.step(step)
            if (step + 1) % 10 == 0:
                print(f"seed {seed}: step {step + 1}/{config.steps}", file=sys.stderr, flush=True)
        for run in runs:
            result = results[run.name]
            result["seconds"] += run.seconds[min(10, len(run.seconds) - 1):]  # the first steps warm up
            for rule, batches in val.items():
                loss = evaluate(run.model, batches, torch.device("cpu"), contextlib.nullcontext)  # fp32
                result[rule].append(bits_per_byte(loss))

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               "unknown CPU")
    print(f"{config.steps} steps of {config.batch_size} x {config.seq_len} bytes, seeds {args.seeds}, "
          f"{torch.get_num_threads()} threads, {cpu}\n")
    first = args.variants[0]
    print(f"| variant | val bits/byte, packed rule | val bits/byte, concatenated | median ms/step | "
          f"ms/step quartiles | step time / {first}'s |")
    print("|---|---|---|---|---|---|")
    for name, result in results.items():
        q1, median, q3 = statistics.quantiles(result["seconds"], n=4)
        # the same step of two variants ran back to back: their ratio cancels most of the machine's drift
        ratio = statistics.median(a / b for a, b in zip(result["seconds"], results[first]["seconds"]))
        print(f"| {name} | {statistics.mean(result['packed']):.3f} | {statistics.mean(result['concatenated']):.3f} "
              f"| {median * 1e3:.1f} | {q1 * 1e3:.1f} - {q3 * 1e3:.1f} | {ratio:.3f} |")


if __name__ == "__main__":
    main()
