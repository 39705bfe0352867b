"""What `import local_attention` gives after `windowed_attention.compat.install()`: local-attention 1.11.2's
top-level names (and its submodules `local_attention`, `rotary`, `transformer`), all windowed-attention's.

Importable directly too (`windowed_attention.compat.local_attention`), without touching `sys.modules`.
"""

from . import local_attention, rotary, transformer  # noqa: F401  (submodules as attributes, as in local-attention)
from .local_attention import LocalAttention
from .transformer import DynamicPositionBias, LocalMHA, LocalTransformer

__all__ = ["LocalAttention", "LocalTransformer", "LocalMHA", "DynamicPositionBias"]
