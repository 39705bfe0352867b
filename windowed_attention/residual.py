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
        materialised), both dynamic projections are one matmul, the mix is one batched matmul over the
        tokens (`(1 + s, s) @ (s, dim)` per token) and the write-back another (`(s, 1) @ (1, dim)`)."""
        streams, dim = self.streams, h.shape[-1]
        lead = h.shape[:-2]
        h = h.reshape(-1, streams, dim)  # (tokens, s, dim)
        weights = torch.cat((self.dynamic_alpha_fn, self.dynamic_beta_fn[:, None]), dim=1) * (self.norm.gamma + 1)[:, None]
        inverse_norm = self.norm.scale / torch.linalg.vector_norm(h, dim=-1, keepdim=True).clamp_min(NORM_EPS)
        dynamic = torch.tanh((h @ weights) * inverse_norm)  # (tokens, s, 1 + s + 1)
        alpha = self.static_alpha + dynamic[..., :-1] * self.dynamic_alpha_scale  # (tokens, s, 1 + s)
        beta = self.static_beta + dynamic[..., -1] * self.dynamic_beta_scale  # (tokens, s)
        # (tokens, 1 + s, dim): the block's input and the remixed streams; split (not sliced) so that the
        # backward concatenates the two gradients instead of zero-filling one per slice
        x, remixed = torch.bmm(alpha.transpose(1, 2).contiguous(), h).split((1, streams), dim=1)
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
