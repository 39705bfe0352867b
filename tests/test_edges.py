"""Edges a user hits without meaning to: narrow prompt dtypes, a data path that is a directory."""

from __future__ import annotations

import pytest
import torch

from windowed_attention import LocalTransformer
from windowed_attention.training.data import read_bytes


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.int16])
def test_generate_returns_whole_ids_for_a_narrow_prompt_dtype(dtype):
    """Ids past the prompt dtype's range come back whole (torch.long), equal to those of an int64 prompt."""
    torch.manual_seed(0)
    model = LocalTransformer(num_tokens=300, max_seq_len=32, dim=16, depth=1, heads=2, dim_head=8,
                             local_attn_window_size=8).eval()
    with torch.no_grad():  # ids past 255 (so past every narrow dtype's range) win: the others' logits are 0
        model.to_logits[1].weight[:256] = 0.0
    prime = torch.tensor([[1, 2, 3]])
    wide = model.generate(prime, 6, temperature=0.0)
    narrow = model.generate(prime.to(dtype), 6, temperature=0.0)
    assert wide.dtype == narrow.dtype == torch.long
    assert (wide >= 256).all()
    assert torch.equal(narrow, wide)


def test_data_path_that_is_a_directory_says_so(tmp_path):
    with pytest.raises(ValueError, match="is a directory"):
        read_bytes(tmp_path)
    with pytest.raises(FileNotFoundError, match="not found"):
        read_bytes(tmp_path / "missing.txt")


EMPTY = [(0, 2, 50, 16), (2, 0, 50, 16), (0, 50, 16), (2, 2, 0, 16)]


@pytest.mark.parametrize("shape", EMPTY, ids=["batch 0", "heads 0", "packed 0", "n 0"])
@pytest.mark.parametrize("backend", ["auto", "reference", "sdpa", "fused"])
def test_empty_inputs_give_empty_results_and_gradients(shape, backend):
    from windowed_attention import local_attention
    from windowed_attention.ops import backends

    if backend != "auto" and backend != "reference" and not backends.availability()[backend]:
        pytest.skip(f"{backend} is not available here")
    q, k, v = (torch.randn(*shape, requires_grad=True) for _ in range(3))
    sinks = torch.zeros(2, requires_grad=True) if len(shape) == 4 and shape[1] == 2 else None
    extra = {} if sinks is None or backend == "sdpa" else {"sinks": sinks}
    out = local_attention(q, k, v, window_size=16, causal=True, backend=backend, **extra)
    assert out.shape == shape
    out.sum().backward()
    for t in (q, k, v):
        assert t.grad is not None and t.grad.shape == t.shape
    if extra:
        assert sinks.grad is not None and sinks.grad.eq(0).all()


def test_modules_and_generate_take_an_empty_batch():
    from windowed_attention import LocalAttention, LocalMHA

    torch.manual_seed(0)
    x = torch.randn(0, 2, 50, 16, requires_grad=True)
    out = LocalAttention(window_size=16, causal=True, dim=16, autopad=True)(x, x, x)
    assert out.shape == x.shape
    out.sum().backward()
    assert x.grad.shape == x.shape
    mha = LocalMHA(dim=32, window_size=16, causal=True, heads=2, dim_head=16)
    assert mha(torch.randn(0, 50, 32)).shape == (0, 50, 32)
    model = LocalTransformer(num_tokens=20, max_seq_len=64, dim=32, depth=1, heads=2, dim_head=16,
                             local_attn_window_size=8)
    assert model(torch.zeros(0, 10, dtype=torch.long)).shape == (0, 10, 20)
    for use_kv_cache in (True, False):
        new = model.generate(torch.zeros(0, 3, dtype=torch.long), 4, use_kv_cache=use_kv_cache)
        assert new.shape == (0, 4) and new.dtype == torch.long
