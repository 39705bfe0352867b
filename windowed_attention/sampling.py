"""Next-token sampling from logits: top-k (`filter_thres`), top-p, temperature, greedy."""

from __future__ import annotations

import numbers

import torch


def check_sampling(temperature, filter_thres, top_p) -> None:
    """Errors name the parameter: temperature >= 0, filter_thres in [0, 1], top_p in (0, 1] or None."""
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not 0 <= temperature < float("inf"):
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if isinstance(filter_thres, bool) or not isinstance(filter_thres, numbers.Real) or not 0 <= filter_thres <= 1:
        raise ValueError(f"filter_thres must be a number in [0, 1] (keep the top (1 - filter_thres) of tokens), got {filter_thres!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, numbers.Real) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be a number in (0, 1] or None, got {top_p!r}")


def top_k(logits: torch.Tensor, thres: float = 0.9) -> torch.Tensor:
    """Keep the `max(1, int((1 - thres) * vocab))` largest logits of `(b, vocab)`; the rest become -inf.

    The count is local-attention's, except that at least one token is always kept.
    """
    k = max(1, int((1 - thres) * logits.shape[-1]))
    values, indices = torch.topk(logits, k, dim=-1)
    return torch.full_like(logits, float("-inf")).scatter_(-1, indices, values)


def top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches `p`; the rest become -inf."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop = cumulative - sorted_logits.softmax(dim=-1) >= p  # mass before this token already reaches p
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter_(-1, order, sorted_logits)


def sample(logits: torch.Tensor, temperature: float = 1.0, filter_thres: float = 0.9, p: float | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """`(b, vocab)` logits -> `(b, 1)` token ids. `temperature=0` is greedy (argmax)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = top_k(logits.float(), filter_thres)
    if p is not None:
        logits = top_p(logits, p)
    # Shift by the max first: a tiny temperature then sharpens towards greedy instead of overflowing.
    probs = ((logits - logits.amax(dim=-1, keepdim=True)) / temperature).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)
