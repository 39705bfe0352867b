"""Argument checks shared by the op and the modules: each error names the argument and what is allowed."""

from __future__ import annotations

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= {minimum}, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
    return int(value)


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return value


def check_probability(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float in [0, 1), got {type(value).__name__} {value!r}")
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{name} must be a float in [0, 1), got {value}")
    return float(value)


def check_look(causal: bool, look_backward, look_forward) -> tuple[int, int]:
    """Validate the look-around and resolve `look_forward=None` (0 when causal, else 1)."""
    look_backward = check_int("look_backward", look_backward, 0)
    if look_forward is None:
        look_forward = 0 if causal else 1
    look_forward = check_int("look_forward", look_forward, 0)
    if causal and look_forward > 0:
        raise ValueError(f"look_forward must be 0 when causal=True (a causal query cannot see ahead), got {look_forward}")
    return look_backward, look_forward


# Largest attention scale accepted: beyond it the softmax is a hard argmax for any two scores that
# differ at all, and scores of large queries and keys overflow float32 (to inf, then NaN).
MAX_SCALE = 1e4


def check_positive_real(name: str, value, maximum: float = float("inf")) -> float:
    """A finite real number in `(0, maximum]` (not a bool), as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a positive finite number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not (0.0 < value <= maximum and math.isfinite(value)):
        bound = "" if maximum == float("inf") else f" at most {maximum:g}"
        raise ValueError(f"{name} must be a positive finite number{bound}, got {value!r}")
    return value


def check_scale(scale, name: str = "scale") -> float | None:
    """An attention scale: None (the default `d ** -0.5`) or a finite number in `(0, MAX_SCALE]`."""
    if scale is None:
        return None
    return check_positive_real(name, scale, MAX_SCALE)


def check_qkv(q, k, v) -> None:
    """q, k, v: float tensors `(..., n, d)` on one device, one dtype; q and k share `d`; k and v may have
    fewer heads than q (`is_grouped`)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape (..., n, d), got {type(t).__name__}")
        if t.ndim < 2:
            raise ValueError(f"{name} must have shape (..., n, d) with at least 2 dims, got shape {tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype of {name} must be one of float16, bfloat16, float32, float64, got {t.dtype}")
    for name, t in (("q", q), ("v", v)):
        if t.shape[-1] == 0:
            raise ValueError(f"{name} must have a last dim d >= 1, got shape {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"dtype of q, k, v must match, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.shape[:-2] + q.shape[-1:] != k.shape[:-2] + k.shape[-1:] and not is_grouped(q, k):
        raise ValueError(
            f"k must have the shape of q (..., n, d), or (..., h_kv, n, d) for q (..., h, n, d) with h_kv dividing h "
            f"(grouped-query attention), got q {tuple(q.shape)} and k {tuple(k.shape)}"
        )
    if q.shape[-2] > k.shape[-2]:
        raise ValueError(f"q must hold at most as many positions as k (the last n_q of them), got q {tuple(q.shape)} "
                         f"and k {tuple(k.shape)}")
    if v.shape[:-1] != k.shape[:-1]:
        raise ValueError(f"v must have shape (..., n, d_v) matching k's (..., n), got k {tuple(k.shape)} and v {tuple(v.shape)}")


def is_grouped(q, k) -> bool:
    """Grouped-query attention: `q (..., h, n, d)` and `k (..., h_kv, n, d)` with `h_kv | h`, the other
    leading dims equal (the dim just before `n` is the head dim). Query head `i` uses kv head
    `i // (h // h_kv)`, so once the leading dims are packed, query row `p` uses kv row `p // (P // P_kv)`."""
    return (
        q.ndim >= 3 and k.ndim == q.ndim and k.shape[-1] == q.shape[-1] and k.shape[:-3] == q.shape[:-3]
        and k.shape[-3] >= 1 and q.shape[-3] % k.shape[-3] == 0
    )


def check_mask(mask, packed: int, n: int, device, name: str = "mask") -> None:
    """Key padding mask `(b, n)` bool, with `b` dividing the packed batch `P`."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a bool tensor of shape (b, n), got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor of shape (b, n), got dtype {mask.dtype}")
    if mask.ndim != 2 or mask.shape[1] != n or mask.shape[0] == 0 or packed % mask.shape[0] != 0:
        raise ValueError(
            f"{name} must have shape (b, n) with n = {n} and b dividing the packed batch {packed}, got {tuple(mask.shape)}"
        )
    if mask.device != device:
        raise ValueError(f"{name} must be on the device of q ({device}), got {mask.device}")


def check_attn_bias(attn_bias, packed: int, spec, n: int | None, device) -> None:
    """Bias `(heads, w, span * w)`, float, with `heads` dividing the packed batch: that of `spec`, or (with
    `n`) that of the window cut to any length `m >= n`, `spec.for_length(m)` (the same rule on `n`
    positions; a window far longer than the sequence needs no bias as long as the window)."""
    if not isinstance(attn_bias, torch.Tensor):
        raise TypeError(f"attn_bias must be a float tensor of shape (heads, w, span * w), got {type(attn_bias).__name__}")
    if attn_bias.dtype not in FLOAT_DTYPES:
        raise TypeError(f"attn_bias must be a float tensor, got dtype {attn_bias.dtype}")
    source = spec.with_bias_shape(*attn_bias.shape[1:]) if attn_bias.ndim == 3 else None
    fits = source is not None and (source == spec if n is None else spec.covers(source, n))
    if not fits or attn_bias.shape[0] == 0 or packed % attn_bias.shape[0] != 0:
        w = spec.window_size
        cut = "" if n is None else f", or that of the window cut to a length >= {n}"
        raise ValueError(
            f"attn_bias must have shape (heads, {w}, {spec.span * w}) = (heads, window_size, "
            f"(look_backward + look_forward + 1) * window_size){cut}, with heads dividing the packed batch "
            f"{packed}, got {tuple(attn_bias.shape)}"
        )
    if attn_bias.device != device:
        raise ValueError(f"attn_bias must be on the device of q ({device}), got {attn_bias.device}")


def check_token_window(window, causal: bool) -> tuple[int, int]:
    """A `(left, right)` token window: two ints >= -1 (-1 unbounded); `right` 0 or -1 when causal."""
    if len(window) != 2 or any(isinstance(t, bool) or not isinstance(t, numbers.Integral) for t in window):
        raise TypeError(f"window_size must be an int >= 1 or a (left, right) pair of ints >= -1, got {window!r}")
    left, right = (int(t) for t in window)
    if left < -1 or right < -1:
        raise ValueError(f"window_size (left, right) takes ints >= -1 (-1: unbounded on that side), got {window!r}")
    if causal and right not in (0, -1):
        raise ValueError(f"window_size: causal=True takes a (left, right) window with right 0 or -1 (a causal query "
                         f"cannot see ahead), got {window!r}")
    return left, right


def check_documents(documents, packed: int, n: int, device, order: bool = True) -> None:
    """Document ids `(b, n)` integer, non-decreasing along each row (`order=False`: that is left to
    `check_document_order`), `b` dividing the packed batch."""
    if not isinstance(documents, torch.Tensor):
        raise TypeError(f"documents must be an integer tensor of shape (b, n), got {type(documents).__name__}")
    if documents.dtype.is_floating_point or documents.dtype.is_complex or documents.dtype == torch.bool:
        raise TypeError(f"documents must be an integer tensor of shape (b, n), got dtype {documents.dtype}")
    if documents.ndim != 2 or documents.shape[1] != n or documents.shape[0] == 0 or packed % documents.shape[0]:
        raise ValueError(f"documents must have shape (b, n) with n = {n} and b dividing the packed batch {packed}, "
                         f"got {tuple(documents.shape)}")
    if documents.device != device:
        raise ValueError(f"documents must be on the device of q ({device}), got {documents.device}")
    if order:
        check_document_order(documents)


def check_document_order(documents: torch.Tensor) -> None:
    """Document ids `(b, n)` (shape already checked) non-decreasing along each row: the part of
    `check_documents` that reads the values, so a call checks it every time (`ops.api` caches the rest)."""
    if documents.shape[1] > 1 and bool((documents[:, 1:] < documents[:, :-1]).any()):
        raise ValueError("documents must be non-decreasing along each row (every document one contiguous run)")


def check_sinks(sinks, packed: int, q) -> None:
    """Learned sink logits `(h,)`, float, `h` dividing the packed batch, on q's device."""
    if not isinstance(sinks, torch.Tensor):
        raise TypeError(f"sinks must be a float tensor of shape (heads,), got {type(sinks).__name__}")
    if sinks.dtype not in FLOAT_DTYPES:
        raise TypeError(f"sinks must be a float tensor of shape (heads,), got dtype {sinks.dtype}")
    if sinks.ndim != 1 or sinks.shape[0] == 0 or packed % sinks.shape[0]:
        raise ValueError(f"sinks must have shape (heads,) with heads dividing the packed batch {packed}, "
                         f"got {tuple(sinks.shape)}")
    if sinks.device != q.device:
        raise ValueError(f"sinks must be on the device of q ({q.device}), got {sinks.device}")
