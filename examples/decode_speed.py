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

`--baseline DIR` times another version of this package too (DIR: its `windowed_attention` folder, for
example that of `git archive main windowed_attention | tar -x -C /tmp/main`), imported under another name,
with our weights, in the same turns: before/after figures of a change from one process. Both versions run
our kernels (the C++ library and the modules that register custom ops, which must be the same files), so
this compares changes to the Python around them. `--clock cpu` times by the process's CPU time instead of
the wall clock, for a machine that others load; `--paired` also times single decode steps of ours and the
baseline's in turns (prefill, then step by step: the medians of `--rounds` x (`--tokens` - 1) steps each, a
finer comparison than whole runs). `--weights-check` times what a decode step spends checking that the
caches were built from the model's current weights (`KVCache.check_weights`: the model's record and each
layer's), inside real steps. `--compile` also times ours with each decode step compiled (`generate(...,
compile=True)`: one graph per step, `generation.engine.CompiledStep`; compiled in the warm-up, whose time
is printed), timed at the ends of the engine's prefill and steps (the graph holds no Python hook).
`--profile-step` times `--tokens` - 1 decode steps of the README model (`README_CONFIG`), eager and
compiled (at batch 1 after a prompt of the smallest context), and the kernels of a step replayed alone
(`profile_steps`: our decode-attention, small-linear and hyper-connection kernels, with the inputs an eager
step gave them), by `--clock`; the rest of a step is outside the kernels (Python, dispatch, the small ops;
in the compiled graph, inductor's fused elementwise kernels).
Run: python examples/decode_speed.py [--batches 1 16] [--contexts 512 8192] [--rounds 5] [--threads N]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch

import windowed_attention
from windowed_attention import KVCache, LocalTransformer
from windowed_attention.generation import engine

CONFIG = dict(num_tokens=256, dim=256, depth=4, heads=4, dim_head=64, local_attn_window_size=256)
README_CONFIG = dict(num_tokens=256, dim=256, depth=2, local_attn_window_size=128, kv_heads=2)  # the README's model


@torch.no_grad()
def decode_rate(model, prime, n: int, **options) -> float:
    """Tokens/s of the decode steps of `model.generate(prime, n, **options)` (the prefill left out)."""
    if options.get("compile"):
        return engine_rate(model, prime, n, **options)
    ends, forward = [], model.forward

    def timed(*args, **kwargs):  # local-attention's generate calls self.forward, so no hook would see it
        out = forward(*args, **kwargs)
        ends.append(CLOCK[0]())
        return out

    model.forward = timed
    try:
        model.generate(prime, n, **options)
    finally:
        del model.forward
    if len(ends) != n:
        raise RuntimeError(f"expected one forward per token, got {len(ends)} for {n} tokens")
    return prime.shape[0] * (n - 1) / (ends[-1] - ends[0])


@torch.no_grad()
def engine_rate(model, prime, n: int, **options) -> float:
    """`decode_rate` timed at the ends of the engine's `prefill` and `decode_step` calls (a compiled step
    runs no Python hook inside the model)."""
    ends, functions = [], {name: getattr(engine, name) for name in ("prefill", "decode_step")}

    def timed(function):
        def call(*args, **kwargs):
            out = function(*args, **kwargs)
            ends.append(CLOCK[0]())
            return out
        return call

    for name, function in functions.items():
        setattr(engine, name, timed(function))
    try:
        model.generate(prime, n, **options)
    finally:
        for name, function in functions.items():
            setattr(engine, name, function)
    if len(ends) != n:
        raise RuntimeError(f"expected a prefill and a step per token, got {len(ends)} calls for {n} tokens")
    return prime.shape[0] * (n - 1) / (ends[-1] - ends[0])


class _Recorder:
    """Stands for the kernel library (`fused_cpu.kernel()`): notes each call (name, inputs) and makes it."""

    def __init__(self, ops):
        self.ops, self.calls = ops, []

    def __getattr__(self, name):
        op = getattr(self.ops, name)

        def call(*args):
            self.calls.append((op, [a.clone() if isinstance(a, torch.Tensor) else a for a in args]))
            return op(*args)
        return call


@torch.no_grad()
def profile_steps(model, prime, steps: int, compile: bool) -> tuple[float, float]:
    """Seconds of a decode step (the median of `steps` steps, `CLOCK`) and of the kernels in it: the calls of
    our kernel library one eager step makes (decode attention, small linears, hyper connections), noted with
    their inputs and replayed alone, `steps` times (median). What a step makes besides them is what the
    compiled graph exists to cut (the Python, the dispatch, the small ops, inductor's fused kernels)."""
    from windowed_attention.ops import fused_cpu

    tokens = torch.randint(0, 256, (prime.shape[0], steps + 4), generator=torch.Generator().manual_seed(1))
    _, caches = engine.prefill(model, prime)
    for t in range(3):  # the eager first step of a configuration, the compilation, a warm step
        _, caches = engine.decode_step(model, tokens[:, t : t + 1], caches, compile)
    times = []
    for t in range(3, steps + 3):
        started = CLOCK[0]()
        _, caches = engine.decode_step(model, tokens[:, t : t + 1], caches, compile)
        times.append(CLOCK[0]() - started)
    recorder = fused_cpu._state["ops"] = _Recorder(fused_cpu.kernel())
    try:
        engine.decode_step(model, tokens[:, -1:], caches)  # eager: the same kernels, called from Python
    finally:
        fused_cpu._state["ops"] = recorder.ops
    replays = []
    for _ in range(steps):
        started = CLOCK[0]()
        for op, args in recorder.calls:
            op(*args)
        replays.append(CLOCK[0]() - started)
    return statistics.median(times), statistics.median(replays)


CLOCK = [time.perf_counter]  # or time.process_time (--clock cpu)

# The modules that register torch.library custom ops: a second registration of an op under the same name
# replaces the first (our calls then reach a dead registration), so the baseline shares ours.
CUSTOM_OP_MODULES = ("ops.fused_cpu", "ops.decode", "ops.small_linear", "ops.hyper")


def load_baseline(folder: str):
    """The `windowed_attention` package in `folder`, imported as `windowed_attention_baseline`, with our
    custom-op modules in place of its own (which must be the same files)."""
    init = Path(folder) / "__init__.py"
    if not init.is_file():
        raise SystemExit(f"--baseline: {folder} holds no package (__init__.py)")
    ours = Path(windowed_attention.__file__).parent
    for name in CUSTOM_OP_MODULES:
        path = name.replace(".", "/") + ".py"
        if (init.parent / path).read_bytes() != (ours / path).read_bytes():
            raise SystemExit(f"--baseline: its {path} differs from ours; one process holds one set of custom ops")
        sys.modules[f"windowed_attention_baseline.{name}"] = importlib.import_module(f"windowed_attention.{name}")
    spec = importlib.util.spec_from_file_location("windowed_attention_baseline", init,
                                                  submodule_search_locations=[str(init.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def weights_check_seconds(model, prime, steps: int) -> tuple[float, float, int]:
    """Seconds of a decode step, and of the weights checks it makes (the model's record and each layer's),
    medians over `steps` steps after a prefill of `prime`: a wrapper on `KVCache.check_weights` notes each
    call's time inside the real steps (cold caches, as they are; the wrapper's own cost included; the wall
    clock, whose reading costs less than the CPU clock's). Also how many parameter versions a step reads."""
    check, spent = KVCache.check_weights, []

    def timed(cache, module):
        started = time.perf_counter()
        check(cache, module)
        spent[-1] += time.perf_counter() - started

    KVCache.check_weights = timed
    try:
        tokens = torch.randint(0, 256, (prime.shape[0], steps), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            _, caches = model(prime, return_cache=True)
            step_times = []
            for t in range(steps):
                spent.append(0.0)
                started = time.perf_counter()
                _, caches = model(tokens[:, t : t + 1], cache=caches, return_cache=True)
                step_times.append(time.perf_counter() - started)
    finally:
        KVCache.check_weights = check
    reads = len(caches[0].weights[-1].params)  # the model's record (the layers check only that a cache is theirs)
    return statistics.median(step_times), statistics.median(spent), reads


@torch.no_grad()
def paired_steps(models, prime, steps: int) -> list[list[float]]:
    """Seconds of each of `steps` decode steps of every model in `models` after a prefill of `prime`, the
    models taking turns step by step, each first every other step (what `generate` calls, without the
    sampling)."""
    tokens = torch.randint(0, 256, (prime.shape[0], steps), generator=torch.Generator().manual_seed(1))
    caches = [model(prime, return_cache=True)[1] for model in models]
    times = [[] for _ in models]
    for t in range(steps):
        for index in range(len(models)) if t % 2 else reversed(range(len(models))):  # each goes first in turn
            started = CLOCK[0]()
            _, caches[index] = models[index](tokens[:, t : t + 1], cache=caches[index], return_cache=True)
            times[index].append(CLOCK[0]() - started)
    return times


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
    parser.add_argument("--baseline", metavar="DIR", help="another version's windowed_attention folder, timed too")
    parser.add_argument("--paired", action="store_true",
                        help="with --baseline, also time single decode steps of the two in turns, step by step")
    parser.add_argument("--weights-check", action="store_true", help="time the weights checks of a step")
    parser.add_argument("--compile", action="store_true", help="also time ours with compiled decode steps")
    parser.add_argument("--profile-step", action="store_true",
                        help="profile the README model's decode step, eager and compiled: kernels and the rest")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall time, or this process's CPU time (steadier on a machine others load; "
                             "with --threads 1, as spinning worker threads would count) (default: %(default)s)")
    args = parser.parse_args()
    if args.clock == "cpu":
        CLOCK[0] = time.process_time
    if args.threads:
        torch.set_num_threads(args.threads)
    max_seq_len = max(args.contexts) + args.tokens + 1

    torch.manual_seed(0)
    ours = LocalTransformer(max_seq_len=max_seq_len, num_residual_streams=1, **CONFIG).eval()  # as theirs
    models = {}  # name -> (model, generate options)
    for cache_dtype in args.cache_dtypes:
        name = "windowed-attention" + ("" if cache_dtype == "float32" else f" {cache_dtype} cache")
        models[name] = (ours, {} if cache_dtype == "float32" else {"cache_dtype": getattr(torch, cache_dtype)})
    if args.compile:
        models["windowed-attention compiled"] = (ours, {"compile": True})
    if args.baseline:
        baseline = load_baseline(args.baseline).LocalTransformer(max_seq_len=max_seq_len, num_residual_streams=1,
                                                                 **CONFIG).eval()
        baseline.load_state_dict(ours.state_dict())
        models["baseline"] = (baseline, {})
    if args.their_batches:
        import local_attention

        models["local-attention"] = (local_attention.LocalTransformer(
            max_seq_len=max_seq_len, causal=True, num_residual_streams=1, **CONFIG).eval(), {})

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.clock} clock; model {CONFIG}")
    print(f"rate = B * {args.tokens - 1} decode steps / their time (prefill left out), median of {args.rounds} rounds")
    points = [(b, c) for b in args.batches for c in args.contexts]
    primes = {(b, c): torch.randint(0, 256, (b, c), generator=torch.Generator().manual_seed(c)) for b, c in points}
    mine = [name for name in models if name.startswith("windowed-attention") or name == "baseline"]
    runs = [(name, b, c) for b, c in points for name in models if name in mine or b in args.their_batches]
    for name, b, c in runs:  # warm-up: builds the kernel, first-touches the caches, compiles (a first step is eager)
        decode_rate(models[name][0], primes[b, c], 4, **models[name][1])
    if args.compile:
        seconds = engine.CompiledStep.of(ours).compile_seconds
        print(f"compiled the decode step {len(seconds)} time(s) in the warm-up: "
              + ", ".join(f"{s:.1f} s" for s in seconds))
    rates: dict[tuple, list[float]] = {run: [] for run in runs}
    for _ in range(args.rounds):
        for name, b, c in runs:
            rates[name, b, c].append(decode_rate(models[name][0], primes[b, c], args.tokens, **models[name][1]))
    median = {run: statistics.median(values) for run, values in rates.items()}
    for (name, b, c), rate in median.items():
        spread = f"{min(rates[name, b, c]):.0f}-{max(rates[name, b, c]):.0f}"
        print(f"{name:>20} batch {b:>3} context {c:>6}: {rate:8.1f} tokens/s (rounds {spread})", flush=True)

    if "baseline" in models:
        for b, c in points:
            per_round = zip(rates["windowed-attention", b, c], rates["baseline", b, c])
            print(f"batch {b} context {c}: windowed-attention / baseline = "
                  f"{median['windowed-attention', b, c] / median['baseline', b, c]:.3f} (per round: "
                  + ", ".join(f"{x / y:.3f}" for x, y in per_round) + ")")
    if "baseline" in models and args.paired:
        for b, c in points:
            times = [[], []]
            for _ in range(args.rounds):
                for index, values in enumerate(paired_steps([ours, models["baseline"][0]], primes[b, c],
                                                            args.tokens - 1)):
                    times[index] += values
            mine_ms, base_ms = (statistics.median(values) * 1e3 for values in times)
            ratio = statistics.median(x / y for x, y in zip(*times))
            print(f"batch {b} context {c}, {len(times[0])} steps in turns: windowed-attention {mine_ms:.4f} ms, "
                  f"baseline {base_ms:.4f} ms a step (medians); step time ratio {mine_ms / base_ms:.4f}, median "
                  f"of the turns' ratios {ratio:.4f}")
    if args.weights_check:
        for b, c in points:
            checks, steps = [], []
            for _ in range(args.rounds):
                step, seconds, reads = weights_check_seconds(ours, primes[b, c], args.tokens - 1)
                steps.append(step)
                checks.append(seconds)
            step, seconds = statistics.median(steps), statistics.median(checks)
            print(f"batch {b} context {c}: weights checks {seconds * 1e6:.1f} us of a {step * 1e3:.3f} ms step "
                  f"({seconds / step:.2%}; {reads} parameter versions read; medians of {args.rounds} runs)")

    if args.profile_step:
        torch.manual_seed(0)
        readme = LocalTransformer(max_seq_len=max_seq_len + 2 * args.tokens, **README_CONFIG).eval()
        prime = primes[1, min(args.contexts)] if (1, min(args.contexts)) in primes else torch.randint(0, 256, (1, 512))
        for compile in (False, True):
            results = [profile_steps(readme, prime, args.tokens - 1, compile) for _ in range(args.rounds)]
            step, kernels = statistics.median(r[0] for r in results), statistics.median(r[1] for r in results)
            print(f"README model decode step, {'compiled' if compile else 'eager'}: {step * 1e3:.3f} ms, kernels "
                  f"{kernels * 1e3:.3f} ms, outside the kernels {(step - kernels) * 1e3:.3f} ms (medians of "
                  f"{args.rounds} runs of {args.tokens - 1} steps)")

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
