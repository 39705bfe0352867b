"""The feed-forward's gate in our CPU kernel (`ops.geglu`, eager calls without autograd) against
`a * F.gelu(g)`: within float32 rounding on random shapes, taken only where it applies, used by the modules."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from windowed_attention import FeedForward, LocalTransformer
from windowed_attention.generation import decode_step, prefill
from windowed_attention.ops import fused_cpu, geglu

pytestmark = pytest.mark.skipif(not fused_cpu.available(), reason="the fused CPU kernel is not built here")


@pytest.fixture
def calls(count_calls):
    """How many times the kernel ran."""
    return count_calls(geglu, "_fused")


def _exact(x: torch.Tensor) -> torch.Tensor:
    """`a * gelu(g)` in float64, from the definition."""
    a, g = x.double().chunk(2, dim=-1)
    return a * g * 0.5 * (1 + torch.erf(g / math.sqrt(2)))


def test_matches_the_definition_on_random_shapes(calls):
    """Rows of any count and halves around the vector widths (the scalar tail), large and small gates."""
    g = torch.Generator().manual_seed(0)
    for case in range(60):
        e = int(torch.randint(1, 300, (1,), generator=g)) if case % 3 else 16 * int(torch.randint(1, 9, (1,), generator=g))
        lead = [int(torch.randint(1, 6, (1,), generator=g)) for _ in range(int(torch.randint(1, 3, (1,), generator=g)))]
        x = torch.randn(*lead, 2 * e, generator=g) * float(torch.rand(1, generator=g) * 8)
        with torch.no_grad():
            out = geglu.geglu(x)
        exact = _exact(x)
        a, gate = x.double().abs().chunk(2, dim=-1)
        assert out.shape == exact.shape and out.dtype == torch.float32
        # float32 roundings of the products, and erf's few ulp of 1 (which 1 + erf cancels for negative gates)
        assert ((out.double() - exact).abs() <= 1e-6 * exact.abs() + 2e-7 * a * gate + 1e-30).all(), (lead, e)
    assert len(calls) == 60


def test_not_taken_where_it_does_not_apply(calls):
    x = torch.randn(3, 10)
    geglu.geglu(x.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        geglu.geglu(x)
    w = x.clone().requires_grad_()
    geglu.geglu(w).sum().backward()  # training: autograd's gelu, whose gradient this is
    assert not calls
    a, g = x.chunk(2, dim=-1)
    gelu_grad = 0.5 * (1 + torch.erf(g / math.sqrt(2))) + g * torch.exp(-g * g / 2) / math.sqrt(2 * math.pi)
    torch.testing.assert_close(w.grad, torch.cat([F.gelu(g), a * gelu_grad], dim=-1))
    _, tangent = torch.func.jvp(geglu.geglu, (x,), (torch.ones_like(x),))
    assert not calls
    with torch.no_grad():
        torch.testing.assert_close(geglu.geglu(x[:, ::1].t().contiguous().t()), _exact(x).float())  # strided: copied
        geglu.geglu(torch.randn(0, 8))
    assert len(calls) == 2


def test_feedforward_uses_it_and_matches_training_mode(calls):
    """The module's no-grad forward takes the kernel and equals its autograd forward (torch's gelu); TorchScript
    keeps torch's branch."""
    torch.manual_seed(0)
    ff = FeedForward(24).eval()
    x = torch.randn(2, 5, 24)
    trained = ff(x)
    assert not calls
    with torch.no_grad():
        torch.testing.assert_close(ff(x), trained, rtol=1e-5, atol=1e-6)
        assert len(calls) == 1
        torch.testing.assert_close(torch.jit.script(ff)(x), trained, rtol=1e-5, atol=1e-6)


def test_a_decode_step_takes_it_and_equals_the_full_forward(calls):
    torch.manual_seed(0)
    model = LocalTransformer(num_tokens=40, max_seq_len=64, dim=32, depth=2, heads=2, dim_head=16,
                             local_attn_window_size=8).eval()
    tokens = torch.randint(0, 40, (3, 24))
    logits, caches = prefill(model, tokens[:, :12])
    for t in range(12, 24):
        before = len(calls)
        logits, caches = decode_step(model, tokens[:, t:t + 1], caches)
        assert len(calls) - before == 2  # a gate per layer
        with torch.no_grad():
            torch.testing.assert_close(logits, model(tokens[:, :t + 1])[:, -1], rtol=1e-4, atol=1e-4)


def test_tracers_see_the_op_or_torch_gelu():
    """make_fx records the kernel's op (its replay computes the same) or, with fake tensors, torch's gelu."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    from windowed_attention.feedforward import GEGLU

    x = torch.randn(3, 10)
    with torch.no_grad():
        expected = GEGLU()(x)
        for mode, op in (("real", "windowed_attention_cpu.geglu.default"), ("fake", "aten.gelu.default")):
            graph = make_fx(GEGLU(), tracing_mode=mode)(x)
            assert op in {str(node.target) for node in graph.graph.nodes}, mode
            torch.testing.assert_close(graph(x), expected)
        with FakeTensorMode() as fake:
            assert GEGLU()(fake.from_tensor(x)).shape == (3, 5)


@pytest.mark.parametrize("e", [1, 7, 16, 23, 40])
def test_non_finite_gates_as_torch_in_every_lane(calls, e):
    """Infinities and NaN in the gate or the value, in the vector lanes and in the row's tail: the same
    infinities and NaN as the path without the kernel, `a * F.gelu(g)` on the halves (gelu(+inf) = +inf; torch's
    oneDNN route, taken for a contiguous gate, gives NaN there, its own kernel +inf)."""
    specials = torch.tensor([float("inf"), float("-inf"), float("nan"), 1e30, -1e30, 0.0, 3.0, -3.0])
    rows = []
    for where in range(e):
        for value in specials:
            for side in (0, 1):
                row = torch.ones(2 * e)
                row[side * e + where] = value
                rows.append(row)
    x = torch.stack(rows)
    with torch.no_grad():
        out = geglu.geglu(x)
    a, g = x.chunk(2, dim=-1)
    expected = a * F.gelu(g)
    assert len(calls) == 1
    # finite entries within float32 rounding (erf's few ulp of 1, cancelled by 1 + erf for negative gates)
    torch.testing.assert_close(out, expected, equal_nan=True, rtol=1e-6, atol=1e-6)
    assert torch.equal(out.isnan(), expected.isnan()) and torch.equal(out.isinf(), expected.isinf())
