"""Hugging Face transformers models on our op (`windowed_attention.integrations.transformers`) against their own
eager attention: tiny random models of each family, float32, a left-padded batch longer than the window."""

import subprocess
import sys

import pytest
import torch

tf = pytest.importorskip("transformers")
from windowed_attention.integrations.transformers import LayerMask, attention_forward, register  # noqa: E402

NAME = register()
W = 8  # sliding window; prompts are longer, and generation runs past it (the sliding cache drops keys)
COMMON = dict(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, max_position_embeddings=128, sliding_window=W)
HYBRID = dict(layer_types=["sliding_attention", "full_attention"])
FAMILIES = {
    "mistral": lambda: tf.MistralConfig(**COMMON),
    "qwen2": lambda: tf.Qwen2Config(**COMMON, use_sliding_window=True, max_window_layers=1),  # layer 1 slides
    "gemma2": lambda: tf.Gemma2Config(**COMMON, **HYBRID, attn_logit_softcapping=2.0, final_logit_softcapping=30.0,
                                      query_pre_attn_scalar=12),
    "gemma3": lambda: tf.Gemma3TextConfig(**COMMON, **HYBRID, query_pre_attn_scalar=12),
    "gpt_oss": lambda: tf.GptOssConfig(**COMMON, **HYBRID, num_local_experts=4, num_experts_per_tok=2,
                                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "cohere2": lambda: tf.Cohere2Config(**COMMON, **HYBRID),
}


def build(family: str, attn: str = "eager"):
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(FAMILIES[family](), attn_implementation=attn).eval()
    for module in model.modules():  # gpt-oss sinks: random, so that they matter
        if isinstance(getattr(module, "sinks", None), torch.nn.Parameter):
            torch.nn.init.normal_(module.sinks)
    return model


def batch(n: int = 20, pad: int = 5):
    """Token ids `(2, n)` and their mask, row 1 left-padded by `pad`."""
    ids = torch.randint(1, 100, (2, n), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    return ids, mask


def loss_and_grads(model, ids, mask):
    # a padding row is padding (eager averages it, we output zeros): no label is predicted from one
    labels = ids.clone()
    labels[:, 1:].masked_fill_(mask[:, :-1] == 0, -100)
    model.zero_grad()
    loss = model(ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_same_as_eager(family):
    model = build(family)
    ids, mask = batch()
    real = mask.bool()
    with torch.no_grad():
        ref_logits = model(ids, attention_mask=mask).logits
        ref_tokens = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    ref_loss, ref_grads = loss_and_grads(model, ids, mask)

    right = torch.ones_like(mask)
    right[0, -4:] = 0  # right padding too (row 0), for the logits
    with torch.no_grad():
        ref_right = model(ids, attention_mask=right).logits

    model.set_attn_implementation(NAME)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
        logits_right = model(ids, attention_mask=right).logits
        tokens = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    loss, grads = loss_and_grads(model, ids, mask)

    torch.testing.assert_close(logits[real], ref_logits[real], atol=1e-4, rtol=0)
    torch.testing.assert_close(logits_right[right.bool()], ref_right[right.bool()], atol=1e-4, rtol=0)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=0)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_from_pretrained_and_static_cache(tmp_path):
    """`from_pretrained(attn_implementation=...)`, and a static cache (unfilled slots, a rolling sliding buffer);
    `from_config` and `set_attn_implementation` are the other tests' way in."""
    eager = build("gemma3")
    eager.save_pretrained(tmp_path)
    ours = tf.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=NAME).eval()
    assert ours.config._attn_implementation == NAME
    ids, mask = batch(n=12, pad=3)
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, cache_implementation="static")
    with torch.no_grad():
        assert torch.equal(ours.generate(ids, **kwargs), eager.generate(ids, **kwargs))


def test_packed_sequences_are_documents():
    """position_ids restarting mark packed sequences: each is computed as if alone."""
    model = build("qwen2", NAME)
    ids = torch.randint(1, 100, (1, 23), generator=torch.Generator().manual_seed(2))
    lengths = [11, 12]
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.no_grad():
        packed = model(ids, position_ids=position_ids, use_cache=False).logits  # no cache: training
        alone = torch.cat([model(part).logits for part in ids.split(lengths, dim=1)], dim=1)
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=0)


def test_dropout_in_training():
    """`dropout` reaches the op in training (and only there): two training forwards differ, gradients flow."""
    config = FAMILIES["mistral"]()
    config.attention_dropout = 0.5
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config, attn_implementation=NAME)
    ids, mask = batch(n=12)
    real = mask.bool()
    with torch.no_grad():
        model.eval()
        first, second = (model(ids, attention_mask=mask).logits for _ in range(2))
        assert torch.equal(first, second)
        model.train()
        first, second = (model(ids, attention_mask=mask).logits for _ in range(2))
        assert not torch.allclose(first[real], second[real])
    model(ids, attention_mask=mask, labels=ids).loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_attention_forward_refuses_what_it_cannot_serve():
    q, k = torch.randn(1, 4, 6, 8), torch.randn(1, 2, 6, 8)
    layer = LayerMask(window=(W - 1, 0), q_offset=0, kv_offset=0, kv_length=6)
    out, weights = attention_forward(None, q, k, k, layer, sliding_window=W)
    assert out.shape == (1, 6, 4, 8) and weights is None
    with pytest.raises(ValueError, match="sliding_window"):  # the layer and its mask disagree
        attention_forward(None, q, k, k, layer, sliding_window=W + 1)
    with pytest.raises(ValueError, match="key"):  # a cache passed other keys than its mask sizes said
        attention_forward(None, q, k, k, LayerMask((W - 1, 0), 0, 0, kv_length=7))
    with pytest.raises(ValueError, match="key"):  # queries that do not end within the keys
        attention_forward(None, q, k, k, LayerMask((W - 1, 0), q_offset=3, kv_offset=0, kv_length=6))
    with pytest.raises(ValueError, match="cu_seq_lens_q"):
        attention_forward(None, q, k, k, layer, cu_seq_lens_q=torch.tensor([0, 6]))


def test_unsupported_raises_naming_it():
    model = build("mistral", NAME)
    ids, mask = batch(n=12)
    with torch.no_grad():
        with pytest.raises(ValueError, match="output_attentions"):
            model(ids, attention_mask=mask, output_attentions=True)
        with pytest.raises(ValueError, match="attention_mask"):  # a ready 4-D mask is n x n
            model(ids, attention_mask=torch.ones(2, 1, 12, 12, dtype=torch.bool))
        with pytest.raises(ValueError, match="mask_function"):  # an overlay on the rule: bidirectional layers
            gemma = build("gemma3")
            gemma.config.use_bidirectional_attention = True
            gemma.set_attn_implementation(NAME)
            gemma(ids)
    for taken in ("sdpa", "eager", "flash_attention_2", "org/kernel"):
        with pytest.raises(ValueError, match="name"):
            register(taken)
    with pytest.raises(TypeError, match="name"):
        register(3)


def test_layer_mask_is_compact():
    """The mask function builds no n x n mask: a window, offsets and the (b, n) padding."""
    _, mask = batch(n=4096, pad=5)
    layer = tf.masking_utils.ALL_MASK_ATTENTION_FUNCTIONS[NAME](
        batch_size=2, q_length=4096, kv_length=4096, attention_mask=mask.bool(), local_size=W,
        mask_function=tf.masking_utils.sliding_window_causal_mask_function(W))
    assert isinstance(layer, LayerMask)
    assert layer.window == (W - 1, 0) and layer.padding.shape == (2, 4096)


def test_missing_transformers_names_the_extra():
    code = ("import sys; sys.modules['transformers'] = None\n"
            "try:\n    import windowed_attention.integrations.transformers\n"
            "except ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert 'pip install "windowed-attention[transformers]"' in out
