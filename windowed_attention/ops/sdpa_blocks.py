"""Local attention as a few fused flash-attention calls on window pairs (CPU fast path, backend "sdpa").

The window pattern decomposes into *tasks*, one per key-window offset `o` in `[-look_backward,
look_forward]`: query window `b` against key window `b + o`, both plain views of `q, k, v` reshaped to
`(P, windows, w, d)` (no gather, no copy). Inside a pair the visible keys are all, `j <= i` (`lower`),
`j >= i` (`upper`) or `j == i` (both) in window-local indices, so each task is one call of PyTorch's
fused CPU flash kernel (`is_causal` for `lower`, a tiny broadcast `(w, w)` mask otherwise). The calls
return their log-sum-exp, which merges the partial softmaxes exactly; backward calls the fused backward
kernel per task with the merged output and log-sum-exp, which gives each task's exact share of the
gradients. Only `out` and the log-sum-exp `(P, n)` are saved, and work runs in chunks of windows, so
memory stays O(n d), never O(n w).

Supports key padding masks, any `n`, exact windows, `key_scale` (treated as a constant) and
float64/float32/bfloat16/float16. Not `attn_bias`, `mask_self` or dropout (other backends do those).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .spec import WindowSpec

_aten = torch.ops.aten
_FLASH_FWD = "_scaled_dot_product_flash_attention_for_cpu"
_FLASH_BWD = "_scaled_dot_product_flash_attention_for_cpu_backward"

# Elements of one chunk's query block (P * windows * w * d); ~8 MB in fp32 keeps temporaries small.
CHUNK_ELEMENTS = 1 << 21


def available() -> bool:
    """The fused CPU flash kernels exist in this torch (2.3+)."""
    return hasattr(_aten, _FLASH_FWD) and hasattr(_aten, _FLASH_BWD)


def supports(device_type: str, dtype: torch.dtype, *, attn_bias: bool, mask_self: bool, dropout: bool) -> bool:
    """Whether this backend computes these options on this device (a pure function of its inputs)."""
    return (
        device_type == "cpu"
        and dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16)
        and not (attn_bias or mask_self or dropout)
    )


@dataclass(frozen=True)
class Task:
    """Query window `b` against key window `b + offset`; `lower`: keep `j <= i`, `upper`: keep `j >= i`."""

    offset: int
    lower: bool
    upper: bool


def window_tasks(spec: WindowSpec) -> tuple[Task, ...]:
    """The window-pair tasks whose union is exactly `spec.visible` (before the sequence bounds)."""
    exact, causal = spec.exact_windowsize, spec.causal
    return tuple(
        Task(
            offset,
            lower=(causal and offset == 0) or (exact and not causal and offset == spec.look_forward),
            upper=exact and offset == -spec.look_backward,
        )
        for offset in range(-spec.look_backward, spec.look_forward + 1)
    )


def _keep_positions(task: Task, w: int, device) -> torch.Tensor | None:
    """`(w, w)` bool: which local (query, key) pairs a task keeps; None when all."""
    if not (task.lower or task.upper):
        return None
    i = torch.arange(w, device=device)[:, None]
    j = torch.arange(w, device=device)[None, :]
    keep = torch.ones(w, w, dtype=torch.bool, device=device)
    if task.lower:
        keep &= j <= i
    if task.upper:
        keep &= j >= i
    return keep


def _rows_seeing_keys(task: Task, key_ok: torch.Tensor) -> torch.Tensor:
    """`key_ok (Pm, c, w)` of the task's key windows -> `(Pm, c, w or 1)`: query rows with a visible key."""
    if task.lower and task.upper:
        return key_ok
    if task.lower:
        return key_ok.cumsum(-1) > 0
    if task.upper:
        return key_ok.flip(-1).cumsum(-1).flip(-1) > 0
    return key_ok.any(-1, keepdim=True)


class _Plan:
    """Everything one call needs to run its tasks chunk by chunk (shared by forward and backward)."""

    def __init__(self, spec: WindowSpec, windows: int, key_ok, scale: float, key_scale, dtype, device, per_window: int):
        self.spec, self.windows, self.key_ok, self.scale, self.key_scale = spec, windows, key_ok, scale, key_scale
        self.dtype = dtype
        self.tasks = window_tasks(spec)
        self.keeps = {t: _keep_positions(t, spec.window_size, device) for t in self.tasks}
        self.chunk = max(1, CHUNK_ELEMENTS // max(1, per_window))

    def chunks(self):
        """Yield `(b0, b1, [(task, a, b)])`: query windows `[a, b)` of `[b0, b1)` each task covers."""
        for b0 in range(0, self.windows, self.chunk):
            b1 = min(b0 + self.chunk, self.windows)
            items = []
            for task in self.tasks:
                a = max(b0, -task.offset)
                b = min(b1, self.windows - task.offset)
                if a < b:
                    items.append((task, a, b))
            yield b0, b1, items

    def call_args(self, task: Task, a: int, b: int):
        """`(is_causal, attn_mask or None, rows seeing a key or None)` of a task on query windows `[a, b)`."""
        keep_pos = self.keeps[task]
        key_ok = None if self.key_ok is None else self.key_ok[:, a + task.offset : b + task.offset]
        if key_ok is None:
            if task.lower and not task.upper:
                return True, None, None
            if keep_pos is None:
                return False, None, None
            keep = keep_pos
        else:
            keep = key_ok[:, :, None, :] if keep_pos is None else key_ok[:, :, None, :] & keep_pos
        attn_mask = torch.zeros(keep.shape, dtype=self.dtype, device=keep.device).masked_fill_(~keep, float("-inf"))
        return False, attn_mask, None if key_ok is None else _rows_seeing_keys(task, key_ok)

    def keys(self, k: torch.Tensor, task: Task) -> torch.Tensor:
        if self.key_scale is None:
            return k
        return k * self.key_scale[task.offset + self.spec.look_backward].to(k.dtype)


class _FlashBlocks(torch.autograd.Function):
    """`q, k, v (P, windows, w, d)` -> `out (P, windows, w, d_v)`; saves only out and log-sum-exp."""

    @staticmethod
    def forward(ctx, q, k, v, plan: _Plan):
        P, windows, w, _ = q.shape
        acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        out = q.new_empty(P, windows, w, v.shape[-1])
        lse = torch.empty(P, windows, w, dtype=acc_dtype, device=q.device)
        fwd = getattr(_aten, _FLASH_FWD)
        for b0, b1, items in plan.chunks():
            parts, lses = [], torch.full((len(items), P, b1 - b0, w), float("-inf"), dtype=acc_dtype, device=q.device)
            for slot, (task, a, b) in enumerate(items):
                o = task.offset
                causal, attn_mask, sees = plan.call_args(task, a, b)
                part, part_lse = fwd(q[:, a:b], plan.keys(k[:, a + o : b + o], task), v[:, a + o : b + o],
                                     0.0, causal, attn_mask=attn_mask, scale=plan.scale)
                if sees is not None:  # the kernel reports lse 0 for a row that sees nothing
                    part_lse = part_lse.masked_fill(~sees, float("-inf"))
                lses[slot, :, a - b0 : b - b0] = part_lse
                parts.append(part)
            total = torch.logsumexp(lses, dim=0) if len(items) > 1 else lses[0]
            safe = total.masked_fill(total == float("-inf"), 0.0)
            weights = (lses - safe).exp_()  # each task's share of a row's softmax mass
            in_place = acc_dtype == q.dtype
            acc = out[:, b0:b1] if in_place else torch.empty(P, b1 - b0, w, v.shape[-1], dtype=acc_dtype, device=q.device)
            for slot, ((task, a, b), part) in enumerate(zip(items, parts)):
                rows = slice(a - b0, b - b0)
                share = weights[slot, :, rows, :, None]
                if slot == 0 and (a, b) == (b0, b1):
                    torch.mul(part, share, out=acc)
                else:
                    if slot == 0:
                        acc.zero_()
                    acc[:, rows].addcmul_(part.to(acc_dtype), share)
            if not in_place:
                out[:, b0:b1] = acc
            lse[:, b0:b1] = total
        # A row that sees no key: lse +inf makes every backward weight exp(s - lse) exactly 0.
        lse.masked_fill_(lse == float("-inf"), float("inf"))
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan = plan
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        plan: _Plan = ctx.plan
        acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        dq = torch.zeros(q.shape, dtype=acc_dtype, device=q.device)
        dk = torch.zeros(k.shape, dtype=acc_dtype, device=q.device)
        dv = torch.zeros(v.shape, dtype=acc_dtype, device=q.device)
        bwd = getattr(_aten, _FLASH_BWD)
        for _, _, items in plan.chunks():
            for task, a, b in items:
                o = task.offset
                causal, attn_mask, _ = plan.call_args(task, a, b)
                lse_ab = lse[:, a:b]
                if q.dtype in (torch.bfloat16, torch.float16):
                    lse_ab = lse_ab.float()
                # per-task copy: a broadcast grad (from .sum()) is never materialised whole
                g_q, g_k, g_v = bwd(grad_out[:, a:b].contiguous(), q[:, a:b], plan.keys(k[:, a + o : b + o], task),
                                    v[:, a + o : b + o], out[:, a:b], lse_ab.contiguous(), 0.0, causal,
                                    attn_mask=attn_mask, scale=plan.scale)
                dq[:, a:b] += g_q
                dk[:, a + o : b + o] += plan.keys(g_k, task)
                dv[:, a + o : b + o] += g_v
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None


def sdpa_blocks_attention(
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
    """Same contract as `reference_attention`: `q, k (P, n, d)`, `v (P, n, d_v)` -> `(P, n, d_v)`."""
    if not supports(q.device.type, q.dtype, attn_bias=attn_bias is not None, mask_self=mask_self,
                    dropout=dropout_p > 0.0):
        raise ValueError(
            "backend 'sdpa' supports CPU tensors without attn_bias, shared_qk or dropout; "
            "use backend='auto' or 'reference'"
        )
    device_type = q.device.type
    if torch.is_autocast_enabled(device_type) and q.dtype == torch.float32:
        # Match what the matmuls of any other backend do under autocast: run in the autocast dtype.
        low = torch.get_autocast_dtype(device_type)
        q, k, v = q.to(low), k.to(low), v.to(low)
    P, n, d = q.shape
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
    key_ok = None
    if mask is not None or pad:
        key_ok = mask.repeat_interleave(P // mask.shape[0], dim=0) if mask is not None else q.new_ones(1, n, dtype=torch.bool)
        key_ok = F.pad(key_ok, (0, pad), value=False).unflatten(1, (windows, w))
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    bq, bk, bv = (t.unflatten(1, (windows, w)) for t in (q, k, v))
    with torch.autocast(device_type, enabled=False):
        plan = _Plan(spec, windows, key_ok, scale, key_scale, q.dtype, q.device, P * w * v.shape[-1])
        out = _FlashBlocks.apply(bq, bk, bv, plan)
    out = out.flatten(1, 2)
    # slice only when needed: a slice's backward allocates a zero-filled gradient of the full output
    return out if (pad == 0 and dv == out.shape[-1]) else out[:, :n, :dv]
