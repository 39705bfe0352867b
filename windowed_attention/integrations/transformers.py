"""Hugging Face transformers models on our op: `register()`, then `attn_implementation="windowed_attention"`.

    from windowed_attention.integrations.transformers import register
    name = register()                       # "windowed_attention"
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=name)   # or from_pretrained / set_attn_implementation

transformers (5.x) lets a library register an attention function (`AttentionInterface`) and the function that
builds the mask it is given (`AttentionMaskInterface`). We register both under one name:

- `layer_mask` (the mask function) never builds an `n x n` mask. It recognises the rule transformers asks for
  (causal, or causal with a sliding window of `W`: a query sees the last `W` positions, itself included, so
  the token window `(W - 1, 0)`; packed sequences from `position_ids` become our `documents`) and returns a
  `LayerMask`: that window, the positions of the queries and keys (`q_offset`, `kv_offset`, `kv_length`, from
  the cache) and the key padding mask `(b, n)`. Any other rule (bidirectional, chunked, image-token overlays,
  a custom `or_mask_function`/`and_mask_function`) raises `ValueError` naming `mask_function`.
- `attention_forward` (the attention function) reads only what the interface passes (`query (b, h, n_q, d)`,
  `key, value (b, h_kv, n, d)`, the `LayerMask`, `scaling`, `dropout`, `sliding_window`, `softcap`, `s_aux`)
  and calls `local_attention`: the queries are the last `n_q` of the keys' positions (bottom-right aligned, so
  a cache's shorter queries and a sliding cache that keeps only the last keys are exact), grouped-query
  heads as they come, `s_aux` as `sinks`. What it cannot serve raises `ValueError` naming it.

A query row that sees no key (a left-padding position) outputs zeros, where eager attention outputs an
average of padding; those rows are padding either way. See docs/transformers.md.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

try:
    import transformers
    from transformers import AttentionInterface
    from transformers import masking_utils as hf_masks
    from transformers.masking_utils import AttentionMaskInterface
except ImportError:
    raise ImportError('windowed_attention.integrations.transformers needs Hugging Face transformers 5.x: '
                      'pip install "windowed-attention[transformers]"') from None

from ..ops import local_attention

if int(transformers.__version__.split(".")[0]) < 5:
    raise ImportError(f"windowed_attention.integrations.transformers needs transformers 5.x (its attention and mask "
                      f"interfaces), found {transformers.__version__}: pip install \"windowed-attention[transformers]\"")

__all__ = ["register", "attention_forward", "layer_mask", "LayerMask"]


@dataclass(frozen=True)
class LayerMask:
    """Which keys a layer's queries see, without an `n x n` mask.

    `window`: `(left, right)` token window over absolute positions (`local_attention`'s `window_size`, causal).
    The keys passed to attention hold positions `kv_offset .. kv_offset + kv_length - 1` and the queries
    `q_offset .. q_offset + n_q - 1`. `padding` `(b, kv_length)` bool, True at real tokens (None: no padding).
    `documents` `(b, kv_length)` non-decreasing ids of packed sequences (None: one sequence a row).
    """

    window: tuple[int, int]
    q_offset: int
    kv_offset: int
    kv_length: int
    padding: torch.Tensor | None = None
    documents: torch.Tensor | None = None


# --- recognising the rule transformers asks for ------------------------------------------------------------
# A mask function is a closure built by masking_utils' factories. Two closures compute the same rule when they
# run the same code over equal captured values; so we build the rules we serve with the same factories and
# compare. Tensors captured (padding, packed-sequence ids) are "slots": any tensor matches and is collected.


class _Slot:
    """A placeholder for a captured tensor in a template rule."""

    def __init__(self, name: str):
        self.name = name


def _match(actual, template, found: dict) -> bool:
    if isinstance(template, _Slot):
        found[template.name] = actual
        return isinstance(actual, torch.Tensor)
    if actual is template:
        return True
    code = getattr(template, "__code__", None)
    if code is not None:
        if getattr(actual, "__code__", None) is not code:
            return False
        cells, template_cells = actual.__closure__ or (), template.__closure__ or ()
        return len(cells) == len(template_cells) and all(
            _match(a.cell_contents, t.cell_contents, found) for a, t in zip(cells, template_cells))
    if isinstance(template, (tuple, list)):
        return (type(actual) is type(template) and len(actual) == len(template)
                and all(_match(a, t, found) for a, t in zip(actual, template)))
    if isinstance(template, torch.Tensor):
        return False  # captured tensors are slots; a concrete one is never equal to another
    return type(actual) is type(template) and actual == template


def _recognise(mask_function, local_size) -> tuple[tuple[int, int], torch.Tensor | None]:
    """`(window, documents)` for the rule `mask_function` (built by masking_utils), or ValueError naming it."""
    if local_size is None:
        base, window = hf_masks.causal_mask_function, (-1, 0)
    else:
        base, window = hf_masks.sliding_window_causal_mask_function(local_size), (local_size - 1, 0)
    if _match(mask_function, base, {}):
        return window, None
    # packed sequences (position_ids restarting, no attention_mask): the base rule on each sequence's own positions
    packed = hf_masks.and_masks(hf_masks.remap_positions_for_packed_sequence(base, _Slot("position_ids")),
                                hf_masks.packed_sequence_mask_function(_Slot("documents")))
    found = {}
    if _match(mask_function, packed, found):
        return window, found["documents"]
    served = "causal" if local_size is None else f"sliding-window causal (window {local_size})"
    raise ValueError(
        f"mask_function: windowed_attention serves the causal and sliding-window causal masks of decoder models "
        f"(and packed sequences given by position_ids); this layer asked for another rule than the {served} one, or "
        f"for more on top of it ({getattr(mask_function, '__qualname__', mask_function)!r}: bidirectional or chunked "
        f"attention, image-token overlays, or a custom or_mask_function/and_mask_function). Use "
        f"attn_implementation='sdpa' or 'eager' for it")


def layer_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset: int = 0,
               mask_function=hf_masks.causal_mask_function, attention_mask: torch.Tensor | None = None,
               local_size: int | None = None, **kwargs) -> LayerMask:
    """transformers' mask function (`AttentionMaskInterface`): the compact `LayerMask` for one kind of layer.

    `attention_mask` `(b, past + n_q)` is the 2-D padding mask (True at tokens); `local_size` the sliding window
    `W` of sliding layers; `q_offset`, `kv_offset`, `kv_length` come from the cache."""
    window, documents = _recognise(mask_function, local_size)
    q_offset = int(q_offset)  # a static cache passes a 0-d tensor
    padding = None
    if attention_mask is not None:
        if attention_mask.dim() != 2:
            raise ValueError(f"attention_mask: windowed_attention takes the 2-D padding mask (batch, length), "
                             f"got shape {tuple(attention_mask.shape)}")
        padding = attention_mask.bool()
        if padding.shape[-1] < kv_offset + kv_length:  # a static cache's unfilled slots: never seen (future)
            padding = torch.nn.functional.pad(padding, (0, kv_offset + kv_length - padding.shape[-1]))
        padding = padding[:, kv_offset : kv_offset + kv_length]
        if bool(padding.all()):
            padding = None
    return LayerMask(window, q_offset, kv_offset, kv_length, padding, documents)


# flash-attention's ways of saying "packed sequences"; we take them from position_ids instead
_FLASH_PACKING = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: LayerMask | None, dropout: float = 0.0, scaling: float | None = None,
                      sliding_window: int | None = None, softcap: float | None = None,
                      s_aux: torch.Tensor | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention function (`AttentionInterface`): `query (b, h, n_q, d)`, `key, value
    (b, h_kv, n, d)` -> `(b, n_q, h, d_v)` and no attention weights. `attention_mask` is the `LayerMask` built by
    `layer_mask`; `s_aux` `(h,)` are learned sink logits (gpt-oss); `softcap` caps the scores (Gemma 2)."""
    layer = attention_mask
    if not isinstance(layer, LayerMask):
        raise ValueError(
            f"attention_mask: windowed_attention needs the mask its own mask function builds, got "
            f"{type(layer).__name__}{'' if layer is None else ' of shape ' + str(tuple(layer.shape))}: a ready 4-D "
            f"mask (or none) cannot be served without an n x n mask; pass the 2-D padding mask (batch, length) "
            f"and let the model build its masks")
    if kwargs.get("output_attentions"):
        raise ValueError("output_attentions: windowed_attention never materialises the attention weights; "
                         "use attn_implementation='eager' to return them")
    if kwargs.get("position_bias") is not None:
        raise ValueError("position_bias: windowed_attention takes no additive position bias")
    for name in _FLASH_PACKING:
        if kwargs.get(name) is not None:
            raise ValueError(f"{name}: windowed_attention reads packed sequences from position_ids (each sequence "
                             f"restarting at 0), not from flash-attention's cu_seq_lens/max_length")
    if sliding_window is not None and layer.window != (sliding_window - 1, 0):
        raise ValueError(f"sliding_window: the layer says {sliding_window} but its mask was built for the window "
                         f"{layer.window} (left, right); the model's layers and masks disagree")

    n_q = query.shape[-2]
    if key.shape[-2] != layer.kv_length:
        raise ValueError(f"key: the cache passed {key.shape[-2]} keys where its mask sizes said {layer.kv_length}; "
                         f"windowed_attention does not serve this cache layout")
    # keys hold positions kv_offset..; the queries end at q_offset + n_q: later slots (a static cache's
    # unfilled ones) are in every query's future, and dropping them makes the queries bottom-right aligned
    end = layer.q_offset + n_q - layer.kv_offset
    if not n_q <= end <= layer.kv_length:
        raise ValueError(f"key: the queries (positions {layer.q_offset}..{layer.q_offset + n_q - 1}) do not end "
                         f"within the keys passed (positions {layer.kv_offset}..{layer.kv_offset + layer.kv_length - 1}); "
                         f"windowed_attention does not serve this cache layout")
    if end < layer.kv_length:
        key, value = key[..., :end, :], value[..., :end, :]
    padding = None if layer.padding is None else layer.padding[:, :end]
    documents = None if layer.documents is None else layer.documents[:, :end]
    out = local_attention(query, key, value, window_size=layer.window, causal=True, mask=padding,
                          documents=documents, scale=scaling, dropout_p=float(dropout), sinks=s_aux, softcap=softcap)
    return out.transpose(1, 2).contiguous(), None


def register(name: str = "windowed_attention") -> str:
    """Register our attention and mask functions with transformers under `name` and return it, for
    `from_pretrained(..., attn_implementation=name)`, `from_config(...)` or `model.set_attn_implementation(name)`.
    Registering again is harmless; a name transformers gives a meaning (eager, sdpa, flash_*, flex_*, paged|...,
    hub kernels `org/repo`) or that holds another function is refused."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__} {name!r}")
    taken = AttentionInterface()
    if (not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_\-]*", name) or name == "eager"
            or any(word in name for word in ("flash", "flex", "paged"))
            or (name in taken and taken[name] is not attention_forward)):
        raise ValueError(f"name: a new attention implementation name (letters, digits, '_' or '-'; not eager, sdpa, "
                         f"flash_*, flex_* or one already registered), got {name!r}")
    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, layer_mask)
    return name
