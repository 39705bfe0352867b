"""Exact sliding windows on the `flash_attn` package (backend "flash", CUDA, fp16/bf16).

`exact_windowsize=True` is a plain sliding window: query `i` sees `i - w*look_backward <= j <=
i + w*look_forward` (the window-block bound follows from it), which is flash-attn's `window_size=(left,
right)`. Only that pattern, without masks, biases, shared qk or xpos, and only the head dims flash-attn 2
takes: values as wide as queries, at most 256.
"""

from __future__ import annotations

import importlib.util

import torch

from .spec import WindowSpec


def available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


MAX_HEAD_DIM = 256


def supports(device_type: str, dtype: torch.dtype, spec: WindowSpec, *, mask: bool, attn_bias: bool,
             mask_self: bool, key_scale: bool, head_dim: int, value_dim: int) -> bool:
    """Whether this backend computes these options on this device (a pure function of its inputs)."""
    return (
        device_type == "cuda"
        and dtype in (torch.float16, torch.bfloat16)
        and spec.exact_windowsize
        and not (mask or attn_bias or mask_self or key_scale)
        and head_dim == value_dim <= MAX_HEAD_DIM
    )


def flash_attn_backend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    spec: WindowSpec,
    *,
    scale: float,
    mask: torch.Tensor | None = None,
    attn_bias: torch.Tensor | None = None,
    mask_self: bool = False,
    key_scale: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Same contract as `reference_attention` for exact windows: `(P, n, d)` -> `(P, n, d_v)`."""
    from flash_attn import flash_attn_func

    if not spec.exact_windowsize or mask is not None or attn_bias is not None or mask_self or key_scale is not None:
        raise ValueError("backend 'flash' supports only exact_windowsize=True without mask, attn_bias, shared_qk or xpos")
    w = spec.window_size
    left, right = w * spec.look_backward, 0 if spec.causal else w * spec.look_forward
    # flash-attn wants (batch, seqlen, heads, dim): the packed P rows become heads of one batch (with
    # fewer kv rows, flash-attn's own grouped-query rule maps query head p to kv head p // (P // P_kv)).
    # flash-attn needs the last dim contiguous: other layouts are copied.
    q4, k4, v4 = ((t if t.stride(-1) == 1 else t.contiguous()).transpose(0, 1)[None] for t in (q, k, v))
    out = flash_attn_func(q4, k4, v4, dropout_p=dropout_p, softmax_scale=scale, causal=spec.causal,
                          window_size=(left, right))
    return out[0].transpose(0, 1)
