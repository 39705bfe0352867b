"""windowed-attention: exact, fast local (sliding-window) attention and the local-attention transformer.

A drop-in replacement for the `local-attention` package: same class names, keywords and call signatures.

The names below are imported on first use (PEP 562), so `import windowed_attention` itself loads no
torch: the command line handles Ctrl-C before torch's seconds of import begin. `from windowed_attention
import LocalAttention`, `dir()` and `__all__` behave as with eager imports.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# public name -> the submodule that defines it
_EXPORTS = {
    "local_attention": ".ops",
    "LocalAttention": ".attention",
    "LocalMHA": ".mha",
    "LocalTransformer": ".transformer",
    "FeedForward": ".feedforward",
    "GEGLU": ".feedforward",
    "DynamicPositionBias": ".position_bias",
    "SinusoidalEmbeddings": ".positional",
    "apply_rotary_pos_emb": ".positional",
    "KVCache": ".kv_cache",
}

__all__ = [
    "local_attention",
    "LocalAttention",
    "LocalMHA",
    "LocalTransformer",
    "FeedForward",
    "GEGLU",
    "DynamicPositionBias",
    "SinusoidalEmbeddings",
    "apply_rotary_pos_emb",
    "KVCache",
]

__version__ = "0.1.0"

if TYPE_CHECKING:  # what type checkers and IDEs read
    from .attention import LocalAttention
    from .feedforward import GEGLU, FeedForward
    from .kv_cache import KVCache
    from .mha import LocalMHA
    from .ops import local_attention
    from .position_bias import DynamicPositionBias
    from .positional import SinusoidalEmbeddings, apply_rotary_pos_emb
    from .transformer import LocalTransformer


def __getattr__(name: str):
    """A public name, imported on first access (then cached here); a submodule (`windowed_attention.ops`)
    is imported too, as an eager package would have done."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    if not name.startswith("_"):
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as error:
            if error.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
