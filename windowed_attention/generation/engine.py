"""Generation kept apart from the model: prefill the prompt once, then decode one token at a time.

`prefill` runs one blocked forward over the prompt and keeps, per layer, a `KVCache` of only the keys
the next token can see. `decode_step` feeds one token through the model against those caches: O(window)
time and memory per token, whatever the length so far. With `use_abs_pos_emb=False` (rotary only) the
model has no maximum length, and `stream` can run indefinitely in constant memory.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch

from ..kv_cache import KVCache
from . import decoder
from ..sampling import check_sampling, sample
from ..transformer import LocalTransformer


def _check_model(model) -> LocalTransformer:
    if not isinstance(model, LocalTransformer):
        raise TypeError(f"model must be a windowed_attention.LocalTransformer, got {type(model).__name__}")
    if not model.causal:
        raise ValueError("model must be causal (causal=True) to generate")
    return model


def _check_prompt(prompt) -> torch.Tensor:
    if not isinstance(prompt, torch.Tensor) or prompt.dtype.is_floating_point or prompt.dtype == torch.bool:
        raise TypeError(f"prompt must be an integer tensor of token ids, got {getattr(prompt, 'dtype', type(prompt).__name__)}")
    if prompt.ndim == 1:
        prompt = prompt[None]
    if prompt.ndim != 2 or prompt.shape[1] < 1:
        raise ValueError(f"prompt must have shape (b, n) with n >= 1, got {tuple(prompt.shape)}")
    return prompt.long()


def _check_count(max_new_tokens) -> int:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    return max_new_tokens


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module):
    """The model in eval mode inside the block only, so a suspended `stream` leaves it as it found it.

    A model already in eval mode is left alone: `train()` walks every submodule, which cost a sixth of a
    decoding step."""
    if not model.training:
        yield
        return
    model.eval()
    try:
        yield
    finally:
        model.train(True)


@torch.no_grad()
def prefill(model: LocalTransformer, prompt: torch.Tensor) -> tuple[torch.Tensor, list[KVCache]]:
    """One forward over `prompt` `(b, n)`: the logits of its last position `(b, vocab)` and the caches."""
    logits, caches = model(prompt, return_cache=True)
    return logits[:, -1], caches


@torch.no_grad()
def decode_step(model: LocalTransformer, token: torch.Tensor, caches: list[KVCache]) -> tuple[torch.Tensor, list[KVCache]]:
    """The next token `(b, 1)` through the model against `caches`: its logits `(b, vocab)` and the new caches."""
    logits, caches = model(token, cache=caches, return_cache=True)
    return logits[:, -1], caches


def cache_nbytes(caches: list[KVCache]) -> int:
    """Bytes held by all layers' caches."""
    return sum(cache.nbytes() for cache in caches)


@torch.no_grad()
def stream(model: LocalTransformer, prompt: torch.Tensor, max_new_tokens: int | None, *,
           temperature: float = 1.0, filter_thres: float = 0.9, top_p: float | None = None,
           generator: torch.Generator | None = None,
           on_caches: Callable[[int, list[KVCache]], None] | None = None, fast: bool = True) -> Iterator[torch.Tensor]:
    """Yield new tokens `(b, 1)` one by one after `prompt` `(b, n)`; `max_new_tokens=None` never stops
    (needs a model without absolute positions to run past `max_seq_len`).

    `temperature=0` is greedy; `filter_thres` keeps the top `1 - filter_thres` of the vocabulary (top-k);
    `top_p` adds nucleus filtering. `on_caches(step, caches)` is called after each decode step.
    `fast=False` decodes with the model's own cached forward instead of `decoder.step` (same tokens).
    """
    model = _check_model(model)
    prompt = _check_prompt(prompt)
    check_sampling(temperature, filter_thres, top_p)
    if max_new_tokens is not None:
        _check_count(max_new_tokens)
        if model.use_abs_pos_emb and prompt.shape[1] + max_new_tokens - 1 > model.max_seq_len:
            raise ValueError(
                f"prompt length {prompt.shape[1]} + max_new_tokens {max_new_tokens} - 1 exceeds max_seq_len = "
                f"{model.max_seq_len} (a model with use_abs_pos_emb=False has no limit)"
            )
    if max_new_tokens == 0:
        return
    with _eval_mode(model):
        logits, caches = prefill(model, prompt)
        state = decoder.from_reference(model, caches) if fast and decoder.supported(model) else None
    step = 0
    while True:
        token = sample(logits, temperature, filter_thres, top_p, generator)
        yield token
        step += 1
        if max_new_tokens is not None and step >= max_new_tokens:
            return
        if model.use_abs_pos_emb and caches[0].length >= model.max_seq_len:
            raise ValueError(f"generation reached max_seq_len = {model.max_seq_len} (build the model with use_abs_pos_emb=False to stream past it)")
        with _eval_mode(model):
            if state is not None:
                logits, state = decoder.step(model, token, state)
                caches = state.caches
            else:
                logits, caches = decode_step(model, token, caches)
        if on_caches is not None:
            on_caches(step, caches)


@torch.no_grad()
def generate(model: LocalTransformer, prompt: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
             filter_thres: float = 0.9, top_p: float | None = None,
             generator: torch.Generator | None = None, fast: bool = True) -> torch.Tensor:
    """Sample `max_new_tokens` tokens after `prompt` `(b, n)` with the rolling KV cache; returns `(b, max_new_tokens)`.

    Gives the same tokens as `model.generate(prompt, max_new_tokens, ..., use_kv_cache=False)`.
    """
    if max_new_tokens is None:
        raise ValueError("max_new_tokens must be an int >= 0 (use stream() to generate without end)")
    _check_count(max_new_tokens)
    prompt = _check_prompt(prompt)
    out = torch.empty(prompt.shape[0], max_new_tokens, dtype=torch.long, device=prompt.device)
    for index, token in enumerate(stream(model, prompt, max_new_tokens, temperature=temperature,
                                         filter_thres=filter_thres, top_p=top_p, generator=generator,
                                         fast=fast)):
        out[:, index:index + 1] = token
    return out
