"""`local_attention.rotary` of local-attention 1.11.2, on windowed-attention's rotary embeddings."""

from ...positional import SinusoidalEmbeddings, apply_rotary_pos_emb, rotate_half
from .local_attention import exists

__all__ = ["SinusoidalEmbeddings", "apply_rotary_pos_emb", "rotate_half", "exists"]
