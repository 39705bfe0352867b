"""`geglu(x)`: `a * F.gelu(g)` for `x = [a | g]` (halves of the last dimension), in our CPU kernel
(`csrc/geglu_cpu.cpp`) where it computes the same function: eager float32 CPU tensors without autograd
(decode steps, inference). torch hands a contiguous float32 `gelu` to oneDNN, which opens a parallel region
for every call: one per layer and decode step, which on a machine with another busy process made two threads
decode 3x slower than one. The kernel splits rows among threads only when the work pays for it, and computes
GELU as torch's own kernel does (erf), so results agree to float32 rounding."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import fused_cpu
from .small_linear import eager_without_autograd

# The kernel's op, `windowed_attention_cpu::geglu`: its schema and fake here, its CPU kernel registered in C++
# (`csrc/geglu_cpu.cpp`), so that a tracer that reaches it (make_fx, fake tensors) records the op.
_KERNEL_LIBRARY = torch.library.Library("windowed_attention_cpu", "FRAGMENT")
_KERNEL_LIBRARY.define("geglu(Tensor x) -> Tensor")


@torch.library.register_fake("windowed_attention_cpu::geglu", lib=_KERNEL_LIBRARY)
def _(x):
    return x.new_empty(x.shape[0], x.shape[1] // 2)


def _fused(x: torch.Tensor) -> torch.Tensor:
    """The kernel on `x (M, 2e)` (contiguous)."""
    return fused_cpu.kernel().geglu(x)


def _takes(x: torch.Tensor) -> bool:
    if type(x) is not torch.Tensor:  # subclasses (fake tensors among them) and FX proxies: torch's gelu
        return False
    return eager_without_autograd(x) and x.ndim > 0 and x.shape[-1] % 2 == 0

def geglu(x: torch.Tensor) -> torch.Tensor:
    """`(..., 2e) -> (..., e)`: the first half times GELU (exact, erf) of the second."""
    if not _takes(x):
        a, gate = x.chunk(2, dim=-1)
        return a * F.gelu(gate)
    y = _fused(x.reshape(-1, x.shape[-1]).contiguous())
    return y.view(*x.shape[:-1], x.shape[-1] // 2)
