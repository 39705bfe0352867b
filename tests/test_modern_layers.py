"""The modern options on the layers: `LocalAttention(sink_tokens, softcap, (left, right) windows)` with
`forward(documents, sinks)`, `LocalMHA(attn_sinks, sink_tokens, softcap)` with `forward(documents)`, and
their KV cache.

The modules are checked against the dense float64 oracle (`oracle.oracle_modern`, after rotary at positions
counted from each document's start), packed documents against each document alone, the learned sinks'
gradients, state dicts, cached decoding against the uncached forward (the torch step with autograd, the CPU
kernel's step without), and validation.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from oracle import apply_rotary, oracle_modern
from windowed_attention import KVCache, LocalAttention, LocalMHA
from windowed_attention.ops import fused_cpu
from windowed_attention.ops.call import document_bounds, segments

KERNEL = fused_cpu.available()


def _rotated(x: torch.Tensor, documents: torch.Tensor | None) -> torch.Tensor:
    """`x` `(b, h, n, d)` float64 rotated at positions counted from each position's document start."""
    b, _, n, _ = x.shape
    if documents is None:
        return apply_rotary(x.double(), torch.arange(n))
    positions = torch.arange(n) - document_bounds(documents)[0]
    rows = []
    for r in range(b):
        doc_row = documents[r * documents.shape[0] // b]
        parts = [apply_rotary(x[r, :, s:e].double(), positions[r * documents.shape[0] // b, s:e])
                 for s, e in segments(doc_row)]
        rows.append(torch.cat(parts, dim=-2))
    return torch.stack(rows)


@st.composite
def layer_options(draw):
    """Constructor and forward keywords of a `LocalAttention` with random modern options."""
    causal = draw(st.booleans())
    init: dict = dict(causal=causal, autopad=True, shared_qk=draw(st.booleans()))
    if draw(st.booleans()):
        left = draw(st.sampled_from([-1, 0, 1, 3, 7]))
        init["window_size"] = (left, 0 if causal else draw(st.sampled_from([-1, 0, 2, 5])))
    else:
        init.update(window_size=draw(st.integers(1, 6)), look_backward=draw(st.integers(0, 2)),
                    look_forward=0 if causal else draw(st.integers(0, 2)), exact_windowsize=draw(st.booleans()))
    init["sink_tokens"] = draw(st.sampled_from([0, 0, 1, 3]))
    init["softcap"] = draw(st.sampled_from([None, None, 0.7, 5.0]))
    return init


@settings(max_examples=30, deadline=None)
@given(options=layer_options(), n=st.integers(1, 23), heads=st.sampled_from([(2, 2), (4, 2), (2, 1)]),
       with_documents=st.booleans(), with_sinks=st.booleans(), with_mask=st.booleans(), seed=st.integers(0, 2**16))
def test_local_attention_matches_the_oracle(options, n, heads, with_documents, with_sinks, with_mask, seed):
    """LocalAttention (rotary on) with token or block windows, sink tokens, softcap, packed documents, learned
    sinks, a key mask and grouped kv heads equals the dense oracle on inputs rotated at document positions."""
    g = torch.Generator().manual_seed(seed)
    (h, h_kv), b, d = heads, 2, 8
    q = torch.randn(b, h, n, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, h_kv, n, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, h_kv, n, d, generator=g, dtype=torch.float64)
    documents = torch.sort(torch.randint(0, 4, (b, n), generator=g), dim=1).values if with_documents else None
    sinks = torch.randn(h, generator=g, dtype=torch.float64) if with_sinks else None
    mask = torch.rand(b, n, generator=g) < 0.8 if with_mask else None
    layer = LocalAttention(dim=d, **options)
    out = layer(q, k, v, mask=mask, documents=documents, sinks=sinks)

    oracle_keywords = {key: val for key, val in options.items() if key not in ("autopad",)}
    oracle_keywords["shared_qk"] = oracle_keywords.pop("shared_qk")
    expected = oracle_modern(_rotated(q, documents), _rotated(k, documents), v, mask=mask, documents=documents,
                             sinks=sinks, **oracle_keywords)
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("window, xpos", [(5, False), (5, True), (3, True), ((4, 0), False), ((3, 2), False),
                                          ((-1, -1), False)])  # xpos takes block windows only
@pytest.mark.parametrize("causal", [True, False])
def test_packed_documents_equal_each_document_alone(window, causal, xpos):
    """A packed row of documents (rotary, and xpos for block windows: positions restart at each document, so a
    document that starts inside a window block is computed as if alone) equals each document run alone."""
    if causal and isinstance(window, tuple) and window[1] > 0:
        window = (window[0], 0)
    torch.manual_seed(0)
    mha = LocalMHA(dim=16, dim_head=8, heads=2, window_size=window, causal=causal, use_xpos=xpos,
                   attn_sinks=True, sink_tokens=0 if xpos else 2, softcap=4.0, prenorm=True).double()
    torch.nn.init.normal_(mha.sinks)
    lengths = [7, 3, 11, 1, 6]
    documents = torch.cat([torch.full((m,), i) for i, m in enumerate(lengths)])[None]
    x = torch.randn(1, sum(lengths), 16, dtype=torch.float64)
    packed = mha(x, documents=documents)
    start = 0
    for m in lengths:
        alone = mha(x[:, start:start + m])
        torch.testing.assert_close(packed[:, start:start + m], alone, rtol=1e-10, atol=1e-10)
        start += m


def test_learned_sinks_get_gradients():
    """The sinks parameter (one per query head, grouped kv heads too) is trained: its gradient equals the
    numerical one, and it changes the output."""
    torch.manual_seed(0)
    mha = LocalMHA(dim=12, dim_head=4, heads=4, kv_heads=2, window_size=3, causal=True, attn_sinks=True,
                   softcap=3.0, sink_tokens=1).double()
    assert tuple(mha.sinks.shape) == (4,) and torch.equal(mha.sinks.detach(), torch.zeros(4))
    x = torch.randn(2, 9, 12, dtype=torch.float64)
    before = mha(x).detach()

    def run(sinks):
        with torch.no_grad():
            mha.sinks.copy_(sinks)
        return mha(x)

    mha(x).square().sum().backward()
    assert mha.sinks.grad is not None and bool((mha.sinks.grad != 0).all())
    sinks = torch.randn(4, dtype=torch.float64)
    attn = mha.attn_fn
    q, k, v = mha._project(x)
    torch.autograd.gradcheck(lambda s: attn(q.detach(), k.detach(), v.detach(), sinks=s), (sinks.requires_grad_(),))
    assert not torch.allclose(run(sinks.detach()), before)


def test_state_dict_round_trip_and_plain_layers_load_strictly():
    """With attn_sinks the state dict holds `sinks` and loads back into an equal layer; without it the layer
    has exactly the keys of a plain one (local-attention's dicts load with strict=True), and a dict without
    `sinks` does not load strictly into a layer that has them."""
    torch.manual_seed(0)
    base = dict(dim=16, dim_head=8, heads=2, window_size=4, causal=True)
    with_sinks = LocalMHA(**base, attn_sinks=True)
    torch.nn.init.normal_(with_sinks.sinks)
    state = with_sinks.state_dict()
    assert "sinks" in state
    copy = LocalMHA(**base, attn_sinks=True)
    copy.load_state_dict(state, strict=True)
    x = torch.randn(1, 6, 16)
    torch.testing.assert_close(copy(x), with_sinks(x))

    plain, modern = LocalMHA(**base), LocalMHA(**base, sink_tokens=2, softcap=3.0)
    assert set(modern.state_dict()) == set(plain.state_dict())
    modern.load_state_dict(plain.state_dict(), strict=True)
    with pytest.raises(RuntimeError, match="sinks"):
        copy.load_state_dict(plain.state_dict(), strict=True)


CACHE_OPTIONS = [
    dict(window_size=(5, 0)),
    dict(window_size=(0, 0)),
    dict(window_size=(-1, 0)),
    dict(window_size=3, look_backward=2, exact_windowsize=False, sink_tokens=4),
    dict(window_size=(4, 0), sink_tokens=3, shared_qk=True),
    dict(window_size=3, attn_sinks=True, softcap=2.0),
    dict(window_size=(6, 0), attn_sinks=True, softcap=1.5, sink_tokens=2, kv_heads=2),
    dict(window_size=4, attn_sinks=True, softcap=2.0, use_xpos=True, kv_heads=1),
]


def _compare_decoding(mha, n, lengths, grad, dtype=torch.float64, cache_dtype=None, tol=1e-9, attn_bias=None):
    """Prefill rows of the prompt `lengths` (right padding), then decode one token at a time to `n`
    positions: every output equals the uncached forward of its row alone. Returns the last cache."""
    b, prefix = len(lengths), max(lengths)
    x = torch.randn(b, n, 12, dtype=dtype)
    lengths_t = torch.tensor(lengths)
    # row r's sequence: its prompt x[r, :length], then x[r, prefix:]
    rows = [torch.cat((x[r, :lengths[r]], x[r, prefix:])) for r in range(b)]
    fulls = [mha(row[None], attn_bias=attn_bias)[0] for row in rows]
    mask = torch.arange(prefix) < lengths_t[:, None]
    with torch.set_grad_enabled(grad):
        out, cache = mha(x[:, :prefix], mask=mask, attn_bias=attn_bias, return_cache=True, cache_dtype=cache_dtype)
        for r in range(b):
            torch.testing.assert_close(out[r, :lengths[r]], fulls[r][:lengths[r]], rtol=tol, atol=tol)
        for t in range(prefix, n):
            step, cache = mha(x[:, t:t + 1], attn_bias=attn_bias, cache=cache, return_cache=True)
            for r in range(b):
                torch.testing.assert_close(step[r, 0], fulls[r][t - prefix + lengths[r]], rtol=tol, atol=tol)
    return cache


@pytest.mark.parametrize("options", CACHE_OPTIONS)
@pytest.mark.parametrize("path", ["torch", "kernel"])
def test_cached_decoding_equals_the_full_forward(options, path):
    """Prefill (rows of different prompt lengths, one shorter than the sink tokens) and decode steps equal the
    uncached forward for token windows (unbounded on the left: the cache grows with the text), sink tokens,
    learned sinks, softcap and grouped kv heads; `torch`: with autograd (the torch step), `kernel`: without
    (the C++ step, sink tokens included)."""
    if path == "kernel" and not KERNEL:
        pytest.skip("the fused CPU kernel is not built here")
    torch.manual_seed(1)
    options = dict(options)
    mha = LocalMHA(dim=12, dim_head=8, heads=4, causal=True, prenorm=True, **options).double().eval()
    if mha.sinks is not None:
        torch.nn.init.normal_(mha.sinks, std=2.0)
    cache = _compare_decoding(mha, 24, [9, 1, 5], grad=path == "torch")
    left = mha.attn_fn.spec.bounds[0]
    if left is not None:
        assert cache.capacity == left == mha.cache_capacity  # a ring as long as the window, not the text
    elif options["window_size"] == (-1, 0):
        assert mha.cache_capacity is None and cache.capacity >= 24  # unbounded: the cache follows the text
    assert cache.sink_tokens == mha.attn_fn.sink_tokens


@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize("path", ["torch", "kernel"])
def test_cached_decoding_with_a_position_bias_and_sink_tokens(exact, path):
    """With a position bias (block windows), a sink key seen only as a sink gets no bias and one inside the
    window gets its bias once: decoding equals the full forward, with learned sinks and softcap too."""
    from windowed_attention import DynamicPositionBias

    if path == "kernel" and not KERNEL:
        pytest.skip("the fused CPU kernel is not built here")
    torch.manual_seed(3)
    w, look_backward, heads = 3, 1, 4
    mha = LocalMHA(dim=12, dim_head=8, heads=heads, causal=True, window_size=w, look_backward=look_backward,
                   exact_windowsize=exact, attn_sinks=True, softcap=2.5, sink_tokens=2,
                   use_rotary_pos_emb=False).double().eval()
    torch.nn.init.normal_(mha.sinks)
    span = look_backward + 1
    attn_bias = DynamicPositionBias(dim=4, heads=heads).double()(w, span * w, offset=look_backward * w).detach()
    _compare_decoding(mha, 20, [7, 1], grad=path == "torch", attn_bias=attn_bias)


@pytest.mark.parametrize("path", ["torch", "kernel"])
def test_bfloat16_cache_with_the_modern_options(path):
    """A bfloat16 cache of a float32 layer with sink tokens, learned sinks, softcap and a token window stays
    close to the float32 forward (keys and values rounded once, on the way in)."""
    if path == "kernel" and not KERNEL:
        pytest.skip("the fused CPU kernel is not built here")
    torch.manual_seed(2)
    mha = LocalMHA(dim=12, dim_head=8, heads=4, kv_heads=2, causal=True, window_size=(5, 0), attn_sinks=True,
                   softcap=2.0, sink_tokens=2).eval()
    torch.nn.init.normal_(mha.sinks)
    cache = _compare_decoding(mha, 16, [6, 2], grad=path == "torch", dtype=torch.float32,
                              cache_dtype=torch.bfloat16, tol=3e-2)
    assert cache.dtype == torch.bfloat16 and cache.sink_buffers[0].dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("options", [dict(softcap=0.8), dict(sinks=True), dict(softcap=3.0, sinks=True),
                                     dict(softcap=3.0, sinks=True, shared_qk=True, holes=True)])
def test_kernel_step_with_softcap_and_sinks_matches_the_torch_step(dtype, kv_heads, options):
    """The C++ decode step against the torch step (`attend_step` with and without autograd) with softcap and
    learned sinks, rows of different lengths and a bias that hides every key of one query (zeros)."""
    if not KERNEL:
        pytest.skip("the fused CPU kernel is not built here")
    from windowed_attention.ops.decode import attend_step, cache_capacity, score_table
    from windowed_attention.ops.spec import WindowSpec
    from windowed_attention.positional import SinusoidalEmbeddings, step_rotation

    torch.manual_seed(0)
    b, h, n, d = 3, 4, 9, 8
    spec = WindowSpec(4, True, 1, 0, False)
    capacity, compute = cache_capacity(spec), torch.float64 if dtype == torch.float64 else torch.float32
    row = score_table(spec, torch.randn(h, 4, 8), "cpu", compute)[torch.tensor([1, 2, 3])]
    if options.get("holes"):
        row = row.masked_fill(torch.rand(row.shape) < 0.3, float("-inf"))
        row[1, 2] = float("-inf")
    sinks = torch.randn(h, dtype=compute) * 2 if options.get("sinks") else None
    k, v = torch.randn(b, kv_heads, n, d).to(dtype), torch.randn(b, kv_heads, n, d).to(dtype)
    lengths = torch.tensor([9, 2, 5])
    caches = [KVCache.from_prefill(k, v, capacity, lengths, compute_dtype=compute) for _ in range(3)]
    rotation = step_rotation(SinusoidalEmbeddings(d), caches[0].positions, dtype)
    tol = {torch.bfloat16: dict(rtol=2e-2, atol=2e-2), torch.float32: dict(rtol=1e-5, atol=1e-5),
           torch.float64: dict(rtol=1e-10, atol=1e-12)}[dtype]
    for _ in range(6):
        q = torch.randn(b, h, 1, d).to(dtype)
        k1, v1 = torch.randn(b, kv_heads, 1, d).to(dtype), torch.randn(b, kv_heads, 1, d).to(dtype)
        outs = []
        for index, grad in enumerate((False, True)):
            with torch.set_grad_enabled(grad):
                out, caches[index] = attend_step(q.clone().requires_grad_(grad), k1, v1, caches[index], rotation, row,
                                                 scale=0.3, shared_qk=options.get("shared_qk", False),
                                                 softcap=options.get("softcap"), sinks=sinks)
            outs.append(out.detach())
        torch.testing.assert_close(outs[0], outs[1], **tol)
        # the same step without softcap and sinks differs (so that this comparison can fail)
        with torch.no_grad():
            plain, caches[2] = attend_step(q, k1, v1, caches[2], rotation, row, scale=0.3,
                                           shared_qk=options.get("shared_qk", False))
        assert not torch.allclose(plain, outs[0], **tol)


@pytest.mark.parametrize("path", ["torch", "kernel"])
def test_sink_tokens_stay_in_the_cache_beside_the_ring(path):
    """The cache keeps each row's first S positions however far decoding goes (its ring holds only the
    window), also for a row whose prompt is shorter than S (written by its decode steps: the torch step's
    update, or after the kernel's step)."""
    if path == "kernel" and not KERNEL:
        pytest.skip("the fused CPU kernel is not built here")
    torch.manual_seed(0)
    mha = LocalMHA(dim=12, dim_head=8, heads=2, window_size=(2, 0), causal=True, sink_tokens=3,
                   use_rotary_pos_emb=False).double().eval()
    x = torch.randn(2, 30, 12, dtype=torch.float64)
    mask = torch.tensor([[True] * 5, [True] + [False] * 4])
    with torch.set_grad_enabled(path == "torch"):
        _, cache = mha(x[:, :5], mask=mask, return_cache=True)
        for t in range(5, 30):
            _, cache = mha(x[:, t:t + 1], cache=cache, return_cache=True)
    keys = mha._project(x)[1].detach()
    sink_k = cache.sink_buffers[0]
    sink_k = sink_k.detach()
    torch.testing.assert_close(sink_k[0], keys[0, :, :3])
    # row 1: its prompt is x[1, :1], then x[1, 5:], so its positions 1, 2 are x[1, 5], x[1, 6]
    torch.testing.assert_close(sink_k[1], torch.cat((keys[1, :, :1], keys[1, :, 5:7]), dim=1))
    assert cache.capacity == 2 and cache.k.shape[-2] == 2


@pytest.mark.parametrize("make, call, name", [
    (lambda: LocalAttention((3, 1), causal=True), None, "window_size"),
    (lambda: LocalAttention((3, 0), look_backward=2), None, "window_size"),
    (lambda: LocalAttention((3, 0), dim=8, use_xpos=True), None, "use_xpos"),
    (lambda: LocalAttention(4, dim=8, use_xpos=True, sink_tokens=2), None, "use_xpos"),
    (lambda: LocalAttention(4, sink_tokens=-1), None, "sink_tokens"),
    (lambda: LocalAttention(4, softcap=0.0), None, "softcap"),
    (lambda: LocalMHA(dim=8, window_size=4, attn_sinks="yes"), None, "attn_sinks"),
    (lambda: LocalMHA(dim=8, window_size=(4, 0), exact_windowsize=True), None, "window_size"),
    (lambda: LocalAttention((3, 0), causal=True),
     lambda m, q: m(q, q, q, attn_bias=torch.zeros(2, 64, 128)), "attn_bias"),
    (lambda: LocalAttention(4, causal=True),
     lambda m, q: m(q, q, q, documents=torch.tensor([[1, 0, 0, 0, 0, 0, 0, 0]])), "documents"),
    (lambda: LocalAttention(4, causal=True),
     lambda m, q: m(q, q, q, documents=torch.zeros(1, 8, dtype=torch.long), return_cache=True), "documents"),
    (lambda: LocalAttention(4, causal=True), lambda m, q: m(q, q, q, sinks=torch.zeros(3)), "sinks"),
    (lambda: LocalAttention(4, causal=True), lambda m, q: m(q, q, q, sinks=torch.zeros(2, 1)), "sinks"),
])
def test_validation_names_the_argument(make, call, name):
    """Bad modern options raise ValueError or TypeError naming the argument, at construction or in forward."""
    q = torch.randn(1, 2, 8, 8)
    with pytest.raises((ValueError, TypeError), match=name):
        layer = make()
        call(layer, q)


@settings(max_examples=20, deadline=None)
@given(
    window=st.sampled_from([(0, 0), (1, 0), (4, 0), (9, 0), (-1, 0), 2, 3]),
    exact=st.booleans(),
    sink_tokens=st.sampled_from([0, 1, 3, 7]),
    attn_sinks=st.booleans(),
    softcap=st.sampled_from([None, 0.5, 4.0]),
    shared_qk=st.booleans(),
    kv_heads=st.sampled_from([1, 2, 4]),
    lengths=st.lists(st.integers(1, 9), min_size=1, max_size=3),
    grad=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_cached_decoding_on_random_options(window, exact, sink_tokens, attn_sinks, softcap, shared_qk, kv_heads,
                                           lengths, grad, seed):
    """Random combinations of the modern options, prompt lengths and grouped heads: prefill + decode steps
    equal the full forward of each row (with autograd: the torch step; without: the kernel's where built)."""
    torch.manual_seed(seed)
    block = dict(exact_windowsize=exact) if isinstance(window, int) else {}
    mha = LocalMHA(dim=12, dim_head=8, heads=4, kv_heads=kv_heads, causal=True, window_size=window,
                   sink_tokens=sink_tokens, attn_sinks=attn_sinks, softcap=softcap, shared_qk=shared_qk,
                   **block).double().eval()
    if attn_sinks:
        torch.nn.init.normal_(mha.sinks, std=2.0)
    cache = _compare_decoding(mha, max(lengths) + 12, lengths, grad=grad)
    assert cache.sink_tokens == sink_tokens
