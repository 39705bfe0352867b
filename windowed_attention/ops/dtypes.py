"""The dtype rules every backend follows: what scores and sums accumulate in, and autocast."""

from __future__ import annotations

import contextlib

import torch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Scores, softmax and gradient sums run in float32, or in float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype float32 matmuls run in under autocast on this device type, or None without autocast."""
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def autocast_inputs(*tensors: torch.Tensor, takes=None) -> tuple[torch.Tensor, ...]:
    """Under autocast, float32 tensors in the autocast dtype (as every matmul there computes), when that
    dtype is in `takes` (None: any); otherwise unchanged. A backend then runs with autocast off."""
    low = autocast_dtype(tensors[0].device.type)
    if low is None or tensors[0].dtype != torch.float32 or (takes is not None and low not in takes):
        return tensors
    return tuple(t.to(low) for t in tensors)


def result_dtype(dtype: torch.dtype, device_type: str) -> torch.dtype:
    """The dtype the op returns for inputs of `dtype`: the autocast dtype for float32 under autocast
    (every backend alike), else `dtype`."""
    low = autocast_dtype(device_type)
    return low if low is not None and dtype == torch.float32 else dtype


def without_autocast(device_type: str):
    """A context that turns autocast off on this device type (a no-op where it is not on)."""
    if autocast_dtype(device_type) is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)
