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


def _kept(thres: float, vocab: int) -> int:
    """How many tokens top-k keeps: local-attention's count, except that at least one is always kept."""
    return max(1, int((1 - thres) * vocab))


def top_k(logits: torch.Tensor, thres: float = 0.9) -> torch.Tensor:
    """Keep the `max(1, int((1 - thres) * vocab))` largest logits of `(b, vocab)`; the rest become -inf."""
    values, indices = torch.topk(logits, _kept(thres, logits.shape[-1]), dim=-1)
    return torch.full_like(logits, float("-inf")).scatter_(-1, indices, values)


def _nucleus(sorted_logits: torch.Tensor, p: float) -> torch.Tensor:
    """`sorted_logits` `(b, k)` in descending order with those past the smallest prefix whose probability
    reaches `p` set to -inf."""
    probs = sorted_logits.softmax(dim=-1)
    drop = probs.cumsum(dim=-1) - probs >= p  # mass before this token already reaches p
    return sorted_logits.masked_fill(drop, float("-inf"))


def top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches `p`; the rest become -inf."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    return torch.full_like(logits, float("-inf")).scatter_(-1, order, _nucleus(sorted_logits, p))


def sample(logits: torch.Tensor, temperature: float = 1.0, filter_thres: float = 0.9, p: float | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """`(b, vocab)` logits -> `(b, 1)` token ids. `temperature=0` is greedy (argmax).

    Draws from the distribution of `top_p(top_k(logits, filter_thres), p)` at `temperature`, but only over
    the `k` tokens `top_k` keeps (sorted), not the whole vocabulary: a step of a batch of 16 spent a
    twentieth of its time drawing over 256 tokens mostly at -inf."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    if logits.ndim == 1:  # one row `(vocab,)` -> `(1,)`
        return sample(logits[None], temperature, filter_thres, p, generator)[0]
    kept, indices = torch.topk(logits.float(), _kept(filter_thres, logits.shape[-1]), dim=-1)  # largest first
    if p is not None:
        kept = _nucleus(kept, p)
    # Shift by the max first: a tiny temperature then sharpens towards greedy instead of overflowing.
    probs = ((kept - kept[:, :1]) / temperature).softmax(dim=-1)
    return indices.gather(-1, torch.multinomial(probs, 1, generator=generator))
