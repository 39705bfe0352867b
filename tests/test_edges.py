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
