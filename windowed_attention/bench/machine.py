"""The machine a figure was measured on: the CPU as /proc/cpuinfo names it and the instruction sets that
decide which kernels run (every figure names them; the benchmark, the examples and benchmarks/ read this)."""

from __future__ import annotations

import os
import platform

ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu() -> dict:
    """`{"vendor", "model", "family", "isa", "cores"}` of the first processor (Linux; the model from
    `platform` elsewhere, with no instruction sets)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    flags = set(fields.get("flags", "").split())
    return dict(vendor=fields.get("vendor_id"), model=fields.get("model name") or platform.processor() or platform.machine(),
                family=fields.get("cpu family"), isa=[flag for flag in ISA_FLAGS if flag in flags],
                cores=os.cpu_count())


def cpu_label() -> str:
    """One line: `AMD EPYC, family 25 (avx2, avx512f, avx512_bf16), 2 cores`."""
    info = cpu()
    family = f", family {info['family']}" if info["family"] else ""
    return f"{info['model']}{family} ({', '.join(info['isa']) or 'no avx2'}), {info['cores']} cores"
