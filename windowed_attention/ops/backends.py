"""The backend registry and the `auto` dispatch rule.

Every backend is `fn(q, k, v, call)` (`ops.call.AttentionCall`) and returns the reference's result (tested
against the reference on random configurations, forward and backward). Each backend's module declares
what it computes (`DTYPES`, `FEATURES`, `takes_head_dims`); an explicit backend that lacks an option of the
call is refused by name (`check_call`), and `auto` (`choose`) takes the first backend of the device's
order that declares everything the call uses: CUDA `flash` > `flex` > `reference`; CPU `fused` > `sdpa` >
`reference` (in traced code, torch.compile's, `fused` > `reference`). Under autocast the dtype that
counts is the autocast dtype (a float32 input then computes in bfloat16). The decision is `decide`, a
pure function of device type, dtype, the call's features, head dims and availability flags, so it is
tested without a GPU.
"""

from __future__ import annotations

import functools
from typing import Callable, Mapping

import torch

from . import flash, flex, fused_cpu, reference, sdpa_blocks
from .call import AttentionCall
from .dtypes import autocast_dtype
from .flash import flash_attn_backend
from .flex import flex_attention_backend
from .fused_cpu import fused_cpu_attention
from .reference import reference_attention
from .sdpa_blocks import sdpa_blocks_attention

_BACKENDS: dict[str, Callable[..., torch.Tensor]] = {
    "reference": reference_attention,
    "fused": fused_cpu_attention,
    "sdpa": sdpa_blocks_attention,
    "flex": flex_attention_backend,
    "flash": flash_attn_backend,
}

# Which device types a backend can run on at all (explicit choices are checked against this).
# flex on CPU: forward only (FlexAttention has no CPU backward), so `auto` never picks it there
_DEVICES = {"reference": None, "fused": ("cpu",), "sdpa": ("cpu",), "flex": ("cuda", "cpu"), "flash": ("cuda",)}
# Each backend's module declares what it takes: DTYPES, FEATURES (names of `call.ALL_FEATURES`) and
# takes_head_dims(d, d_v); `auto` reads these declarations, and so do the tests' matrices.
_MODULES = {"reference": reference, "fused": fused_cpu, "sdpa": sdpa_blocks, "flex": flex, "flash": flash}
# The order `auto` tries them in, by device type (the reference takes whatever none of them does).
_ORDER = {"cuda": ("flash", "flex"), "cpu": ("fused", "sdpa")}


def names() -> list[str]:
    """Backend names a caller may pass, besides "auto"."""
    return list(_BACKENDS)


def get(name: str) -> Callable[..., torch.Tensor]:
    return _BACKENDS[name]


# probed once at import (cheap); `fused` asks its build, which traced code takes as a constant
_AVAILABLE = {"sdpa": sdpa_blocks.available(), "flex": flex.available(), "flash": flash.available()}
_UNAVAILABLE = {"sdpa": "this torch has no fused CPU flash-attention kernels (torch 2.3+)",
                "flex": "this torch has no FlexAttention", "flash": "flash-attn is not installed"}


def availability() -> dict[str, bool]:
    """Which optional backends this torch / environment can run (torch.compile traces it without a break)."""
    return {"fused": fused_cpu.available(), **_AVAILABLE}


def unavailable_reason(name: str) -> str | None:
    """Why backend `name` cannot run in this environment (None when it can)."""
    if name == "fused":
        return fused_cpu.unavailable_reason()
    return _UNAVAILABLE[name] if name in _AVAILABLE and not _AVAILABLE[name] else None


def check_name(backend, device: torch.device) -> str:
    """Validate an explicit `backend` for tensors on `device` (ValueError/TypeError naming `backend`)."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, one of {['auto', *names()]}, got {type(backend).__name__}")
    if backend != "auto" and backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {['auto', *names()]}, got {backend!r}")
    devices = _DEVICES.get(backend)
    if devices is not None and torch.device(device).type not in devices:
        raise ValueError(f"backend {backend!r} runs only on {', '.join(devices)} tensors, got {device}; use backend='auto'")
    if backend in ("fused", "sdpa", "flex", "flash") and not availability()[backend]:
        raise ValueError(f"backend {backend!r} is not available in this environment ({unavailable_reason(backend)}); "
                         "use backend='auto'")
    return backend


def features(name: str) -> frozenset[str]:
    """The options backend `name` computes (its module's `FEATURES`)."""
    return _MODULES[name].FEATURES


def check_call(name: str, call: AttentionCall) -> str:
    """An explicitly chosen backend must compute every option of the call: ValueError naming the backend and
    what it lacks otherwise."""
    call.require(name, features(name))
    return name


def decide(
    device_type: str,
    dtype: torch.dtype,
    used: frozenset[str] = frozenset(),
    *,
    head_dim: int = 64,
    value_dim: int | None = None,
    available: Mapping[str, bool],
) -> str:
    """The dispatch rule: the first backend in this device's order (CUDA `flash` > `flex`; CPU `fused` >
    `sdpa`; then `reference`) that is available, takes the dtype and declares every option in `used`
    (pure; `value_dim` None meaning `head_dim`)."""
    value_dim = head_dim if value_dim is None else value_dim
    for name in _ORDER.get(device_type, ()):
        module = _MODULES[name]
        if (
            available.get(name)
            and dtype in module.DTYPES
            and used <= module.FEATURES
            and module.takes_head_dims(head_dim, value_dim)
        ):
            return name
    return "reference"


def choose(q: torch.Tensor, call: AttentionCall, *, value_dim: int | None = None) -> str:
    """The fastest backend that supports this device, dtype, head dims and the call's options (see `decide`)."""
    device_type, dtype = q.device.type, q.dtype
    if dtype == torch.float32:
        dtype = autocast_dtype(device_type) or dtype
    available = availability()
    if torch.compiler.is_compiling():  # sdpa's autograd.Function takes strided views dynamo cannot trace:
        available["sdpa"] = False      # traced code without the fused kernel takes the reference (no break)
        return decide(device_type, dtype, call.features(), head_dim=q.shape[-1], value_dim=value_dim,
                      available=available)
    return _decided(device_type, dtype, call.features(), q.shape[-1], value_dim, tuple(available.items()))


@functools.lru_cache(maxsize=256)
def _decided(device_type, dtype, used, head_dim, value_dim, available: tuple) -> str:
    """`decide`, remembered: it is a pure function of exactly these arguments (availability as pairs)."""
    return decide(device_type, dtype, used, head_dim=head_dim, value_dim=value_dim, available=dict(available))


# The fused kernel's plain entry, which `ops.api` calls for a plan that `plain_route` gave options.
plain_forward = fused_cpu.plain_forward


def plain_route(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall, backend: str) -> tuple | None:
    """The options of `plain_forward` when it computes this call: `q (..., n_q, d)`, `k, v (..., n, d)` plain
    CPU tensors and `call` (its window fitted to `n`) with no mask, bias, key scale, documents, sinks,
    shared-qk rule or dropout, for which `backend` (already checked) is `fused` or `auto` picks it without
    autocast. None otherwise. A pure function of the tensors' types, shapes, dtypes and devices, the call
    and availability, so a cached plan holds it; whether autograd records the call and autocast are the
    caller's to check, every call."""
    if (backend not in ("auto", "fused") or call.features() - {"token_window", "block_window", "sink_tokens",
                                                               "softcap", "short_queries"}
            or any(type(t) is not torch.Tensor or t.device.type != "cpu" for t in (q, k, v))):
        return None
    if backend == "auto" and decide("cpu", q.dtype, call.features(), head_dim=q.shape[-1], value_dim=v.shape[-1],
                                    available=availability()) != "fused":
        return None
    return fused_cpu.plain_options(call)
