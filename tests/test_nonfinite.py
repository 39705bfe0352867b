"""Non-finite keys and values reach only the rows that see them (`ops.finite`), on every backend, the
decode step and traced code, against the dense oracle: a row that sees a key with a non-finite entry is
NaN, a row that sees a non-finite value takes it in that column (NaN, or the infinity's sign), and every
other entry equals the call with the non-finite entries set to zero — as do the gradients, the
non-finite entries and the output entries they poison passing none. (The sharded route: `cp_workers`.)
"""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from oracle import oracle_modern
from test_modern import CPU_BACKENDS, FORWARD_ONLY, TOL, calls
from windowed_attention import LocalMHA, local_attention
from torch.nn.attention.flex_attention import flex_attention

from windowed_attention.ops import backends, flex

NAN, INF = float("nan"), float("inf")


def spoil(t: torch.Tensor, gen: torch.Generator, rate: float = 0.08) -> torch.Tensor:
    """`t` with random entries (and sometimes whole positions) NaN, +inf or -inf."""
    t = t.clone()
    pick = torch.rand(t.shape, generator=gen) < rate
    pick |= (torch.rand(*t.shape[:-1], 1, generator=gen) < rate / 2).expand_as(pick)
    kind = torch.randint(0, 3, t.shape, generator=gen)
    bad = torch.tensor([NAN, INF, -INF], dtype=t.dtype)[kind]
    return torch.where(pick, bad, t)


def expected(q, k, v, keywords, upstream):
    """`(out, grads of q, k, v)` by the rule of the module docstring, from the float64 oracle."""
    fk, fv = torch.isfinite(k), torch.isfinite(v)
    leaves = [t.detach().double().requires_grad_() for t in (q, torch.where(fk, k, 0), torch.where(fv, v, 0))]
    out = oracle_modern(*leaves, **keywords)
    sees = oracle_modern(q.double(), k.double(), v.double(), **keywords, seen=True).double()  # (..., n_q, n)
    group = q.shape[-3] // k.shape[-3]
    per_head = lambda t: t.double().repeat_interleave(group, dim=-3)  # noqa: E731  kv heads -> query heads
    nan, pos, neg = (sees @ per_head(f(v)) > 0 for f in (torch.isnan, torch.isposinf, torch.isneginf))
    bad_key = sees @ per_head(~fk.all(dim=-1, keepdim=True)) > 0
    poisoned = nan | (pos & neg) | bad_key
    want = out.detach().masked_fill(pos & ~neg, INF).masked_fill(neg & ~pos, -INF).masked_fill(poisoned, NAN)
    grads = torch.autograd.grad((out * upstream.masked_fill(poisoned | pos | neg, 0)).sum(), leaves)
    return want, [grads[0], grads[1].masked_fill(~fk, 0), grads[2].masked_fill(~fv, 0)]


def same_nonfinite(got: torch.Tensor, want: torch.Tensor, dtype, label: str, grad=False) -> None:
    """NaN and infinities where `want` has them, the finite entries close (`TOL`)."""
    assert torch.equal(got.isnan(), want.isnan()), f"{label}: NaN at other places"
    assert torch.equal(got.isposinf(), want.isposinf()) and torch.equal(got.isneginf(), want.isneginf()), label
    fine = torch.isfinite(want)
    tol = TOL[dtype][1 if grad else 0]
    torch.testing.assert_close(got.double()[fine], want[fine], rtol=tol, atol=tol, msg=label)


def run(backend, q, k, v, keywords, upstream, backward):
    leaves = [t.clone().requires_grad_(backward) for t in (q, k, v)]
    with warnings.catch_warnings(), pytest.MonkeyPatch.context() as patch:
        warnings.simplefilter("ignore")
        patch.setattr(flex, "_compiled_flex", lambda: flex_attention)  # eager on CPU: fast to start
        out = local_attention(*leaves, backend=backend, **keywords)
    if not backward:
        return out, None
    return out, torch.autograd.grad((out * upstream.to(out.dtype)).sum(), leaves)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=calls(dtypes=(torch.float64, torch.float32)), seed=st.integers(0, 2**16),
       which=st.sampled_from(["k", "v", "kv"]))
@pytest.mark.parametrize("backend", CPU_BACKENDS + FORWARD_ONLY + ["auto"])
def test_nonfinite_entries_reach_only_the_rows_that_see_them(backend, problem, seed, which):
    q, k, v, keywords = problem
    keywords = {name: value for name, value in keywords.items() if name not in ("sinks", "attn_bias")} | {
        name: value.to(q.dtype) for name, value in keywords.items() if name in ("sinks", "attn_bias")}
    if backend != "auto" and backend not in ("reference",) and not _takes(backend, q, k, v, keywords):
        return
    gen = torch.Generator().manual_seed(seed)
    k = spoil(k, gen) if "k" in which else k
    v = spoil(v, gen) if "v" in which else v
    upstream = torch.randn(*q.shape[:-1], v.shape[-1], generator=gen, dtype=torch.float64)
    backward = backend not in FORWARD_ONLY
    out, grads = run(backend, q, k, v, keywords, upstream, backward)
    want, want_grads = expected(q, k, v, keywords, upstream)
    same_nonfinite(out, want, q.dtype, f"{backend} output")
    if backward:
        for name, got, ref in zip("qkv", grads, want_grads):
            assert torch.isfinite(got).all(), f"{backend} grad {name}: not finite"
            same_nonfinite(got, ref, q.dtype, f"{backend} grad {name}", grad=True)


def _takes(backend, q, k, v, keywords) -> bool:
    """Whether `backend` declares every option of the call (it would refuse it by name otherwise)."""
    from test_modern import _features

    module = backends._MODULES[backend]
    return _features(q, k, v, keywords) <= module.FEATURES and q.dtype in module.DTYPES


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["auto"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("which, value", [("k", NAN), ("k", INF), ("v", NAN), ("v", INF)])
def test_padding_and_later_keys_never_reach_a_row(backend, causal, which, value):
    """The reported cases: `mask[:, 200:] = False` with garbage in the padded keys or values leaves every
    valid row as it is with zeros there; a non-finite key or value at position 70 (window 16) changes no
    row that does not see it (under `causal`, rows 64-69 of its block)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 256, 32) for _ in range(3))
    mask = torch.ones(2, 256, dtype=torch.bool)
    mask[:, 200:] = False
    spoilt = {"k": k.clone(), "v": v.clone()}
    spoilt[which][..., 200:, :] = value
    out = local_attention(q, spoilt["k"], spoilt["v"], window_size=16, causal=causal, mask=mask, backend=backend)
    clean = {"k": k.clone(), "v": v.clone()}
    clean[which][..., 200:, :] = 0
    want = local_attention(q, clean["k"], clean["v"], window_size=16, causal=causal, mask=mask, backend=backend)
    torch.testing.assert_close(out[..., :200, :], want[..., :200, :])

    spoilt = {"k": k.clone(), "v": v.clone()}
    spoilt[which][..., 70, :] = value
    out = local_attention(q, spoilt["k"], spoilt["v"], window_size=16, causal=causal, backend=backend)
    plain = local_attention(q, k, v, window_size=16, causal=causal, backend=backend)
    unseen = torch.tensor([i < 70 if causal else i < 48 or i >= 96 for i in range(256)])
    torch.testing.assert_close(out[..., unseen, :], plain[..., unseen, :])
    assert not torch.isfinite(out[..., 70, :]).all()  # the key's own row sees it


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_decoding_never_reads_garbage_in_padding(fused, kv_heads):
    """A ragged prefill whose padding holds NaN (an overflowed padded embedding) then decode steps: the
    valid rows equal the same decode with zeros in the padding; `fused` runs without autograd (the CPU
    kernel's step), else with it (the torch step)."""
    torch.manual_seed(0)
    mha = LocalMHA(dim=16, dim_head=8, heads=4, kv_heads=kv_heads, window_size=4, causal=True, prenorm=True).eval()
    x = torch.randn(2, 14, 16)
    lengths = torch.tensor([6, 3])
    mask = torch.arange(6) < lengths[:, None]
    outs = []
    for fill in (NAN, 0.0):
        prompt = x[:, :6].masked_fill(~mask[..., None], fill)
        with torch.set_grad_enabled(not fused):
            out, cache = mha(prompt, mask=mask, return_cache=True)
            steps = [out.masked_fill(~mask[..., None], 0)]
            for t in range(6, 14):
                step, cache = mha(x[:, t : t + 1], cache=cache, return_cache=True)
                steps.append(step)
        outs.append(torch.cat(steps, dim=1).detach())
    assert torch.isfinite(outs[0]).all()
    torch.testing.assert_close(outs[0], outs[1])


@pytest.mark.parametrize("shared_qk", [False, True])
def test_torch_decode_step_puts_back_what_a_query_sees(shared_qk):
    """The torch step (`attend_one`): a non-finite key a query sees makes it NaN, a value it sees lands in its
    column, one it does not see changes nothing (its row hides it with -inf)."""
    from windowed_attention.ops.decode import attend_one

    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    row = torch.zeros(1, 1, 1, 5)
    row[..., 1] = -INF  # key 1 is hidden from both heads
    plain = attend_one(q, k, v, row, scale=0.3, shared_qk=shared_qk)
    hidden_k, hidden_v = k.clone(), v.clone()
    hidden_k[:, :, 1], hidden_v[:, :, 1] = NAN, INF
    torch.testing.assert_close(attend_one(q, hidden_k, hidden_v, row, scale=0.3, shared_qk=shared_qk), plain)
    seen_v = v.clone()
    seen_v[:, 0, 2, 3], seen_v[:, 1, 2, 5] = INF, NAN
    out = attend_one(q, k, seen_v, row, scale=0.3, shared_qk=shared_qk)
    assert out[0, 0, 0, 3] == INF and out[0, 1, 0, 5].isnan()
    assert torch.isfinite(out[0, 0, 0, :3]).all() and torch.isfinite(out[0, 1, 0, :5]).all()
    seen_k = k.clone()
    seen_k[:, 1, 0, 0] = NAN
    out = attend_one(q, seen_k, v, row, scale=0.3, shared_qk=shared_qk)
    assert out[0, 1].isnan().all() and torch.isfinite(out[0, 0]).all()


def test_traced_code_zeroes_what_the_mask_hides():
    """Under torch.compile (no branch on data) the padding still never reaches a valid row."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 64, 16) for _ in range(3))
    mask = torch.ones(1, 64, dtype=torch.bool)
    mask[:, 40:] = False
    v_bad = v.clone()
    v_bad[..., 40:, :] = NAN

    def fn(q, k, v, mask):
        return local_attention(q, k, v, window_size=16, causal=False, mask=mask)

    out = torch.compile(fn, backend="eager", fullgraph=True)(q, k, v_bad, mask)
    torch.testing.assert_close(out[..., :40, :], fn(q, k, v, mask)[..., :40, :])
