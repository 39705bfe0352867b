"""The first call in a fresh interpreter: `import windowed_attention` plus one small `local_attention` call,
against the same call through `torch.nn.functional.scaled_dot_product_attention` (#24).

Each measurement is a new Python process that times, from its first line, its imports and one call on
q = k = v of shape (1, 4, 128, 32), window 32, causal (SDPA: `is_causal=True`). The two run in turns
(the order alternates each round, so load changes hit both alike) after one untimed run of each, which
builds the fused kernel if it is not cached yet and warms the page cache; the medians are compared. The
processes import the package from this checkout.

Run: python benchmarks/first_call.py [--rounds 9] [--output benchmarks/first_call.json [--overwrite]]
Nothing is written unless --output is given; an existing file is kept unless --overwrite.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

from windowed_attention.bench.machine import ISA_FLAGS, cpu

ROOT = Path(__file__).resolve().parent.parent

# each prints {"seconds": imports + first call, "dynamo": whether torch._dynamo got imported}
CHILD = """
import time
start = time.perf_counter()
{body}
seconds = time.perf_counter() - start
import json, sys
print(json.dumps({{"seconds": seconds, "dynamo": "torch._dynamo" in sys.modules}}))
"""
OURS = """
import torch
from windowed_attention import local_attention
q = torch.randn(1, 4, 128, 32)
local_attention(q, q, q, window_size=32, causal=True)
"""
SDPA = """
import torch
import torch.nn.functional as F
q = torch.randn(1, 4, 128, 32)
F.scaled_dot_product_attention(q, q, q, is_causal=True)
"""
PROGRAMS = {"windowed_attention": OURS, "sdpa": SDPA}




def measure(name: str) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-c", CHILD.format(body=PROGRAMS[name])], env=env, cwd=ROOT,
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"first_call: the {name} process failed: {result.stderr.strip()[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=9, help="timed processes of each (default: %(default)s)")
    parser.add_argument("--output", type=Path, help="also write the result as JSON to this file")
    parser.add_argument("--overwrite", action="store_true", help="let --output replace an existing file")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    if args.output is not None and args.output.exists() and not args.overwrite:
        parser.error(f"--output {args.output} exists; pass --overwrite to replace it")

    for name in PROGRAMS:  # untimed: builds the kernel if needed, warms the page cache
        measure(name)
    times = {name: [] for name in PROGRAMS}
    dynamo = False
    for round_ in range(args.rounds):
        for name in (PROGRAMS if round_ % 2 == 0 else reversed(PROGRAMS)):
            run = measure(name)
            times[name].append(run["seconds"])
            dynamo |= name == "windowed_attention" and run["dynamo"]
    ours, sdpa = (statistics.median(times[name]) for name in PROGRAMS)
    result = {
        "cpu": cpu(), "python": platform.python_version(), "torch": _torch_version(), "rounds": args.rounds,
        "median_s": {"windowed_attention": ours, "sdpa": sdpa}, "difference_s": ours - sdpa,
        "ratio": ours / sdpa, "imports_dynamo": dynamo, "times_s": times,
    }
    info = result["cpu"]
    print(f"CPU: {info['model']} ({info['cores']} CPUs; {', '.join(info['isa']) or 'none of ' + ' '.join(ISA_FLAGS)})")
    print(f"torch {result['torch']}, Python {result['python']}, {args.rounds} rounds, medians of import + first call:")
    print(f"  windowed_attention.local_attention  {ours:.3f} s{'  (imported torch._dynamo)' if dynamo else ''}")
    print(f"  F.scaled_dot_product_attention      {sdpa:.3f} s")
    print(f"  difference {ours - sdpa:+.3f} s, ratio {ours / sdpa:.2f}")
    if args.output is not None:
        args.output.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.output}")


def _torch_version() -> str:
    result = subprocess.run([sys.executable, "-c", "import torch; print(torch.__version__)"], capture_output=True,
                            text=True)
    return result.stdout.strip() or "unknown"


if __name__ == "__main__":
    main()
