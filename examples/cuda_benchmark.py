"""Local attention on a CUDA GPU: ours (`auto`) against the alternatives, forward and forward+backward.

Shapes as the CPU headline: B=1, H=8, D=64, W=256, causal, look_backward=1, bfloat16 (fp32 with
`--dtype float32`). Each point runs all implementations in turns (interleaved medians of CUDA-event
timings) and records the peak memory one call adds. Prints a table and, with `--json FILE`, writes the
numbers there; it writes nothing else.

Implementations: `ours` (what `local_attention(..., backend="auto")` picks: flash-attn when installed and
the call is an exact window, else compiled FlexAttention with our window `mask_mod`); `flex-direct`
(FlexAttention called by hand with a sliding-window block mask, compiled: what a user would write);
`local-attention` (lucidrains' `LocalAttention`, if installed); `sdpa-band` (one SDPA call with a dense
(n, n) band mask, O(n^2); up to `--dense-max`); `sdpa-causal` (full causal SDPA flash, no window: the
dense causal cost for context); `flash-attn` (flash-attn 2's `window_size`, if installed).

    python examples/cuda_benchmark.py --sizes 8192 32768 131072
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch
import torch.nn.functional as F

from windowed_attention import local_attention
from windowed_attention.ops import backends
from windowed_attention.ops.spec import WindowSpec

HEADS, DIM, W = 8, 64, 256


def implementations(n: int, dtype, dense_max: int) -> dict:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    fns = {"ours": lambda q, k, v: local_attention(q, k, v, window_size=W, causal=True, look_backward=1)}

    def window(b, h, i, j):  # our semantics: key window block in [block(i) - 1, block(i)], j <= i
        return (j <= i) & (j // W >= i // W - 1)

    block_mask = create_block_mask(window, None, None, n, n, device="cuda", _compile=True)  # eager: n * n memory
    flex = torch.compile(flex_attention, dynamic=False)
    fns["flex-direct"] = lambda q, k, v: flex(q, k, v, block_mask=block_mask)
    try:
        from local_attention import LocalAttention

        theirs = LocalAttention(window_size=W, causal=True, look_backward=1, look_forward=0).cuda()
        fns["local-attention"] = lambda q, k, v: theirs(q, k, v)
    except ImportError:
        print("local-attention: not installed, skipped", file=sys.stderr)
    if n <= dense_max:
        i = torch.arange(n, device="cuda")
        band = (i[None] <= i[:, None]) & (i[None] // W >= i[:, None] // W - 1)
        fns["sdpa-band"] = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=band)
    fns["sdpa-causal"] = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if backends.availability().get("flash"):
        from flash_attn import flash_attn_func

        def flash(q, k, v):  # ours is block-window (not exact): flash-attn's nearest is left = 2W - 1
            t = (x.transpose(1, 2) for x in (q, k, v))
            return flash_attn_func(*t, causal=True, window_size=(2 * W - 1, 0)).transpose(1, 2)

        fns["flash-attn"] = flash
    return fns


def call(fn, inputs, backward: bool) -> None:
    """One forward (under no_grad), or one forward and backward."""
    if backward:
        out = fn(*inputs)
        out.backward(torch.ones_like(out))
    else:
        with torch.no_grad():
            fn(*inputs)


def timed(fn, inputs, backward: bool, reps: int) -> list[float]:
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call(fn, inputs, backward)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return times


def peak_mib(fn, inputs, backward: bool) -> float:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    call(fn, inputs, backward)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[8192, 32768, 131072])
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--dense-max", type=int, default=32768)
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.exit(2, "cuda_benchmark: needs a CUDA GPU\n")
    dtype = getattr(torch, args.dtype)
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, {args.dtype}, B=1 H={HEADS} D={DIM} W={W} causal lb=1; "
          f"ours runs on backend {backends.choose(torch.empty(1, 1, DIM, device='cuda', dtype=dtype), WindowSpec(W, True, 1, 0, False))!r}")
    results = []
    for n in args.sizes:
        fns = implementations(n, dtype, args.dense_max)
        for backward in (False, True):
            inputs = [torch.randn(1, HEADS, n, DIM, device="cuda", dtype=dtype, requires_grad=backward) for _ in range(3)]
            usable = {}
            for name, fn in fns.items():
                try:
                    timed(fn, inputs, backward, 2)  # warm-up (compiles)
                    usable[name] = fn
                except (RuntimeError, torch.OutOfMemoryError) as error:
                    print(f"n={n} {'fwd+bwd' if backward else 'fwd'} {name}: skipped ({type(error).__name__}: {str(error)[:120]})",
                          file=sys.stderr)
                    torch.cuda.empty_cache()
            times = {name: [] for name in usable}
            for _ in range(args.reps):
                for name, fn in usable.items():
                    times[name] += timed(fn, inputs, backward, 1)
            for name, fn in usable.items():
                ms = statistics.median(times[name])
                row = dict(n=n, mode="fwd+bwd" if backward else "fwd", impl=name, ms=ms, peak_mib=peak_mib(fn, inputs, backward))
                results.append(row)
            base = statistics.median(times["ours"]) if "ours" in times else None
            for row in results[-len(usable):]:
                ratio = f"{row['ms'] / base:6.2f}x ours" if base else ""
                print(f"n={n:>7} {row['mode']:>7} {row['impl']:>16}: {row['ms']:9.3f} ms  {row['peak_mib']:9.1f} MiB  {ratio}")
            del inputs
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, dtype=args.dtype, results=results), f, indent=1)


if __name__ == "__main__":
    main()
