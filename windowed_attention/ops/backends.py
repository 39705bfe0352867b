"""The backend registry and the `auto` dispatch rule.

Every backend takes the same trusted arguments as `reference.reference_attention` and returns the same
result (tested against the reference on random configurations, forward and backward).

| backend     | device | dtypes            | does not support                              |
|-------------|--------|-------------------|-----------------------------------------------|
| `fused`     | CPU    | all float         | (takes every option); needs a C++ build       |
| `sdpa`      | CPU    | all float         | attn_bias, shared_qk, dropout                 |
| `flex`      | CUDA   | fp32, bf16, fp16  | xpos (key_scale), dropout                     |
| `flash`     | CUDA   | bf16, fp16        | anything but exact windows without mask/bias  |
| `reference` | any    | all float         | (everything; materialises window scores)      |

`auto` (`choose`) takes the first that supports the call: CUDA `flash` > `flex` > `reference`;
CPU `fused` > `sdpa` > `reference` (in traced code, torch.compile's, `fused` > `reference`). Under autocast the dtype that counts is the autocast dtype (a float32
input then computes in bfloat16). The decision is `decide`, a pure function of
device type, dtype, window spec, options and availability flags, so it is tested without a GPU.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch

from . import flash, flex, fused_cpu, sdpa_blocks
from .dtypes import autocast_dtype
from .flash import flash_attn_backend
from .flex import flex_attention_backend
from .fused_cpu import fused_cpu_attention
from .reference import reference_attention
from .sdpa_blocks import sdpa_blocks_attention
from .spec import WindowSpec

_BACKENDS: dict[str, Callable[..., torch.Tensor]] = {
    "reference": reference_attention,
    "fused": fused_cpu_attention,
    "sdpa": sdpa_blocks_attention,
    "flex": flex_attention_backend,
    "flash": flash_attn_backend,
}

# Which device types a backend can run on at all (explicit choices are checked against this).
_DEVICES = {"reference": None, "fused": ("cpu",), "sdpa": ("cpu",), "flex": ("cuda",), "flash": ("cuda",)}


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


def decide(
    device_type: str,
    dtype: torch.dtype,
    spec: WindowSpec,
    *,
    mask: bool = False,
    attn_bias: bool = False,
    mask_self: bool = False,
    key_scale: bool = False,
    dropout: bool = False,
    head_dim: int = 64,
    value_dim: int | None = None,
    available: Mapping[str, bool],
) -> str:
    """The dispatch rule: the fastest backend that supports this call (pure; booleans for options,
    `value_dim` None meaning `head_dim`)."""
    if device_type == "cuda":
        if available.get("flash") and flash.supports(
            device_type, dtype, spec, mask=mask, attn_bias=attn_bias, mask_self=mask_self, key_scale=key_scale,
            head_dim=head_dim, value_dim=head_dim if value_dim is None else value_dim,
        ):
            return "flash"
        if available.get("flex") and flex.supports(device_type, dtype, key_scale=key_scale, dropout=dropout):
            return "flex"
    if device_type == "cpu" and available.get("fused") and fused_cpu.supports(device_type, dtype):
        return "fused"
    if device_type == "cpu" and available.get("sdpa") and sdpa_blocks.supports(
        device_type, dtype, attn_bias=attn_bias, mask_self=mask_self, dropout=dropout
    ):
        return "sdpa"
    return "reference"


def choose(q: torch.Tensor, spec: WindowSpec, *, value_dim: int | None = None, **options) -> str:
    """The fastest backend that supports this device, dtype, head dims and these options (see `decide`)."""
    device_type, dtype = q.device.type, q.dtype
    if dtype == torch.float32:
        dtype = autocast_dtype(device_type) or dtype
    available = availability()
    if torch.compiler.is_compiling():  # sdpa's autograd.Function takes strided views dynamo cannot trace:
        available["sdpa"] = False      # traced code without the fused kernel takes the reference (no break)
    return decide(
        device_type,
        dtype,
        spec,
        mask=options.get("mask") is not None,
        attn_bias=options.get("attn_bias") is not None,
        mask_self=bool(options.get("mask_self", False)),
        key_scale=options.get("key_scale") is not None,
        dropout=float(options.get("dropout_p", 0.0)) > 0.0,
        head_dim=q.shape[-1],
        value_dim=value_dim,
        available=available,
    )
