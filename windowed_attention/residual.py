"""Residual connections around the transformer's blocks: a plain residual (one stream) or hyper-connections.

Hyper-connections (Zhu et al. 2024, arXiv:2409.19606, the "dynamic" variant with tanh), as local-attention
1.11 uses them through the `hyper-connections` package: the residual is `s` streams `H` `(b, n, s, dim)`.
A block reads a learned, input-dependent mix of the streams and writes its output back to every stream
with learned, input-dependent weights:

    u      = rmsnorm(H)                                              learned gain (1 + gamma), per stream
    alpha  = static_alpha + dynamic_alpha_scale * tanh(u @ dynamic_alpha_fn)        (b, n, s, 1 + s)
    beta   = static_beta + dynamic_beta_scale * tanh(u @ dynamic_beta_fn)           (b, n, s)
    [x, H'] = alpha^T H                        x: the block's input (b, n, dim); H' the remixed streams
    H_next = H' + beta * block(x)

The model copies its embedding into every stream before the first block and sums the streams after the
last. Everything is position-wise, so cached decoding runs the same wrappers on the new position alone.
Parameter names are those of the `hyper-connections` package, so local-attention's state dicts load as
they are (`static_alpha`, `dynamic_alpha_fn`, ..., `norm.gamma`, and the block under `branch`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import reduce, repeat
from torch import nn

from .ops import hyper

# The parameters of a hyper-connection wrapper (not of its branch), as the `hyper-connections` package names them.
HYPER_CONNECTION_PARAMETERS = (
    "static_alpha", "dynamic_alpha_fn", "dynamic_alpha_scale", "static_beta", "dynamic_beta_fn",
    "dynamic_beta_scale", "norm.gamma",
)


def _split_output(out):
    """A block's output: the tensor, and whatever else it returned (a cache) as a tuple."""
    if isinstance(out, tuple):
        return out[0], out[1:]
    return out, None


class Residual(nn.Module):
    """`h + branch(h)` on `h` `(b, n, dim)`: the residual of one stream (no parameters of its own)."""

    def __init__(self, branch: nn.Module):
        super().__init__()
        self.branch = branch

    def forward(self, h, *args, **kwargs):
        out, rest = _split_output(self.branch(h, *args, **kwargs))
        h = h + out
        return h if rest is None else (h, *rest)


NORM_EPS = 1e-12  # as F.normalize


class StreamNorm(nn.Module):
    """RMS norm over the last dim with a learned gain `1 + gamma` (gamma starts at zero). `HyperConnection`
    folds it into its projection; the module holds its parameter (and says what it computes)."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        return F.normalize(x, dim=-1, eps=NORM_EPS) * self.scale * (self.gamma + 1)


class _NormedProjection(torch.autograd.Function):
    """`rmsnorm(h) @ W` without materialising the normalised streams: `h` `(tokens, s, dim)`, `W` `(dim, k)`
    (the gain already folded in) -> `(h @ W) * scale / max(|h|, eps)` `(tokens, s, k)`; the backward in
    three passes over `h` (autograd's takes about twice as many)."""

    @staticmethod
    def forward(ctx, h, weights, scale: float):
        norm = torch.linalg.vector_norm(h, dim=-1, keepdim=True)
        inverse = scale / norm.clamp_min(NORM_EPS)
        projected = h @ weights
        ctx.save_for_backward(h, weights, norm, inverse, projected)
        ctx.scale = scale
        return projected * inverse

    @staticmethod
    def backward(ctx, grad):
        h, weights, norm, inverse, projected = ctx.saved_tensors
        grad = grad.contiguous()
        scaled = grad * inverse  # (tokens, s, k)
        grad_weights = (scaled.flatten(0, 1).t() @ h.flatten(0, 1)).t()  # k x (tokens s) @ (tokens s) x dim: MKL's fast side
        grad_h = scaled @ weights.t()
        # d inverse / d h = -inverse^3 / scale^2 * h where |h| > eps (the clamp is flat below)
        coef = (grad * projected).sum(-1, keepdim=True) * inverse.pow(3) * (-1.0 / ctx.scale**2)
        grad_h.addcmul_(h, coef.masked_fill_(norm <= NORM_EPS, 0.0))
        return grad_h, grad_weights, None


class _Mix(torch.autograd.Function):
    """`alpha` `(tokens, s, 1 + s)`, `h` `(tokens, s, dim)` -> the block input `alpha[:, :, 0]^T h`
    `(tokens, 1, dim)` and the remixed streams `alpha[:, :, 1:]^T h` `(tokens, s, dim)`."""

    @staticmethod
    def forward(ctx, alpha, h):
        ctx.save_for_backward(alpha, h)
        mix = alpha.transpose(1, 2).contiguous()
        return torch.bmm(mix[:, :1], h), torch.bmm(mix[:, 1:], h)

    @staticmethod
    def backward(ctx, grad_x, grad_remixed):
        alpha, h = ctx.saved_tensors
        # contiguous: the gradient of the stream sum after the last block is an expanded view (stride 0 over
        # the streams), which would send the batched matmuls down a per-token loop
        grad_x = torch.zeros_like(h[:, :1]) if grad_x is None else grad_x
        grad_remixed = torch.zeros_like(h) if grad_remixed is None else grad_remixed
        # one (tokens, 1 + s, dim) gradient (a copy, also contiguous: the gradient of the stream sum after
        # the last block is an expanded view) for two batched matmuls without vector-shaped operands (which
        # torch runs as a per-token loop)
        grad_mix = torch.cat((grad_x, grad_remixed), dim=1)
        grad_alpha = torch.bmm(h, grad_mix.transpose(1, 2))  # (tokens, s, 1 + s)
        grad_h = torch.bmm(alpha, grad_mix)
        return grad_alpha, grad_h


class HyperConnection(nn.Module):
    """A block on `s` residual streams `h` `(b, n, s, dim)` (see the module docstring).

    `stream` is the stream the block reads at initialisation (the static mix starts as a one-hot on it
    and the identity on the streams; the dynamic parts start at zero).
    """

    def __init__(self, streams: int, *, dim: int, branch: nn.Module, stream: int = 0):
        super().__init__()
        self.branch = branch
        self.streams = streams
        self.norm = StreamNorm(dim)
        read = torch.zeros(streams, 1)
        read[stream % streams] = 1.0
        self.static_alpha = nn.Parameter(torch.cat((read, torch.eye(streams)), dim=1))  # (s, 1 + s)
        self.dynamic_alpha_fn = nn.Parameter(torch.zeros(dim, streams + 1))
        self.dynamic_alpha_scale = nn.Parameter(torch.tensor(1e-2))
        self.static_beta = nn.Parameter(torch.ones(streams))
        self.dynamic_beta_fn = nn.Parameter(torch.zeros(dim))
        self.dynamic_beta_scale = nn.Parameter(torch.tensor(1e-2))

    def forward(self, h, *args, **kwargs):
        """`h` `(..., s, dim)` -> the streams after the block (and whatever else the block returned).

        Written for few passes over the streams: the RMS norm is folded into the projection
        (`rmsnorm(h) @ W = scale / |h| * (h @ ((1 + gamma) W))`, so the normalised streams are never
        materialised), both dynamic projections are one matmul, the mix is batched matmuls over the
        tokens (`(1 + s, s) @ (s, dim)` per token) and the write-back another (`(s, 1) @ (1, dim)`), with
        hand-written backwards where autograd's would take extra passes (`_NormedProjection`, `_Mix`).
        On CPU in float32/float64 (outside autocast) our kernel computes the same in one pass over the
        streams each way, the mix and the write-back (`ops/hyper.py`; tested against this formula).
        `StreamNorm.forward` and the parity tests hold the plain formula."""
        streams, dim = self.streams, h.shape[-1]
        lead = h.shape[:-2]
        h = h.reshape(-1, streams, dim)  # (tokens, s, dim)
        weights = torch.cat((self.dynamic_alpha_fn, self.dynamic_beta_fn[:, None]), dim=1) * (self.norm.gamma + 1)[:, None]
        parameters = (weights, self.static_alpha, self.dynamic_alpha_scale, self.static_beta, self.dynamic_beta_scale)
        if hyper.supports(h, *parameters):  # the same formula in one pass of our CPU kernel, each way
            x, remixed, beta = hyper.mix(h, *parameters, self.norm.scale)
            out, rest = _split_output(self.branch(x.view(*lead, dim), *args, **kwargs))
            h = hyper.write(remixed, beta, out.reshape(-1, dim)).view(*lead, streams, dim)
            return h if rest is None else (h, *rest)
        dynamic = torch.tanh(_NormedProjection.apply(h, weights, self.norm.scale))  # (tokens, s, 1 + s + 1)
        alpha = self.static_alpha + dynamic[..., :-1] * self.dynamic_alpha_scale  # (tokens, s, 1 + s)
        beta = self.static_beta + dynamic[..., -1] * self.dynamic_beta_scale  # (tokens, s)
        x, remixed = _Mix.apply(alpha, h)  # (tokens, 1, dim), (tokens, s, dim)
        out, rest = _split_output(self.branch(x.view(*lead, dim), *args, **kwargs))
        h = torch.baddbmm(remixed, beta[..., None], out.reshape(-1, 1, dim)).view(*lead, streams, dim)
        return h if rest is None else (h, *rest)


def expand_streams(x: torch.Tensor, streams: int) -> torch.Tensor:
    """`(b, n, dim)` -> `(b, n, s, dim)`: every stream starts as the input (unchanged for one stream)."""
    # a real copy: an expanded view (stride 0 over the streams) would send every batched matmul of the first
    # block down a per-token loop
    return x if streams == 1 else repeat(x, "... d -> ... s d", s=streams).contiguous()


def reduce_streams(h: torch.Tensor, streams: int) -> torch.Tensor:
    """`(b, n, s, dim)` -> `(b, n, dim)`: the sum of the streams (unchanged for one stream)."""
    return h if streams == 1 else reduce(h, "... s d -> ... d", "sum")


def wrap(branch: nn.Module, streams: int, dim: int, index: int) -> nn.Module:
    """`branch` as a residual block of a model with `streams` streams; `index` counts the model's blocks
    (block `index` starts by reading stream `index % streams`)."""
    if streams == 1:
        return Residual(branch)
    return HyperConnection(streams, dim=dim, branch=branch, stream=index)
