"""No silent wrong results from the op: any memory layout, degenerate rows, autocast, windows longer than
the sequence, second derivatives and absurd scales.

Every backend that runs on CPU (`reference`, `sdpa`, `fused`; `flex` forward in eager mode) is checked
against the reference on contiguous float64 copies of the same inputs.
"""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from windowed_attention.ops.call import AttentionCall
from windowed_attention import LocalAttention, LocalMHA, LocalTransformer, local_attention
from windowed_attention.ops import backends, flex, fused_cpu
from windowed_attention.ops.flex import flex_attention_backend
from torch.nn.attention.flex_attention import flex_attention
from windowed_attention.ops.reference import reference_attention
from windowed_attention.ops.spec import WindowSpec
from windowed_attention.ops.validation import check_attn_bias

CPU_BACKENDS = [name for name in ("reference", "sdpa", "fused") if name == "reference" or backends.availability()[name]]
LAYOUTS = ["contiguous", "transposed", "sliced", "strided", "expanded", "heads-outer", "broadcast-rows"]


def laid_out(layout: str, shape: tuple[int, ...], dtype, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """`(leaf, view)`: `view` has `shape` `(..., n, d)` in the given memory layout and is a differentiable
    function of `leaf` (gradients are compared on the leaf)."""
    *lead, n, d = shape
    if layout == "contiguous":
        leaf = torch.randn(*shape, generator=g, dtype=torch.float64)
        make = lambda t: t
    elif layout == "transposed":  # last dim not contiguous
        leaf = torch.randn(*lead, d, n, generator=g, dtype=torch.float64)
        make = lambda t: t.transpose(-1, -2)
    elif layout == "sliced":  # an offset window of a larger tensor
        leaf = torch.randn(*lead, n + 3, d + 5, generator=g, dtype=torch.float64)
        make = lambda t: t[..., 1 : n + 1, 2 : d + 2]
    elif layout == "strided":  # every other element of the last dim
        leaf = torch.randn(*lead, n, 2 * d, generator=g, dtype=torch.float64)
        make = lambda t: t[..., ::2]
    elif layout == "expanded":  # one row of the leading dims shared by all (stride 0)
        leaf = torch.randn(*[1] * len(lead), n, d, generator=g, dtype=torch.float64)
        make = lambda t: t.expand(*shape)
    elif layout == "heads-outer":  # (n, ..., d) in memory, as from a (b, n, h, d) projection
        leaf = torch.randn(n, *lead, d, generator=g, dtype=torch.float64)
        make = lambda t: t.movedim(0, -2)
    elif layout == "broadcast-rows":  # one position repeated along n (stride 0 there)
        leaf = torch.randn(*lead, 1, d, generator=g, dtype=torch.float64)
        make = lambda t: t.expand(*shape)
    else:
        raise AssertionError(layout)
    leaf = leaf.to(dtype).requires_grad_()
    return leaf, make


@st.composite
def layout_problems(draw):
    causal = draw(st.booleans())
    w = draw(st.integers(1, 12))
    lb = draw(st.integers(0, 2))
    lf = 0 if causal else draw(st.integers(0, 2))
    # whole windows and equal head dims half of the time: backends then skip their padding copies
    n = w * draw(st.integers(1, max(1, 40 // w))) if draw(st.booleans()) else draw(st.integers(1, 40))
    d = draw(st.sampled_from([4, 6]))
    return dict(
        window=dict(window_size=w, causal=causal, look_backward=lb, look_forward=lf, exact_windowsize=draw(st.booleans())),
        n=n, b=draw(st.sampled_from([1, 2])), h=draw(st.sampled_from([1, 3])), d=d,
        dv=draw(st.sampled_from([d, 5])), layouts=[draw(st.sampled_from(LAYOUTS)) for _ in range(4)],
        mask=draw(st.sampled_from([None, "contiguous", "transposed"])),
        bias=draw(st.sampled_from([None, "contiguous", "transposed"])),
        shared_qk=draw(st.booleans()), dtype=draw(st.sampled_from([torch.float64, torch.float32])),
        seed=draw(st.integers(0, 2**16)),
    )


def _run(pb, backend: str, backward: bool = True):
    """The op on inputs in the drawn layouts; returns `(out, grads of the leaves)` in float64."""
    g = torch.Generator().manual_seed(pb["seed"])
    b, h, n, d, dv, dtype = pb["b"], pb["h"], pb["n"], pb["d"], pb["dv"], pb["dtype"]
    q_layout, k_layout, v_layout, grad_layout = pb["layouts"]
    leaves, views = [], []
    for layout, width in ((q_layout, d), (k_layout, d), (v_layout, dv)):
        leaf, make = laid_out(layout, (b, h, n, width), dtype, g)
        if backend == "reference":  # the oracle: contiguous float64 copies
            leaf = leaf.detach().double().requires_grad_()
            views.append(make(leaf).contiguous())
        else:
            views.append(make(leaf))
        leaves.append(leaf)
    kwargs = {}
    if pb["mask"] is not None:
        mask = torch.rand(n, b, generator=g) < 0.75
        kwargs["mask"] = mask.t() if pb["mask"] == "transposed" else mask.t().contiguous()
    if pb["bias"] is not None:
        w, span = pb["window"]["window_size"], pb["window"]["look_backward"] + pb["window"]["look_forward"] + 1
        bias = torch.randn(h, span * w, w, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
        leaves.append(bias)
        kwargs["attn_bias"] = bias.transpose(1, 2) if pb["bias"] == "transposed" else bias.transpose(1, 2).contiguous()
    out = local_attention(*views, **pb["window"], shared_qk=pb["shared_qk"], scale=0.7, backend=backend, **kwargs)
    if not backward:
        return out.double(), []
    grad_leaf, make_grad = laid_out(grad_layout, tuple(out.shape), out.dtype, g)
    upstream = make_grad(grad_leaf.detach())  # autograd hands gradients over in any layout too
    grads = torch.autograd.grad(out, leaves, upstream)
    return out.double(), [t.double() for t in grads]


def _close(got, ref, dtype, what):
    tol = (1e-10 if dtype == torch.float64 else 2e-4) * max(1.0, ref.abs().max().item())
    assert torch.isfinite(got).all(), what
    assert (got - ref).abs().max().item() <= tol, what


@pytest.mark.parametrize("layout", [*LAYOUTS, "mixed"])
@pytest.mark.parametrize("backend", [name for name in CPU_BACKENDS if name != "reference"])
@settings(max_examples=6)
@given(pb=layout_problems())
def test_every_layout_matches_the_reference_forward_and_backward(backend, layout, pb):
    """q, k, v, mask, attn_bias and the upstream gradient as transposed, sliced, strided, expanded and
    permuted views (all in `layout`, or each its own): the same output and gradients as contiguous
    copies through the reference."""
    if layout != "mixed":
        pb = {**pb, "layouts": [layout] * 4}
    if backend == "sdpa":  # it takes neither bias nor shared_qk
        pb = {**pb, "bias": None, "shared_qk": False}
    ref_out, ref_grads = _run(pb, "reference")
    out, grads = _run(pb, backend)
    _close(out, ref_out, pb["dtype"], "output")
    for index, (got, ref) in enumerate(zip(grads, ref_grads)):
        _close(got, ref, pb["dtype"], f"gradient {index} (q, k, v, bias)")


@settings(max_examples=5)
@given(pb=layout_problems())
def test_flex_forward_takes_every_layout(pb):
    """Flex in eager mode on CPU (forward only there), called with the trusted `(P, n, d)` contract."""
    g = torch.Generator().manual_seed(pb["seed"])
    spec = WindowSpec(**pb["window"])
    P, n, d = pb["b"] * pb["h"], pb["n"], pb["d"]
    tensors = [laid_out(layout, (P, n, d), torch.float32, g) for layout in pb["layouts"][:3]]
    views = [make(leaf.detach()) for leaf, make in tensors]
    ref = reference_attention(*(t.double().contiguous() for t in views), AttentionCall(spec, scale=0.7))
    with warnings.catch_warnings(), pytest.MonkeyPatch.context() as patch:
        warnings.simplefilter("ignore")
        patch.setattr(flex, "_compiled_flex", lambda: flex_attention)  # eager: its mask and score mods
        got = flex_attention_backend(*views, AttentionCall(spec, scale=0.7))
    _close(got.double(), ref, torch.float32, "flex output")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_local_attention_module_takes_every_layout(layout):
    """The module's rotary/xpos path (its own CPU kernel for large tensors) on the same views: the same
    output and gradients as contiguous copies."""
    module = LocalAttention(window_size=16, causal=True, dim=8, use_xpos=True, xpos_scale_base=32)
    results = []
    for contiguous in (True, False):
        g = torch.Generator().manual_seed(5)
        pairs = [laid_out(layout, (2, 3, 320, 8), torch.float32, g) for _ in range(3)]  # over the kernel's minimum
        views = [make(leaf).contiguous() if contiguous else make(leaf) for leaf, make in pairs]
        out = module(*views)
        results.append([out, *torch.autograd.grad(out.square().sum(), [leaf for leaf, _ in pairs])])
    for ref, got in zip(*results):
        assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_flash_hands_flash_attn_rows_it_can_read(monkeypatch, layout):
    """flash-attn refuses a last dim that is not contiguous: the backend copies such views. Checked with a
    dense stand-in for `flash_attn_func` that refuses them as flash-attn does."""
    import types

    from windowed_attention.ops.flash import flash_attn_backend

    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1)):
        for t in (q, k, v):
            if t.stride(-1) != 1:
                raise RuntimeError("Input tensor must have contiguous last dimension")
        i, j = torch.arange(q.shape[1])[:, None], torch.arange(q.shape[1])[None]
        keep = (j >= i - window_size[0]) & (j <= i + window_size[1]) & ((j <= i) | (not causal))
        scores = torch.einsum("bihd,bjhd->bhij", q, k) * softmax_scale
        return torch.einsum("bhij,bjhd->bihd", scores.masked_fill(~keep, float("-inf")).softmax(-1), v)

    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_func=flash_attn_func))
    g = torch.Generator().manual_seed(4)
    spec = WindowSpec(4, True, 1, 0, True)
    views = [make(leaf.detach()) for leaf, make in (laid_out(layout, (3, 19, 8), torch.float64, g) for _ in range(3))]
    got = flash_attn_backend(*views, AttentionCall(spec, scale=0.5))
    ref = reference_attention(*(t.contiguous() for t in views), AttentionCall(spec, scale=0.5))
    assert torch.allclose(got, ref)


# ---------------------------------------------------------------------------------------------- rows

@pytest.mark.parametrize("backend", ["reference", "fused"])
def test_a_bias_row_of_minus_inf_is_a_fully_masked_row(backend):
    """A query whose every visible score `attn_bias` sets to -inf sees nothing: zeros out, zero and finite
    gradients (as a query whose keys are all masked), on every backend that takes a bias."""
    if backend not in CPU_BACKENDS:
        pytest.skip(f"{backend} not built here")
    g = torch.Generator().manual_seed(0)
    w, n = 4, 13
    q, k, v = (torch.randn(2, n, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    bias = torch.randn(2, w, 2 * w, generator=g, dtype=torch.float64)
    bias[0, 1] = float("-inf")  # row 1 of every window, head 0: nothing left to see
    bias[1, 2, : w + 1] = float("-inf")  # partly -inf: still a normal row
    bias.requires_grad_()
    out = local_attention(q, k, v, window_size=w, causal=True, attn_bias=bias, backend=backend)
    rows = torch.arange(1, n, w)
    assert out[0, rows].eq(0).all() and torch.isfinite(out).all()
    grads = torch.autograd.grad(out.sum(), (q, k, v, bias))
    assert all(torch.isfinite(t).all() for t in grads)
    assert grads[0][0, rows].eq(0).all()  # those queries pass no gradient
    assert grads[3][0, 1].eq(0).all()
    # every other row is the softmax with the -inf scores left out (a huge finite bias gives the same)
    ref = local_attention(q, k, v, window_size=w, causal=True, attn_bias=bias.detach().nan_to_num(neginf=-1e300),
                          backend="reference")
    others = torch.ones(n, dtype=torch.bool)
    others[rows] = False
    assert torch.allclose(out[0, others], ref[0, others]) and torch.allclose(out[1], ref[1])


def test_flex_forward_gives_zeros_for_a_bias_row_of_minus_inf():
    q, k, v = (torch.randn(2, 13, 8, generator=torch.Generator().manual_seed(s)) for s in range(3))
    bias = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(3))
    bias[0, 1] = float("-inf")
    spec = WindowSpec(4, True, 1, 0, False)
    with warnings.catch_warnings(), pytest.MonkeyPatch.context() as patch:
        warnings.simplefilter("ignore")
        patch.setattr(flex, "_compiled_flex", lambda: flex_attention)  # eager: its mask and score mods
        out = flex_attention_backend(q, k, v, AttentionCall(spec, scale=0.3, attn_bias=bias))
    ref = reference_attention(q, k, v, AttentionCall(spec, scale=0.3, attn_bias=bias))
    assert out[0, 1::4].eq(0).all() and torch.allclose(out, ref, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_output_dtype_under_autocast_does_not_depend_on_the_backend(dtype):
    q, k, v = (torch.randn(2, 30, 8) for _ in range(3))
    dtypes = {}
    with torch.autocast("cpu", dtype=dtype):
        for backend in CPU_BACKENDS:
            dtypes[backend] = local_attention(q, k, v, window_size=8, causal=True, backend=backend).dtype
        dtypes["empty"] = local_attention(q[:, :0], k[:, :0], v[:, :0], window_size=8).dtype
    assert set(dtypes.values()) == {dtype}, dtypes


# ------------------------------------------------------------------------------ windows longer than n

@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_window_far_longer_than_the_sequence_costs_what_the_sequence_costs(backend):
    """`window_size=10**9` (or `look_backward=10**9`) with 20 positions: the window rule is that of the
    window `n` (and a look-around of the whole sequence), so the result equals it; nothing is allocated by
    the window (it would take gigabytes: this would fail with an allocation error)."""
    g = torch.Generator().manual_seed(1)
    for w, causal, exact, lb, lf in ((10**9, True, False, 1, 0), (10**9, True, True, 0, 0), (10**9, False, True, 1, 1),
                                     (3, True, True, 10**9, 0), (3, False, False, 10**9, 10**9)):
        q, k, v = (torch.randn(3, 20, 8, generator=g, requires_grad=True) for _ in range(3))
        window = dict(causal=causal, exact_windowsize=exact, look_forward=lf)
        out = local_attention(q, k, v, window_size=w, look_backward=lb, backend=backend, **window)
        small = min(w, 20)  # the same rule: a look-around of every window in the sequence
        ref = local_attention(q, k, v, window_size=small, look_backward=min(lb, 20), backend="reference",
                              **{**window, "look_forward": min(lf, 20)})
        assert torch.allclose(out, ref, atol=1e-5)
        grads = torch.autograd.grad(out.sum(), (q, k, v))
        refs = torch.autograd.grad(ref.sum(), (q, k, v))
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grads, refs))


@settings(max_examples=300, deadline=None)
@given(w=st.integers(1, 40), lb=st.sampled_from([0, 1, 2, 3, 10**9]), lf=st.sampled_from([0, 1, 2, 10**9]),
       causal=st.booleans(), exact=st.booleans(), m=st.integers(1, 300), n=st.integers(1, 300))
def test_the_bias_shape_of_a_cut_window_names_the_cut(w, lb, lf, causal, exact, m, n):
    """`with_bias_shape` finds the rule `for_length(m)` back from its bias's shape, and `check_attn_bias`
    takes the bias of any cut that covers the sequence (m >= n) and refuses a shorter one."""
    spec = WindowSpec(w, causal, lb, 0 if causal else lf, exact)
    cut = spec.for_length(m)
    assert spec.with_bias_shape(cut.window_size, cut.span * cut.window_size) == cut
    bias = torch.zeros(1, cut.window_size, cut.span * cut.window_size)
    if m >= n or cut == spec.for_length(n):
        check_attn_bias(bias, 2, spec, n, bias.device)
    else:
        with pytest.raises(ValueError, match="attn_bias"):
            check_attn_bias(bias, 2, spec, n, bias.device)


@pytest.mark.parametrize("w, n, lb, lf, causal", [(16, 9, 1, 1, False), (4, 9, 5, 2, False), (4, 9, 0, 7, False),
                                                   (3, 10, 10**6, 0, True), (10**6, 10, 2, 0, True)])
def test_a_bias_for_a_long_window_or_look_around_is_cut_to_the_sequence(w, n, lb, lf, causal):
    """attn_bias of a window or look-around longer than the sequence acts as the definition says
    (`bias[h, i % w, j - (i // w - lb) * w]`), is cut to `spec.for_length(n)` with gradients only where it
    acts, and the cut bias is accepted as is and gives the same result."""
    g = torch.Generator().manual_seed(2)
    spec = WindowSpec(w, causal, lb, lf, False)
    small = spec.for_length(n)
    q, k, v = (torch.randn(2, n, 8, generator=g, dtype=torch.float64) for _ in range(3))
    i, j = torch.arange(n)[:, None], torch.arange(n)[None]
    col = j - (i // w - lb) * w
    window = dict(window_size=w, causal=causal, look_backward=lb, look_forward=lf)
    results = []
    if spec.span * w <= 10**4:  # the full bias exists only when it is small enough to build
        bias = torch.randn(2, w, spec.span * w, generator=g, dtype=torch.float64, requires_grad=True)
        scores = torch.einsum("pid,pjd->pij", q, k) * 8**-0.5 + bias[:, i % w, col.clamp(0, spec.span * w - 1)]
        expected = torch.einsum("pij,pjd->pid", scores.masked_fill(~spec.visible(i, j, n), float("-inf")).softmax(-1), v)
        out = local_attention(q, k, v, attn_bias=bias, backend="reference", **window)
        assert torch.allclose(out, expected)
        (grad,) = torch.autograd.grad(out.sum(), bias)
        used = torch.zeros_like(grad, dtype=torch.bool)
        used[:, i % w, col.clamp(0, spec.span * w - 1)] = spec.visible(i, j, n)
        assert grad[~used].eq(0).all()
        # the same bias in the layout of the smaller spec, and of the window cut to a longer length
        for other in (small, spec.for_length(n + 3)):
            m, other_col = other.window_size, j - (i // other.window_size - other.look_backward) * other.window_size
            cut = torch.zeros(2, m, other.span * m, dtype=torch.float64)
            visible = spec.visible(i, j, n)
            cut[:, (i % m).expand(n, n)[visible], other_col[visible]] = bias.detach()[:, (i % w).expand(n, n)[visible], col[visible]]
            results.append((cut, expected))
    else:  # the bias only as the smaller spec's: compare with a finite stand-in of the same values
        cut = torch.randn(2, small.window_size, small.span * small.window_size, generator=g, dtype=torch.float64)
        results.append((cut, local_attention(q, k, v, attn_bias=cut, backend="reference",
                                             window_size=small.window_size, causal=causal,
                                             look_backward=small.look_backward, look_forward=small.look_forward)))
    for cut, expected in results:
        for backend in ("reference", "fused") if "fused" in CPU_BACKENDS else ("reference",):
            assert torch.allclose(local_attention(q, k, v, attn_bias=cut, backend=backend, **window), expected)
        with pytest.raises(ValueError, match="attn_bias"):
            local_attention(q, k, v, attn_bias=cut[:, :, :-1], **window)


def test_modules_with_a_huge_window_run_in_little_memory():
    """LocalAttention with xpos and LocalTransformer with dynamic position bias at `window_size=10**9`:
    the same outputs as with the window `n`, and cached generation (a KV cache) as uncached, in a fresh
    process whose peak memory stays small."""
    code = """
import resource
# a regression must fail here with an allocation error, not take the machine's memory
resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))
import torch
from windowed_attention import LocalAttention, LocalTransformer
torch.manual_seed(0)
q, k, v = (torch.randn(2, 2, 24, 16) for _ in range(3))
big = LocalAttention(window_size=10**9, causal=True, dim=16, use_xpos=True, xpos_scale_base=64, autopad=True)
small = LocalAttention(window_size=24, causal=True, dim=16, use_xpos=True, xpos_scale_base=64)
assert torch.allclose(big(q, k, v), small(q, k, v), atol=1e-5)
model = LocalTransformer(num_tokens=32, max_seq_len=64, dim=16, depth=1, heads=2, dim_head=8,
                         local_attn_window_size=10**9, use_dynamic_pos_bias=True)
tokens = torch.randint(0, 32, (2, 40))
loss = model(tokens, return_loss=True)
loss.backward()
assert torch.isfinite(loss)
# decoding: the cache, score table and bias follow the text too (here within the first bound, 1024)
model.eval()
assert torch.equal(model.generate(tokens[:, :5], 30, temperature=0),
                   model.generate(tokens[:, :5], 30, temperature=0, use_kv_cache=False))
out, cache = big(q, k, v, return_cache=True)
assert cache.nbytes() < 16 << 20  # a ring for the first bound (1024 positions), not the window
with torch.no_grad():
    for t in range(3):
        step, cache = big(q[:, :, :1], k[:, :, :1], v[:, :, :1], cache=cache, return_cache=True)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout.strip()) < 2048  # MiB: an allocation by the window would be gigabytes


# ------------------------------------------------------------------------------- second derivatives

@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_second_derivatives_are_right_or_raise(backend):
    """create_graph=True through every CPU backend: the reference's second derivative (autograd's own),
    or an error; never a wrong value."""
    results = []
    for name in ("reference", backend):
        q, k, v = (torch.randn(2, 16, 8, generator=torch.Generator().manual_seed(s), dtype=torch.float64,
                               requires_grad=True) for s in range(3))
        out = local_attention(q, k, v, window_size=4, causal=True, backend=name)
        (gq,) = torch.autograd.grad((out**2).sum(), q, create_graph=True)
        try:
            results.append(torch.autograd.grad(gq.sum(), (k, v)))
        except RuntimeError as error:
            message = str(error)
            assert name != "reference" and ("differentiat" in message or "double backward" in message), message
            results.append(None)
    if results[1] is not None:
        assert all(torch.allclose(a, b) for a, b in zip(*results))


def test_rotary_kernel_second_derivative_is_exact_or_raises():
    """The CPU rotary kernel (for tensors of KERNEL_MIN_NUMEL elements and more) under create_graph:
    second derivatives equal the torch expression's, or raise; never a wrong value."""
    from windowed_attention.positional import KERNEL_MIN_NUMEL, SinusoidalEmbeddings, apply_rotation, rotation_tables

    emb = SinusoidalEmbeddings(8)
    n = KERNEL_MIN_NUMEL // 8
    cos, sin = emb.rotation(torch.arange(n))
    c, s = rotation_tables(cos, sin, None, torch.float64)
    x = torch.randn(3, n, 8, dtype=torch.float64, requires_grad=True)
    results = []
    for rotate in (lambda t: apply_rotation(t, (c, s)),
                   lambda t: torch.cat((t[..., :4] * c - t[..., 4:] * s, t[..., 4:] * c + t[..., :4] * s), -1)):
        y = rotate(x)
        (gx,) = torch.autograd.grad((y**3).sum(), x, create_graph=True)
        try:
            (hx,) = torch.autograd.grad((gx**2).sum(), x)
        except RuntimeError:
            hx = None
        results.append((gx.detach(), hx))
    (got_g, got_h), (ref_g, ref_h) = results
    assert torch.allclose(got_g, ref_g)
    assert got_h is None or torch.allclose(got_h, ref_h)


# --------------------------------------------------------------------------------- absurd numbers

@pytest.mark.parametrize("value", [float("inf"), float("nan"), -1.0, 0.0, 1e30, True, "8"])
def test_non_finite_or_absurd_scales_are_rejected_by_name(value):
    q = torch.randn(1, 8, 4)
    with pytest.raises((ValueError, TypeError), match="qk_scale"):
        LocalMHA(dim=8, window_size=4, heads=2, dim_head=4, qk_rmsnorm=True, qk_scale=value)
    with pytest.raises((ValueError, TypeError), match="scale"):
        LocalAttention(window_size=4, scale=value)
    with pytest.raises((ValueError, TypeError), match="scale"):
        local_attention(q, q, q, window_size=4, scale=value)


@pytest.mark.parametrize("value", [float("inf"), float("nan"), -2.0, 0])
def test_non_finite_xpos_scale_base_is_rejected_by_name(value):
    with pytest.raises((ValueError, TypeError), match="xpos_scale_base"):
        LocalAttention(window_size=4, dim=8, use_xpos=True, xpos_scale_base=value)


def test_largest_accepted_scale_gives_finite_results():
    q = torch.randn(2, 24, 8) * 30
    for backend in CPU_BACKENDS:
        out = local_attention(q, q, q, window_size=8, causal=True, scale=1e4, backend=backend)
        assert torch.isfinite(out).all(), backend


@pytest.mark.parametrize("value", [float("inf"), float("nan"), -1.0, 0])
def test_other_non_finite_constructor_numbers_are_rejected_by_name(value):
    from windowed_attention import FeedForward, SinusoidalEmbeddings

    with pytest.raises((ValueError, TypeError), match="mult"):
        FeedForward(8, mult=value)
    with pytest.raises((ValueError, TypeError), match="ff_mult"):
        LocalTransformer(num_tokens=8, max_seq_len=8, dim=8, depth=1, ff_mult=value)
    with pytest.raises((ValueError, TypeError), match="theta"):
        SinusoidalEmbeddings(8, theta=value)
    with pytest.raises((ValueError, TypeError), match="scale_base"):
        SinusoidalEmbeddings(8, scale_base=value, use_xpos=True)


def test_the_kernel_op_refuses_a_bias_or_mask_of_another_shape():
    """A direct call of the fused kernel's op (what `torch.ops` exposes) with a bias or key mask whose shape
    does not match the window and q, or a look-around whose index arithmetic would overflow, raises instead
    of reading past the tensor."""
    if not fused_cpu.available():
        pytest.skip("the fused CPU kernel is not built here")
    q, k, v = (torch.randn(4, 16, 8) for _ in range(3))
    # w, lb, lf, left, right, causal, sink_tokens, softcap, scale, mask_self, dropout_p, seed
    window = (4, 1, 0, -1, 0, True, 0, 0.0, 0.3, False, 0.0, 0)
    ops = fused_cpu.kernel()
    ops.forward(q, k, v, torch.zeros(2, 4, 8), torch.ones(2, 16), None, None, None, *window)  # the right shapes
    for bias, keep in ((torch.zeros(2, 4, 4), None), (torch.zeros(3, 4, 8), None), (torch.zeros(2, 8, 8), None),
                       (torch.zeros(4, 8), None), (None, torch.ones(2, 8)), (None, torch.ones(3, 16)), (None, torch.ones(16))):
        with pytest.raises(RuntimeError, match="bias|keep"):
            ops.forward(q, k, v, bias, keep, None, None, None, *window)
    with pytest.raises(RuntimeError, match="window_size"):  # a look-around whose index arithmetic overflows
        ops.forward(q, k, v, torch.zeros(2, 4, 4), None, None, None, None, 4, 2**62, 0, *window[3:])
