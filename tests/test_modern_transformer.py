"""LocalTransformer on packed documents: every document's logits and loss are those of the document alone,
with the modern layer options passed to every layer."""

from __future__ import annotations

import pytest
import torch

from windowed_attention import LocalTransformer

LENGTHS = [5, 13, 1, 9, 20]


def _model(**options) -> LocalTransformer:
    torch.manual_seed(0)
    config = dict(num_tokens=40, max_seq_len=64, dim=32, depth=2, heads=4, dim_head=8, local_attn_window_size=8)
    return LocalTransformer(**{**config, **options}).double().eval()


def _packed(lengths, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 40, (batch, sum(lengths)), generator=g)
    documents = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).expand(batch, -1)
    return x, documents


VARIANTS = {
    "rotary": {},
    "dynamic bias": dict(use_dynamic_pos_bias=True),
    "no abs pos, xpos": dict(use_abs_pos_emb=False, use_xpos=True, xpos_scale_base=32),
    "grouped, sinks, sink tokens, softcap": dict(kv_heads=2, attn_sinks=True, sink_tokens=2, softcap=5.0),
    "not causal, one stream": dict(causal=False, num_residual_streams=1, look_backward=1, look_forward=1),
    "token window": dict(local_attn_window_size=(6, 0), sink_tokens=1),
}


@pytest.mark.parametrize("options", VARIANTS.values(), ids=VARIANTS.keys())
def test_packed_logits_equal_each_document_alone(options):
    model = _model(**options)
    if options.get("attn_sinks"):  # learned sinks start at zero: make them matter
        sinks = [parameter for name, parameter in model.named_parameters() if name.endswith("sinks")]
        assert len(sinks) == 2
        with torch.no_grad():
            for parameter in sinks:
                parameter.normal_()
    x, documents = _packed(LENGTHS)
    packed = model(x, documents=documents)
    start = 0
    for length in LENGTHS:
        alone = model(x[:, start : start + length])
        torch.testing.assert_close(packed[:, start : start + length], alone, atol=1e-10, rtol=0)
        start += length


@pytest.mark.parametrize("options", [VARIANTS["rotary"], VARIANTS["grouped, sinks, sink tokens, softcap"]],
                         ids=["rotary", "modern"])
def test_packed_loss_is_the_documents_losses_weighted_by_their_targets(options):
    model = _model(**options)
    x, documents = _packed(LENGTHS)
    packed = model(x, return_loss=True, documents=documents)
    total, count, start = 0.0, 0, 0
    for length in LENGTHS:
        if length >= 2:
            total = total + model(x[:, start : start + length], return_loss=True) * (length - 1)
            count += length - 1
        start += length
    torch.testing.assert_close(packed, total / count, atol=1e-10, rtol=0)


def test_documents_with_a_cache_are_refused_by_name():
    model = _model()
    x, documents = _packed([4, 4])
    with pytest.raises(ValueError, match="documents"):
        model(x, documents=documents, return_cache=True)


@pytest.mark.parametrize("documents", [torch.tensor([[1, 0, 0, 0, 0, 0, 0, 0]] * 2), torch.zeros(2, 7, dtype=torch.long),
                                       torch.zeros(2, 8)])
def test_bad_documents_raise_naming_them(documents):
    model = _model()
    x, _ = _packed([4, 4])
    with pytest.raises((ValueError, TypeError), match="documents"):
        model(x, documents=documents)


def test_a_token_window_takes_no_dynamic_position_bias():
    with pytest.raises(ValueError, match="local_attn_window_size"):
        _model(local_attn_window_size=(6, 0), use_dynamic_pos_bias=True)


def test_token_window_model_generates_the_same_with_and_without_the_cache():
    model = _model(local_attn_window_size=(6, 0), sink_tokens=2, attn_sinks=True, softcap=5.0).float()
    prime = torch.randint(0, 40, (2, 5), generator=torch.Generator().manual_seed(3))
    cached = model.generate(prime, 20, temperature=0.0)
    uncached = model.generate(prime, 20, temperature=0.0, use_kv_cache=False)
    assert torch.equal(cached, uncached)
