"""Generation: prefill + rolling-KV-cache decoding (`engine`), and the `generate` command (`cli`)."""

from .engine import batch_prompts, cache_nbytes, decode_step, generate, prefill, stream

__all__ = ["prefill", "decode_step", "generate", "stream", "cache_nbytes", "batch_prompts"]
