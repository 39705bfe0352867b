"""The functional op `local_attention` against the dense oracle (tests/oracle.py), on random configurations.

Semantics come from docs/semantics.md ("The op", "Errors"). Hypothesis draws window sizes, look-around, causality,
exact windows, masks (including rows that see nothing), biases, shared-qk, scales, leading dims and
lengths that are not multiples of the window.
"""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field

import pytest
import torch
from hypothesis import given, reject, settings
from hypothesis import strategies as st

from oracle import oracle_attention, visibility
from windowed_attention import local_attention
from windowed_attention.ops import backends

LEADING = [(), (1,), (2,), (2, 2), (2, 3), (1, 2, 2)]  # 0 to 3 leading dims
BACKENDS = ["auto", "reference"]


def _cpu_backends() -> list[str]:
    """Every backend that runs on CPU here with gradients, by name (each is checked against the oracle too;
    flex computes only the forward on CPU, compiled: test_backends and test_modern check it)."""
    usable = []
    for name in backends.names():
        if name == "flex":
            continue
        try:
            backends.check_name(name, torch.device("cpu"))
        except ValueError:
            continue
        usable.append(name)
    return ["auto", *usable]


ORACLE_BACKENDS = _cpu_backends()
DROPOUT_BACKENDS = [name for name in ORACLE_BACKENDS if name in ("auto", "reference", "fused")]  # those with dropout


def _few(divisor: int) -> int:
    """A fraction of the profile's example budget, for the heavier tests."""
    return max(5, settings.default.max_examples // divisor)


def _divisors(p: int) -> list[int]:
    return [x for x in range(1, p + 1) if p % x == 0]


def _batch_sizes(draw, packed: int) -> int:
    """A divisor of the packed batch, usually a proper one (where the broadcast rule matters)."""
    proper = [x for x in _divisors(packed) if 1 < x < packed]
    if proper and draw(st.booleans()):
        return draw(st.sampled_from(proper))
    return draw(st.sampled_from(_divisors(packed)))


@dataclass
class Case:
    """One drawn configuration: the op's keywords plus the shapes and tensors' seed."""

    lead: tuple
    n: int
    d: int
    dv: int
    seed: int
    kwargs: dict = field(default_factory=dict)
    mask_batch: int | None = None
    mask_keep: float = 1.0
    bias_heads: int | None = None
    k_is_q: bool = False

    @property
    def packed(self) -> int:
        return math.prod(self.lead)

    @property
    def span(self) -> int:
        kw = self.kwargs
        lf = kw.get("look_forward")
        if lf is None:
            lf = 0 if kw.get("causal", False) else 1
        return kw.get("look_backward", 1) + lf + 1

    def tensors(self, dtype=torch.float64):
        """q, k, v and the optional mask / attn_bias, deterministic in `seed`."""
        g = torch.Generator().manual_seed(self.seed)
        q = torch.randn(*self.lead, self.n, self.d, generator=g, dtype=torch.float64)
        k = q.clone() if self.k_is_q else torch.randn(*self.lead, self.n, self.d, generator=g, dtype=torch.float64)
        v = torch.randn(*self.lead, self.n, self.dv, generator=g, dtype=torch.float64)
        mask = bias = None
        if self.mask_batch is not None:
            mask = torch.rand(self.mask_batch, self.n, generator=g) < self.mask_keep
        if self.bias_heads is not None:
            w = self.kwargs["window_size"]
            bias = torch.randn(self.bias_heads, w, self.span * w, generator=g, dtype=torch.float64)
        q, k, v = (t.to(dtype) for t in (q, k, v))
        if bias is not None:
            bias = bias.to(dtype)
        return q, k, v, mask, bias


@st.composite
def cases(draw, max_n: int = 150) -> Case:
    causal = draw(st.booleans())
    window_size = draw(st.one_of(st.integers(1, 8), st.integers(1, 64)))
    look_backward = draw(st.integers(0, 2))
    if causal:
        look_forward = draw(st.sampled_from([None, 0]))
    else:
        look_forward = draw(st.one_of(st.none(), st.integers(0, 2)))
    kwargs = dict(window_size=window_size, causal=causal, look_backward=look_backward,
                  exact_windowsize=draw(st.booleans()))
    if look_forward is not None or draw(st.booleans()):
        kwargs["look_forward"] = look_forward  # None passed explicitly, or left to the default
    windows = draw(st.integers(0, 3))
    remainder = draw(st.integers(0, window_size - 1))
    n = min(max(1, windows * window_size + remainder), max_n)
    lead = draw(st.sampled_from(LEADING))
    case = Case(lead=lead, n=n, d=draw(st.integers(1, 8)), dv=draw(st.integers(1, 6)),
                seed=draw(st.integers(0, 2**31 - 1)), kwargs=kwargs)
    packed = case.packed
    if draw(st.booleans()):
        case.mask_batch = _batch_sizes(draw, packed)
        case.mask_keep = draw(st.sampled_from([0.0, 0.15, 0.5, 0.9, 1.0]))
    if draw(st.booleans()):
        case.bias_heads = _batch_sizes(draw, packed)
    if draw(st.booleans()):
        kwargs["scale"] = draw(st.floats(0.05, 3.0))
    if draw(st.booleans()):
        kwargs["shared_qk"] = True
        case.k_is_q = draw(st.booleans())
    return case


def _op_or_reject(q, k, v, mask, bias, backend, kwargs):
    """`local_attention` on `backend`; an explicit backend that says it does not support these options
    rejects the example instead of failing it."""
    try:
        return local_attention(q, k, v, mask=mask, attn_bias=bias, backend=backend, **kwargs)
    except ValueError as error:
        if backend not in ("auto", "reference") and str(error).startswith(f"backend {backend!r}"):
            reject()
        raise


def _run_both(case: Case, dtype, backend="auto", requires_grad=False):
    q, k, v, mask, bias = case.tensors(dtype)
    leaves = [q, k, v] + ([bias] if bias is not None else [])
    for t in leaves:
        t.requires_grad_(requires_grad)
    out = _op_or_reject(q, k, v, mask, bias, backend, case.kwargs)
    # the oracle gets its own float64 copies so gradients are separate
    oq, ok, ov = (t.detach().to(torch.float64).requires_grad_(requires_grad) for t in (q, k, v))
    ob = None if bias is None else bias.detach().to(torch.float64).requires_grad_(requires_grad)
    ref = oracle_attention(oq, ok, ov, mask=mask, attn_bias=ob, **case.kwargs)
    return out, ref, (q, k, v, bias), (oq, ok, ov, ob)


# -- forward and backward against the oracle ------------------------------------------------------


@given(case=cases(), backend=st.sampled_from(ORACLE_BACKENDS))
def test_float64_forward_and_backward_match_oracle(case, backend):
    out, ref, ins, oracle_ins = _run_both(case, torch.float64, backend, requires_grad=True)
    assert out.shape == ref.shape == (*case.lead, case.n, case.dv)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-9)

    upstream = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(case.seed + 1))
    (out * upstream).sum().backward()
    (ref * upstream).sum().backward()
    for name, a, b in zip("q k v attn_bias".split(), ins, oracle_ins):
        if a is None:
            continue
        assert a.grad is not None, f"no gradient for {name}"
        assert torch.isfinite(a.grad).all(), f"non-finite gradient for {name}"
        torch.testing.assert_close(a.grad, b.grad, atol=1e-9, rtol=1e-8, msg=lambda m: f"grad of {name}: {m}")


LOW_PRECISION_TOL = {
    torch.float32: dict(atol=2e-5, rtol=2e-4),
    torch.bfloat16: dict(atol=6e-2, rtol=4e-2),
    torch.float16: dict(atol=1e-2, rtol=1e-2),
}


@given(case=cases(), dtype=st.sampled_from(list(LOW_PRECISION_TOL)), backend=st.sampled_from(ORACLE_BACKENDS))
def test_low_precision_forward_matches_oracle(case, dtype, backend):
    case.kwargs["scale"] = min(case.kwargs.get("scale", 1.0), 1.0)  # keep logits O(1) for bf16
    out, ref, _, _ = _run_both(case, dtype, backend)
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.to(torch.float64), ref, **LOW_PRECISION_TOL[dtype])


# -- grouped-query attention: k, v with fewer heads than q ------------------------------------------

GQA_LEADING = [(2,), (4,), (6,), (2, 4), (1, 6), (2, 2, 4)]  # the last leading dim is the head dim


@st.composite
def grouped_cases(draw):
    """A drawn case whose head dim (the one before n) has a kv head count dividing it."""
    case = draw(cases(max_n=70))
    case.lead = draw(st.sampled_from(GQA_LEADING))
    heads = case.lead[-1]
    kv_heads = draw(st.sampled_from([x for x in _divisors(heads) if x < heads]))
    if case.mask_batch is not None:
        case.mask_batch = _batch_sizes(draw, case.packed)
    if case.bias_heads is not None:
        case.bias_heads = _batch_sizes(draw, case.packed)
    case.k_is_q = False
    return case, kv_heads


@settings(max_examples=_few(2))
@given(drawn=grouped_cases(), backend=st.sampled_from(ORACLE_BACKENDS))
def test_grouped_query_attention_matches_oracle_with_repeated_heads(drawn, backend):
    """q (..., h, n, d) with k, v (..., h_kv, n, d): query head i uses kv head i // (h // h_kv), and the
    k, v gradients are summed over the heads that share them (the oracle repeats the heads)."""
    case, kv_heads = drawn
    q, k, v, mask, bias = case.tensors(torch.float64)
    group = case.lead[-1] // kv_heads
    k, v = k[..., ::group, :, :].clone(), v[..., ::group, :, :].clone()  # (..., h_kv, n, d)
    leaves = [t.requires_grad_(True) for t in (q, k, v)]
    out = _op_or_reject(q, k, v, mask, bias, backend, case.kwargs)
    oracle_leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    oq, ok, ov = oracle_leaves
    ref = oracle_attention(oq, ok.repeat_interleave(group, dim=-3), ov.repeat_interleave(group, dim=-3), mask=mask,
                           attn_bias=bias, **case.kwargs)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-9)
    upstream = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(case.seed + 1))
    (out * upstream).sum().backward()
    (ref * upstream).sum().backward()
    for name, a, b in zip("qkv", leaves, oracle_leaves):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-9, rtol=1e-8, msg=lambda m: f"grad of {name}: {m}")


@pytest.mark.parametrize("backend", ["reference", "sdpa", "fused"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_query_attention_in_low_precision(backend, dtype):
    if backend not in ORACLE_BACKENDS:
        pytest.skip(f"{backend} is not available here")
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 8, 100, 16, generator=g).to(dtype)
    k, v = (torch.randn(2, 2, 100, 16, generator=g).to(dtype) for _ in range(2))
    kw = dict(window_size=16, causal=True, look_backward=2, exact_windowsize=True)
    out = local_attention(q, k, v, backend=backend, **kw)
    ref = oracle_attention(q, k.repeat_interleave(4, dim=1), v.repeat_interleave(4, dim=1), **kw)
    torch.testing.assert_close(out.double(), ref, **LOW_PRECISION_TOL[dtype])


@settings(max_examples=_few(3))
@given(case=cases(max_n=20), backend=st.sampled_from(BACKENDS))
def test_gradcheck(case, backend):
    case.lead = case.lead[:1]  # keep gradcheck's numerical Jacobian tiny
    if case.mask_batch is not None:
        case.mask_batch = 1
    if case.bias_heads is not None:
        case.bias_heads = 1
    case.d, case.dv = min(case.d, 3), min(case.dv, 3)
    case.k_is_q = False
    q, k, v, mask, bias = case.tensors(torch.float64)
    inputs = [q, k, v] + ([bias] if bias is not None else [])
    for t in inputs:
        t.requires_grad_(True)

    def fn(q, k, v, *maybe_bias):
        return local_attention(q, k, v, mask=mask, attn_bias=maybe_bias[0] if maybe_bias else None,
                               backend=backend, **case.kwargs)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_and_bias_broadcast_over_packed_rows(backend):
    """Row p = (b, h) of (b, h, n, d) uses mask[b] (p // (P // b)) and attn_bias[h] (p % heads)."""
    torch.manual_seed(0)
    b, h, n, d, w = 2, 3, 11, 4, 3
    q, k, v = (torch.randn(b, h, n, d, dtype=torch.float64) for _ in range(3))
    mask = torch.rand(b, n) < 0.7
    bias = torch.randn(h, w, 3 * w, dtype=torch.float64)
    out = local_attention(q, k, v, window_size=w, mask=mask, attn_bias=bias, backend=backend)
    for bi in range(b):
        for hi in range(h):
            one = local_attention(q[bi, hi], k[bi, hi], v[bi, hi], window_size=w, mask=mask[bi : bi + 1],
                                  attn_bias=bias[hi : hi + 1], backend=backend)
            torch.testing.assert_close(out[bi, hi], one, atol=1e-12, rtol=0)
    torch.testing.assert_close(out, oracle_attention(q, k, v, window_size=w, mask=mask, attn_bias=bias),
                               atol=1e-12, rtol=0)


# -- rows that see nothing ----------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shared_qk", [False, True])
def test_rows_that_see_nothing_are_exact_zeros_with_zero_grads(backend, causal, shared_qk):
    torch.manual_seed(0)
    b, h, n, d, w = 2, 2, 13, 4, 3
    q, k, v = (torch.randn(b, h, n, d, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[0] = False  # batch 0: every row sees nothing
    mask[1, :6] = False  # batch 1, window 0 and 1 (positions 0..5): with look_backward=0, nothing visible
    out = local_attention(q, k, v, window_size=w, causal=causal, look_backward=0, look_forward=0,
                          mask=mask, shared_qk=shared_qk, backend=backend)
    assert torch.isfinite(out).all()
    assert (out[0] == 0).all()
    assert (out[1, :, :6] == 0).all()
    assert (out[1, :, 6:].abs().sum(-1) > 0).all()
    out.sum().backward()
    for name, t in zip("qkv", (q, k, v)):
        assert torch.isfinite(t.grad).all(), name
        assert (t.grad[0] == 0).all(), name
        assert (t.grad[1, :, :6] == 0).all(), name
    assert (q.grad[1, :, 6:] != 0).any()


def test_shared_qk_attends_to_itself_only_when_nothing_else_is_visible():
    torch.manual_seed(0)
    x, v = torch.randn(2, 10, 4, dtype=torch.float64), torch.randn(2, 10, 3, dtype=torch.float64)
    # window 1, no look-around: each query sees only itself, so it must take its own value
    out = local_attention(x, x, v, window_size=1, look_backward=0, look_forward=0, shared_qk=True)
    torch.testing.assert_close(out, v, atol=1e-12, rtol=0)
    # with neighbours visible, the weight on itself is ~exp(-5e4): output is a mix of the others only
    out = local_attention(x, x, v, window_size=2, look_backward=0, look_forward=0, shared_qk=True)
    partner = v.view(2, 5, 2, 3).flip(2).reshape(2, 10, 3)
    torch.testing.assert_close(out, partner, atol=1e-12, rtol=0)


def test_empty_sequence_gives_empty_output():
    q = torch.randn(2, 3, 0, 4)
    out = local_attention(q, q, torch.randn(2, 3, 0, 5), window_size=4)
    assert out.shape == (2, 3, 0, 5)


def test_d_v_different_from_d_and_no_leading_dims():
    q, k, v = torch.randn(5, 4), torch.randn(5, 4), torch.randn(5, 7)
    out = local_attention(q, k, v, window_size=2)
    assert out.shape == (5, 7)
    torch.testing.assert_close(out.double(), oracle_attention(q, k, v, window_size=2), atol=1e-5, rtol=1e-5)


def test_non_causal_look_forward_default_is_one_and_causal_default_is_zero():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 1, 12, 4, dtype=torch.float64).unbind(0)
    for causal, lf in ((False, 1), (True, 0)):
        a = local_attention(q, k, v, window_size=3, causal=causal)
        b = local_attention(q, k, v, window_size=3, causal=causal, look_forward=lf)
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    # and the default really looks ahead: differs from look_forward=0
    a = local_attention(q, k, v, window_size=3)
    b = local_attention(q, k, v, window_size=3, look_forward=0)
    assert not torch.allclose(a, b)


def test_oracle_visibility_matches_the_definition_on_a_picture():
    # w=2, look_backward=1, look_forward=0, causal, exact: i sees j in [i-2, i]
    vis = visibility(6, 2, causal=True, look_backward=1, exact_windowsize=True).int()
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [0, 1, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 0, 1, 1, 1],
    ])
    assert torch.equal(vis, expected)
    vis = visibility(5, 2, look_backward=0, look_forward=1).int()  # blocks {0,1},{2,3},{4}
    expected = torch.tensor([
        [1, 1, 1, 1, 0],
        [1, 1, 1, 1, 0],
        [0, 0, 1, 1, 1],
        [0, 0, 1, 1, 1],
        [0, 0, 0, 0, 1],
    ])
    assert torch.equal(vis, expected)


# -- dropout ----------------------------------------------------------------------------------


def _one_hot_problem(n=12, w=4, causal=False):
    """v = identity, so the output rows are the attention weights themselves."""
    torch.manual_seed(1)
    q, k = torch.randn(2, 1, n, 4, dtype=torch.float64).unbind(0)
    v = torch.eye(n, dtype=torch.float64)[None]
    mask = torch.ones(1, n, dtype=torch.bool)
    mask[0, :w] = False  # with look_backward=0 and look_forward=0, the first window sees nothing
    kw = dict(window_size=w, causal=causal, look_backward=1 if causal else 0,
              look_forward=0 if causal else 1, mask=mask)
    return q, k, v, kw


@pytest.mark.parametrize("backend", DROPOUT_BACKENDS)
def test_dropout_changes_output_and_is_reproducible_with_a_seed(backend):
    q, k, v, kw = _one_hot_problem()
    clean = local_attention(q, k, v, backend=backend, **kw)
    torch.manual_seed(123)
    a = local_attention(q, k, v, dropout_p=0.5, backend=backend, **kw)
    torch.manual_seed(123)
    b = local_attention(q, k, v, dropout_p=0.5, backend=backend, **kw)
    torch.manual_seed(124)
    c = local_attention(q, k, v, dropout_p=0.5, backend=backend, **kw)
    assert torch.equal(a, b)
    assert not torch.equal(a, clean)
    assert not torch.equal(a, c)
    # dropout_p=0 is exactly the undropped op
    assert torch.equal(local_attention(q, k, v, dropout_p=0.0, backend=backend, **kw), clean)


@pytest.mark.parametrize("backend", DROPOUT_BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_dropout_zeroes_weights_and_rescales_the_rest(backend, causal):
    p = 0.3
    q, k, v, kw = _one_hot_problem(n=40, w=5, causal=causal)
    ref = oracle_attention(q, k, v, **kw)[0]  # (n, n) weights
    kept = dropped = 0
    for seed in range(20):
        torch.manual_seed(seed)
        out = local_attention(q, k, v, dropout_p=p, backend=backend, **kw)[0]
        assert torch.isfinite(out).all()
        assert (out[ref == 0] == 0).all(), "dropout must not create weight where there was none"
        zero = out == 0
        torch.testing.assert_close(out[~zero], ref[~zero] / (1 - p), atol=1e-12, rtol=1e-10)
        dropped += int((zero & (ref > 0)).sum())
        kept += int((~zero).sum())
    total = dropped + kept
    sigma = math.sqrt(total * p * (1 - p))
    assert abs(dropped - p * total) < 6 * sigma, (dropped, total)


@pytest.mark.parametrize("backend", DROPOUT_BACKENDS)
def test_dropout_expectation_equals_undropped_output(backend):
    p, draws = 0.4, 250
    torch.manual_seed(5)
    q, k, v = torch.randn(3, 2, 10, 4, dtype=torch.float64).unbind(0)
    kw = dict(window_size=3, look_backward=1, look_forward=1)
    clean = local_attention(q, k, v, backend=backend, **kw)
    torch.manual_seed(0)
    mean = sum(local_attention(q, k, v, dropout_p=p, backend=backend, **kw) for _ in range(draws)) / draws
    # per-entry std of the mean <= max|v| * sqrt(p / (1 - p) / draws) ~ 0.04 * max|v|
    bound = 6 * v.abs().max() * math.sqrt(p / (1 - p) / draws)
    assert (mean - clean).abs().max() < bound
    assert (mean - clean).abs().max() > 0


# -- validation ---------------------------------------------------------------------------------

# (argument name the message must contain, overrides of the valid call, packed-shape note)
N, D, W = 8, 4, 2


def _valid():
    """A valid call: q, k, v (2, 2, 8, 4), window 2, look-around 1/1 (span 3)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, N, D) for _ in range(3))
    return dict(q=q, k=k, v=v, window_size=W, look_backward=1, look_forward=1)


BAD_CALLS = [
    ("window_size", dict(window_size=0)),
    ("window_size", dict(window_size=-1)),
    ("window_size", dict(window_size=1.5)),
    ("window_size", dict(window_size=True)),
    ("window_size", dict(window_size=None)),
    ("window_size", dict(window_size="4")),
    ("look_backward", dict(look_backward=-1)),
    ("look_backward", dict(look_backward=0.5)),
    ("look_backward", dict(look_backward=None)),
    ("look_forward", dict(look_forward=-1)),
    ("look_forward", dict(look_forward=1.5)),
    ("look_forward", dict(causal=True, look_forward=1)),
    ("look_forward", dict(causal=True, look_forward=2)),
    ("dropout_p", dict(dropout_p=-0.1)),
    ("dropout_p", dict(dropout_p=1.0)),
    ("dropout_p", dict(dropout_p=1.5)),
    ("dropout_p", dict(dropout_p="0.1")),
    ("dropout_p", dict(dropout_p=float("nan"))),
    ("scale", dict(scale=0.0)),
    ("scale", dict(scale=-1.0)),
    ("scale", dict(scale="1")),
    ("scale", dict(scale=float("nan"))),
    ("backend", dict(backend="no-such-backend")),
    ("backend", dict(backend=3)),
    ("q", dict(q=[[1.0]])),
    ("k", dict(k=None)),
    ("v", dict(v=3.0)),
    ("q", dict(q=torch.randn(4))),
    ("dtype", dict(q=torch.ones(2, 2, N, D, dtype=torch.int64))),
    ("dtype", dict(k=torch.ones(2, 2, N, D, dtype=torch.int32))),
    ("dtype", dict(v=torch.ones(2, 2, N, D, dtype=torch.bool))),
    ("dtype", dict(k=torch.randn(2, 2, N, D, dtype=torch.float64))),
    ("k", dict(k=torch.randn(2, 2, N, D + 1))),
    ("k", dict(k=torch.randn(2, 2, N + 1, D))),
    ("v", dict(v=torch.randn(2, 2, N + 1, D))),
    ("v", dict(v=torch.randn(2, 3, N, D))),
    ("mask", dict(mask=torch.ones(2, N))),
    ("mask", dict(mask=torch.ones(2, N, dtype=torch.int64))),
    ("mask", dict(mask=torch.ones(2, N + 1, dtype=torch.bool))),
    ("mask", dict(mask=torch.ones(N, dtype=torch.bool))),
    ("mask", dict(mask=torch.ones(3, N, dtype=torch.bool))),  # 3 does not divide 4
    ("mask", dict(mask=torch.ones(2, 2, N, dtype=torch.bool))),
    ("mask", dict(mask=[[True] * N] * 2)),
    ("attn_bias", dict(attn_bias=torch.randn(2, W, 2 * W))),  # span is 3
    ("attn_bias", dict(attn_bias=torch.randn(2, W + 1, 3 * W))),
    ("attn_bias", dict(attn_bias=torch.randn(3, W, 3 * W))),  # 3 does not divide 4
    ("attn_bias", dict(attn_bias=torch.randn(W, 3 * W))),
    ("attn_bias", dict(attn_bias=torch.ones(2, W, 3 * W, dtype=torch.int64))),
    ("attn_bias", dict(attn_bias="bias")),
    ("k", dict(k=torch.randn(2, 3, N, D), v=torch.randn(2, 3, N, D))),  # 3 kv heads do not divide 2
    ("k", dict(k=torch.randn(1, 1, N, D), v=torch.randn(1, 1, N, D))),  # only the head dim may differ
    ("q", dict(k=torch.randn(2, 1, N - 1, D), v=torch.randn(2, 1, N - 1, D))),  # q may be shorter than k, not longer
    ("v", dict(k=torch.randn(2, 1, N, D), v=torch.randn(2, 2, N, D))),  # v must have k's heads
]


@pytest.mark.parametrize("name, overrides", BAD_CALLS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(BAD_CALLS)])
def test_bad_argument_raises_naming_it(name, overrides):
    call = {**_valid(), **overrides}
    q, k, v = call.pop("q"), call.pop("k"), call.pop("v")
    pattern = rf"\b{name}\b"
    with pytest.raises((ValueError, TypeError), match=pattern):
        local_attention(q, k, v, **call)


def test_valid_call_passes():
    call = _valid()
    q, k, v = call.pop("q"), call.pop("k"), call.pop("v")
    out = local_attention(q, k, v, mask=torch.ones(2, N, dtype=torch.bool),
                          attn_bias=torch.randn(2, W, 3 * W), **call)
    assert out.shape == q.shape


_OPTIMIZED_SCRIPT = textwrap.dedent(
    r"""
    import re, sys, torch
    assert sys.flags.optimize >= 1
    try:
        assert False
    except AssertionError:
        sys.exit("asserts are still active")
    from windowed_attention.ops import local_attention
    N, D, W = {N}, {D}, {W}
    q = torch.randn(2, 2, N, D)
    cases = [
        ("window_size", dict(window_size=0)),
        ("window_size", dict(window_size=1.5)),
        ("window_size", dict(window_size=True)),
        ("look_backward", dict(look_backward=-1)),
        ("look_forward", dict(look_forward=-1)),
        ("look_forward", dict(causal=True, look_forward=1)),
        ("dropout_p", dict(dropout_p=1.0)),
        ("scale", dict(scale=-1.0)),
        ("backend", dict(backend="no-such-backend")),
        ("q", dict(q=[1.0])),
        ("dtype", dict(q=torch.ones(2, 2, N, D, dtype=torch.int64))),
        ("dtype", dict(k=torch.randn(2, 2, N, D, dtype=torch.float64))),
        ("k", dict(k=torch.randn(2, 2, N, D + 1))),
        ("v", dict(v=torch.randn(2, 2, N + 1, D))),
        ("mask", dict(mask=torch.ones(2, N))),
        ("mask", dict(mask=torch.ones(2, N + 1, dtype=torch.bool))),
        ("mask", dict(mask=torch.ones(3, N, dtype=torch.bool))),
        ("attn_bias", dict(attn_bias=torch.randn(2, W, 2 * W))),
        ("attn_bias", dict(attn_bias=torch.randn(3, W, 3 * W))),
    ]
    failures = []
    for name, over in cases:
        call = dict(q=q, k=q, v=q, window_size=W, look_backward=1, look_forward=1)
        call.update(over)
        try:
            local_attention(call.pop("q"), call.pop("k"), call.pop("v"), **call)
        except (ValueError, TypeError) as e:
            if not re.search(rf"\b{{name}}\b", str(e)):
                failures.append(f"{{name}}: message does not name it: {{e}}")
        except Exception as e:
            failures.append(f"{{name}}: {{type(e).__name__}}: {{e}}")
        else:
            failures.append(f"{{name}}: no error under python -O")
    print("\n".join(failures) or "ok")
    sys.exit(1 if failures else 0)
    """
).format(N=N, D=D, W=W)


def test_validation_survives_python_O():
    result = subprocess.run([sys.executable, "-O", "-c", _OPTIMIZED_SCRIPT], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "ok"
