"""The rotary kernel (`ops/csrc/rotary_cpu.cpp`, used by `apply_rotation` on CPU) against the torch
expression it replaces, `x * cos + rotate_half(x) * sin`, forward and backward, on random shapes, dtypes,
layouts and xpos factors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from windowed_attention.ops import fused_cpu
from windowed_attention.positional import SinusoidalEmbeddings, rotate_half, rotation_tables

TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def _expression(x, cos, sin, factor):
    """The definition, in float64."""
    if factor is not None:
        cos, sin = cos * factor, sin * factor
    x = x.double()
    return x * cos + rotate_half(x) * sin


@settings(max_examples=60, deadline=None)
@given(
    P=st.integers(1, 4), n=st.integers(1, 40), half=st.integers(1, 12), xpos=st.booleans(),
    layout=st.sampled_from(["contiguous", "heads inside rows", "wider rows"]),
    dtype=st.sampled_from(list(TOL)), seed=st.integers(0, 99),
)
def test_rotation_kernel_matches_the_expression(P, n, half, xpos, layout, dtype, seed):
    d = 2 * half
    g = torch.Generator().manual_seed(seed)
    x = {
        "contiguous": lambda: torch.randn(P, n, d, generator=g),
        "heads inside rows": lambda: torch.randn(n, P, d, generator=g).transpose(0, 1),
        "wider rows": lambda: torch.randn(P, n, d + 3, generator=g)[..., 1:1 + d],
    }[layout]().to(dtype)
    emb = SinusoidalEmbeddings(d, use_xpos=xpos, scale_base=8 if xpos else None)
    cos, sin = emb.rotation(torch.arange(n) + seed)
    factor = emb.xpos_scale(torch.arange(n, dtype=torch.float64) - n / 2) if xpos else None
    c, s = rotation_tables(cos, sin, factor, dtype)
    upstream = torch.randn(P, n, d, generator=g, dtype=torch.float64)

    leaf = x.detach().clone().requires_grad_()
    got = fused_cpu.rotate(leaf, c, s)
    (got.double() * upstream).sum().backward()
    ref_leaf = x.detach().double().requires_grad_()
    ref = _expression(ref_leaf, cos, sin, factor)
    (ref * upstream).sum().backward()

    assert got.dtype == dtype and got.shape == x.shape
    scale = max(1.0, ref.abs().max().item())
    assert (got.double() - ref).abs().max().item() <= TOL[dtype] * scale
    grad_scale = max(1.0, ref_leaf.grad.abs().max().item())
    assert (leaf.grad.double() - ref_leaf.grad).abs().max().item() <= TOL[dtype] * grad_scale


def test_modules_take_the_kernel_on_cpu_for_all_but_small_tensors(monkeypatch):
    """`apply_rotation` uses the kernel on CPU where it is built (so the tests above cover the modules' path),
    except for small tensors such as a decoding step's."""
    from windowed_attention import LocalAttention

    assert fused_cpu.available()
    calls = []
    original = fused_cpu.rotate

    def counted(x, *args):
        calls.append(x.shape)
        return original(x, *args)

    monkeypatch.setattr(fused_cpu, "rotate", counted)
    q = torch.randn(2, 3, 256, 8)  # 6144 elements: at least KERNEL_MIN_NUMEL
    LocalAttention(window_size=4, causal=True, dim=8)(q, q, q)
    assert len(calls) == 2  # q and k
    LocalAttention(window_size=4, causal=True, dim=8)(*(q[..., :4, :],) * 3)
    assert len(calls) == 2  # 96 elements: the torch expression
