"""Decoding from a KV cache gives what the full forward gives, token by token."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from windowed_attention import DynamicPositionBias, KVCache, LocalMHA, LocalTransformer
from windowed_attention.ops import decode
from windowed_attention.ops.spec import WindowSpec


@settings(max_examples=25, deadline=None)
@given(
    window=st.integers(1, 9),
    look_backward=st.integers(0, 2),
    exact=st.booleans(),
    xpos=st.booleans(),
    qk_rmsnorm=st.booleans(),
    gates=st.booleans(),
    shared_qk=st.booleans(),
    bias=st.booleans(),
    prefix=st.integers(1, 12),
    shorter=st.integers(0, 11),
    fused=st.booleans(),
    seed=st.integers(0, 2**16),
    kv_heads=st.sampled_from([1, 2, 4]),
)
def test_mha_cache_matches_full_forward(window, look_backward, exact, xpos, qk_rmsnorm, gates, shared_qk, bias,
                                        prefix, shorter, fused, seed, kv_heads):
    """Prefill (rows of different lengths: the second row's prompt is `shorter` tokens shorter) then decode
    token by token equals the full forward of each row; `fused` runs without autograd (the CPU kernel
    step), else with it (the torch step)."""
    torch.manual_seed(seed)
    heads = 4
    mha = LocalMHA(kv_heads=kv_heads, 
        dim=12, dim_head=8, heads=heads, window_size=window, causal=True, look_backward=look_backward,
        exact_windowsize=exact, use_xpos=xpos and not bias, qk_rmsnorm=qk_rmsnorm,
        gate_values_per_head=gates, shared_qk=shared_qk, prenorm=True,
        use_rotary_pos_emb=not bias,
    ).double().eval()
    attn_bias = None
    if bias:
        span = look_backward + 1
        attn_bias = DynamicPositionBias(dim=4, heads=heads).double()(window, span * window, offset=look_backward * window)
    n = prefix + 3 * window + 2
    cache = _decode_and_compare(mha, attn_bias, n, prefix, shorter, fused)
    assert cache.k.shape[1] == kv_heads  # the cache holds the kv heads only
    assert cache.capacity == mha.cache_capacity  # O(window), whatever the length is


def _decode_and_compare(mha, attn_bias, n, prefix, shorter, fused):
    """Prefill two rows (the second `shorter` tokens shorter) of `n` random positions, then decode token by
    token: every output equals the full forward of its row. Returns the last cache."""
    x = torch.randn(2, n, 12, dtype=torch.float64)
    full = mha(x, attn_bias=attn_bias)
    lengths = torch.tensor([prefix, max(prefix - shorter, 1)])
    mask = torch.arange(prefix) < lengths[:, None]
    # row 1 continues from its own last prompt token: its sequence is x[1, :length] then x[1, prefix:]
    row1 = torch.cat((x[1, :lengths[1]], x[1, prefix:]))
    full1 = mha(row1[None], attn_bias=attn_bias)[0]

    with torch.set_grad_enabled(not fused):
        out, cache = mha(x[:, :prefix], mask=mask, attn_bias=attn_bias, return_cache=True)
        torch.testing.assert_close(out[0], full[0, :prefix])
        torch.testing.assert_close(out[1, :lengths[1]], full1[:lengths[1]])
        for t in range(prefix, n):
            step, cache = mha(x[:, t : t + 1], attn_bias=attn_bias, cache=cache, return_cache=True)
            torch.testing.assert_close(step[0, 0], full[0, t], rtol=1e-9, atol=1e-9)
            torch.testing.assert_close(step[1, 0], full1[t - prefix + lengths[1]], rtol=1e-9, atol=1e-9)
            assert cache.k.shape[-2] <= cache.capacity
    assert cache.length == n and cache.positions.tolist() == [n, n - prefix + int(lengths[1])]
    return cache


@settings(max_examples=30, deadline=None)
@given(
    window=st.sampled_from([2, 5, 24, 10**9]),
    look_backward=st.sampled_from([0, 1, 2, 10**9]),
    exact=st.booleans(),
    xpos=st.booleans(),
    shared_qk=st.booleans(),
    bias=st.booleans(),
    prefix=st.integers(1, 12),
    shorter=st.integers(0, 11),
    fused=st.booleans(),
    first_limit=st.sampled_from([1, 2, 4]),
    seed=st.integers(0, 2**16),
)
def test_decoding_a_window_longer_than_the_text_grows_the_cache_with_the_text(
        window, look_backward, exact, xpos, shared_qk, bias, prefix, shorter, fused, first_limit, seed):
    """A window (or look-back) longer than the text decodes with the window cut to a length bound that
    doubles as the text grows (from `first_limit` here, 1024 by default): the ring, the score table and
    the bias are re-laid at each doubling, and every step still equals the full forward. The bias may be
    that of any cut covering the text."""
    torch.manual_seed(seed)
    n = prefix + 20
    spec = WindowSpec(window, True, look_backward, 0, exact)
    mha = LocalMHA(dim=12, dim_head=8, heads=2, window_size=window, causal=True, look_backward=look_backward,
                   exact_windowsize=exact, use_xpos=xpos and not bias, shared_qk=shared_qk, prenorm=True,
                   use_rotary_pos_emb=not bias).double().eval()
    attn_bias = None
    if bias:  # the bias of the window cut to 64 positions (it covers every bound reached below)
        cut = spec.for_length(64)
        w = cut.window_size
        attn_bias = DynamicPositionBias(dim=4, heads=2).double()(w, cut.span * w, offset=cut.look_backward * w)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(decode, "FIRST_DECODE_LIMIT", first_limit)
        cache = _decode_and_compare(mha, attn_bias, n, prefix, shorter, fused)
        # the ring holds what the window cut to the bound (a power of two >= the text) needs, not the window
        assert cache.capacity == decode.cache_capacity(decode.decode_window(spec, n)[0]) <= 2 * 64


def test_cache_bytes_scale_with_kv_heads():
    x = torch.randn(1, 40, 32)
    sizes = {}
    for kv_heads in (1, 2, 4):
        mha = LocalMHA(dim=32, dim_head=8, heads=4, kv_heads=kv_heads, window_size=8, causal=True)
        _, cache = mha(x, return_cache=True)
        sizes[kv_heads] = cache.nbytes()
    # kv_heads * (key and value rings) + what does not depend on heads (each row's key bias)
    per_head = sizes[2] - sizes[1]
    assert per_head > 0 and sizes[4] - sizes[2] == 2 * per_head and sizes[1] - per_head < per_head


def test_cache_cannot_branch():
    torch.manual_seed(0)
    mha = LocalMHA(dim=8, dim_head=4, heads=2, window_size=4, causal=True).eval()
    x = torch.randn(1, 9, 8)
    _, cache = mha(x[:, :6], return_cache=True)
    k_before = cache.k.clone()
    a, newer = mha(x[:, 6:7], cache=cache, return_cache=True)
    assert torch.equal(cache.k, k_before) and cache.length == 6  # the old cache's view is untouched
    with pytest.raises(ValueError, match="cache"):
        mha(x[:, 7:8], cache=cache, return_cache=True)  # its buffers now hold position 6
    b, _ = mha(x[:, 7:8], cache=newer, return_cache=True)
    torch.testing.assert_close(b[:, 0], mha(x[:, :8])[:, 7], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("options", [dict(), dict(shared_qk=True, exact_windowsize=False), dict(qk_rmsnorm=True),
                                     dict(use_dynamic_pos_bias=True), dict(use_abs_pos_emb=False, look_backward=2)])
@pytest.mark.parametrize("prompt", [1, 7, 9, 13, 30])
def test_engine_decoding_after_prompts_longer_than_the_cache(options, prompt):
    """Prompts longer than the cache capacity (here 4, 7 or 11) must land in the right ring slots."""
    from windowed_attention.generation import engine

    torch.manual_seed(prompt)
    model = LocalTransformer(num_tokens=17, max_seq_len=64, dim=16, depth=2, heads=2, dim_head=8,
                             local_attn_window_size=4, num_residual_streams=1, **options).double().eval()
    tokens = torch.randint(0, 17, (2, prompt + 6))
    full = model(tokens)
    logits, caches = engine.prefill(model, tokens[:, :prompt])
    for t in range(prompt, prompt + 6):
        torch.testing.assert_close(logits, full[:, t - 1], rtol=1e-9, atol=1e-9)
        logits, caches = engine.decode_step(model, tokens[:, t : t + 1], caches)
    generated = model.generate(tokens[:, :prompt], 12, temperature=0)
    assert torch.equal(generated, model.generate(tokens[:, :prompt], 12, temperature=0, use_kv_cache=False))


@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(exact_windowsize=False),
        dict(look_backward=2),
        dict(use_dynamic_pos_bias=True),
        dict(use_xpos=True),
        dict(qk_rmsnorm=True, gate_values_per_head=True),
        dict(shared_qk=True, exact_windowsize=False, look_backward=2),
        dict(use_abs_pos_emb=False),
        dict(num_residual_streams=1, kv_heads=1),
        dict(num_residual_streams=2, kv_heads=1, qk_rmsnorm=True),
        dict(global_attn_layer=torch.nn.Sequential(torch.nn.LayerNorm(32), torch.nn.Linear(32, 32))),
        dict(global_attn_layer=torch.nn.Linear(32, 32), layers_insert_global_attn=(2,), num_residual_streams=1),
    ],
)
def test_generate_cached_equals_uncached(options):
    torch.manual_seed(0)
    model = LocalTransformer(num_tokens=40, max_seq_len=96, dim=32, depth=2, heads=2, dim_head=16,
                             local_attn_window_size=6, **options)
    prime = torch.randint(0, 40, (2, 7))
    greedy_cached = model.generate(prime, 30, temperature=0, use_kv_cache=True)
    greedy_full = model.generate(prime, 30, temperature=0, use_kv_cache=False)
    assert greedy_cached.shape == (2, 30)
    assert torch.equal(greedy_cached, greedy_full)

    sampled = [
        model.generate(prime, 20, temperature=1.0, filter_thres=0.5, use_kv_cache=use_cache,
                       generator=torch.Generator().manual_seed(3))
        for use_cache in (True, False)
    ]
    assert torch.equal(*sampled)


def test_generate_keeps_training_mode_and_rejects_bad_sampling():
    model = LocalTransformer(num_tokens=10, max_seq_len=16, dim=8, depth=1, heads=1, dim_head=8,
                             local_attn_window_size=4).train()
    prime = torch.zeros(1, 2, dtype=torch.long)
    model.generate(prime, 3)
    assert model.training
    for name, kwargs in [("temperature", dict(temperature=-1)), ("filter_thres", dict(filter_thres=1.5)),
                         ("top_p", dict(top_p=0.0)), ("seq_len", dict(seq_len=-1)),
                         ("max_seq_len", dict(seq_len=20))]:
        kwargs = {"seq_len": 3, **kwargs}
        with pytest.raises(ValueError, match=name):
            model.generate(prime, **kwargs)
    with pytest.raises(TypeError, match="prime"):
        model.generate(prime.float(), 3)


def test_generation_past_max_seq_len_without_absolute_positions():
    torch.manual_seed(0)
    model = LocalTransformer(num_tokens=20, max_seq_len=8, dim=16, depth=1, heads=2, dim_head=8,
                             local_attn_window_size=4, use_abs_pos_emb=False)
    prime = torch.randint(0, 20, (1, 3))
    out = model.generate(prime, 40, temperature=0)
    assert out.shape == (1, 40)
    assert torch.equal(out, model.generate(prime, 40, temperature=0, use_kv_cache=False))


def test_kv_cache_keeps_at_most_capacity():
    k = torch.randn(1, 2, 10, 4)
    cache = KVCache.from_prefill(k, k, capacity=6)
    assert cache.k.shape[-2] == 6 and cache.length == 10
    cache, keys, _, key_bias = cache.update(k[..., :1, :], k[..., :1, :])
    assert keys.shape[-2] == 7 and cache.k.shape[-2] == 6 and cache.length == 11 and key_bias is None


@pytest.mark.parametrize("dtype, cache_dtype", [(torch.float32, None), (torch.float64, None), (torch.bfloat16, None),
                                                (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("d", [8, 72])
@pytest.mark.parametrize("options", [dict(), dict(shared_qk=True), dict(factors=True), dict(rotary=False),
                                     dict(holes=True), dict(holes=True, shared_qk=True), dict(holes=True, factors=True)])
def test_fused_decode_step_matches_torch_step(dtype, cache_dtype, kv_heads, options, d):
    """The CPU kernel's step (rotate, write the ring, attend) against the torch ops of `attend_step`, on
    rows of different lengths (empty slots masked), grouped-query heads, shared-qk and xpos factors, head
    dims below and above a vector (with a tail); `holes`: a bias that hides random keys, and every key of
    one query (its output is zeros, or its own value under shared-qk); `cache_dtype`: a bfloat16 cache of
    float32 keys (both steps round the new key and value the same way, and compute in float32)."""
    from windowed_attention.ops import fused_cpu
    from windowed_attention.ops.decode import attend_step, cache_capacity, score_table
    from windowed_attention.ops.spec import WindowSpec
    from windowed_attention.positional import SinusoidalEmbeddings, step_rotation

    if not fused_cpu.available():
        pytest.skip("the fused CPU kernel is not built here")
    torch.manual_seed(0)
    b, h, n = 3, 4, 9
    spec = WindowSpec(4, True, 1, 0, False)
    capacity, compute = cache_capacity(spec), torch.float64 if dtype == torch.float64 else torch.float32
    bias = torch.randn(h, 4, 8)
    row = score_table(spec, bias, "cpu", compute)[torch.tensor([1, 2, 3])]  # (b, h, slots)
    if options.get("holes"):
        row = row.masked_fill(torch.rand(row.shape) < 0.3, float("-inf"))
        row[1, 2] = float("-inf")
    factors = torch.rand(capacity + 1, d, dtype=compute) + 0.5 if options.get("factors") else None
    lengths = torch.tensor([9, 2, 5])
    k, v = torch.randn(b, kv_heads, n, d).to(dtype), torch.randn(b, kv_heads, n, d).to(dtype)
    caches = [KVCache.from_prefill(k, v, capacity, lengths, compute_dtype=compute, dtype=cache_dtype) for _ in range(2)]
    assert caches[0].dtype == (cache_dtype or dtype)
    rotation = None
    if options.get("rotary", True):
        rotation = step_rotation(SinusoidalEmbeddings(d), caches[0].positions, dtype)
    for step in range(8):
        q = torch.randn(b, h, 1, d).to(dtype)
        k1, v1 = torch.randn(b, kv_heads, 1, d).to(dtype), torch.randn(b, kv_heads, 1, d).to(dtype)
        outs = []
        for index, grad in enumerate((False, True)):  # no autograd: the kernel; autograd: the torch ops
            with torch.set_grad_enabled(grad):
                q_in = q.clone().requires_grad_(grad)
                out, caches[index] = attend_step(q_in, k1, v1, caches[index], rotation, row, scale=0.3,
                                                 shared_qk=options.get("shared_qk", False), key_factors=factors)
            outs.append(out.detach())
        tol = {torch.bfloat16: dict(rtol=2e-2, atol=2e-2), torch.float32: dict(rtol=1e-5, atol=1e-5),
               torch.float64: dict(rtol=1e-10, atol=1e-12)}[dtype]
        torch.testing.assert_close(outs[0], outs[1], **tol)
        assert torch.equal(caches[0].k, caches[1].k) and torch.equal(caches[0].v, caches[1].v)


def test_cache_of_another_layer_or_type_is_refused():
    """A cache used with a layer whose window, heads, head dim, position encoding or batch differ, or a
    `cache` that is no cache, raises an error naming `cache` (never a wrong result or AttributeError)."""
    torch.manual_seed(0)
    base = dict(dim=16, dim_head=8, heads=2, window_size=4, causal=True)
    mha = LocalMHA(**base).eval()
    x = torch.randn(2, 6, 16)
    _, cache = mha(x, return_cache=True)
    others = [
        LocalMHA(**{**base, "window_size": 8}),
        LocalMHA(**{**base, "window_size": 4, "look_backward": 2}),
        LocalMHA(**{**base, "heads": 4}),
        LocalMHA(**{**base, "dim_head": 4}),
        LocalMHA(**{**base, "use_xpos": True}),
        LocalMHA(**{**base, "exact_windowsize": False}),
    ]
    for other in others:  # refused as another layer's cache; its attention (no weights) by its configuration
        with pytest.raises(ValueError, match="cache"):
            other.eval()(x[:, :1], cache=cache)
        q, k, v = other._project(x[:, :1])
        if k.shape[-1] == cache.head_dims[0] and k.shape[1] == cache.heads:
            with pytest.raises(ValueError, match="cache was built by a layer with another window"):
                other.attn_fn(q, k, v, cache=cache)
    with pytest.raises(ValueError, match="cache"):
        mha(x[:1, :1], cache=cache)  # batch 1 against a cache of 2 rows
    with pytest.raises(ValueError, match="cache"):
        mha.double()(x[:, :1].double(), cache=cache)  # float64 layer, float32 cache
    mha.float()
    for wrong in (object(), [cache], (cache.k, cache.v), torch.zeros(3)):
        with pytest.raises(TypeError, match="cache"):
            mha(x[:, :1], cache=wrong)
    with pytest.raises(ValueError, match="cache"):
        LocalMHA(**{**base, "causal": False})(x[:, :1], cache=cache)

    model = LocalTransformer(num_tokens=10, max_seq_len=32, dim=16, depth=2, heads=2, dim_head=8,
                             local_attn_window_size=4).eval()
    tokens = torch.randint(0, 10, (2, 5))
    _, caches = model(tokens, return_cache=True)
    with pytest.raises(ValueError, match="cache"):
        model(tokens[:, :1], cache=caches[:1])
    with pytest.raises(TypeError, match="cache"):
        model(tokens[:, :1], cache=[caches[0], "cache"])
    with pytest.raises(TypeError, match="cache"):
        model(tokens[:, :1], cache=caches[0])
    with pytest.raises(ValueError, match="cache"):
        model(tokens[:1, :1], cache=caches)
    wider = LocalTransformer(num_tokens=10, max_seq_len=32, dim=16, depth=2, heads=2, dim_head=8,
                             local_attn_window_size=8).eval()
    with pytest.raises(ValueError, match="cache"):
        wider(tokens[:, :1], cache=caches)
    # another layer refuses it even with the same configuration and weights (the cache belongs to the layer
    # that built it: tests/test_cache_grad.py)
    twin = LocalMHA(**base).eval()
    twin.load_state_dict(mha.state_dict())
    with pytest.raises(ValueError, match="cache was not built by this LocalMHA"):
        twin(x[:, :1], cache=cache)


def test_prefill_mask_must_be_right_padding():
    mha = LocalMHA(dim=16, dim_head=8, heads=2, window_size=4, causal=True).eval()
    x = torch.randn(2, 5, 16)
    with pytest.raises(ValueError, match="mask"):
        mha(x, mask=torch.tensor([[True] * 5, [False, True, True, True, True]]), return_cache=True)
    with pytest.raises(ValueError, match="mask"):
        mha(x, mask=torch.tensor([[True] * 5, [False] * 5]), return_cache=True)


def test_a_resized_ring_keeps_exactly_the_columns_it_held():
    """`KVCache.resized` right after a prefill and after steps, several times: every key the grown ring
    shows as present is the true key of its column, and it shows what the smaller ring held, its last
    `slots` columns less those an earlier resize had already left empty (older ones are not kept: the
    owning layer resizes only when no query can see them)."""
    n, capacity, grown = 10, 3, 6
    keys = torch.arange(1.0, n + 20)[None, None, :, None]  # column c holds the value c + 1
    cache = KVCache.from_prefill(keys[:, :, :n], keys[:, :, :n], capacity)
    held_from = 0
    for steps in range(3):
        small = cache
        column = small.column
        held_from = max(held_from, column - small.slots)
        held = set(range(held_from, column))
        big = small.resized(grown)
        big, k, v, bias = big.update(keys[:, :, column : column + 1], keys[:, :, column : column + 1])
        window = range(column + 1 - big.slots, column + 1)  # the columns of the returned window, oldest first
        present = {c for c, b in zip(window, bias[0, 0, 0].tolist()) if b == 0}
        assert present == held | {column}
        assert all(k[0, 0, i, 0] == c + 1 for i, c in enumerate(window) if c in present)
        with pytest.raises(ValueError, match="cache"):
            small.update(keys[:, :, :1], keys[:, :, :1])  # the smaller ring was left behind
        cache = big.resized(big.capacity)  # the same cache (nothing to grow) for the next round
        for _ in range(steps):
            cache, *_ = cache.update(keys[:, :, cache.column : cache.column + 1], keys[:, :, cache.column : cache.column + 1])
        capacity, grown = cache.capacity, cache.capacity + 3
