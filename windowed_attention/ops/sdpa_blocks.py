"""Local attention as one fused flash-attention call per chunk of windows (CPU fast path, backend "sdpa").

The keys a query window can see, windows `b - look_backward .. b + look_forward`, lie next to each other
in memory, so the key block of every query window is a *strided view* of the keys,
`(P, windows, span * w, d)` with stride `w * d` between windows: no gather, no copy (only chunks at the
ends of the sequence take a small zero-padded copy of their rows). One call of PyTorch's fused CPU flash kernel
per chunk of windows does the whole softmax with a small `(w, span * w)` mask of what each local query
sees, shared by every interior window (edge windows and key padding masks get their own).

A custom `autograd.Function` saves only the output and the log-sum-exp, and the backward calls the fused
backward kernel per chunk, folding the overlapping key-block gradients back onto the keys; memory stays
O(n d), never O(n w).

Supports key padding masks, any `n`, exact and token windows, `key_scale` (treated as a constant) and
float64/float32/bfloat16/float16. Not `attn_bias`, `mask_self`, dropout, documents, sinks, sink tokens,
softcap or shorter queries (`FEATURES`; other backends do those).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .dtypes import accumulation_dtype, autocast_inputs
from .call import AttentionCall
from .reference import repeat_kv
from .spec import WindowSpec

_aten = torch.ops.aten
_FLASH_FWD = "_scaled_dot_product_flash_attention_for_cpu"
_FLASH_BWD = "_scaled_dot_product_flash_attention_for_cpu_backward"

# Elements of one chunk's key block (P * windows * span * w * d), and of its mask when the mask is per
# window: ~16 MB in fp32 keeps the kernel's working set and our temporaries small.
CHUNK_ELEMENTS = 1 << 22


def available() -> bool:
    """The fused CPU flash kernels exist in this torch (2.3+)."""
    return hasattr(_aten, _FLASH_FWD) and hasattr(_aten, _FLASH_BWD)


DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
# What it computes (`ops.call.ALL_FEATURES`): the window (blocks or token bounds), key masks and xpos.
FEATURES = frozenset({"mask", "xpos", "block_window", "token_window"})


def takes_head_dims(head_dim: int, value_dim: int) -> bool:
    return True


def block_visibility(spec: WindowSpec, first: int, last: int, n: int, device) -> torch.Tensor:
    """`(last - first, w, span * w)` bool: what query `r` of window `b` sees at key slot `s` of its block.

    Slot `s` of window `b`'s block is key position `(b - look_backward) * w + s`.
    """
    w = spec.window_size
    windows = torch.arange(first, last, device=device)[:, None, None]
    q_pos = windows * w + torch.arange(w, device=device)[None, :, None]
    k_pos = (windows - spec.look_backward) * w + torch.arange(spec.span * w, device=device)[None, None, :]
    return spec.window_visible(q_pos, k_pos, n)


class _Plan:
    """The chunks of windows and their masks (shared by forward and backward)."""

    def __init__(self, spec: WindowSpec, n: int, windows: int, key_ok, scale: float, key_scale, dtype, device, per_window: int):
        self.spec, self.n, self.windows, self.key_ok = spec, n, windows, key_ok
        self.scale, self.key_scale, self.dtype, self.device = scale, key_scale, dtype, device
        w, span = spec.window_size, spec.span
        # Interior windows [lb, interior_end) see no sequence edge: one shared positional mask serves all.
        self.interior = (spec.look_backward, min(windows, n // w - spec.look_forward))
        self.shared = None
        if self.interior[0] < self.interior[1]:
            self.shared = self._as_float(block_visibility(spec, self.interior[0], self.interior[0] + 1, n, device))
        mask_per_window = w * span * w * (1 if key_ok is None else key_ok.shape[0])
        self.chunk = max(1, CHUNK_ELEMENTS // max(per_window, mask_per_window))

    def _as_float(self, keep: torch.Tensor) -> torch.Tensor:
        return torch.zeros(keep.shape, dtype=self.dtype, device=self.device).masked_fill_(~keep, float("-inf"))

    def chunks(self):
        """Yield window ranges `[b0, b1)` that never mix edge and interior windows."""
        lo, hi = self.interior
        bounds = sorted({0, self.windows, *(b for b in (lo, hi) if 0 < b < self.windows)})
        for start, stop in zip(bounds, bounds[1:]):
            for b0 in range(start, stop, self.chunk):
                yield b0, min(b0 + self.chunk, stop)

    def mask(self, b0: int, b1: int) -> torch.Tensor:
        """Additive mask `(1 or P, 1 or c, w, span * w)` for query windows `[b0, b1)`."""
        lo, hi = self.interior
        if self.key_ok is None and lo <= b0 and b1 <= hi:
            return self.shared[None]
        keep = block_visibility(self.spec, b0, b1, self.n, self.device)[None]
        if self.key_ok is not None:
            keep = keep & self.blocks(self.key_ok, b0, b1)[:, :, None, :]
        return self._as_float(keep)

    def rows(self, t: torch.Tensor, b0: int, b1: int) -> torch.Tensor:
        """Rows `(b0 - lb) * w .. (b1 + lf) * w` of `t` `(P, n, ...)`: a view inside the sequence, a small
        zero-filled copy for edge chunks that reach past either end."""
        w, lb, lf = self.spec.window_size, self.spec.look_backward, self.spec.look_forward
        lo, hi = (b0 - lb) * w, (b1 + lf) * w
        if lo >= 0 and hi <= t.shape[1]:
            return t[:, lo:hi]
        slab = t.new_zeros(t.shape[0], hi - lo, *t.shape[2:])
        a, b = max(lo, 0), min(hi, t.shape[1])
        slab[:, a - lo : b - lo] = t[:, a:b]
        return slab

    def blocks(self, t: torch.Tensor, b0: int, b1: int) -> torch.Tensor:
        """Key blocks of windows `[b0, b1)`, `(P, c, span * w, ...)`: a strided view of `rows(t, b0, b1)`."""
        w, span = self.spec.window_size, self.spec.span
        rows = self.rows(t, b0, b1)
        size = (rows.shape[0], b1 - b0, span * w, *rows.shape[2:])
        stride = (rows.stride(0), w * rows.stride(1), *rows.stride()[1:])
        return rows.as_strided(size, stride, rows.storage_offset())

    def keys(self, k: torch.Tensor, b0: int, b1: int) -> torch.Tensor:
        blocks = self.blocks(k, b0, b1)
        if self.key_scale is None:
            return blocks
        w = self.spec.window_size
        return (blocks.unflatten(2, (self.spec.span, w)) * self.key_scale[:, None, :].to(k.dtype)).flatten(2, 3)


class _FlashSpans(torch.autograd.Function):
    """`q (P, windows * w, d)`, `k, v (P, n, d)` -> `out (P, windows * w, d_v)`; saves out and log-sum-exp."""

    @staticmethod
    def forward(ctx, q, k, v, plan: _Plan):
        P, w = q.shape[0], plan.spec.window_size
        out = q.new_empty(P, q.shape[1], v.shape[-1])
        lse = torch.empty(P, plan.windows, w, dtype=accumulation_dtype(q.dtype),
                          device=q.device)
        fwd = getattr(_aten, _FLASH_FWD)
        for b0, b1 in plan.chunks():
            rows = slice(b0 * w, b1 * w)
            part, part_lse = fwd(q[:, rows].unflatten(1, (b1 - b0, w)), plan.keys(k, b0, b1), plan.blocks(v, b0, b1),
                                 0.0, False, attn_mask=plan.mask(b0, b1), scale=plan.scale)
            out[:, rows] = part.flatten(1, 2)
            lse[:, b0:b1] = part_lse
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan = plan
        return out

    @staticmethod
    @once_differentiable  # the fused backward kernel has no derivative: a second one raises, never wrong
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        plan: _Plan = ctx.plan
        w, span = plan.spec.window_size, plan.spec.span
        acc = accumulation_dtype(q.dtype)
        dq = torch.empty_like(q)
        dk = torch.zeros(k.shape, dtype=acc, device=k.device)
        dv = torch.zeros(v.shape, dtype=acc, device=v.device)
        bwd = getattr(_aten, _FLASH_BWD)
        for b0, b1 in plan.chunks():
            c, rows = b1 - b0, slice(b0 * w, b1 * w)
            g_q, g_k, g_v = bwd(
                grad_out[:, rows].unflatten(1, (c, w)).contiguous(), q[:, rows].unflatten(1, (c, w)),
                plan.keys(k, b0, b1), plan.blocks(v, b0, b1), out[:, rows].unflatten(1, (c, w)),
                lse[:, b0:b1].contiguous(), 0.0, False,
                attn_mask=plan.mask(b0, b1), scale=plan.scale,
            )
            dq[:, rows] = g_q.flatten(1, 2)
            g_k, g_v = g_k.unflatten(2, (span, w)), g_v.unflatten(2, (span, w))
            if plan.key_scale is not None:
                g_k = g_k * plan.key_scale[:, None, :].to(g_k.dtype)
            n = k.shape[1]
            for s in range(span):  # slot s of window b is key window b - look_backward + s
                lo = (b0 + s - plan.spec.look_backward) * w
                a, b = max(lo, 0), min(lo + c * w, n)
                if a < b:
                    dk[:, a:b] += g_k[:, :, s].flatten(1, 2)[:, a - lo : b - lo]
                    dv[:, a:b] += g_v[:, :, s].flatten(1, 2)[:, a - lo : b - lo]
        return dq, dk.to(k.dtype), dv.to(v.dtype), None


def sdpa_blocks_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall) -> torch.Tensor:
    """Same contract as `reference_attention`: `q, k (P, n, d)`, `v (P, n, d_v)` -> `(P, n, d_v)`."""
    if q.device.type != "cpu":
        raise ValueError("backend 'sdpa' supports CPU tensors; use backend='auto' or 'reference'")
    call.require("sdpa", FEATURES)
    spec, scale, mask, key_scale = call.spec, call.scale, call.mask, call.key_scale
    device_type = q.device.type
    q, k, v = autocast_inputs(q, k, v)
    P, n, d = q.shape
    k, v = repeat_kv(k, P), repeat_kv(v, P)  # grouped-query attention: the flash kernel wants one kv row per q row
    dv = v.shape[-1]
    if dv != d:
        # The fused kernel wants one head size: zero channels change neither scores nor outputs.
        width = max(d, dv)
        q, k = (F.pad(t, (0, width - d)) for t in (q, k))
        v = F.pad(v, (0, width - dv))
        if key_scale is not None:
            key_scale = F.pad(key_scale, (0, width - d), value=1.0)
    w = spec.window_size
    windows = -(-n // w)
    pad = windows * w - n
    key_ok = None if mask is None else mask.repeat_interleave(P // mask.shape[0], dim=0)
    if pad:
        q = F.pad(q, (0, 0, 0, pad))
    with torch.autocast(device_type, enabled=False):
        plan = _Plan(spec, n, windows, key_ok, scale, key_scale, q.dtype, q.device, P * spec.span * w * q.shape[-1])
        # The CPU flash kernel reads rows as contiguous vectors (a transposed view gives wrong values): the
        # chunks are views of contiguous q, k, v.
        out = _FlashSpans.apply(q.contiguous(), k.contiguous(), v.contiguous(), plan)
    # slice only when needed: a slice's backward allocates a zero-filled gradient of the full output
    return out if (pad == 0 and dv == out.shape[-1]) else out[:, :n, :dv]
