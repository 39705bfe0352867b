"""Tests of local-attention 1.11.2's public calls, written against `local_attention` alone.

Our own rewrite (not a copy) of local-attention's `tests/test_local_attention.py` (1.11.2) -- `LocalMHA`'s
KV cache against the full forward, with and without rotary embeddings, a dynamic position bias, exact
windows, and a window as long as the text -- and, in its spirit, the other calls code written for
local-attention makes: `LocalAttention` with causal, look_forward, exact_windowsize, shared_qk, autopad
and a key mask; the rotary helpers; `LocalTransformer`'s loss and generation; the helper functions.

It imports nothing of windowed-attention: `tests/test_compat.py` runs this file unchanged after
`windowed_attention.compat.install()`. It keeps to what local-attention computes correctly (each of its
defects is pinned in `tests/test_parity.py`), so it also passes on local-attention 1.11.2 itself. Not
collected by a plain `pytest` run (the file name has no `test_` prefix).
"""

import pytest
import torch

from local_attention import LocalAttention, LocalTransformer
from local_attention.local_attention import default, exists, look_around, max_neg_value, pad_to_multiple
from local_attention.rotary import SinusoidalEmbeddings, apply_rotary_pos_emb
from local_attention.transformer import DynamicPositionBias, LocalMHA, eval_decorator, top_k


@pytest.mark.parametrize("use_rotary_pos_emb", (True, False))
@pytest.mark.parametrize("use_attn_bias", (True, False))
@pytest.mark.parametrize("exact_windowsize", (True, False))
@pytest.mark.parametrize("window_size", (32, 300))  # 300: the window holds the whole text
def test_cache(use_rotary_pos_emb, use_attn_bias, exact_windowsize, window_size):
    torch.manual_seed(0)
    heads = 4
    attn_bias = None
    if use_attn_bias:
        bias_mlp = DynamicPositionBias(dim=16, heads=heads).eval()
        attn_bias = bias_mlp(window_size, 2 * window_size)  # queries: the last window of the keys

    mha = LocalMHA(dim=64, heads=heads, dim_head=16, window_size=window_size, causal=True,
                   exact_windowsize=exact_windowsize, use_rotary_pos_emb=use_rotary_pos_emb,
                   gate_values_per_head=False).eval()
    text = torch.randn(2, 300, 64)
    _, cache = mha(text, return_cache=True)

    next_position = torch.randn(2, 1, 64)
    whole = mha(torch.cat((text, next_position), dim=1), attn_bias=attn_bias)[:, -1]
    step = mha(next_position, cache=cache, attn_bias=attn_bias)[:, -1]
    assert step.shape == (2, 64)
    assert torch.allclose(whole, step, atol=1e-6)


def dense_local_attention(q, k, v, window_size, causal, look_backward, look_forward, exact_windowsize,
                          shared_qk, mask):
    """The rule local-attention documents, on the whole score matrix: query i sees key j when their
    windows are at most look_backward behind / look_forward ahead (and j <= i when causal; within
    window_size * look_backward behind, and * look_forward ahead, with exact_windowsize)."""
    n, d = q.shape[-2:]
    if shared_qk:
        k = torch.nn.functional.normalize(k, dim=-1)
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    block = j // window_size - i // window_size
    visible = (block >= -look_backward) & (block <= look_forward)
    if causal:
        visible &= j <= i
        if exact_windowsize:
            visible &= i - j <= window_size * look_backward
    elif exact_windowsize:
        visible &= (i - j <= window_size * look_backward) & (j - i <= window_size * look_forward)
    sim = q @ k.transpose(-1, -2) * d**-0.5
    if shared_qk:
        sim = sim.masked_fill(i == j, -5e4)
    visible = visible & mask[:, None, None, :]
    sim = sim.masked_fill(~visible, -torch.finfo(sim.dtype).max)
    return sim.softmax(dim=-1) @ v


CONFIGS = [
    dict(causal=True, look_backward=1, look_forward=0, exact_windowsize=False),
    dict(causal=True, look_backward=2, look_forward=0, exact_windowsize=True),
    dict(causal=False, look_backward=1, look_forward=1, exact_windowsize=False),
    dict(causal=False, look_backward=1, look_forward=2, exact_windowsize=True),
]


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("shared_qk", (False, True))
@pytest.mark.parametrize("n", (40, 37))  # 37: not a multiple of the window, with autopad
def test_local_attention_sees_its_window(config, shared_qk, n):
    torch.manual_seed(1)
    window_size = 8
    q, k, v = (torch.randn(2, 3, n, 16, dtype=torch.float64) for _ in range(3))
    mask = torch.rand(2, n) > 0.3
    mask[:, ::window_size] = True  # every query sees a key of its own window
    attn = LocalAttention(window_size=window_size, shared_qk=shared_qk, autopad=n % window_size != 0, **config)
    out = attn(q, k, v, input_mask=mask)
    expected = dense_local_attention(q, k, v, window_size, shared_qk=shared_qk, mask=mask, **config)
    assert out.shape == (2, 3, n, 16)
    assert torch.allclose(out, expected)


def test_local_attention_with_rotary_is_causal():
    torch.manual_seed(2)
    attn = LocalAttention(window_size=8, causal=True, autopad=True, rel_pos_emb_config=(16, 3))
    q, k, v = (torch.randn(2, 3, 30, 16) for _ in range(3))
    out = attn(q, k, v)
    later = [t.clone() for t in (q, k, v)]
    for t in later:
        t[..., 20:, :] = torch.randn_like(t[..., 20:, :])
    assert torch.allclose(attn(*later)[..., :20, :], out[..., :20, :])
    assert not torch.allclose(attn(*later)[..., 20:, :], out[..., 20:, :])


def test_rotary_scores_depend_on_distance_only():
    torch.manual_seed(3)
    rotary = SinusoidalEmbeddings(16)
    q, k = torch.randn(16), torch.randn(16)
    freqs, scale = rotary(torch.zeros(12, 16))
    assert freqs.shape == (12, 16)
    qs, ks = apply_rotary_pos_emb(q.expand(12, 16), k.expand(12, 16), freqs, scale)
    scores = qs @ ks.T  # (i, j)
    for distance in (0, 3, 7):
        along = torch.diagonal(scores, offset=-distance)
        assert torch.allclose(along, along[0].expand_as(along), atol=1e-5)
    assert not torch.allclose(scores[5, 5], scores[5, 2])


def test_local_mha_ignores_masked_keys():
    torch.manual_seed(4)
    mha = LocalMHA(dim=32, heads=2, dim_head=16, window_size=8, causal=False).eval()
    x = torch.randn(2, 21, 32)
    mask = torch.ones(2, 21, dtype=torch.bool)
    mask[1, 15:] = False
    out = mha(x, mask=mask)
    changed = x.clone()
    changed[1, 15:] = torch.randn(6, 32)
    again = mha(changed, mask=mask)
    assert out.shape == (2, 21, 32)
    assert torch.allclose(out[1, :15], again[1, :15], atol=1e-6)
    assert torch.allclose(out[0], again[0])


@pytest.mark.parametrize("use_dynamic_pos_bias", (False, True))
def test_transformer_loss_and_generation(use_dynamic_pos_bias):
    torch.manual_seed(5)
    model = LocalTransformer(num_tokens=64, max_seq_len=64, dim=32, depth=2, causal=True, local_attn_window_size=8,
                             dim_head=8, heads=2, use_dynamic_pos_bias=use_dynamic_pos_bias)
    tokens = torch.randint(0, 64, (2, 33))
    loss = model(tokens, return_loss=True)
    assert loss.ndim == 0
    loss.backward()
    assert all(p.grad is not None for p in model.to_logits.parameters())

    logits = model(tokens)
    assert logits.shape == (2, 33, 64)
    prime = tokens[:, :10]
    sampled = model.generate(prime, 12)
    assert sampled.shape == (2, 12)
    assert int(sampled.min()) >= 0 and int(sampled.max()) < 64
    assert model.training  # generate puts back the mode it found


def test_transformer_greedy_generation_follows_the_logits():
    torch.manual_seed(6)
    model = LocalTransformer(num_tokens=64, max_seq_len=64, dim=32, depth=2, local_attn_window_size=8, dim_head=8,
                             heads=2, use_dynamic_pos_bias=True, num_residual_streams=1).eval()
    prime = torch.randint(0, 64, (2, 10))
    sampled = model.generate(prime, 6, temperature=0.0, use_kv_cache=False)
    text = prime
    for _ in range(6):
        text = torch.cat((text, model(text)[:, -1].argmax(dim=-1, keepdim=True)), dim=1)
    assert torch.equal(sampled, text[:, 10:])


def test_dynamic_position_bias_shape():
    bias = DynamicPositionBias(dim=16, heads=4)(8, 16)
    assert bias.shape == (4, 8, 16)


def test_helpers():
    assert exists(0) and not exists(None)
    assert default(None, 3) == 3 and default(0, 3) == 0
    assert max_neg_value(torch.zeros(1)) == -torch.finfo(torch.float32).max

    x = torch.arange(10.0).reshape(1, 10, 1)
    padded, same = pad_to_multiple(x, 5, dim=-2)
    assert not padded and same is x
    padded, y = pad_to_multiple(x, 4, dim=-2, value=-1)
    assert padded and y.shape == (1, 12, 1) and y[0, 10:, 0].tolist() == [-1.0, -1.0]

    windows = torch.arange(6).reshape(1, 3, 2)  # (b, windows, n)
    around = look_around(windows, backward=1, forward=1, pad_value=-1)
    assert around.tolist() == [[[-1, -1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5], [2, 3, 4, 5, -1, -1]]]

    logits = torch.arange(20.0)[None]
    kept = top_k(logits, thres=0.75)  # keeps int((1 - thres) * 20) = 5
    assert torch.isfinite(kept).nonzero()[:, 1].tolist() == [15, 16, 17, 18, 19]
    assert torch.equal(kept[0, 15:], logits[0, 15:])

    class Model(torch.nn.Module):
        @eval_decorator
        def mode(self):
            return self.training

    model = Model()
    assert model.mode() is False and model.training
