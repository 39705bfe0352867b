"""Hugging Face transformers models on our op (`windowed_attention.integrations.transformers`) against their own
eager attention: tiny random models of each family, float32, a left-padded batch longer than the window."""

import subprocess
import sys

import pytest
import torch

tf = pytest.importorskip("transformers")
from windowed_attention.integrations.transformers import LayerMask, register  # noqa: E402

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

    model.set_attn_implementation(NAME)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
        tokens = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    loss, grads = loss_and_grads(model, ids, mask)

    torch.testing.assert_close(logits[real], ref_logits[real], atol=1e-4, rtol=0)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=0)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_from_config_and_static_cache():
    """`from_config(attn_implementation=...)` and a static cache (unfilled slots, a rolling sliding buffer)."""
    eager, ours = build("gemma3"), build("gemma3", NAME)
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
    with pytest.raises(ValueError, match="name"):
        register("sdpa")


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
