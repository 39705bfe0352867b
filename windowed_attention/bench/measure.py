"""Timing, matmul peak and peak-memory measurement.

Memory: each measurement runs in a fresh subprocess (`python -m windowed_attention.bench.measure`),
which builds the inputs and warms up once, returns the memory the fused kernel keeps for reuse and the
heap's free memory to the OS, then resets the kernel's peak-RSS counter
(`echo 5 > /proc/self/clear_refs`) and reports `VmHWM - VmRSS` (both from /proc/self/status) around one
call: the peak resident memory the call added. Linux only; None elsewhere.
"""

from __future__ import annotations

import ctypes
import json
import statistics
import subprocess
import sys
import time

import torch

from ..ops import fused_cpu
from . import impls


def median_time(fn, reps: int) -> float:
    """Median wall time (s) of `fn()` after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved(fns: dict, reps: int) -> dict:
    """Median times of several callables run in turns (so load changes hit all of them alike)."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def matmul_peak(dtype=torch.float32, size: int = 2048, reps: int = 5) -> float:
    """GFLOP/s of a square matmul: the attainable peak the attention figures are compared to."""
    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    return 2 * size**3 / median_time(lambda: a @ b, reps) / 1e9


def step(fn, inputs, backward: bool):
    """One call (under no_grad when forward only); with backward, grads of all inputs."""
    if not backward:
        with torch.no_grad():
            return lambda: fn(*inputs)

    def run():
        for t in inputs:
            t.grad = None
        fn(*inputs).sum().backward()

    return run


def make_inputs(n: int, dtype, backward: bool):
    return [t.requires_grad_(backward) for t in impls.qkv(n, dtype)]


def proc_status(field: str) -> int:
    """A byte count from /proc/self/status (`VmRSS`, `VmHWM`, ...); Linux only."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _trim_heap() -> None:
    """Return the heap's free memory to the OS (glibc's malloc_trim), so that memory the warm-up freed and
    the measured call takes again counts as a rise; without it a call served from the warm-up's freed
    blocks measured as 0."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _measure_here(config: dict) -> dict:
    torch.set_num_threads(config.get("threads") or torch.get_num_threads())
    dtype = getattr(torch, config["dtype"])
    fn = impls.IMPLS[config["impl"]](config["n"], config["w"], dtype, exact=config["exact"], rotary_pos=config["rotary"])
    inputs = make_inputs(config["n"], dtype, config["backward"])
    run = step(fn, inputs, config["backward"])
    run()
    for t in inputs:
        t.grad = None
    return {"peak_rise_bytes": peak_rise(run)}


def peak_rise(fn) -> int:
    """The peak resident memory (bytes) that `fn()` adds, run once after the caller's warm-up: the fused
    kernel's kept memory released, the heap trimmed, the peak counter reset, then `VmHWM - VmRSS`. Linux only."""
    fused_cpu.release_memory()  # the measured call must not reuse the warm-up's outputs
    _trim_heap()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = proc_status("VmRSS")
    fn()
    return proc_status("VmHWM") - before


def peak_memory(impl: str, n: int, w: int, dtype: str = "float32", backward: bool = True, exact: bool = False,
                rotary: bool = False, timeout: float = 600) -> int | None:
    """Peak resident-memory rise (bytes) of one call, measured in a fresh subprocess; None if unavailable."""
    if not sys.platform.startswith("linux"):
        return None
    config = dict(impl=impl, n=n, w=w, dtype=dtype, backward=backward, exact=exact, rotary=rotary,
                  threads=torch.get_num_threads())
    try:
        done = subprocess.run([sys.executable, "-m", "windowed_attention.bench.measure", json.dumps(config)],
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None
    if done.returncode != 0:
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_rise_bytes"]


if __name__ == "__main__":
    print(json.dumps(_measure_here(json.loads(sys.argv[1]))))
