"""`linear(x, weight, bias)`: `F.linear`, with a few rows on CPU in our kernel (`csrc/small_linear_cpu.cpp`).

A decode step projects one token per row of the batch: `x` holds 1 to 64 rows. MKL's GEMM at such sizes
spends its time packing the weights, which a step reads from memory (the weights of all layers and a large
batch's cache do not fit in the caches of the CPU together), and its matrix-vector product reads them at
a fraction of the memory's rate; our kernel reads each row of the weights once, in order, for all rows of
`x`. On this project's 2-core AMD EPYC (family 26, AVX-512), the four projections of a README layer
(dim 256, 2 threads): 16 rows 95 against 209 us with the weights in cache and 179 against 366 us from
memory; 1 row 24 against 50 us and 177 against 337 us.

The kernel runs where it computes the same function: float32 strided tensors on CPU, no autograd
(nothing to differentiate: a decode step runs under `no_grad`; nor forward-mode AD or torch.func
transforms), no autocast, not while torch.jit.trace or torch.fx trace (they see `F.linear`). Traced by
torch.compile without grad (the compiled decode step, `generation.engine.CompiledStep`), it is the kernel's
own op, `windowed_attention_cpu::small_linear` (registered in C++ for CPU tensors: the graph calls it with no
Python in between); traced by torch.export, the op `windowed_attention::small_linear` (defined in Python, so an
exported program loads without the kernel); with grad, `F.linear`. Each output is a float32 sum in order over
the input channels, so it may differ from MKL's in the last bits (as MKL's own results differ between shapes).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import fused_cpu

MIN_ROWS, MAX_ROWS = 1, 64  # more rows: MKL's GEMM, whose packing then pays


def _fused(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The kernel on `x` `(M, K)` (contiguous)."""
    return fused_cpu.kernel().small_linear(x, weight, bias)


_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
_fx_proxy = torch.fx.Proxy


def _plain(t: torch.Tensor) -> bool:
    """A strided float32 CPU tensor that is its own data: no negative view, no functorch wrapper."""
    return t.dtype == torch.float32 and t.is_cpu and t.layout == torch.strided and not t.is_neg() and not _wrapped(t)


def _shapes_fit(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """`x (..., K)` of MIN_ROWS..MAX_ROWS rows, a contiguous `weight (N, K)` and a contiguous `bias (N,)` or none:
    the shapes the kernel takes (eager `_takes` and traced `_traced_takes` alike)."""
    k = x.shape[-1] if x.ndim else 0
    if k < 1 or weight.ndim != 2 or weight.shape[1] != k or not weight.is_contiguous():
        return False
    if bias is not None and (bias.shape != weight.shape[:1] or not bias.is_contiguous()):
        return False
    return MIN_ROWS <= x.numel() // k <= MAX_ROWS


def eager_without_autograd(*tensors: torch.Tensor | None) -> bool:
    """Whether an eager CPU kernel without a derivative may compute on `tensors` (None: an absent optional
    input) in place of torch's ops: no tracer (torch.compile, jit.trace, FX), plain float32 CPU tensors
    (`_plain`), nothing for autograd to record, no forward-mode AD (a tangent to carry), no autocast, and the
    kernel built. Shared by the few-row projection and the feed-forward's gate (`ops/geglu.py`)."""
    given = [t for t in tensors if t is not None]
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or any(isinstance(t, _fx_proxy) for t in given):
        return False
    if not all(_plain(t) for t in given):
        return False  # other dtypes, devices, layouts and transforms
    if torch.is_grad_enabled() and any(t.requires_grad for t in given):
        return False  # training
    if torch.autograd.forward_ad._current_level >= 0 or torch.is_autocast_enabled("cpu"):
        return False
    return fused_cpu.available()


def _takes(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether the kernel computes `F.linear(x, weight, bias)` here (a decode step's projections pass
    every check; together they cost about 2 us a call)."""
    return eager_without_autograd(x, weight, bias) and _shapes_fit(x, weight, bias)


@fused_cpu.custom_op("small_linear")
def small_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The kernel as the op `windowed_attention::small_linear`: what a compiled decode step calls
    (`generation.engine`: traced code sees this op where eager code calls the kernel directly)."""
    return _fused(x, weight, bias)


# The kernel's own op, `windowed_attention_cpu::small_linear`: its schema (the same) and fake here, its CPU kernel
# registered in C++ (`csrc/small_linear_cpu.cpp`), so that a compiled graph calls the kernel with no Python between.
_KERNEL_LIBRARY = torch.library.Library("windowed_attention_cpu", "FRAGMENT")
_KERNEL_LIBRARY.define(str(small_linear_op._schema).removeprefix("windowed_attention::"))


@torch.library.register_fake(small_linear_op)
@torch.library.register_fake("windowed_attention_cpu::small_linear", lib=_KERNEL_LIBRARY)
def _(x, weight, bias):
    return x.new_empty(x.shape[0], weight.shape[0])


def _traced_takes(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """`_takes` for torch.compile (static facts of the trace: a compiled decode step under `no_grad`)."""
    if torch.is_grad_enabled() or torch.is_autocast_enabled("cpu") or not fused_cpu.available():
        return False  # the op has no derivative
    if any(t.dtype != torch.float32 or not t.is_cpu for t in (x, weight, *(() if bias is None else (bias,)))):
        return False
    return _shapes_fit(x, weight, bias)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`."""
    if torch.compiler.is_compiling():  # traced code sees an op; eager code calls the kernel directly
        kernel = None
        if _traced_takes(x, weight, bias):  # (the kernel is loaded: `_traced_takes` asked)
            kernel = torch.ops.windowed_attention_cpu.small_linear.default
            if torch.compiler.is_exporting():
                kernel = small_linear_op
    else:
        kernel = _fused if _takes(x, weight, bias) else None
    if kernel is None:
        return F.linear(x, weight, bias)
    out = kernel(x.reshape(-1, x.shape[-1]).contiguous(), weight, bias)
    return out.view(*x.shape[:-1], weight.shape[0])
