"""The backend registry and the `auto` dispatch rule.

Every backend takes the same trusted arguments as `reference.reference_attention` and returns the same
result (tested against the reference on random configurations, forward and backward).
"""

from __future__ import annotations

from typing import Callable

import torch

from .reference import reference_attention
from .spec import WindowSpec

_BACKENDS: dict[str, Callable[..., torch.Tensor]] = {
    "reference": reference_attention,
}


def names() -> list[str]:
    """Backend names a caller may pass, besides "auto"."""
    return list(_BACKENDS)


def get(name: str) -> Callable[..., torch.Tensor]:
    return _BACKENDS[name]


def check_name(backend, device: torch.device) -> str:
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, one of {['auto', *names()]}, got {type(backend).__name__}")
    if backend != "auto" and backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {['auto', *names()]}, got {backend!r}")
    return backend


def choose(q: torch.Tensor, spec: WindowSpec, **options) -> str:
    """The fastest backend that supports this device, dtype and these options."""
    return "reference"
