"""The generation engine: cached decoding gives the tokens of uncached decoding, the rolling cache
stays bounded, sampling options and errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from windowed_attention import KVCache, LocalTransformer
from windowed_attention.generation import batch_prompts, cache_nbytes, decode_step, generate, prefill, stream
from windowed_attention.ops import decode

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


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_ragged_prompts_match_one_by_one(options):
    """Prompts of different lengths (shorter and longer than the window and the cache) in one batch:
    each row's logits and greedy tokens are those of its prompt alone, cached and uncached."""
    _check_ragged_prompts(tiny(seed=7, **options).double())


HUGE = [dict(local_attn_window_size=10**9), dict(local_attn_window_size=10**9, use_dynamic_pos_bias=True),
        dict(local_attn_window_size=10**9, use_xpos=True, look_backward=2, exact_windowsize=True),
        dict(local_attn_window_size=3, look_backward=10**9, use_dynamic_pos_bias=True, exact_windowsize=False)]


@pytest.mark.parametrize("options", HUGE, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_ragged_prompts_with_a_window_longer_than_the_text(options, monkeypatch):
    """A window or look-back far longer than the text: decoding cuts it to a bound that doubles as the text
    grows (from 4 here, so it grows several times within the prompts and the generation), and rows still
    match their prompts alone and the full forward."""
    monkeypatch.setattr(decode, "FIRST_DECODE_LIMIT", 4)
    _check_ragged_prompts(tiny(seed=7, **options).double())


def _check_ragged_prompts(model):
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 40, (n,), generator=g) for n in (1, 6, 23, 11, 40)]
    logits, _ = prefill(model, *batch_prompts(prompts))
    together = generate(model, prompts, 25, temperature=0)
    assert together.shape == (5, 25)
    assert torch.equal(together, model.generate(prompts, 25, temperature=0, use_kv_cache=False))
    assert torch.equal(together, model.generate(prompts, 25, temperature=0))
    for row, prompt in enumerate(prompts):
        alone_logits, _ = prefill(model, prompt[None])
        torch.testing.assert_close(logits[row], alone_logits[0], rtol=1e-9, atol=1e-9)
        assert torch.equal(together[row:row + 1], generate(model, prompt, 25, temperature=0))
    # decoded logits: every row against the full forward of its own sequence
    tokens, lengths = batch_prompts(prompts)
    _, caches = prefill(model, tokens, lengths)
    for t in range(25):
        step_logits, caches = decode_step(model, together[:, t:t + 1], caches)
        for row, prompt in enumerate(prompts):
            sequence = torch.cat((prompt, together[row, :t + 1]))[None]
            torch.testing.assert_close(step_logits[row], model(sequence)[0, -1], rtol=1e-9, atol=1e-9)


def test_ragged_sampling_is_reproducible_and_rows_alone_match_batches_of_one():
    model = tiny(seed=8)
    prompts = [torch.tensor([1, 2, 3]), torch.tensor([4]), torch.tensor([5, 6, 7, 8, 9, 10])]

    def run(batch, seed):
        return generate(model, batch, 15, temperature=1.0, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(prompts, 3), run(prompts, 3))
    assert torch.equal(run(prompts[1:2], 3), run(prompts[1][None], 3))
    assert torch.equal(run(prompts, 3), model.generate(prompts, 15, generator=torch.Generator().manual_seed(3),
                                                       use_kv_cache=False))


def test_ragged_prompt_errors_name_the_argument():
    model = tiny()
    with pytest.raises(ValueError, match=r"prompt\[1\]"):
        generate(model, [torch.tensor([1, 2]), torch.tensor([], dtype=torch.long)], 3)
    with pytest.raises(TypeError, match=r"prompt\[0\]"):
        generate(model, [torch.tensor([1.0, 2.0])], 3)
    with pytest.raises(ValueError, match=r"prime\[0\]"):
        model.generate([torch.zeros(2, 2, dtype=torch.long)], 3)
    with pytest.raises(TypeError, match="prompt"):
        generate(model, [], 3)
    with pytest.raises(ValueError, match="max_seq_len"):
        model.generate([torch.zeros(90, dtype=torch.long), torch.zeros(3, dtype=torch.long)], 10)
    with pytest.raises(ValueError, match="num_tokens"):
        model.generate([torch.tensor([1, 99])], 3)


def test_top_p_and_top_k_restrict_choices():
    model = tiny(seed=3)
    prime = torch.randint(0, 40, (1, 5))
    greedy = generate(model, prime, 20, temperature=0)
    # a tiny nucleus or a top-1 filter leaves only the argmax, whatever the temperature
    assert torch.equal(generate(model, prime, 20, temperature=2.0, top_p=1e-6), greedy)
    assert torch.equal(generate(model, prime, 20, temperature=2.0, filter_thres=1.0), greedy)



@pytest.mark.parametrize("filter_thres, top_p, temperature", [(0.9, None, 1.0), (0.5, 0.8, 0.7), (0.0, None, 1.5)])
def test_sample_draws_from_the_filtered_distribution(filter_thres, top_p, temperature):
    """`sample` draws over the kept tokens only; its frequencies follow softmax(top_p(top_k(logits)) / T)
    over the whole vocabulary (within 5 standard deviations over 40000 draws)."""
    from windowed_attention.sampling import sample, top_k, top_p as nucleus

    logits = torch.randn(1, 40, generator=torch.Generator().manual_seed(5)) * 2
    expected = top_k(logits, filter_thres)
    expected = expected if top_p is None else nucleus(expected, top_p)
    expected = (expected / temperature).softmax(dim=-1)[0].double()
    draws = 40000
    tokens = sample(logits.expand(draws, -1), temperature, filter_thres, top_p, torch.Generator().manual_seed(6))
    assert tokens.shape == (draws, 1)
    assert sample(logits[0], temperature, filter_thres, top_p).shape == (1,)  # one row (vocab,) -> (1,)
    frequencies = torch.bincount(tokens[:, 0], minlength=40).double() / draws
    sigma = (expected * (1 - expected) / draws).sqrt()
    assert (frequencies[expected == 0] == 0).all()
    assert ((frequencies - expected).abs() <= 5 * sigma + 1e-12).all(), (frequencies, expected)

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
    # depth * ((k, v) * b * h * d + b key-bias entries) * 2 copies of (capacity + 1) slots * 4 bytes
    assert sizes.pop() == 2 * (2 * 2 * 2 * 16 + 2) * 2 * (capacity + 1) * 4


def test_stream_without_end_keeps_going():
    model = tiny(seed=5, use_abs_pos_emb=False, max_seq_len=8, local_attn_window_size=4)
    gen = stream(model, torch.tensor([[1, 2, 3]]), None, temperature=0)
    assert len([next(gen) for _ in range(100)]) == 100


@pytest.mark.parametrize("use_cache", [True, False])
def test_a_suspended_stream_leaves_the_model_in_its_mode(use_cache):
    """Eval mode (no dropout) while computing a token, the caller's mode while the stream waits."""
    model = tiny(seed=6, attn_dropout=0.5, ff_dropout=0.5)
    prime = torch.randint(0, 40, (2, 5), generator=torch.Generator().manual_seed(1))
    expected = generate(model, prime, 12, temperature=0, use_cache=use_cache)
    model.train()
    tokens = []
    for token in stream(model, prime, 12, temperature=0, use_cache=use_cache):
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


@settings(max_examples=25, deadline=None)
@given(capacity=st.integers(0, 9), prefill_len=st.integers(1, 20), shorter=st.integers(0, 19), steps=st.integers(0, 30))
def test_ring_buffer_matches_a_plain_list(capacity, prefill_len, shorter, steps):
    """Row 0 holds `prefill_len` positions, row 1 `shorter` fewer: every window the cache hands back holds
    each row's last keys, oldest first, and marks the slots before a row's first key as empty."""
    torch.manual_seed(capacity * 1000 + prefill_len * 31 + steps)
    total = prefill_len + steps
    k, v = torch.randn(2, 3, total, 4), torch.randn(2, 3, total, 4)
    lengths = [prefill_len, max(prefill_len - shorter, 1)]
    rows = [(k[r, :, :lengths[r]], v[r, :, :lengths[r]]) for r in range(2)]  # (h, length, d) so far
    padded = torch.zeros(2, 3, prefill_len, 4), torch.zeros(2, 3, prefill_len, 4)
    for r in range(2):
        padded[0][r, :, :lengths[r]], padded[1][r, :, :lengths[r]] = rows[r]
    cache = KVCache.from_prefill(*padded, capacity, torch.tensor(lengths))
    assert cache.length == prefill_len and cache.positions.tolist() == lengths
    nbytes = cache.nbytes()
    for t in range(prefill_len, total):
        new_k, new_v = k[..., t:t + 1, :], v[..., t:t + 1, :]
        cache, keys, values, key_bias = cache.update(new_k, new_v)
        slots = capacity + 1
        for r in range(2):
            rows[r] = torch.cat((rows[r][0], new_k[r]), dim=1), torch.cat((rows[r][1], new_v[r]), dim=1)
            seen = rows[r][0].shape[1]
            real = min(seen, slots)
            assert torch.equal(keys[r, :, slots - real:], rows[r][0][:, seen - real:])
            assert torch.equal(values[r, :, slots - real:], rows[r][1][:, seen - real:])
            empty = torch.zeros(slots, dtype=torch.bool)
            empty[:slots - real] = True
            if key_bias is None:
                assert real == slots
            else:
                assert torch.equal(torch.isinf(key_bias[r, 0, 0]), empty)
        assert cache.length == t + 1 and cache.nbytes() == nbytes
        assert torch.equal(cache.v[0], rows[0][1][:, max(t + 1 - capacity, 0):t + 1])


def test_decode_runs_the_modules_own_forward():
    """One decode path: the engine's step is `model(token, cache=...)`, whose layers are `LocalMHA.forward`
    (so a hook on a layer's forward sees every decode step), and the old decoder module is gone."""
    import importlib.util

    assert importlib.util.find_spec("windowed_attention.generation.decoder") is None
    model = tiny()
    calls = []
    model.layers[0][0].branch.register_forward_hook(lambda module, args, out: calls.append(tuple(args[0].shape)))
    generate(model, torch.randint(0, 40, (2, 5)), 4)
    assert calls == [(2, 5, 32)] + [(2, 1, 32)] * 3


def test_streaming_an_eval_model_never_switches_modes(monkeypatch):
    """`train()` walks every submodule; per token it cost a sixth of a decoding step. A model already in
    eval mode must not be switched at all."""
    model = tiny()
    switches = []
    monkeypatch.setattr(torch.nn.Module, "train", lambda self, mode=True: switches.append(mode) or self)
    tokens = list(stream(model, torch.randint(0, 40, (1, 5)), 20))
    assert len(tokens) == 20 and switches == []


@pytest.mark.fast_cases(1)  # each case decodes 3 prompts 20 steps three ways
@pytest.mark.parametrize("options", [dict(), dict(use_xpos=True, exact_windowsize=False), dict(use_dynamic_pos_bias=True),
                                     dict(shared_qk=True, kv_heads=1), dict(look_backward=2, qk_rmsnorm=True)], ids=str)
def test_bfloat16_cache_rounds_keys_and_values_once(options):
    """`cache_dtype=torch.bfloat16` (a float32 model): the caches hold bfloat16 (half the key and value
    bytes), decoding is close to the full forward but not equal to it (the keys and values are rounded),
    the kernel step equals the torch step on the same rounded cache, and ragged rows equal their prompts
    alone with the same cache dtype."""
    model = tiny(seed=9, **options)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 40, (n,), generator=g) for n in (3, 17, 30)]
    tokens, lengths = batch_prompts(prompts)
    _, exact = prefill(model, tokens, lengths)
    _, caches = prefill(model, tokens, lengths, cache_dtype=torch.bfloat16)
    assert all(cache.dtype == torch.bfloat16 for cache in caches)
    assert [c.buffers[0].nbytes for c in caches] == [c.buffers[0].nbytes // 2 for c in exact]
    _, reference = prefill(model, tokens, lengths, cache_dtype=torch.bfloat16)
    steps = torch.randint(0, 40, (3, 20), generator=g)
    alone = [prefill(model, prompt[None], cache_dtype=torch.bfloat16)[1] for prompt in prompts]
    worst = 0.0
    for t in range(steps.shape[1]):
        logits, caches = decode_step(model, steps[:, t:t + 1], caches)  # the kernel (no autograd)
        with torch.enable_grad():  # parameters require grad: the torch step
            torch_logits, reference = model(steps[:, t:t + 1], cache=reference, return_cache=True)
        torch.testing.assert_close(logits, torch_logits[:, -1].detach(), rtol=1e-5, atol=1e-5)
        for row, prompt in enumerate(prompts):
            row_logits, alone[row] = decode_step(model, steps[row:row + 1, t:t + 1], alone[row])
            torch.testing.assert_close(logits[row], row_logits[0], rtol=1e-5, atol=1e-5)
            with torch.no_grad():
                full = model(torch.cat((prompt, steps[row, :t + 1]))[None])[0, -1]
            worst = max(worst, float((logits[row] - full).abs().max()))
    assert 0 < worst < 0.01, worst


def test_cache_dtype_errors_name_the_argument():
    model = tiny()
    prime = torch.randint(0, 40, (1, 5))
    with pytest.raises(ValueError, match="cache_dtype"):
        generate(model, prime, 3, cache_dtype=torch.float16)  # could overflow: refused
    with pytest.raises(ValueError, match="cache_dtype"):
        model.double().generate(prime, 3, cache_dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="cache_dtype"):
        generate(model.float(), prime, 3, cache_dtype="bfloat16")
    with pytest.raises(ValueError, match="cache_dtype"):
        generate(model, prime, 3, cache_dtype=torch.bfloat16, use_cache=False)
    with pytest.raises(ValueError, match="cache_dtype"):
        model(prime, cache_dtype=torch.bfloat16)  # no cache is built
    with pytest.raises(ValueError, match="use_kv_cache"):
        model.generate(prime, 3, cache_dtype=torch.bfloat16, use_kv_cache=False)
    with pytest.raises(TypeError, match="cache_dtype"):
        generate(model, prime, 0, cache_dtype="bfloat16")  # checked before anything is generated
    k = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="cache_dtype"):
        KVCache.from_prefill(k, k, capacity=3, dtype=torch.float16)
    assert torch.equal(generate(model, prime, 5, temperature=0, cache_dtype=torch.float32),
                       generate(model, prime, 5, temperature=0))  # the model's own dtype: the exact cache


@pytest.mark.fast_cases(1)  # float64 (float32 models: test_cached_equals_uncached)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cached_and_uncached_tokens_are_equal_in_full_precision(dtype):
    """The promise as stated (`LocalTransformer.generate`): float32 and float64 models give the same greedy
    and seeded sampled tokens cached and uncached."""
    torch.manual_seed(1)
    model = LocalTransformer(num_tokens=40, max_seq_len=96, dim=32, depth=2, heads=2, dim_head=16,
                             local_attn_window_size=6).to(dtype)
    prime = torch.randint(0, 40, (3, 5))
    for temperature in (0.0, 1.0):
        tokens = [model.generate(prime, 40, temperature=temperature, use_kv_cache=use_cache,
                                 generator=torch.Generator().manual_seed(4)) for use_cache in (True, False)]
        assert torch.equal(*tokens)


@pytest.mark.fast_cases(1)  # three models, 43 steps each
@pytest.mark.parametrize("dtype, bound", [(torch.bfloat16, 2e-2), (torch.float16, 4e-3)])
def test_half_precision_cached_logits_agree_to_the_stated_rounding(dtype, bound):
    """In bfloat16 (float16) the two routes round activations at different places: each cached step's
    logits are within the bound the docs state (2% (0.4%) of the largest logit) of the full forward's,
    and the greedy token is the same wherever the full forward's top two logits are further apart."""
    for seed in range(3):
        torch.manual_seed(seed)
        model = LocalTransformer(num_tokens=40, max_seq_len=96, dim=32, depth=2, heads=2, dim_head=16,
                                 local_attn_window_size=6).to(dtype).eval()
        x = torch.randint(0, 40, (2, 50))
        with torch.no_grad():
            full = model(x).float()
            out, cache = model(x[:, :7], return_cache=True)
            steps = [out.float()]
            for t in range(7, 50):
                step, cache = model(x[:, t : t + 1], cache=cache, return_cache=True)
                steps.append(step.float())
        cached = torch.cat(steps, dim=1)
        scale = full.abs().amax(dim=-1)
        assert ((cached - full).abs().amax(dim=-1) <= bound * scale).all()
        top2 = full.topk(2, dim=-1).values
        clear = top2[..., 0] - top2[..., 1] > 2 * bound * scale
        assert torch.equal(cached.argmax(dim=-1)[clear], full.argmax(dim=-1)[clear])
