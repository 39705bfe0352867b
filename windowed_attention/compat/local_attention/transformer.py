"""`local_attention.transformer` of local-attention 1.11.2: the multi-head layer, feed-forward, dynamic
position bias and transformer (windowed-attention's), and the helpers code written for it imports from here."""

from __future__ import annotations

import functools
from collections import namedtuple

import torch.nn.functional as F

from ...feedforward import GEGLU, FeedForward
from ...mha import LocalMHA
from ...position_bias import DynamicPositionBias
from ...positional import apply_rotary_pos_emb
from ...sampling import top_k
from ...transformer import LocalTransformer
from .local_attention import LocalAttention, exists

__all__ = [
    "LocalAttention", "LocalMHA", "LocalTransformer", "FeedForward", "GEGLU", "DynamicPositionBias", "Cache",
    "apply_rotary_pos_emb", "exists", "default", "l2norm", "eval_decorator", "top_k",
]

# local-attention's name for what its LocalTransformer returns as a cache. Ours returns a list of `KVCache`
# (one per layer); give it back as `cache` as it came. The name is here for code that imports it.
Cache = namedtuple("Cache", ["cache_kv", "maybe_cached_attn_bias"])


def default(val, d):
    """`val`, or `d` when `val` is None."""
    return d if val is None else val


def l2norm(t):
    """`t` scaled to unit l2 norm over its last dim."""
    return F.normalize(t, dim=-1)


def eval_decorator(fn):
    """Run the method `fn(model, ...)` with `model` in eval mode, then put back the mode it had (also when
    `fn` raises)."""

    @functools.wraps(fn)
    def inner(model, *args, **kwargs):
        was_training = model.training
        model.eval()
        try:
            return fn(model, *args, **kwargs)
        finally:
            model.train(was_training)

    return inner
