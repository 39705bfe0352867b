"""The generation engine: cached decoding gives the tokens of uncached decoding, the rolling cache
stays bounded, sampling options and errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from windowed_attention import KVCache, LocalTransformer
from windowed_attention.generation import cache_nbytes, decode_step, generate, prefill, stream

OPTIONS = [
    dict(),
    dict(exact_windowsize=False),
    dict(look_backward=2),
    dict(look_backward=2, exact_windowsize=False),
    dict(use_dynamic_pos_bias=True),
    dict(use_xpos=True),
    dict(qk_rmsnorm=True),
    dict(gate_values_per_head=True),
    dict(shared_qk=True),
    dict(use_abs_pos_emb=False, look_backward=2, qk_rmsnorm=True),
    dict(num_residual_streams=1),
    dict(kv_heads=1),
    dict(kv_heads=1, num_residual_streams=1, use_dynamic_pos_bias=True),
    dict(num_residual_streams=3, kv_heads=1, use_xpos=True),
]


def tiny(seed=0, **kwargs):
    torch.manual_seed(seed)
    config = dict(num_tokens=40, max_seq_len=96, dim=32, depth=2, heads=2, dim_head=16, local_attn_window_size=8)
    return LocalTransformer(**{**config, **kwargs}).eval()


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_cached_equals_uncached(options):
    model = tiny(**options)
    prime = torch.randint(0, 40, (2, 11))
    cached = generate(model, prime, 30, temperature=0)
    uncached = model.generate(prime, 30, temperature=0, use_kv_cache=False)
    assert torch.equal(cached, uncached)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    sampled = generate(model, prime, 20, temperature=1.0, filter_thres=0.5, generator=g1)
    assert torch.equal(sampled, model.generate(prime, 20, temperature=1.0, filter_thres=0.5, use_kv_cache=False,
                                               generator=g2))


@pytest.mark.parametrize("options", OPTIONS[:5], ids=str)
def test_decode_step_logits_match_full_forward(options):
    model = tiny(seed=1, **options)
    tokens = torch.randint(0, 40, (1, 60))
    with torch.no_grad():
        full = model(tokens)
    logits, caches = prefill(model, tokens[:, :5])
    torch.testing.assert_close(logits, full[:, 4], atol=1e-4, rtol=1e-4)
    for t in range(5, 60):
        logits, caches = decode_step(model, tokens[:, t:t + 1], caches)
        torch.testing.assert_close(logits, full[:, t], atol=1e-4, rtol=1e-4)


def test_batched_prompts_match_one_by_one():
    model = tiny(seed=2)
    prime = torch.randint(0, 40, (3, 9))
    together = generate(model, prime, 30, temperature=0)
    for row in range(3):
        assert torch.equal(together[row:row + 1], generate(model, prime[row:row + 1], 30, temperature=0))


def test_top_p_and_top_k_restrict_choices():
    model = tiny(seed=3)
    prime = torch.randint(0, 40, (1, 5))
    greedy = generate(model, prime, 20, temperature=0)
    # a tiny nucleus or a top-1 filter leaves only the argmax, whatever the temperature
    assert torch.equal(generate(model, prime, 20, temperature=2.0, top_p=1e-6), greedy)
    assert torch.equal(generate(model, prime, 20, temperature=2.0, filter_thres=1.0), greedy)


def test_rolling_cache_stays_bounded_past_max_seq_len():
    model = tiny(seed=4, use_abs_pos_emb=False, max_seq_len=16, local_attn_window_size=4)
    sizes, lengths = set(), []

    def watch(step, caches):
        sizes.add(cache_nbytes(caches))
        lengths.append(caches[0].length)
        assert all(c.k.shape[-2] <= c.capacity for c in caches)

    tokens = list(stream(model, torch.randint(0, 40, (2, 7)), 400, temperature=1.0, on_caches=watch))
    assert len(tokens) == 400 and all(t.shape == (2, 1) for t in tokens)
    assert len(sizes) == 1  # the same buffers from first to last token
    assert lengths[-1] == 7 + 399
    capacity = model.layers[0][0].branch.cache_capacity
    # depth * (k, v) * 2 copies of (capacity + 1) slots * b * h * d * 4 bytes
    assert sizes.pop() == 2 * 2 * 2 * (capacity + 1) * 2 * 2 * 16 * 4


def test_stream_without_end_keeps_going():
    model = tiny(seed=5, use_abs_pos_emb=False, max_seq_len=8, local_attn_window_size=4)
    gen = stream(model, torch.tensor([[1, 2, 3]]), None, temperature=0)
    assert len([next(gen) for _ in range(100)]) == 100


@pytest.mark.parametrize("fast", [True, False])
def test_a_suspended_stream_leaves_the_model_in_its_mode(fast):
    """Eval mode (no dropout) while computing a token, the caller's mode while the stream waits."""
    model = tiny(seed=6, attn_dropout=0.5, ff_dropout=0.5)
    prime = torch.randint(0, 40, (2, 5), generator=torch.Generator().manual_seed(1))
    expected = generate(model, prime, 12, temperature=0, fast=fast)
    model.train()
    tokens = []
    for token in stream(model, prime, 12, temperature=0, fast=fast):
        assert model.training
        tokens.append(token)
    assert model.training
    assert torch.equal(torch.cat(tokens, dim=1), expected)


def test_errors_name_the_argument():
    model = tiny()
    prime = torch.randint(0, 40, (1, 4))
    for kwargs, name in [(dict(temperature=-1), "temperature"), (dict(filter_thres=2), "filter_thres"),
                         (dict(top_p=0), "top_p")]:
        with pytest.raises(ValueError, match=name):
            generate(model, prime, 3, **kwargs)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, prime, -1)
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, prime, 200)
    with pytest.raises(TypeError, match="prompt"):
        generate(model, prime.float(), 3)
    with pytest.raises(TypeError, match="model"):
        generate(torch.nn.Linear(2, 2), prime, 3)
    with pytest.raises(ValueError, match="causal"):
        generate(tiny(causal=False), prime, 3)
    assert generate(model, prime, 0).shape == (1, 0)


@settings(max_examples=25)
@given(capacity=st.integers(0, 9), prefill_len=st.integers(1, 20), steps=st.integers(0, 30))
def test_ring_buffer_matches_a_plain_list(capacity, prefill_len, steps):
    torch.manual_seed(capacity * 1000 + prefill_len * 31 + steps)
    total = prefill_len + steps
    k, v = torch.randn(2, 3, total, 4), torch.randn(2, 3, total, 4)
    cache = KVCache.from_prefill(k[..., :prefill_len, :], v[..., :prefill_len, :], capacity)
    assert cache.length == prefill_len
    torch.testing.assert_close(cache.k, k[..., max(prefill_len - capacity, 0):prefill_len, :], rtol=0, atol=0)
    nbytes = cache.nbytes()
    for t in range(prefill_len, total):
        cache, keys, values = cache.append(k[..., t:t + 1, :], v[..., t:t + 1, :])
        start = max(t - capacity, 0)
        assert torch.equal(keys, k[..., start:t + 1, :]) and torch.equal(values, v[..., start:t + 1, :])
        assert cache.length == t + 1 and cache.nbytes() == nbytes
        assert torch.equal(cache.v, v[..., max(t + 1 - capacity, 0):t + 1, :])


@pytest.mark.parametrize("options", [o for o in OPTIONS if not o.get("use_xpos")], ids=str)
def test_fast_step_matches_reference_decode(options):
    """decoder.step (rotated-key cache, hoisted masks and bias) against the model's own cached forward."""
    from windowed_attention.generation import decoder

    model = tiny(seed=6, **{**options, "num_residual_streams": 1})  # the fast step runs one-stream models
    assert decoder.supported(model)
    tokens = torch.randint(0, 40, (2, 70))
    logits, caches = prefill(model, tokens[:, :3])
    state = decoder.from_reference(model, caches)
    for t in range(3, 70):
        reference, caches = decode_step(model, tokens[:, t:t + 1], caches)
        fast, state = decoder.step(model, tokens[:, t:t + 1], state)
        torch.testing.assert_close(fast, reference, atol=1e-4, rtol=1e-4)
        assert state.position == caches[0].length == t + 1
    assert not decoder.supported(tiny(use_xpos=True, num_residual_streams=1))
    assert not decoder.supported(tiny(num_residual_streams=4))


def test_streaming_an_eval_model_never_switches_modes(monkeypatch):
    """`train()` walks every submodule; per token it cost a sixth of a decoding step. A model already in
    eval mode must not be switched at all."""
    model = tiny()
    switches = []
    monkeypatch.setattr(torch.nn.Module, "train", lambda self, mode=True: switches.append(mode) or self)
    tokens = list(stream(model, torch.randint(0, 40, (1, 5)), 20))
    assert len(tokens) == 20 and switches == []
