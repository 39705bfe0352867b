"""Every backend against `reference_attention` on random configurations, forward and backward.

Backends are called directly with the trusted `(P, n, d)` contract (see ops/reference.py). CUDA-only
backends are checked here as far as a CPU allows: flex forward in eager mode, flash's argument mapping
through a dense stand-in for `flash_attn_func`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import types
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from windowed_attention import local_attention
from windowed_attention.ops import backends, flex
from windowed_attention.ops.call import AttentionCall
from windowed_attention.ops.flash import flash_attn_backend
from windowed_attention.ops.flex import flex_attention_backend
from windowed_attention.ops import fused_cpu
from windowed_attention.ops.fused_cpu import fused_cpu_attention
from windowed_attention.ops.reference import reference_attention
from windowed_attention.ops.sdpa_blocks import _Plan, sdpa_blocks_attention
from windowed_attention.ops.spec import WindowSpec

# (forward, gradient) tolerances relative to the largest reference magnitude
TOL = {torch.float64: (1e-10, 1e-9), torch.float32: (2e-5, 1e-4), torch.float16: (4e-3, 1e-2),
       torch.bfloat16: (3e-2, 6e-2)}


@st.composite
def problems(draw, dtypes=(torch.float64, torch.float32, torch.bfloat16), max_w=64, with_bias=False):
    causal = draw(st.booleans())
    w = draw(st.integers(1, max_w))
    spec = WindowSpec(w, causal, draw(st.integers(0, 2)), 0 if causal else draw(st.integers(0, 2)), draw(st.booleans()))
    n = draw(st.integers(1, min(3 * w + 5, 160)))
    heads = draw(st.sampled_from([1, 2, 4]))
    batch = draw(st.sampled_from([1, 2]))
    # grouped-query attention: query heads per kv head (k, v get batch * heads / groups rows)
    groups = draw(st.sampled_from([g for g in (1, 2, 4) if heads % g == 0]))
    d = draw(st.sampled_from([4, 8]))
    dv = draw(st.sampled_from([d, 6]))
    mask = None
    if draw(st.booleans()):
        mask = torch.rand(batch, n, generator=torch.Generator().manual_seed(draw(st.integers(0, 99)))) < 0.7
        if draw(st.booleans()):
            mask[0] = False  # every query of these rows sees nothing
    key_scale = None
    if draw(st.booleans()):
        key_scale = 0.5 + torch.rand(spec.span, d, dtype=torch.float64)
    bias = None
    if with_bias and draw(st.booleans()):
        bias = torch.randn(heads, w, spec.span * w, dtype=torch.float64)
    return dict(
        spec=spec, n=n, P=batch * heads, P_kv=batch * heads // groups, d=d, dv=dv, mask=mask, key_scale=key_scale, attn_bias=bias,
        mask_self=with_bias and draw(st.booleans()), dtype=draw(st.sampled_from(dtypes)), seed=draw(st.integers(0, 99)),
    )


def _inputs(pb, requires_grad=True):
    g = torch.Generator().manual_seed(pb["seed"])
    P, n, d, dv, dtype = pb["P"], pb["n"], pb["d"], pb["dv"], pb["dtype"]
    P_kv = pb.get("P_kv", P)
    q, k = (torch.randn(rows, n, d, generator=g).to(dtype).requires_grad_(requires_grad) for rows in (P, P_kv))
    v = torch.randn(P_kv, n, dv, generator=g).to(dtype).requires_grad_(requires_grad)
    bias = pb["attn_bias"]
    if bias is not None:
        bias = bias.to(dtype).requires_grad_(requires_grad)
    ks = None if pb["key_scale"] is None else pb["key_scale"].to(dtype)
    return q, k, v, bias, ks


def _compare(fn, pb, backward=True):
    """Run `fn` and the reference on the same inputs; compare outputs (and q, k, v, bias grads)."""
    results = []
    for f in (reference_attention, fn):
        q, k, v, bias, ks = _inputs(pb, requires_grad=backward)
        out = f(q, k, v, AttentionCall(pb["spec"], scale=0.5, mask=pb["mask"], attn_bias=bias, mask_self=pb["mask_self"],
                                       key_scale=ks))
        tensors = [out]
        if backward:
            weights = torch.linspace(-1, 1, out.numel()).view_as(out).to(out.dtype)
            wrt = [t for t in (q, k, v, bias) if t is not None]
            tensors += torch.autograd.grad((out * weights).sum(), wrt)
        results.append(tensors)
    fwd_tol, grad_tol = TOL[pb["dtype"]]
    for index, (ref, got) in enumerate(zip(*results)):
        assert got.dtype == ref.dtype and got.shape == ref.shape
        assert torch.isfinite(got).all()
        ref, got = ref.double(), got.double()
        tol = (fwd_tol if index == 0 else grad_tol) * max(1.0, ref.abs().max().item())
        assert (got - ref).abs().max().item() <= tol, f"tensor {index} (0 = out, then grads of q, k, v, bias)"


@settings(max_examples=120)
@given(pb=problems())
def test_sdpa_matches_reference_forward_and_backward(pb):
    _compare(sdpa_blocks_attention, pb)


def test_sdpa_small_chunks_match_reference(monkeypatch):
    """Work in many chunks (each a window) gives the same result as one chunk."""
    monkeypatch.setattr("windowed_attention.ops.sdpa_blocks.CHUNK_ELEMENTS", 1)
    for causal, exact in ((True, False), (True, True), (False, True)):
        spec = WindowSpec(5, causal, 2, 0 if causal else 1, exact)
        mask = torch.rand(2, 37, generator=torch.Generator().manual_seed(1)) < 0.6
        pb = dict(spec=spec, n=37, P=4, d=8, dv=8, mask=mask, key_scale=None, attn_bias=None, mask_self=False,
                  dtype=torch.float64, seed=3)
        _compare(sdpa_blocks_attention, pb)


def test_sdpa_rows_that_see_nothing_are_zero_with_zero_grads():
    spec = WindowSpec(4, True, 1, 0, False)
    q, k, v = (torch.randn(2, 10, 8, requires_grad=True) for _ in range(3))
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[0] = False
    out = sdpa_blocks_attention(q, k, v, AttentionCall(spec, scale=0.3, mask=mask))
    assert out[0].eq(0).all()
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all() and t.grad[0].eq(0).all()


@pytest.mark.parametrize("chunk_elements", [1, 1 << 22])
def test_chunk_masks_cover_exactly_the_window_pattern(monkeypatch, chunk_elements):
    """The shared interior mask, the edge masks and the chunking together give exactly `spec.visible`."""
    monkeypatch.setattr("windowed_attention.ops.sdpa_blocks.CHUNK_ELEMENTS", chunk_elements)
    for causal, exact, lb, lf in ((True, False, 1, 0), (True, True, 2, 0), (False, True, 1, 2), (False, False, 0, 1), (True, True, 0, 0)):
        spec = WindowSpec(3, causal, lb, lf, exact)
        w = 3
        for n in (1, 7, 3 * (lb + lf + 3), 3 * (lb + lf + 3) + 2):
            windows = -(-n // w)
            plan = _Plan(spec, n, windows, None, 1.0, None, torch.float32, torch.device("cpu"), 1)
            seen = torch.zeros(windows * w, (windows + lb + lf) * w, dtype=torch.int64)
            covered = []
            for b0, b1 in plan.chunks():
                covered += range(b0, b1)
                keep = plan.mask(b0, b1).expand(1, b1 - b0, w, spec.span * w)[0] == 0
                for b in range(b0, b1):
                    seen[b * w : (b + 1) * w, b * w : (b + spec.span) * w] += keep[b - b0].long()
            assert covered == list(range(windows))
            i, j = torch.arange(windows * w)[:, None], torch.arange(-lb * w, (windows + lf) * w)[None]
            assert torch.equal(seen, spec.visible(i, j, n).long())


def test_sdpa_refuses_what_it_does_not_support():
    spec = WindowSpec(4, True, 1, 0, False)
    q = torch.randn(2, 8, 4)
    for kwargs in (dict(attn_bias=torch.zeros(1, 4, 8)), dict(mask_self=True), dict(dropout_p=0.1)):
        with pytest.raises(ValueError, match="sdpa"):
            sdpa_blocks_attention(q, q, q, AttentionCall(spec, scale=1.0, **kwargs))


def test_sdpa_under_cpu_autocast_runs_in_bfloat16_close_to_reference():
    spec = WindowSpec(16, True, 1, 0, True)
    q, k, v = (torch.randn(4, 70, 16) for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = local_attention(q, k, v, window_size=16, causal=True, exact_windowsize=True)
    ref = reference_attention(q.double(), k.double(), v.double(), AttentionCall(spec, scale=0.25))
    assert out.dtype == torch.bfloat16
    assert (out.double() - ref).abs().max() < 5e-2


def test_bias_and_mask_self_grads_through_auto():
    """attn_bias and shared_qk dispatch to a backend that takes them (fused, or reference without it)."""
    pb = dict(spec=WindowSpec(4, False, 1, 1, False), n=13, P=4, d=8, dv=8, mask=None, key_scale=None,
              attn_bias=torch.randn(2, 4, 12, dtype=torch.float64), mask_self=True, dtype=torch.float64, seed=0)
    backend = backends.choose(torch.zeros(1, dtype=pb["dtype"]),
                              AttentionCall(pb["spec"], 1.0, attn_bias=pb["attn_bias"], mask_self=True))
    _compare(backends.get(backend), pb)


@settings(max_examples=150)
@given(pb=problems(dtypes=(torch.float64, torch.float32, torch.bfloat16, torch.float16), max_w=80, with_bias=True))
def test_fused_matches_reference_forward_and_backward(pb):
    """Windows up to 80 (more than one 64-row block), masks, bias (and its gradient), shared_qk, xpos key
    scales, any n, float64/float32/bfloat16/float16."""
    _compare(fused_cpu_attention, pb)


@pytest.mark.parametrize(
    "causal,look_backward,look_forward,exact", [(True, 1, 0, False), (True, 2, 0, True), (False, 1, 1, False), (False, 2, 1, True)]
)
def test_fused_blocks_and_phases_at_larger_windows(causal, look_backward, look_forward, exact):
    """w = 100 (blocks of 64 and 36 rows), n not a multiple of w, enough windows for both backward phases."""
    mask = torch.rand(3, 523, generator=torch.Generator().manual_seed(2)) < 0.8
    bias = torch.randn(2, 100, (look_backward + look_forward + 1) * 100, dtype=torch.float64)
    key_scale = 0.5 + torch.rand(look_backward + look_forward + 1, 16, dtype=torch.float64)
    pb = dict(spec=WindowSpec(100, causal, look_backward, look_forward, exact), n=523, P=6, d=16, dv=8, mask=mask,
              key_scale=key_scale, attn_bias=bias, mask_self=True, dtype=torch.float64, seed=5)
    _compare(fused_cpu_attention, pb)
    pb.update(mask=None, attn_bias=None, mask_self=False, key_scale=None, dtype=torch.float32)
    _compare(fused_cpu_attention, pb)
    for dtype in (torch.bfloat16, torch.float16):
        pb.update(dtype=dtype)
        _compare(fused_cpu_attention, pb)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["expanded", "wider rows", "transposed", "heads inside rows"])
def test_fused_takes_the_upstream_gradient_in_any_layout(layout, dtype):
    """Autograd hands over gradients with any strides (`.sum()` gives an expanded one): the kernel reads
    them in place or gathers them per block, with the same result as a contiguous gradient."""
    P, n, dv = 3, 150, 8
    g = torch.Generator().manual_seed(3)
    grad = {
        "expanded": lambda: torch.tensor(0.7).expand(P, n, dv),
        "wider rows": lambda: torch.randn(P, n, dv + 5, generator=g)[..., 2:2 + dv],
        "transposed": lambda: torch.randn(P, dv, n, generator=g).transpose(1, 2),
        "heads inside rows": lambda: torch.randn(n, P, dv, generator=g).transpose(0, 1),
    }[layout]().to(dtype)
    spec = WindowSpec(40, False, 1, 1, False)
    results = []
    for f, upstream in ((reference_attention, grad.contiguous().double()), (fused_cpu_attention, grad)):
        leaves = [torch.randn(P, n, dv, generator=torch.Generator().manual_seed(s)).to(upstream.dtype).requires_grad_()
                  for s in range(3)]
        out = f(*leaves, AttentionCall(spec, scale=0.3))
        results.append(torch.autograd.grad(out, leaves, upstream))
    tol = 1e-9 if dtype == torch.float64 else 5e-2
    for ref, got in zip(*results):
        assert (got.double() - ref).abs().max() <= tol * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 5e-2), (torch.float16, 5e-3)])
def test_fused_under_cpu_autocast_runs_in_the_autocast_dtype_close_to_reference(dtype, tol):
    spec = WindowSpec(16, True, 1, 0, True)
    q, k, v = (torch.randn(4, 70, 16, requires_grad=True) for _ in range(3))
    with torch.autocast("cpu", dtype=dtype):
        out = fused_cpu_attention(q, k, v, AttentionCall(spec, scale=0.25))
    ref = reference_attention(q.double(), k.double(), v.double(), AttentionCall(spec, scale=0.25))
    assert out.dtype == dtype
    assert (out.double() - ref).abs().max() < tol
    out.float().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.float32 for t in (q, k, v))


def test_fused_rows_that_see_nothing_are_zero_with_zero_grads():
    spec = WindowSpec(4, True, 1, 0, False)
    q, k, v = (torch.randn(2, 10, 8, requires_grad=True) for _ in range(3))
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[0] = False
    out = fused_cpu_attention(q, k, v, AttentionCall(spec, scale=0.3, mask=mask))
    assert out[0].eq(0).all()
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all() and t.grad[0].eq(0).all()


@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_fused_gradients_do_not_depend_on_the_thread_count(dropout_p):
    """The backward's two phases give each key range one owner, and dropout is a hash of positions:
    the same bits with 1 or 2 threads."""
    spec = WindowSpec(64, True, 1, 0, False)
    q, k, v = (torch.randn(4, 700, 16, generator=torch.Generator().manual_seed(s)) for s in range(3))
    results = []
    threads = torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            torch.manual_seed(0)
            out = fused_cpu_attention(*leaves, AttentionCall(spec, scale=0.25, dropout_p=dropout_p))
            results.append([out, *torch.autograd.grad(out.square().sum(), leaves)])
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*results):
        assert torch.equal(one, two)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("spec", [WindowSpec(8, False, 1, 1, False), WindowSpec(70, True, 1, 0, True)])
def test_fused_dropout_is_the_exact_gradient_of_the_weights_it_drops(dtype, spec):
    """Which weights drop depends only on the seed and the (head, query, key) positions. A run with
    v = identity reveals them (its output rows are the dropped weights); the forward and backward of a
    run with the same seed must then be those of the reference's weights times the revealed factors."""
    p, P, n, d = 0.3, 3, 150, 8
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(P, n, d, generator=g).to(dtype) for _ in range(3))
    mask = torch.rand(1, n, generator=g) < 0.8
    eye = torch.eye(n, dtype=torch.float64).expand(P, n, n).contiguous()
    torch.manual_seed(11)
    revealed = fused_cpu_attention(q.double(), k.double(), eye, AttentionCall(spec, scale=0.4, mask=mask, dropout_p=p))
    weights = reference_attention(q.double(), k.double(), eye, AttentionCall(spec, scale=0.4, mask=mask))
    kept = revealed != 0
    assert 0.2 < 1 - kept[weights > 0].double().mean() < 0.4  # about p of the weights are dropped
    torch.testing.assert_close(revealed[kept], weights[kept] / (1 - p))

    results = []
    for run in ("fused", "reference"):
        leaves = [t.clone().requires_grad_() if run == "fused" else t.double().requires_grad_() for t in (q, k, v)]
        if run == "fused":
            torch.manual_seed(11)
            out = fused_cpu_attention(*leaves, AttentionCall(spec, scale=0.4, mask=mask, dropout_p=p))
        else:
            dropped = reference_attention(leaves[0], leaves[1], eye, AttentionCall(spec, scale=0.4, mask=mask)) * kept / (1 - p)
            out = dropped @ leaves[2]
        weights_out = torch.linspace(-1, 1, out.numel()).view_as(out).to(out.dtype)
        results.append([out, *torch.autograd.grad((out * weights_out).sum(), leaves)])
    fwd_tol, grad_tol = TOL[dtype]
    for index, (got, ref) in enumerate(zip(*results)):
        tol = (fwd_tol if index == 0 else grad_tol) * max(1.0, ref.abs().max().item())
        assert (got.double() - ref).abs().max().item() <= tol, index


def test_fused_refuses_what_it_does_not_support():
    spec = WindowSpec(4, True, 1, 0, False)
    q = torch.randn(2, 8, 4)
    with pytest.raises(ValueError, match="fused"):
        fused_cpu_attention(*(q.to(torch.complex64),) * 3, AttentionCall(spec, scale=1.0))


@settings(max_examples=6)
@given(pb=problems(dtypes=(torch.float32,), max_w=8, with_bias=True))
def test_flex_forward_matches_reference(pb):
    """Flex eagerly on CPU (its mask_mod / score_mod; the compiled CPU forward below, CUDA compiled)."""
    from torch.nn.attention.flex_attention import flex_attention

    pb["key_scale"] = None
    with warnings.catch_warnings(), pytest.MonkeyPatch.context() as patch:
        warnings.simplefilter("ignore")
        patch.setattr(flex, "_compiled_flex", lambda: flex_attention)
        with torch.no_grad():
            _compare(flex_attention_backend, pb, backward=False)


def test_flex_runs_compiled_on_cpu_forward_only():
    """`backend="flex"` on CPU: compiled FlexAttention's forward equals the reference (mask, grouped-query
    heads); a call that needs gradients is refused by name; `auto` never picks it on CPU."""
    if not backends.availability()["flex"]:
        pytest.skip("this torch has no FlexAttention")
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 300, 32), torch.randn(2, 2, 300, 32), torch.randn(2, 2, 300, 32)
    mask = torch.rand(2, 300) < 0.8
    options = dict(window_size=64, causal=True, mask=mask)
    with torch.no_grad():
        got = local_attention(q, k, v, backend="flex", **options)
    torch.testing.assert_close(got, local_attention(q, k, v, backend="reference", **options), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="'flex' computes no gradients on CPU"):
        local_attention(q.requires_grad_(), k, v, backend="flex", **options)
    assert backends.decide("cpu", torch.float32, frozenset({"mask"}), available={name: True for name in backends.names()}) != "flex"


def _dense_sliding_window(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0):
    """Stand-in for flash_attn_func: `(b, n, h, d)`, keys in `[i - left, i + right]` (and `j <= i` if causal)."""
    n = q.shape[1]
    i, j = torch.arange(n)[:, None], torch.arange(n)[None]
    left, right = window_size  # -1: unbounded on that side
    keep = ((j >= i - left) | (left < 0)) & ((j <= i + right) | (right < 0))
    if causal:
        keep &= j <= i
    scores = torch.einsum("bihd,bjhd->bhij", q, k) * softmax_scale
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    return torch.einsum("bhij,bjhd->bihd", scores.masked_fill(~keep, float("-inf")).softmax(-1), v)


@pytest.mark.parametrize("causal,look_backward,look_forward", [(True, 1, 0), (True, 2, 0), (False, 1, 1), (False, 0, 2)])
def test_flash_maps_exact_windows_to_window_size(monkeypatch, causal, look_backward, look_forward):
    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_func=_dense_sliding_window))
    pb = dict(spec=WindowSpec(4, causal, look_backward, look_forward, True), n=19, P=3, d=8, dv=8, mask=None,
              key_scale=None, attn_bias=None, mask_self=False, dtype=torch.float64, seed=0)
    _compare(flash_attn_backend, pb)


@pytest.mark.parametrize("window,causal,softcap", [((5, 0), True, None), ((3, 4), False, 2.0), ((-1, 0), True, 30.0),
                                                   ((0, -1), False, None)])
def test_flash_maps_token_windows_and_softcap(monkeypatch, window, causal, softcap):
    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_func=_dense_sliding_window))
    spec = WindowSpec.token_window(*window, causal, softcap=softcap).for_length(19)
    pb = dict(spec=spec, n=19, P=3, d=8, dv=8, mask=None, key_scale=None, attn_bias=None, mask_self=False,
              dtype=torch.float64, seed=0)
    _compare(flash_attn_backend, pb)


def test_flash_refuses_what_flash_attn_lacks_by_name(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_func=_dense_sliding_window))
    q = torch.randn(2, 8, 4)
    for spec, options, lacking in ((WindowSpec(4, True, 1, 0, False), {}, "block_window"),
                                   (WindowSpec(4, True, 1, 0, True, sink_tokens=2), {}, "sink_tokens"),
                                   (WindowSpec(4, True, 1, 0, True), dict(sinks=torch.zeros(2)), "sinks")):
        with pytest.raises(ValueError, match=f"backend 'flash' does not compute {lacking}"):
            flash_attn_backend(q, q, q, AttentionCall(spec, 1.0, **options))


@pytest.mark.parametrize("masked", [True, False])
def test_fused_outputs_reuse_pooled_memory_exactly(masked):
    """Outputs of 1 MB and more come back from the kernel's pool uninitialised, holding the last call's
    values: a second call on other inputs that reuses them must still match the reference everywhere
    (rows that see nothing, the ragged last window, gradients zeroed by the backward's first phase), with a
    key padding mask and without one (the softmax's general and plain passes)."""
    from windowed_attention.ops import fused_cpu

    spec = WindowSpec(16, False, 1, 1, True)
    P, n, d = 2, 4096 + 5, 64  # each output just over 2 MB in float32
    mask = torch.rand(2, n, generator=torch.Generator().manual_seed(0)) < 0.9
    mask[1, : 3 * 16] = False  # whole windows of keys masked: their queries see nothing
    fused_cpu.release_memory()

    def run(f, seed):
        leaves = [torch.randn(P, n, d, generator=torch.Generator().manual_seed(seed + s)).requires_grad_() for s in range(3)]
        out = f(*leaves, AttentionCall(spec, scale=0.125, mask=mask if masked else None))
        weights = torch.linspace(-1, 1, out.numel()).view_as(out)
        return [out.detach(), *torch.autograd.grad((out * weights).sum(), leaves)]

    first = run(fused_cpu_attention, 0)
    freed = {t.data_ptr() for t in first}
    del first
    assert fused_cpu.idle_bytes() >= 4 * P * n * d * 4
    second = run(fused_cpu_attention, 10)
    assert {t.data_ptr() for t in second} <= freed  # every output is a reused buffer
    for index, (got, ref) in enumerate(zip(second, run(reference_attention, 10))):
        assert (got - ref).abs().max().item() <= 1e-4 * max(1.0, ref.abs().max().item()), index
    assert not masked or (second[0][1, :16].eq(0).all() and second[1][1, :16].eq(0).all())
    del second
    fused_cpu.release_memory()
    assert fused_cpu.idle_bytes() == 0


def _pool_in_fresh_process(code: str, env: dict[str, str]) -> list[int]:
    """`code` run in a new Python process (the pool reads its settings once, when the kernel loads) with `env`
    added to the environment and `run(n)`, a fused call on (1, n, 64) inputs whose output it drops, defined; the
    integers of its last printed line."""
    preamble = (
        "import time, torch\n"
        "from windowed_attention.ops import fused_cpu\n"
        "from windowed_attention.ops.call import AttentionCall\n"
        "from windowed_attention.ops.spec import WindowSpec\n"
        "def run(n):\n"
        "    q = torch.randn(1, n, 64)\n"
        "    return fused_cpu.fused_cpu_attention(q, q, q, AttentionCall(WindowSpec(8, True, 1, 0, False), scale=1.0))\n"
    )
    done = subprocess.run([sys.executable, "-c", preamble + code], capture_output=True, text=True,
                          env={**os.environ, **env}, check=True)
    return [int(x) for x in done.stdout.splitlines()[-1].split()]


def test_fused_pool_can_be_turned_off():
    from windowed_attention.ops import fused_cpu

    for cap, pooled in (("0", False), ("64", True)):
        (idle,) = _pool_in_fresh_process("run(2**17 + 1)\nprint(fused_cpu.idle_bytes())\n", {fused_cpu.POOL_ENV: cap})
        assert (idle > 0) == pooled, (cap, idle)


def test_fused_pool_unmaps_memory_no_call_reused():
    """Outputs no call has reused for `$WINDOWED_ATTENTION_POOL_IDLE_S` seconds are unmapped at the pool's next
    use; those reused in time stay (a loop of one shape keeps its memory)."""
    from windowed_attention.ops import fused_cpu

    code = (
        "run(2**14)\n"  # 4 MB: pooled
        "first = fused_cpu.idle_bytes()\n"
        "run(2**14)\n"  # reused at once, kept again
        "again = fused_cpu.idle_bytes()\n"
        "time.sleep(1.5)\n"
        "run(2**15)\n"  # another size, after the first's has been idle for longer than the limit
        "print(first, again, fused_cpu.idle_bytes())\n"
    )
    first, again, last = _pool_in_fresh_process(code, {fused_cpu.POOL_IDLE_ENV: "1"})
    assert first >= 2**14 * 64 * 4 and again == first, (first, again)
    assert 2**15 * 64 * 4 <= last < 2**15 * 64 * 4 + first, (first, last)  # the 4 MB mapping is gone


def _gemm_choice(own: bool, kind: str, instructions: str):
    """The fused kernel with MKL's `kind` GEMM (own False) or ours (skipped on CPUs without `instructions`),
    the previous choice restored afterwards."""
    kernel = fused_cpu.kernel()
    current, use = getattr(kernel, f"own_{kind}_gemm"), getattr(kernel, f"use_own_{kind}_gemm")
    before = current()
    try:
        if use(own) != own:
            pytest.skip(f"this CPU has no {instructions}")
        yield kernel
    finally:
        use(before)


@pytest.fixture(params=[False, True], ids=["mkl-bf16-gemm", "own-bf16-gemm"])
def bf16_gemm(request):
    """The fused kernel with MKL's bfloat16 GEMM, then with ours (AVX512-BF16)."""
    yield from _gemm_choice(request.param, "bf16", "AVX512-BF16")


def test_bf16_gemm_matches_float64_in_every_layout(bf16_gemm):
    """Both transpositions, odd and tiny sizes (tails of the 8 x 32 tiles, of the packing's 16 x 16 transposes
    and 32-wide interleaves, an odd k), alpha and beta, and leading dimensions wider than the rows."""
    g = torch.Generator().manual_seed(0)
    for ta in (False, True):
        for tb in (False, True):
            for m, n, k in [(1, 1, 1), (3, 5, 7), (8, 32, 64), (9, 33, 65), (64, 100, 31), (17, 1, 2), (100, 3, 1),
                            (5, 47, 67), (40, 50, 34)]:
                a = torch.randn(k if ta else m, (m if ta else k) + 3, generator=g).bfloat16()[:, : m if ta else k]
                b = torch.randn(n if tb else k, (k if tb else n) + 2, generator=g).bfloat16()[:, : k if tb else n]
                c = torch.randn(m, n, generator=g)
                for alpha, beta in ((1.0, 0.0), (0.5, 1.0)):
                    ref = alpha * (a.double().T if ta else a.double()) @ (b.double().T if tb else b.double()) + beta * c.double()
                    got = bf16_gemm.bf16_gemm(ta, tb, a, b, alpha, beta, c.clone())
                    assert (got.double() - ref).abs().max() <= 1e-5 * max(1.0, ref.abs().max().item()), (ta, tb, m, n, k)


@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])  # the GEMM choice holds for all
@given(pb=problems(dtypes=(torch.bfloat16,), max_w=80, with_bias=True))
def test_fused_bfloat16_matches_reference_through_either_gemm(bf16_gemm, pb):
    _compare(fused_cpu_attention, pb)


@pytest.fixture(params=["mkl", "avx2", "avx512"], ids=lambda isa: f"{isa}-f32-gemm")
def f32_gemm(request):
    """The fused kernel with MKL's float32 GEMM, then with ours in each build the CPU runs (AVX2 with FMA,
    AVX-512F), the previous choice restored afterwards."""
    kernel = fused_cpu.kernel()
    before = kernel.f32_gemm_isa()
    try:
        if kernel.use_f32_gemm_isa(request.param) != request.param:
            pytest.skip(f"this CPU does not run the {request.param} build")
        yield kernel
    finally:
        kernel.use_f32_gemm_isa(before)


# (m, n, k): tiny ones, the tails of the 6 x 64 tiles and of the 16-wide transposes, k = 0, k in several
# chunks of 256, and the kernel's own block shapes (64 query rows, a few hundred keys, 64 dims)
F32_GEMM_SHAPES = [(1, 1, 1), (3, 5, 7), (6, 64, 16), (7, 65, 17), (13, 100, 0), (100, 3, 1), (17, 130, 33),
                   (9, 70, 600), (64, 416, 64), (64, 64, 320), (320, 64, 64)]


def test_f32_gemm_matches_float64_in_every_layout(f32_gemm):
    """Every transposition (the kernel issues NT, NN and TN), tails of the tiles in m, n and k, alpha and beta
    (beta = 0 must not read C: it holds NaN there), and leading dimensions wider than the rows."""
    g = torch.Generator().manual_seed(0)
    for ta in (False, True):
        for tb in (False, True):
            for m, n, k in F32_GEMM_SHAPES:
                a = torch.randn(k if ta else m, (m if ta else k) + 3, generator=g)[:, : m if ta else k]
                b = torch.randn(n if tb else k, (k if tb else n) + 2, generator=g)[:, : k if tb else n]
                for alpha, beta in ((1.0, 0.0), (0.125, 1.0), (-0.5, 0.25)):
                    c = torch.randn(m, n + 5, generator=g)[:, :n]
                    if beta == 0.0:
                        c.fill_(float("nan"))
                    ref = alpha * (a.double().T if ta else a.double()) @ (b.double().T if tb else b.double())
                    if beta != 0.0:
                        ref += beta * c.double()
                    got = f32_gemm.f32_gemm(ta, tb, a, b, alpha, beta, c.clone())
                    bound = 1e-6 * max(1.0, ref.abs().max().item()) * max(1, k) ** 0.5
                    assert (got.double() - ref).abs().max() <= bound, (ta, tb, m, n, k, alpha, beta)


def _band(rows, cols, g):
    """Random rows' column ranges [lo, hi) within [0, cols), both non-decreasing, some empty (int64)."""
    lo = torch.sort(torch.randint(0, cols + 1, (rows,), generator=g)).values
    hi = torch.maximum(lo, torch.sort(torch.randint(0, cols + 1, (rows,), generator=g)).values)
    return lo, hi


def test_f32_gemm_band_computes_what_the_band_needs(f32_gemm):
    _band_products(f32_gemm, torch.float32, 1e-5)


def test_bf16_gemm_band_computes_what_the_band_needs(bf16_gemm):
    """The same for the bfloat16 GEMM (8-row tiles, 32-column panels, k in pairs: a band may start or end inside
    a pair)."""
    _band_products(bf16_gemm, torch.bfloat16, 1e-5)


def _band_products(kernel, dtype, tol):
    """The band lets the GEMM skip what a block's rows cannot see: over the keys (`cols`: only the band's
    entries of C are defined; C holds NaN elsewhere before), summed per row over its keys (`k_rows`), or per
    key over the rows that see it (`k_cols`); the operand is zero outside the band, as the kernel's weights
    are. Every in-band entry must equal the full float64 product: a tile skipped or cut short shows."""
    g = torch.Generator().manual_seed(1)
    for m, n, k in [(64, 416, 64), (13, 70, 9), (64, 64, 300), (7, 1, 5)]:
        for trial in range(3):
            # cols: C (m x n) = A (m x k) B^T (n x k), row r defined on [lo[r], hi[r])
            lo, hi = _band(m, n, g)
            a, b = torch.randn(m, k, generator=g).to(dtype), torch.randn(n, k, generator=g).to(dtype)
            c = torch.full((m, n), float("nan"))
            kernel.gemm_band(0, lo, hi, False, True, a, b, 0.5, 0.0, c)
            inside = (torch.arange(n) >= lo[:, None]) & (torch.arange(n) < hi[:, None])
            ref = 0.5 * a.double() @ b.double().T
            assert (c.double() - ref)[inside].abs().le(tol * k ** 0.5).all(), (m, n, k, "cols")
            # k_rows: C (m x n) = W (m x k) V (k x n), W zero outside row r's [lo[r], hi[r]) of k
            lo, hi = _band(m, k, g)
            inside = (torch.arange(k) >= lo[:, None]) & (torch.arange(k) < hi[:, None])
            w = (torch.randn(m, k, generator=g) * inside).to(dtype)
            v, c0 = torch.randn(k, n, generator=g).to(dtype), torch.randn(m, n, generator=g)
            got = kernel.gemm_band(1, lo, hi, False, False, w, v, 1.0, 1.0, c0.clone())
            ref = w.double() @ v.double() + c0.double()
            assert (got.double() - ref).abs().max() <= tol * k ** 0.5, (m, n, k, "k_rows")
            # k_cols: C (n x k') = W^T Q, W (m x n) zero outside row r's [lo[r], hi[r]) of the n keys
            lo, hi = _band(m, n, g)
            inside = (torch.arange(n) >= lo[:, None]) & (torch.arange(n) < hi[:, None])
            w = (torch.randn(m, n, generator=g) * inside).to(dtype)
            q, c0 = torch.randn(m, k, generator=g).to(dtype), torch.randn(n, k, generator=g)
            got = kernel.gemm_band(2, lo, hi, True, False, w, q, 0.25, 1.0, c0.clone())
            ref = 0.25 * w.double().T @ q.double() + c0.double()
            assert (got.double() - ref).abs().max() <= tol * m ** 0.5, (m, n, k, "k_cols")


def test_f32_gemm_keeps_packed_keys_across_products(f32_gemm):
    """A kernel call's blocks reuse the keys packed for the block before (the same first key, more of them or
    fewer): each product must still equal its own float64 product, whatever was packed before."""
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(64, 64, generator=g), torch.randn(700, 64, generator=g)
    ns = [100, 200, 320, 384, 90, 448, 513, 700, 1, 650]  # panels packed in part, then extended
    got = f32_gemm.gemm_packed(a, b, [torch.full((64, n), float("nan")) for n in ns])
    for n, c in zip(ns, got):
        ref = a.double() @ b[:n].double().T
        assert (c.double() - ref).abs().max() <= 1e-5 * 8, n


def test_bf16_gemm_keeps_packed_keys_across_products(bf16_gemm):
    """The same for the bfloat16 GEMM's pair panels (32 columns each; an odd k gives a half pair)."""
    g = torch.Generator().manual_seed(3)
    for k in (64, 37):
        a, b = torch.randn(64, k, generator=g).bfloat16(), torch.randn(700, k, generator=g).bfloat16()
        ns = [100, 200, 320, 384, 90, 448, 513, 700, 1, 650]
        got = bf16_gemm.gemm_packed(a, b, [torch.full((64, n), float("nan")) for n in ns])
        for n, c in zip(ns, got):
            ref = a.double() @ b[:n].double().T
            assert (c.double() - ref).abs().max() <= 1e-5 * max(1.0, ref.abs().max().item()), (k, n)


@settings(max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture])  # the GEMM choice holds for all
@given(pb=problems(dtypes=(torch.float32,), max_w=80, with_bias=True))
def test_fused_float32_matches_reference_through_either_gemm(f32_gemm, pb):
    _compare(fused_cpu_attention, pb)


def test_fused_float32_head_dim_64_through_either_gemm(f32_gemm):
    """The shapes the own GEMM is made for: 64 dims, full 64-row blocks over a few hundred keys, forward and
    backward (every gradient) against the reference."""
    _compare_modern(dict(seed=3, spec=WindowSpec(128, True, 1, 0, False), P=2, P_kv=2, n=600, d=64, dv=64),
                    dtype=torch.float32)


@pytest.mark.parametrize("scale", [1.0, 32**-0.5, 0.3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_saturated_rows_pass_exactly_zero_query_gradient(dtype, scale):
    """Where a row's softmax saturates to a single key, the exact gradient of its query is zero, and the
    reference (autograd's softmax) gives exactly zero. So must the kernel: it takes the softmax gradient's
    row sum from the recomputed weights, not from <dO, O>, which differs in the last bits and, times large
    keys (xpos scales them by up to 1e4 and more), left errors of 1e-8 in float64; and its largest weight must
    be exactly 1, which a scale that is not a power of two tests (the scaled score rounded before the shift)."""
    spec = WindowSpec(16, False, 1, 1, False)
    g = torch.Generator().manual_seed(1)
    q = (torch.randn(4, 64, 32, generator=g) * 1e4).to(dtype)  # scores far apart: one-hot rows
    k, v = (torch.randn(4, 64, 32, generator=g).to(dtype) for _ in range(2))
    upstream = torch.randn(4, 64, 32, generator=g).to(dtype)
    grads = []
    for f in (reference_attention, fused_cpu_attention):
        leaf = q.clone().requires_grad_()
        grads.append(torch.autograd.grad(f(leaf, k, v, AttentionCall(spec, scale=scale)), leaf, upstream)[0])
    saturated = grads[0].eq(0).all(dim=-1)
    assert saturated.float().mean() > 0.5
    assert grads[1][saturated].eq(0).all()


def _modern(seed, P=4, P_kv=2, n=300, n_q=None, d=16, dv=8, dtype=torch.float64, mask=False, bias_spec=None,
            key_scale=False, documents=None, sinks=False, **call):
    """Inputs and an `AttentionCall` with the modern options: `(leaves, call)`; leaves are q, k, v and the
    differentiable bias and sinks (present ones only)."""
    g = torch.Generator().manual_seed(seed)
    n_q = n if n_q is None else n_q
    q = torch.randn(P, n_q, d, generator=g).to(dtype).requires_grad_()
    k = torch.randn(P_kv, n, d, generator=g).to(dtype).requires_grad_()
    v = torch.randn(P_kv, n, dv, generator=g).to(dtype).requires_grad_()
    spec = call.pop("spec")
    extra = {}
    if mask:
        extra["mask"] = torch.rand(2, n, generator=g) < 0.85
    if bias_spec is not None:
        extra["attn_bias"] = torch.randn(2, spec.window_size, spec.span * spec.window_size, generator=g,
                                         dtype=torch.float64).to(dtype).requires_grad_()
    if key_scale:
        extra["key_scale"] = (0.5 + torch.rand(spec.span, d, generator=g, dtype=torch.float64)).to(dtype)
    if documents is not None:  # (rows, lengths): the documents of each row, by length
        extra["documents"] = torch.stack([torch.repeat_interleave(torch.arange(len(row)), torch.tensor(row))
                                          for row in documents])
    if sinks:
        extra["sinks"] = torch.randn(2, generator=g, dtype=torch.float64).requires_grad_()
    leaves = [q, k, v] + [extra[name] for name in ("attn_bias", "sinks") if name in extra]
    return leaves, AttentionCall(spec, scale=0.4, query_offset=n - n_q, **extra, **call)


def _compare_modern(setup, dtype=torch.float64, tol=None):
    """Fused against the reference on `_modern(**setup)`: the output and every gradient."""
    results = []
    for f in (reference_attention, fused_cpu_attention):
        leaves, call = _modern(**setup, dtype=dtype)
        out = f(*leaves[:3], call)
        weights = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view_as(out).to(out.dtype)
        results.append([out, *torch.autograd.grad((out * weights).sum(), leaves)])
    fwd_tol, grad_tol = tol or TOL[dtype]
    for index, (ref, got) in enumerate(zip(*results)):
        assert got.dtype == ref.dtype and got.shape == ref.shape, index
        assert torch.isfinite(got).all(), index
        ref, got = ref.double(), got.double()
        bound = (fwd_tol if index == 0 else grad_tol) * max(1.0, ref.abs().max().item())
        assert (got - ref).abs().max().item() <= bound, f"tensor {index} (0 = out, then q, k, v, bias, sinks)"


# documents of each of 2 rows: lengths that hold several windows (both backward phases), a window's
# fraction, and single positions
DOCS = [[130, 1, 97, 72], [250, 50]]
MODERN_CASES = {
    "block window, documents, sink tokens": dict(spec=WindowSpec(100, True, 1, 0, False, sink_tokens=3),
                                                 documents=DOCS, mask=True, bias_spec=True, key_scale=True),
    "exact window, every option": dict(spec=WindowSpec(70, False, 2, 1, True, sink_tokens=5, softcap=2.0),
                                       documents=DOCS, mask=True, bias_spec=True, sinks=True, mask_self=True),
    "token window, documents, short queries": dict(spec=WindowSpec.token_window(150, 0, True, 4, 3.0), documents=DOCS,
                                                   sinks=True, n_q=177),
    "token window both ways, many sink tokens": dict(spec=WindowSpec.token_window(90, 40, False, 200), mask=True,
                                                     sinks=True, n_q=250),
    "not causal, no look-ahead, sink tokens after the window": dict(spec=WindowSpec(30, False, 2, 0, True, sink_tokens=100),
                                                                    documents=DOCS, n_q=290),
    "unbounded token window, GQA 4": dict(spec=WindowSpec.token_window(-1, 0, True, 2, 5.0).for_length(300), P_kv=1,
                                          documents=DOCS, sinks=True),
}


@pytest.mark.parametrize("case", MODERN_CASES)
def test_fused_modern_options_over_several_blocks_and_both_phases(case):
    """Windows of several 64-row blocks, documents spanning several windows (both backward phases per
    document), sink tokens seen by every block, learned sinks, softcap, shorter queries, with masks, bias,
    xpos and GQA: float64 against the reference."""
    _compare_modern(dict(seed=7, **MODERN_CASES[case]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", ["exact window, every option", "token window, documents, short queries"])
def test_fused_modern_options_in_lower_precision(case, dtype):
    _compare_modern(dict(seed=8, **MODERN_CASES[case]), dtype=dtype)


def test_fused_documents_split_key_rows_shared_across_documents_rows():
    """Query rows sharing a key row (GQA) but in different rows of documents: the key rows are repeated."""
    _compare_modern(dict(seed=9, spec=WindowSpec(40, True, 1, 0, False, sink_tokens=2), P=4, P_kv=1, n=120,
                         documents=[[60, 60], [20, 100], [120], [1, 119]], sinks=True))



def test_fused_learned_sink_that_takes_all_weight_passes_no_gradient():
    """A sink so large that every weight of a head underflows in float32: that head outputs zeros and its
    q, k, v get zero gradients (as the reference's float32 softmax gives), not those of unnormalised weights."""
    spec = WindowSpec(32, True, 1, 0, False)
    results = []
    for f in (reference_attention, fused_cpu_attention):
        leaves = [torch.randn(2, 100, 8, generator=torch.Generator().manual_seed(s)).requires_grad_() for s in range(3)]
        sinks = torch.tensor([200.0, 0.0], requires_grad=True)
        out = f(*leaves, AttentionCall(spec, scale=0.5, sinks=sinks))
        results.append([out, *torch.autograd.grad(out.square().sum(), [*leaves, sinks])])
    for ref, got in zip(*results):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
    assert results[1][0][0].eq(0).all() and results[1][1][0].eq(0).all()

@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_fused_modern_gradients_do_not_depend_on_the_thread_count(dropout_p):
    """Sink tokens' dK, dV (their own pass) and the learned sinks' gradient (a fixed-order sum): the same
    bits with 1 or 2 threads."""
    results = []
    threads = torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            leaves, call = _modern(3, P=4, P_kv=4, n=700, spec=WindowSpec(64, True, 1, 0, False, sink_tokens=4,
                                                                          softcap=5.0),
                                   documents=[[300, 400], [700]], sinks=True, dropout_p=dropout_p)
            torch.manual_seed(0)
            out = fused_cpu_attention(*leaves[:3], call)
            results.append([out, *torch.autograd.grad(out.square().sum(), leaves)])
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*results):
        assert torch.equal(one, two)


def test_the_kernel_op_refuses_bad_shapes_of_the_modern_tensors():
    """A direct call of the op with documents, sinks or q of a shape the kernel cannot index raises."""
    ops = fused_cpu.kernel()
    q, k, v = (torch.randn(4, 16, 8) for _ in range(3))
    options = (4, 1, 0, -1, 0, True, 2, 3.0, 0.3, False, 0.0, 0)  # w, lb, lf, left, right, causal, sink_tokens, ...
    documents, sinks = torch.zeros(2, 16, dtype=torch.long), torch.zeros(2)
    ops.forward(q, k, v, None, None, None, documents, sinks, *options)  # the right shapes
    ops.forward(q[:, 5:].contiguous(), k, v, None, None, None, documents, sinks, *options)  # shorter queries
    for bad in (torch.zeros(2, 15, dtype=torch.long), torch.zeros(3, 16, dtype=torch.long), torch.zeros(2, 16),
                torch.zeros(16, dtype=torch.long), torch.zeros(2, 32, dtype=torch.long)[:, ::2]):
        with pytest.raises(RuntimeError, match="documents"):
            ops.forward(q, k, v, None, None, None, bad, None, *options)
    with pytest.raises(RuntimeError, match="documents"):  # query rows of key row 0 in two rows of documents
        ops.forward(q, k[:1], v[:1], None, None, None, torch.zeros(4, 16, dtype=torch.long), None, *options)
    for bad in (torch.zeros(3), torch.zeros(2, 1), torch.zeros(2, dtype=torch.float64), torch.zeros(4)[::2]):
        with pytest.raises(RuntimeError, match="sinks"):
            ops.forward(q, k, v, None, None, None, None, bad, *options)
    with pytest.raises(RuntimeError, match="n_q <= n"):
        ops.forward(torch.randn(4, 17, 8), k, v, None, None, None, None, None, *options)
    for index, value, name in ((3, -2, "token bounds"), (6, -1, "sink_tokens"), (7, -1.0, "softcap")):
        bad = list(options)
        bad[index] = value
        with pytest.raises(RuntimeError, match=name):
            ops.forward(q, k, v, None, None, None, None, None, *bad)
    out, lse = ops.forward(q, k, v, None, None, None, None, sinks, *options)
    with pytest.raises(RuntimeError, match="grad_out"):
        ops.backward(out[:, 1:], q, k, v, lse, None, None, None, None, sinks, *options)


def _tiles(num_blocks, indices) -> set:
    """{(query tile, key tile)} listed by a BlockMask's (count, indices) pair."""
    num_blocks, indices = num_blocks.flatten(0, -2)[0], indices.flatten(0, -3)[0]
    return {(row, int(indices[row, p])) for row in range(indices.shape[0]) for p in range(int(num_blocks[row]))}


@settings(max_examples=40)
@given(causal=st.booleans(), w=st.sampled_from([1, 5, 64, 100, 128, 200, 300]), look_backward=st.integers(0, 2),
       look_forward=st.integers(0, 2), exact=st.booleans(), n=st.integers(1, 1100), kept=st.booleans())
def test_flex_block_mask_lists_exactly_the_tiles_create_block_mask_finds(causal, w, look_backward, look_forward,
                                                                          exact, n, kept):
    """Our block mask (built from key ranges, no n x n evaluation) against FlexAttention's own, which
    evaluates the mask at every pair: the same partial and full tiles, also under a key mask that keeps every
    key (`kept`; tests/test_call_overhead.py takes other masks, documents and sink tokens)."""
    from torch.nn.attention.flex_attention import create_block_mask

    from windowed_attention.ops import flex

    spec = WindowSpec(w, causal, look_backward, 0 if causal else look_forward, exact)
    key_ok = torch.ones(1, n, dtype=torch.bool) if kept else None
    mask_mod = flex._rule_mod(spec, n, 0, key_ok)
    ours = flex._block_mask(spec, n, n, 0, mask_mod, "cpu", key_ok)
    theirs = create_block_mask(mask_mod, None, None, n, n, device="cpu")
    assert _tiles(ours.kv_num_blocks, ours.kv_indices) == _tiles(theirs.kv_num_blocks, theirs.kv_indices)
    assert _tiles(ours.full_kv_num_blocks, ours.full_kv_indices) == _tiles(theirs.full_kv_num_blocks,
                                                                           theirs.full_kv_indices)
    # the transposed lists the backward walks agree too
    assert _tiles(ours.q_num_blocks, ours.q_indices) == _tiles(theirs.q_num_blocks, theirs.q_indices)
