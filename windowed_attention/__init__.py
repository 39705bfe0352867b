"""windowed-attention: exact, fast local (sliding-window) attention and the local-attention transformer.

A drop-in replacement for the `local-attention` package: same class names, keywords and call signatures.
"""

from .attention import LocalAttention
from .feedforward import GEGLU, FeedForward
from .kv_cache import KVCache
from .mha import LocalMHA
from .ops import local_attention
from .position_bias import DynamicPositionBias
from .positional import SinusoidalEmbeddings, apply_rotary_pos_emb
from .transformer import LocalTransformer

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
