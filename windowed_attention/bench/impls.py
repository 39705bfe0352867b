"""The implementations under test, each as `make(n, w, dtype, *, exact, rotary) -> (fn, inputs)`.

Shapes follow the issue: `q, k, v (B=1, H=8, n, D=64)`, causal, `look_backward=1`. `fn(*inputs)` returns
the attention output; inputs that need gradients have `requires_grad` set by the caller.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from windowed_attention import LocalAttention, local_attention
from windowed_attention.compiling import inductor_options
from windowed_attention.ops import sdpa_blocks
from windowed_attention.ops.spec import WindowSpec

HEADS, DIM = 8, 64


def qkv(n: int, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, HEADS, n, DIM, generator=g).to(dtype) for _ in range(3))


def ours(n, w, dtype=torch.float32, exact=False, rotary_pos=False, backend="auto"):
    """Our op as users call it (`auto`: the fused CPU kernel when built); with rotary, our `LocalAttention`
    module (rotary inside, as local-attention's module does it)."""
    if rotary_pos:
        if backend != "auto":
            raise ValueError("rotary runs through the LocalAttention module, which always takes backend='auto'")
        module = LocalAttention(window_size=w, causal=True, look_backward=1, exact_windowsize=exact, dim=DIM)
        return lambda q, k, v: module(q, k, v)

    def fn(q, k, v):
        return local_attention(q, k, v, window_size=w, causal=True, look_backward=1, exact_windowsize=exact, backend=backend)

    return fn


def ours_sdpa(n, w, dtype=torch.float32, exact=False, rotary_pos=False):
    """Our `sdpa` backend (PyTorch's fused CPU flash kernel per chunk of windows), for comparison."""
    return ours(n, w, dtype, exact, rotary_pos, backend="sdpa")


def theirs(n, w, dtype=torch.float32, exact=False, rotary_pos=False):
    """lucidrains' LocalAttention (rotary applied inside when `dim` is given)."""
    from local_attention import LocalAttention

    module = LocalAttention(window_size=w, causal=True, look_backward=1, look_forward=0, exact_windowsize=exact,
                            dim=DIM if rotary_pos else None, use_rotary_pos_emb=rotary_pos)
    return lambda q, k, v: module(q, k, v)


def dense_sdpa(n, w, dtype=torch.float32, exact=False, rotary_pos=False):
    """One SDPA call over the whole sequence with an `(n, n)` band mask: O(n^2), for reference only."""
    spec = WindowSpec(w, True, 1, 0, exact)
    i = torch.arange(n)
    band = spec.visible(i[:, None], i[None, :], n)
    return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=band)


def compiled_flex(n, w, dtype=torch.float32, exact=False, rotary_pos=False):
    """`torch.compile(flex_attention)` with the window block mask (forward only on CPU)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def mask_mod(b, h, i, j):
        ok = (j <= i) & (j // w >= i // w - 1)
        return ok & (i - j <= w) if exact else ok

    block_mask = create_block_mask(mask_mod, None, None, n, n, device="cpu")
    # A fresh compile per shape: past dynamo's recompile limit flex would silently fall back to an
    # unfused implementation that materialises the n x n scores.
    torch._dynamo.reset()
    flex = torch.compile(flex_attention, dynamic=False, options=inductor_options())
    return lambda q, k, v: flex(q, k, v, block_mask=block_mask)


IMPLS = {"ours": ours, "ours-sdpa": ours_sdpa, "local-attention": theirs, "dense-sdpa": dense_sdpa, "flex-compiled": compiled_flex}


def installed(name: str) -> bool:
    if name == "local-attention":
        try:
            import local_attention  # noqa: F401
        except ImportError:
            return False
    if name == "ours":
        return True
    return True


def useful_flops(n: int, w: int, exact: bool, backward: bool) -> float:
    """Matmul flops of the visible (query, key) pairs: 4 d per pair forward, x3.5 with backward."""
    spec = WindowSpec(w, True, 1, 0, exact)
    pairs = int(sdpa_blocks.block_visibility(spec, 0, -(-n // w), n, "cpu").sum())
    flops = 4.0 * HEADS * DIM * pairs
    return flops * 3.5 if backward else flops
