"""`LocalAttention` (the module) against the dense oracle, rotary and xpos applied densely there.

docs/semantics.md: rotary/xpos depend only on the true distance `i - j` (also with `look_forward > 0`, where
local-attention is wrong); `autopad` pads to a multiple of `w`, never attends to the padding and trims
the output; `window_size` in forward only with xpos. The module may place rotary positions differently
(per-window offsets); only outputs and gradients are compared, never intermediate q/k.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from oracle import oracle_attention
from windowed_attention import LocalAttention


def _few(divisor: int) -> int:
    return max(5, settings.default.max_examples // divisor)


@dataclass
class ModuleCase:
    """Constructor keywords, input layout and what the oracle needs to reproduce them."""

    ctor: dict
    layout: tuple  # leading dims: (b,) or (b, h)
    n: int
    d: int
    dv: int
    seed: int
    mask_kind: str | None = None  # None, "mask" or "input_mask"
    mask_keep: float = 1.0
    with_bias: bool = False
    window_override: int | None = None
    extra: dict = field(default_factory=dict)

    @property
    def window_size(self) -> int:
        return self.window_override or self.ctor["window_size"]

    @property
    def look_forward(self) -> int:
        lf = self.ctor.get("look_forward")
        return (0 if self.ctor.get("causal", False) else 1) if lf is None else lf

    @property
    def span(self) -> int:
        return self.ctor.get("look_backward", 1) + self.look_forward + 1

    @property
    def rotary(self) -> bool:
        return self.ctor.get("dim") is not None and self.ctor.get("use_rotary_pos_emb", True)

    @property
    def xpos_scale_base(self):
        if not (self.rotary and self.ctor.get("use_xpos", False)):
            return None
        base = self.ctor.get("xpos_scale_base")
        return self.ctor["window_size"] // 2 if base is None else base  # local-attention's default

    def inputs(self, dtype=torch.float64):
        g = torch.Generator().manual_seed(self.seed)
        q, k = (torch.randn(*self.layout, self.n, self.d, generator=g, dtype=torch.float64) for _ in range(2))
        v = torch.randn(*self.layout, self.n, self.dv, generator=g, dtype=torch.float64)
        mask = bias = None
        if self.mask_kind is not None:
            mask = torch.rand(self.layout[0], self.n, generator=g) < self.mask_keep
        if self.with_bias:
            heads = self.layout[1] if len(self.layout) == 2 else 1
            w = self.window_size
            bias = torch.randn(heads, w, self.span * w, generator=g, dtype=torch.float64)
        return q.to(dtype), k.to(dtype), v.to(dtype), mask, bias

    def module(self) -> LocalAttention:
        return LocalAttention(**self.ctor).eval()

    def call(self, module, q, k, v, mask, bias):
        kwargs = {}
        if mask is not None:
            kwargs[self.mask_kind] = mask
        if bias is not None:
            kwargs["attn_bias"] = bias
        if self.window_override is not None:
            kwargs["window_size"] = self.window_override
        return module(q, k, v, **kwargs)

    def oracle(self, q, k, v, mask, bias):
        return oracle_attention(
            q, k, v, window_size=self.window_size, causal=self.ctor.get("causal", False),
            look_backward=self.ctor.get("look_backward", 1), look_forward=self.look_forward,
            exact_windowsize=self.ctor.get("exact_windowsize", False), mask=mask, attn_bias=bias,
            scale=self.ctor.get("scale"), shared_qk=self.ctor.get("shared_qk", False),
            rotary=self.rotary, xpos_scale_base=self.xpos_scale_base,
        )


@st.composite
def module_cases(draw, max_n: int = 72) -> ModuleCase:
    w = draw(st.integers(1, 12))
    causal = draw(st.booleans())
    ctor = dict(window_size=w, causal=causal, look_backward=draw(st.integers(0, 2)))
    if not causal:
        ctor["look_forward"] = draw(st.one_of(st.none(), st.integers(0, 2), st.just(1), st.just(2)))
    ctor["exact_windowsize"] = draw(st.booleans())
    if draw(st.booleans()):
        ctor["shared_qk"] = True
    if draw(st.booleans()):
        ctor["scale"] = draw(st.floats(0.1, 2.0))

    positions = draw(st.sampled_from(["none", "rotary", "rotary", "xpos", "xpos", "rotary_off"]))
    d = 2 * draw(st.integers(1, 4)) if positions != "none" else draw(st.integers(1, 8))
    if positions != "none":
        ctor["dim"] = d
    if positions == "rotary_off":
        ctor["use_rotary_pos_emb"] = False
    window_override = None
    if positions == "xpos":
        ctor["use_xpos"] = True
        if w < 2 or draw(st.booleans()):
            ctor["xpos_scale_base"] = draw(st.sampled_from([2, 3.5, 8, 16]))
        if draw(st.booleans()):
            window_override = draw(st.integers(1, 12))
    w_eff = window_override or w

    windows = draw(st.integers(1, 4))
    remainder = draw(st.integers(0, w_eff - 1))
    n = min(windows * w_eff + remainder, max_n)
    ctor["autopad"] = n % w_eff != 0 or draw(st.booleans())

    layout = draw(st.sampled_from([(1,), (2,), (2, 2), (1, 3)]))
    case = ModuleCase(ctor=ctor, layout=layout, n=n, d=d, dv=draw(st.integers(1, 5)),
                      seed=draw(st.integers(0, 2**31 - 1)), window_override=window_override)
    if draw(st.booleans()):
        case.mask_kind = draw(st.sampled_from(["mask", "input_mask"]))
        case.mask_keep = draw(st.sampled_from([0.0, 0.3, 0.8, 1.0]))
    case.with_bias = draw(st.booleans())
    return case


def _compare(case: ModuleCase, atol=1e-9, rtol=1e-8, grads=True):
    q, k, v, mask, bias = case.inputs(torch.float64)
    ins = [q, k, v] + ([bias] if bias is not None else [])
    oracle_ins = [t.detach().clone() for t in ins]
    for t in ins + oracle_ins:
        t.requires_grad_(grads)
    out = case.call(case.module(), q, k, v, mask, bias)
    ref = case.oracle(*oracle_ins[:3], mask, oracle_ins[3] if bias is not None else None)
    assert out.shape == (*case.layout, case.n, case.dv)
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)
    if not grads:
        return
    upstream = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(case.seed + 7))
    (out * upstream).sum().backward()
    (ref * upstream).sum().backward()
    for name, a, b in zip(["q", "k", "v", "attn_bias"], ins, oracle_ins):
        assert a.grad is not None and torch.isfinite(a.grad).all(), name
        torch.testing.assert_close(a.grad, b.grad, atol=atol * 10, rtol=rtol * 10, msg=lambda m: f"grad of {name}: {m}")


@given(case=module_cases())
def test_module_matches_oracle_float64_forward_and_backward(case):
    _compare(case)


def test_xpos_is_float64_accurate_in_float64():
    case = ModuleCase(ctor=dict(window_size=4, look_backward=1, look_forward=1, dim=6, use_xpos=True,
                                xpos_scale_base=2), layout=(1,), n=16, d=6, dv=3, seed=0)
    _compare(case, atol=1e-12, rtol=1e-12, grads=False)


@settings(max_examples=_few(3))
@given(case=module_cases(max_n=40))
def test_module_matches_oracle_float32(case):
    q, k, v, mask, bias = case.inputs(torch.float32)
    out = case.call(case.module(), q, k, v, mask, None if bias is None else bias.float())
    assert out.dtype == torch.float32
    ref = case.oracle(q, k, v, mask, bias)
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-3)


# -- positions: only the distance i - j counts ----------------------------------------------------


@pytest.mark.parametrize("use_xpos", [False, True])
@pytest.mark.parametrize("look_backward, look_forward", [(1, 1), (0, 2), (2, 1), (1, 2)])
def test_rotary_with_look_forward_depends_only_on_distance(use_xpos, look_backward, look_forward):
    """The case local-attention gets wrong: non-causal with look_forward > 0."""
    w, n, d = 4, 20, 8
    case = ModuleCase(
        ctor=dict(window_size=w, look_backward=look_backward, look_forward=look_forward, dim=d,
                  use_xpos=use_xpos, xpos_scale_base=6 if use_xpos else None),
        layout=(2, 3), n=n, d=d, dv=4, seed=11,
    )
    _compare(case)
    # and positions matter at all: without rotary the output is different
    q, k, v, _, _ = case.inputs()
    plain = LocalAttention(window_size=w, look_backward=look_backward, look_forward=look_forward)
    assert not torch.allclose(case.module()(q, k, v), plain(q, k, v))


def test_translation_by_whole_windows_does_not_change_the_output():
    """Prepending whole windows that nobody in the tail can see leaves the tail's output unchanged."""
    torch.manual_seed(3)
    w, d = 4, 8
    attn = LocalAttention(window_size=w, look_backward=1, look_forward=1, dim=d, use_xpos=True,
                          xpos_scale_base=4, autopad=True)
    q, k, v = (torch.randn(1, 26, d, dtype=torch.float64) for _ in range(3))
    out = attn(q, k, v)
    prefix = 5 * w
    shifted = [torch.cat((torch.randn(1, prefix, d, dtype=torch.float64), t), dim=1) for t in (q, k, v)]
    out_shifted = attn(*shifted)[:, prefix:]
    # queries from window 1 on only see keys from window 0 of the original sequence onwards
    torch.testing.assert_close(out_shifted[:, w:], out[:, w:], atol=1e-10, rtol=1e-10)
    assert not torch.allclose(out_shifted[:, :w], out[:, :w])  # window 0 now sees the prefix


def test_xpos_finite_at_a_million_positions_non_causal_autopad():
    n, w, d = 1_000_003, 64, 8
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, n, d, generator=g) for _ in range(3))
    attn = LocalAttention(window_size=w, look_backward=1, look_forward=1, dim=d, use_xpos=True,
                          xpos_scale_base=32, autopad=True).eval()
    with torch.no_grad():
        out = attn(q, k, v)
    assert out.shape == (1, n, d)
    assert torch.isfinite(out).all()
    # interior: windows a+1 .. a+3 see only windows a .. a+4, so a 5-window oracle reproduces them
    for a in (0, 7_000, 15_000):
        region = slice(a * w, (a + 5) * w)
        ref = oracle_attention(*(t[:, region].double() for t in (q, k, v)), window_size=w,
                               look_backward=1, look_forward=1, rotary=True, xpos_scale_base=32)
        rows = slice(w, 4 * w) if a else slice(0, 4 * w)
        torch.testing.assert_close(out[:, region][:, rows].double(), ref[:, rows], atol=2e-4, rtol=2e-4)
    # tail: the last, partial window (3 positions) and the one before, no padding attended
    start = (n // w - 2) * w
    ref = oracle_attention(*(t[:, start:].double() for t in (q, k, v)), window_size=w,
                           look_backward=1, look_forward=1, rotary=True, xpos_scale_base=32)
    torch.testing.assert_close(out[:, start + w :].double(), ref[:, w:], atol=2e-4, rtol=2e-4)


# -- autopad, masks, window_size override, errors ------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n", [1, 5, 7, 9, 13])
def test_autopad_never_attends_to_padding_and_trims(causal, n):
    w = 4
    case = ModuleCase(ctor=dict(window_size=w, causal=causal, autopad=True, dim=4), layout=(2,), n=n, d=4,
                      dv=3, seed=n)
    _compare(case)
    # padding is not attended: the last query's output is a convex mix of real values only;
    # with one real key visible, it equals that value exactly
    attn = LocalAttention(window_size=w, causal=causal, look_backward=0, look_forward=0, autopad=True)
    q, k, v = (torch.randn(1, 2 * w + 1, 3, dtype=torch.float64) for _ in range(3))
    out = attn(q, k, v)
    assert out.shape == (1, 2 * w + 1, 3)
    torch.testing.assert_close(out[:, -1], v[:, -1], atol=1e-12, rtol=0)


def test_mask_and_input_mask_are_aliases():
    torch.manual_seed(0)
    attn = LocalAttention(window_size=3, dim=4, autopad=True)
    q, k, v = (torch.randn(2, 2, 10, 4, dtype=torch.float64) for _ in range(3))
    mask = torch.rand(2, 10) < 0.6
    a = attn(q, k, v, mask=mask)
    b = attn(q, k, v, input_mask=mask)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert not torch.allclose(a, attn(q, k, v))


def test_fully_masked_rows_give_zeros_in_the_module():
    attn = LocalAttention(window_size=2, look_backward=0, look_forward=0, dim=4, use_xpos=True, xpos_scale_base=2)
    q, k, v = (torch.randn(1, 6, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = torch.tensor([[False, False, True, True, False, True]])
    out = attn(q, k, v, mask=mask)
    assert (out[:, :2] == 0).all()
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert (q.grad[:, :2] == 0).all()


def test_window_size_override_requires_xpos():
    q = torch.randn(1, 8, 4)
    with pytest.raises(ValueError, match="window_size"):
        LocalAttention(window_size=4, dim=4)(q, q, q, window_size=2)
    with pytest.raises(ValueError, match="window_size"):
        LocalAttention(window_size=4)(q, q, q, window_size=8)


@pytest.mark.parametrize("override", [2, 8, 3])
def test_window_size_override_with_xpos_matches_oracle(override):
    n = 24
    case = ModuleCase(ctor=dict(window_size=4, dim=8, use_xpos=True, causal=True, autopad=True),
                      layout=(2,), n=n, d=8, dv=4, seed=override, window_override=override)
    _compare(case)


@pytest.mark.parametrize("n, w", [(6, 4), (7, 2), (1, 3), (10, 4)])
def test_without_autopad_n_must_be_a_multiple_of_window_size(n, w):
    attn = LocalAttention(window_size=w, causal=True)
    q = torch.randn(2, n, 4)
    with pytest.raises(ValueError, match="window_size"):
        attn(q, q, q)
    ok = torch.randn(2, (n // w + 1) * w, 4)
    assert attn(ok, ok, ok).shape == ok.shape


def test_dropout_only_in_training():
    torch.manual_seed(0)
    attn = LocalAttention(window_size=4, dropout=0.5, dim=4)
    q, k, v = (torch.randn(1, 16, 4) for _ in range(3))
    attn.eval()
    clean = attn(q, k, v)
    ref = oracle_attention(q, k, v, window_size=4, rotary=True)
    torch.testing.assert_close(clean.double(), ref, atol=1e-5, rtol=1e-5)
    attn.train()
    torch.manual_seed(1)
    a = attn(q, k, v)
    torch.manual_seed(1)
    b = attn(q, k, v)
    assert torch.equal(a, b)
    assert not torch.allclose(a, clean)


def test_default_xpos_scale_base_is_half_the_window():
    case = ModuleCase(ctor=dict(window_size=8, causal=True, dim=8, use_xpos=True), layout=(1,), n=32, d=8,
                      dv=4, seed=2)
    assert case.xpos_scale_base == 4
    _compare(case, grads=False)
    wrong = ModuleCase(**{**case.__dict__, "ctor": {**case.ctor, "xpos_scale_base": 8}})
    q, k, v, _, _ = case.inputs()
    with torch.no_grad():
        assert not torch.allclose(case.module()(q, k, v), wrong.module()(q, k, v))


def test_module_agrees_with_local_attention_where_it_is_right():
    """Causal, n a multiple of w, no all-masked rows: local-attention is correct there (drop-in parity)."""
    la = pytest.importorskip("local_attention")
    torch.manual_seed(0)
    for use_xpos in (False, True):
        kw = dict(window_size=8, causal=True, look_backward=1, dim=8, use_xpos=use_xpos, exact_windowsize=True)
        q, k, v = (torch.randn(2, 3, 32, 8) for _ in range(3))
        ours = LocalAttention(**kw)(q, k, v)
        theirs = la.LocalAttention(**kw)(q, k, v)
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
        assert math.isfinite(ours.abs().max().item())
