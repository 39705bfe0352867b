"""The modern options (token windows, documents, learned sinks, sink tokens, softcap, shorter queries) on
every backend that declares them, against the dense float64 oracle (`oracle.oracle_modern`), forward and
backward; validation; packed documents equal each document alone.

Which backend is checked on which option comes from the backends' own declarations (`FEATURES`): a
backend that claims an option is tested on it, one that does not must refuse it by name.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from oracle import oracle_modern
from windowed_attention import local_attention
from torch.nn.attention.flex_attention import flex_attention

from windowed_attention.ops import backends, flex
from windowed_attention.ops.call import ALL_FEATURES, AttentionCall, document_bounds, segments
from windowed_attention.ops.spec import WindowSpec

CPU_BACKENDS = [name for name in ("reference", "fused", "sdpa") if name == "reference" or backends.availability()[name]]
# flex runs eagerly on CPU (forward only: FlexAttention has no CPU backward)
FORWARD_ONLY = ["flex"] if backends.availability()["flex"] else []
TOL = {torch.float64: (1e-9, 1e-8), torch.float32: (2e-5, 1e-4), torch.float16: (4e-3, 1e-2),
       torch.bfloat16: (3e-2, 6e-2)}


@st.composite
def calls(draw, dtypes=(torch.float64,)):
    """Random shapes and options: `(q, k, v, keywords)` with every modern option sometimes on."""
    batch, heads, groups = draw(st.sampled_from([(1, 2, 1), (2, 2, 2), (2, 4, 2), (1, 3, 3)]))
    n = draw(st.integers(1, 40))
    n_q = draw(st.sampled_from([n, draw(st.integers(1, n))]))
    causal = draw(st.booleans())
    keywords: dict = dict(causal=causal)
    if draw(st.booleans()):
        left = draw(st.sampled_from([-1, 0, 1, 3, 7, 12]))
        right = 0 if causal else draw(st.sampled_from([-1, 0, 2, 5]))
        keywords["window_size"] = (left, right)
    else:
        w = draw(st.integers(1, 8))
        keywords.update(window_size=w, look_backward=draw(st.integers(0, 2)),
                        look_forward=0 if causal else draw(st.integers(0, 2)), exact_windowsize=draw(st.booleans()))
        if draw(st.integers(0, 3)) == 0:
            span = keywords["look_backward"] + keywords["look_forward"] + 1
            keywords["attn_bias"] = torch.randn(heads, w, span * w, dtype=torch.float64)
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    if draw(st.booleans()):
        rows = draw(st.sampled_from([1, batch]))
        keywords["documents"] = torch.sort(torch.randint(0, draw(st.integers(1, 5)), (rows, n), generator=g), dim=1).values
    if draw(st.integers(0, 2)) == 0:
        keywords["mask"] = torch.rand(batch, n, generator=g) < 0.8
    if draw(st.booleans()):
        keywords["sinks"] = torch.randn(draw(st.sampled_from([1, heads])), generator=g, dtype=torch.float64)
    if draw(st.booleans()):
        keywords["sink_tokens"] = draw(st.integers(0, 4))
    if draw(st.booleans()):
        keywords["softcap"] = draw(st.sampled_from([0.5, 3.0, 50.0]))
    if draw(st.integers(0, 4)) == 0:
        keywords["shared_qk"] = True
    dtype = draw(st.sampled_from(dtypes))
    d = draw(st.sampled_from([4, 8]))
    q = torch.randn(batch, heads, n_q, d, generator=g, dtype=torch.float64)
    k = torch.randn(batch, heads // groups, n, d, generator=g, dtype=torch.float64)
    v = torch.randn(batch, heads // groups, n, d, generator=g, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype), keywords


def _features(q, k, v, keywords) -> frozenset[str]:
    """The call's features, as the op would build it (via the public validation)."""
    from windowed_attention.ops.api import make_spec

    spec = make_spec(keywords["window_size"], keywords["causal"], keywords.get("look_backward", 1),
                     keywords.get("look_forward"), keywords.get("exact_windowsize", False),
                     keywords.get("sink_tokens", 0), keywords.get("softcap"))
    call = AttentionCall(spec, 1.0, mask=keywords.get("mask"), attn_bias=keywords.get("attn_bias"),
                         mask_self=keywords.get("shared_qk", False), documents=keywords.get("documents"),
                         sinks=keywords.get("sinks"), query_offset=k.shape[-2] - q.shape[-2])
    return call.features()


def _run(backend, q, k, v, keywords, backward=True):
    leaves = [t.clone().requires_grad_(backward) for t in (q, k, v)]
    extra = {name: (t.clone().requires_grad_(backward) if name in ("sinks", "attn_bias") else t)
             for name, t in keywords.items() if isinstance(t, torch.Tensor)}
    if backward:
        extra = {name: t.to(q.dtype) if name in ("sinks", "attn_bias") else t for name, t in extra.items()}
        extra = {name: t.detach().requires_grad_() if name in ("sinks", "attn_bias") else t for name, t in extra.items()}
    options = {**keywords, **extra}
    if backend == "oracle":
        out = oracle_modern(*leaves, **options)
    else:
        with warnings.catch_warnings(), pytest.MonkeyPatch.context() as patch:
            warnings.simplefilter("ignore")
            patch.setattr(flex, "_compiled_flex", lambda: flex_attention)  # eager on CPU: fast to start
            out = local_attention(*leaves, backend=backend, **options)
    if not backward:
        return [out]
    wrt = leaves + [extra[name] for name in ("sinks", "attn_bias") if name in extra]
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    return [out, *torch.autograd.grad((out * weights).sum(), wrt, allow_unused=True)]


def _close(got, ref, dtype):
    fwd_tol, grad_tol = TOL[dtype]
    for index, (a, b) in enumerate(zip(got, ref)):
        if b is None:
            assert a is None or a.eq(0).all(), index
            continue
        tol = (fwd_tol if index == 0 else grad_tol) * max(1.0, b.abs().max().item())
        assert a is not None and a.shape == b.shape, index
        assert (a.double() - b.double()).abs().max().item() <= tol, f"tensor {index} (0 = out, then grads)"


@pytest.mark.parametrize("backend", CPU_BACKENDS + FORWARD_ONLY)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=calls())
def test_backend_matches_the_oracle_or_refuses_by_name(backend, problem):
    q, k, v, keywords = problem
    used = _features(q, k, v, keywords)
    if backend == "flex":
        q, k, v = q.float(), k.float(), v.float()
        keywords = {key: value.float() if isinstance(value, torch.Tensor) and value.is_floating_point() else value
                    for key, value in keywords.items()}
    if not used <= backends.features(backend):
        with pytest.raises(ValueError, match=f"backend '{backend}' does not compute"), pytest.MonkeyPatch.context() as patch:
            patch.setattr(flex, "_compiled_flex", lambda: flex_attention)  # eager on CPU: fast to start
            local_attention(q, k, v, backend=backend, **keywords)
        return
    backward = backend not in FORWARD_ONLY
    _close(_run(backend, q, k, v, keywords, backward), _run("oracle", q, k, v, keywords, backward), q.dtype)


@pytest.mark.parametrize("backend", [name for name in CPU_BACKENDS if name != "reference"])
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=calls(dtypes=(torch.float32, torch.bfloat16, torch.float16)))
def test_backend_matches_the_reference_in_its_dtype(backend, problem):
    """In float32, bfloat16 and float16 each CPU backend equals the reference computed in the same dtype (the
    reference accumulates as the kernels do; it is itself checked against the oracle above)."""
    q, k, v, keywords = problem
    if not _features(q, k, v, keywords) <= backends.features(backend):
        return
    _close(_run(backend, q, k, v, keywords), _run("reference", q, k, v, keywords), q.dtype)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=calls(dtypes=(torch.float32,)))
def test_auto_matches_the_oracle_in_float32(problem):
    q, k, v, keywords = problem
    _close(_run("auto", q, k, v, keywords), _run("oracle", q.double(), k.double(), v.double(), keywords), torch.float32)


def test_every_backend_declares_known_features():
    for name in backends.names():
        assert backends.features(name) <= ALL_FEATURES, name
    assert backends.features("reference") == ALL_FEATURES


@settings(max_examples=30, deadline=None)
@given(problem=calls())
def test_packed_documents_equal_each_document_alone(problem):
    """Each document of a packed row gives what it gives as a sequence of its own."""
    q, k, v, keywords = problem
    keywords = {key: value for key, value in keywords.items() if key not in ("mask",)}
    if "documents" not in keywords or q.shape[-2] != k.shape[-2]:
        return
    documents = keywords.pop("documents")
    packed = local_attention(q, k, v, documents=documents, **keywords)
    per = q.shape[0] // documents.shape[0]
    for row in range(documents.shape[0]):
        rows = slice(row * per, (row + 1) * per)
        for start, end in segments(documents[row]):
            alone = local_attention(q[rows, ..., start:end, :], k[rows, ..., start:end, :], v[rows, ..., start:end, :],
                                    **keywords)
            torch.testing.assert_close(packed[rows, ..., start:end, :], alone, atol=1e-12, rtol=0)


def test_shorter_queries_equal_the_last_rows_of_the_full_call():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 30, 8, generator=g, dtype=torch.float64) for _ in range(3))
    full = local_attention(q, k, v, window_size=(6, 0), causal=True, sink_tokens=2, softcap=4.0)
    for n_q in (1, 7, 30):
        part = local_attention(q[..., -n_q:, :], k, v, window_size=(6, 0), causal=True, sink_tokens=2, softcap=4.0)
        torch.testing.assert_close(part, full[..., -n_q:, :], atol=1e-12, rtol=0)


def test_token_window_equals_its_block_equivalent():
    """`(w * lb, 0)` causal is `exact_windowsize` with window w and look_backward lb."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 50, 8, generator=g, dtype=torch.float64) for _ in range(3))
    tokens = local_attention(q, k, v, window_size=(16, 0), causal=True)
    blocks = local_attention(q, k, v, window_size=8, look_backward=2, causal=True, exact_windowsize=True)
    torch.testing.assert_close(tokens, blocks, atol=1e-12, rtol=0)


def test_learned_sinks_shrink_weights_and_rows_that_see_nothing_stay_zero():
    q = torch.randn(1, 2, 6, 4, dtype=torch.float64)
    mask = torch.tensor([[False] * 3 + [True] * 3])
    sinks = torch.tensor([0.0, 100.0], dtype=torch.float64, requires_grad=True)
    out = local_attention(q, q, q, window_size=(2, 0), causal=True, mask=mask, sinks=sinks)
    assert out[0, :, :3].eq(0).all()  # rows 0-2 see no key
    assert out[0, 1].abs().max() < 1e-30  # a huge sink takes all the weight of head 1
    out.sum().backward()
    assert torch.isfinite(sinks.grad).all()


def test_document_bounds_and_segments():
    documents = torch.tensor([[0, 0, 1, 1, 1, 4], [2, 2, 2, 2, 2, 2]])
    starts, ends = document_bounds(documents)
    assert starts.tolist() == [[0, 0, 2, 2, 2, 5], [0] * 6]
    assert ends.tolist() == [[2, 2, 5, 5, 5, 6], [6] * 6]
    assert segments(documents[0]) == [(0, 2), (2, 5), (5, 6)]


def test_token_window_layout_holds_every_key_its_bounds_allow():
    for left, right, causal in [(0, 0, False), (3, 0, True), (255, 0, True), (-1, 0, True), (5, 70, False), (-1, -1, False)]:
        spec = WindowSpec.token_window(left, right, causal)
        n = 300
        i, j = torch.arange(n)[:, None], torch.arange(n)[None]
        allowed = torch.ones(n, n, dtype=torch.bool)
        if left >= 0:
            allowed &= i - j <= left
        if right >= 0 and not causal:
            allowed &= j - i <= right
        if causal:
            allowed &= j <= i
        assert torch.equal(spec.for_length(n).visible(i, j, n), allowed), (left, right, causal)


Q = torch.randn(1, 2, 12, 4)


@pytest.mark.parametrize("argument,keywords", [
    ("window_size", dict(window_size=(3,))),
    ("window_size", dict(window_size=(3, -2))),
    ("window_size", dict(window_size=(3.0, 0))),
    ("window_size", dict(window_size=(3, 2), causal=True)),
    ("window_size", dict(window_size=(3, 0), look_backward=2)),
    ("window_size", dict(window_size=(3, 0), exact_windowsize=True)),
    ("attn_bias", dict(window_size=(3, 0), attn_bias=torch.zeros(2, 4, 8))),
    ("documents", dict(window_size=4, documents=torch.tensor([[0] * 6 + [1] * 5 + [0]]))),
    ("documents", dict(window_size=4, documents=torch.zeros(1, 11, dtype=torch.long))),
    ("documents", dict(window_size=4, documents=torch.zeros(3, 12, dtype=torch.long))),
    ("documents", dict(window_size=4, documents=torch.zeros(1, 12))),
    ("documents", dict(window_size=4, documents=[[0] * 12])),
    ("sinks", dict(window_size=4, sinks=torch.zeros(3))),
    ("sinks", dict(window_size=4, sinks=torch.zeros(2, 1))),
    ("sinks", dict(window_size=4, sinks=torch.zeros(2, dtype=torch.long))),
    ("sink_tokens", dict(window_size=4, sink_tokens=-1)),
    ("sink_tokens", dict(window_size=4, sink_tokens=1.5)),
    ("softcap", dict(window_size=4, softcap=0.0)),
    ("softcap", dict(window_size=4, softcap=-1.0)),
    ("softcap", dict(window_size=4, softcap=float("inf"))),
    ("softcap", dict(window_size=4, softcap=float("nan"))),
    ("softcap", dict(window_size=4, softcap="1")),
])
def test_bad_modern_arguments_raise_naming_them(argument, keywords):
    with pytest.raises((ValueError, TypeError), match=argument):
        local_attention(Q, Q, Q, **keywords)


@pytest.mark.parametrize("backend", [name for name in ("sdpa", "fused") if backends.availability()[name]])
def test_explicit_backends_refuse_what_they_lack_by_name(backend):
    lacking = sorted(ALL_FEATURES - backends.features(backend))
    options = {
        "documents": dict(documents=torch.zeros(1, 12, dtype=torch.long)), "sinks": dict(sinks=torch.zeros(2)),
        "sink_tokens": dict(sink_tokens=2), "softcap": dict(softcap=2.0), "attn_bias": dict(attn_bias=torch.zeros(2, 4, 8)),
        "shared_qk": dict(shared_qk=True), "dropout": dict(dropout_p=0.1),
    }
    for feature in lacking:
        if feature in options:
            with pytest.raises(ValueError, match=f"backend '{backend}' does not compute {feature}"):
                local_attention(Q, Q, Q, window_size=4, causal=True, backend=backend, **options[feature])
