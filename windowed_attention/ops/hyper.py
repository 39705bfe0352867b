"""The stream mixing of a hyper-connection on CPU in one pass of our kernel (`csrc/hyper_cpu.cpp`).

`residual.HyperConnection` reads a learned, input-dependent mix of `s` residual streams: an RMS norm, a
narrow projection, tanh, and batched `(1 + s, s) @ (s, dim)` matmuls per token. In torch each is a pass
over all the streams, and the backward takes about twice as many; the kernel does the forward in one
pass and the backward in one, per token, in float32 or float64. It is a `torch.library` custom op with a
fake implementation and an autograd formula (double backward raises), so `torch.compile` and
`torch.export` trace through it (code torch.compile traces without grad, such as a compiled decode step,
calls the kernel's own ops instead, registered in C++: see `_kernel_op`); `residual.HyperConnection` keeps the
torch formula (the reference it is tested against) for other devices and dtypes, under autocast, and where
the kernel cannot be built.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import fused_cpu

DTYPES = (torch.float32, torch.float64)


def supports(h: Tensor, *parameters: Tensor) -> bool:
    """Whether the kernel computes the mix of `h` with these parameters here (else the torch formula)."""
    return (h.device.type == "cpu" and h.dtype in DTYPES and all(p.dtype == h.dtype for p in parameters)
            and not torch.is_autocast_enabled("cpu") and fused_cpu.available())


@fused_cpu.custom_op("hyper_mix")
def hyper_mix(h: Tensor, w: Tensor, static_alpha: Tensor, alpha_scale: Tensor, static_beta: Tensor,
              beta_scale: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """`h (T, s, D)`, `w (D, s + 2)` (the gain folded in) -> the block input `x (T, D)`, the remixed streams
    `(T, s, D)`, `beta (T, s)`, and for the backward the tanh values and projections `(T, s, s + 2)` and
    the norms `(T, s)`."""
    return tuple(fused_cpu.kernel().hyper_forward(h, w, static_alpha, alpha_scale, static_beta, beta_scale, scale))


# The kernel's own ops, `windowed_attention_cpu::hyper_forward` and `hyper_write` (the schemas of `hyper_mix` and
# `hyper_write`): their schemas and fakes here, their CPU kernels registered in C++ (`csrc/hyper_cpu.cpp`), so that
# a compiled graph without grad calls the kernels with no Python between (see `_kernel_op`).
_KERNEL_LIBRARY = torch.library.Library("windowed_attention_cpu", "FRAGMENT")
_KERNEL_LIBRARY.define("hyper_forward" + str(hyper_mix._schema).removeprefix("windowed_attention::hyper_mix"))


@torch.library.register_fake(hyper_mix)
@torch.library.register_fake("windowed_attention_cpu::hyper_forward", lib=_KERNEL_LIBRARY)
def _(h, w, static_alpha, alpha_scale, static_beta, beta_scale, scale):
    tokens, s, dim = h.shape
    return (h.new_empty(tokens, dim), h.new_empty(tokens, s, dim), h.new_empty(tokens, s),
            h.new_empty(tokens, s, s + 2), h.new_empty(tokens, s, s + 2), h.new_empty(tokens, s))


@fused_cpu.custom_op("hyper_mix_backward")
def hyper_mix_backward(grad_x: Tensor, grad_remixed: Tensor, grad_beta: Tensor, h: Tensor, w: Tensor,
                       static_alpha: Tensor, alpha_scale: Tensor, static_beta: Tensor, beta_scale: Tensor,
                       scale: float, y: Tensor, p: Tensor, norm: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The gradients of `h, w, static_alpha, alpha_scale, static_beta, beta_scale`."""
    return tuple(fused_cpu.kernel().hyper_backward(grad_x, grad_remixed, grad_beta, h, w, static_alpha, alpha_scale,
                                                   static_beta, beta_scale, scale, y, p, norm))


@torch.library.register_fake(hyper_mix_backward)
def _(grad_x, grad_remixed, grad_beta, h, w, static_alpha, alpha_scale, static_beta, beta_scale, scale, y, p, norm):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format)
                 for t in (h, w, static_alpha, alpha_scale, static_beta, beta_scale))


def _setup(ctx, inputs, output):
    h, w, static_alpha, alpha_scale, static_beta, beta_scale, scale = inputs
    ctx.save_for_backward(h, w, static_alpha, alpha_scale, static_beta, beta_scale, *output[3:])
    ctx.scale = scale
    ctx.mark_non_differentiable(*output[3:])


def _grad(ctx, grad_x, grad_remixed, grad_beta, *_):
    h, w, static_alpha, alpha_scale, static_beta, beta_scale, y, p, norm = ctx.saved_tensors
    grads = [torch.zeros_like(t) if g is None else g.contiguous()
             for g, t in ((grad_x, h[:, 0]), (grad_remixed, h), (grad_beta, h[..., 0]))]
    return (*hyper_mix_backward(*grads, h, w, static_alpha, alpha_scale, static_beta, beta_scale, ctx.scale, y, p, norm),
            None)


_no_double_backward = fused_cpu.no_double_backward(
    "hyper-connection kernel", "set WINDOWED_ATTENTION_NO_FUSED=1 to run the torch formula instead")
torch.library.register_autograd(hyper_mix, _grad, setup_context=_setup)
torch.library.register_autograd(hyper_mix_backward, _no_double_backward)


@fused_cpu.custom_op("hyper_write")
def hyper_write(remixed: Tensor, beta: Tensor, out: Tensor) -> Tensor:
    """The streams after the block: `remixed (T, s, D) + beta (T, s) * out (T, D)` per stream."""
    return fused_cpu.kernel().hyper_write(remixed, beta, out)


_KERNEL_LIBRARY.define(str(hyper_write._schema).removeprefix("windowed_attention::"))


@torch.library.register_fake(hyper_write)
@torch.library.register_fake("windowed_attention_cpu::hyper_write", lib=_KERNEL_LIBRARY)
def _(remixed, beta, out):
    return torch.empty_like(remixed, memory_format=torch.contiguous_format)


@fused_cpu.custom_op("hyper_write_backward")
def hyper_write_backward(grad: Tensor, beta: Tensor, out: Tensor) -> tuple[Tensor, Tensor]:
    """The gradients of `beta` and `out` (that of `remixed` is `grad` itself)."""
    return tuple(fused_cpu.kernel().hyper_write_backward(grad, beta, out))


@torch.library.register_fake(hyper_write_backward)
def _(grad, beta, out):
    return torch.empty_like(beta, memory_format=torch.contiguous_format), torch.empty_like(out, memory_format=torch.contiguous_format)


def _write_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1], inputs[2])


def _write_grad(ctx, grad):
    beta, out = ctx.saved_tensors
    grad = grad.contiguous()
    return (grad, *hyper_write_backward(grad, beta, out))


torch.library.register_autograd(hyper_write, _write_grad, setup_context=_write_setup)
torch.library.register_autograd(hyper_write_backward, _no_double_backward)


def _kernel_op(name: str):
    """In code torch.compile traces without grad (a compiled decode step), the kernel's own op `name`
    (`windowed_attention_cpu::<name>`, registered in C++ for CPU tensors: the graph calls it with no Python in
    between); None elsewhere (the op defined here: its autograd formula; an exported program that loads
    without the kernel)."""
    if torch.compiler.is_compiling() and not torch.is_grad_enabled() and not torch.compiler.is_exporting():
        return getattr(torch.ops.windowed_attention_cpu, name).default  # loaded: `supports` asked
    return None


def write(remixed: Tensor, beta: Tensor, out: Tensor) -> Tensor:
    """`remixed (T, s, D) + beta[..., None] * out[:, None]`: the write-back of `residual.HyperConnection`."""
    return (_kernel_op("hyper_write") or hyper_write)(remixed.contiguous(), beta.contiguous(), out.contiguous())


def mix(h: Tensor, w: Tensor, static_alpha: Tensor, alpha_scale: Tensor, static_beta: Tensor, beta_scale: Tensor,
        scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """`(x (T, D), remixed (T, s, D), beta (T, s))` of the streams `h (T, s, D)` (see the module docstring
    and `residual.HyperConnection`)."""
    x, remixed, beta, *_ = (_kernel_op("hyper_forward") or hyper_mix)(
        h.contiguous(), w.contiguous(), static_alpha.contiguous(), alpha_scale, static_beta.contiguous(), beta_scale,
        float(scale))
    return x, remixed, beta
