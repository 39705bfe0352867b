"""The few-row CPU projection (`ops.small_linear`, the projections of a decode step) against `F.linear`:
within float32 rounding on random shapes, taken only where it applies, and used by the modules."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from windowed_attention import LocalTransformer
from windowed_attention.generation import decode_step, prefill
from windowed_attention.linear import Linear
from windowed_attention.ops import fused_cpu, small_linear

pytestmark = pytest.mark.skipif(not fused_cpu.available(), reason="the fused CPU kernel is not built here")


@pytest.fixture
def calls(count_calls):
    """How many times the kernel ran."""
    return count_calls(small_linear, "_fused")


def _check(x, weight, bias):
    """`linear` against float64 within the error bound of a float32 sum of K products in any order."""
    out = small_linear.linear(x, weight, bias)
    exact = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
    k = x.shape[-1]
    magnitude = F.linear(x.double().abs(), weight.double().abs()) + (0 if bias is None else bias.double().abs())
    bound = (k + 2) * 2.0**-24 * magnitude + 1e-30
    assert out.shape == exact.shape and out.dtype == torch.float32
    assert ((out.double() - exact).abs() <= bound).all()
    return out


def test_matches_float64_on_random_shapes(calls):
    g = torch.Generator().manual_seed(0)
    taken = 0
    for _ in range(120):
        k = int(torch.randint(1, 700, (1,), generator=g))
        n = int(torch.randint(1, 300, (1,), generator=g))
        lead = [int(torch.randint(1, 9, (1,), generator=g)) for _ in range(int(torch.randint(1, 3, (1,), generator=g)))]
        x = torch.randn(*lead, k, generator=g)
        weight = torch.randn(n, k, generator=g)
        bias = torch.randn(n, generator=g) if torch.rand(1, generator=g) < 0.5 else None
        before = len(calls)
        _check(x, weight, bias)
        rows = x.numel() // k
        assert len(calls) - before == int(small_linear.MIN_ROWS <= rows <= small_linear.MAX_ROWS), (lead, k, n)
        taken += len(calls) - before
    assert taken > 60


@pytest.mark.parametrize("rows", [1, 2, 3, 8, 15, 16, 17, 31, 33, 64])
@pytest.mark.parametrize("n", [1, 3, 4, 7, 16, 17, 40])
def test_every_row_and_output_block(rows, n, calls):
    """Row counts around the vector width and output counts around the block (its tail), with a bias."""
    g = torch.Generator().manual_seed(rows * 100 + n)
    _check(torch.randn(rows, 1, 72, generator=g), torch.randn(n, 72, generator=g), torch.randn(n, generator=g))
    assert calls


def test_not_taken_where_it_does_not_apply(calls):
    x, weight = torch.randn(4, 32), torch.randn(8, 32)
    small_linear.linear(torch.randn(0, 32), weight)  # no row
    small_linear.linear(torch.randn(65, 32), weight)  # many rows
    small_linear.linear(x.double(), weight.double())
    small_linear.linear(x, weight.t().contiguous().t())  # weight not contiguous
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert small_linear.linear(x, weight).dtype == torch.bfloat16
    assert not calls
    # autograd: F.linear, whose gradients these are
    w = weight.clone().requires_grad_()
    small_linear.linear(x, w).sum().backward()
    assert not calls
    torch.testing.assert_close(w.grad, x.sum(0).expand(8, -1))
    with torch.no_grad():
        small_linear.linear(x, w)  # under no_grad it applies
    small_linear.linear(x[:, ::2], torch.randn(8, 16))  # a strided x is made contiguous
    assert len(calls) == 2
    _check(x[:, ::2], torch.randn(8, 16), None)


def test_modules_use_it_to_decode(calls):
    """`Linear` keeps `nn.Linear`'s state dict; a batch's decode step runs its projections in the kernel and
    equals the full forward."""
    layer = Linear(4, 3)
    reference = torch.nn.Linear(4, 3)
    reference.load_state_dict(layer.state_dict())
    assert list(layer.state_dict()) == ["weight", "bias"]
    torch.manual_seed(0)
    model = LocalTransformer(num_tokens=40, max_seq_len=64, dim=32, depth=2, heads=2, dim_head=16,
                             local_attn_window_size=8, use_dynamic_pos_bias=True, gate_values_per_head=True).eval()
    tokens = torch.randint(0, 40, (5, 30))
    logits, caches = prefill(model, tokens[:, :15])
    assert not calls  # 75 rows at once: MKL
    for t in range(15, 30):
        logits, caches = decode_step(model, tokens[:, t:t + 1], caches)
        with torch.no_grad():
            torch.testing.assert_close(logits, model(tokens[:, :t + 1])[:, -1], rtol=1e-4, atol=1e-4)
    assert len(calls) == 15 * (2 * 5 + 1)  # per step: qkv, gate, out, two feed-forward, per layer; the logits


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore:Sparse CSR:UserWarning")
def test_other_inputs_and_transforms_take_f_linear(calls):
    """What the kernel cannot see through gets `F.linear`'s result: no input channels, a negative view,
    a sparse weight, forward-mode AD (under no_grad too) and torch.func; TorchScript, jit.trace and FX of a
    module that uses `Linear` give its results."""
    import torch.autograd.forward_ad as fwAD

    from windowed_attention import FeedForward

    x, weight = torch.randn(3, 8), torch.randn(5, 8)
    with torch.no_grad():
        assert small_linear.linear(torch.randn(2, 0), torch.randn(3, 0), torch.ones(3)).equal(torch.ones(2, 3))
        torch.testing.assert_close(small_linear.linear(x, weight._neg_view()), F.linear(x, -weight))
        torch.testing.assert_close(small_linear.linear(x, weight.to_sparse_csr()), F.linear(x, weight))
        with fwAD.dual_level():
            out = small_linear.linear(fwAD.make_dual(x, torch.ones_like(x)), weight)
            torch.testing.assert_close(fwAD.unpack_dual(out).tangent, F.linear(torch.ones_like(x), weight))
    _, tangent = torch.func.jvp(lambda t: small_linear.linear(t, weight), (x,), (torch.ones_like(x),))
    torch.testing.assert_close(tangent, F.linear(torch.ones_like(x), weight))
    assert not calls
    ff = FeedForward(8).eval()
    with torch.no_grad():
        expected = ff(x)
        assert calls  # the module itself takes the kernel
        for traced in (torch.jit.script(ff), torch.jit.trace(ff, x), torch.fx.symbolic_trace(ff)):
            torch.testing.assert_close(traced(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("m, n, k", [(1, 4096, 1024), (1, 96, 64), (20, 520, 520), (3, 40, 24)])
def test_threads_split_large_products_and_give_the_same_bits(m, n, k):
    """Products of over 2^21 multiply-adds are split among torch's threads, smaller ones run on the calling
    thread (`work_grain.h`): every output is the same sum either way, so two threads give one thread's bits,
    and both stay within rounding of float64."""
    generator = torch.Generator().manual_seed(m * n + k)
    x, weight, bias = (torch.randn(*shape, generator=generator) for shape in ((m, k), (n, k), (n,)))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = small_linear.linear(x, weight, bias)
        torch.set_num_threads(2)
        two = small_linear.linear(x, weight, bias)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    _check(x, weight, bias)
