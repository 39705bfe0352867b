"""Run folders from Python (`windowed_attention.training.runs`): load, save, tokenizer, and the CLI's view."""

from __future__ import annotations

import pytest
import torch

from windowed_attention.generation import cli as generate_cli
from windowed_attention.training import ByteTokenizer, CheckpointError, ModelConfig, load_run, save_run
from windowed_attention.training import cli as train_cli

CONFIG = ModelConfig(max_seq_len=32, dim=32, depth=1, heads=2, dim_head=16, local_attn_window_size=16)


def test_tokenizer_round_trips_utf8():
    tokenizer = ByteTokenizer()
    tokens = tokenizer.encode("héllo ✓")
    assert tokens.dtype == torch.long and tokens.shape == (len("héllo ✓".encode()),)
    assert tokenizer.decode(tokens) == "héllo ✓" and tokenizer.decode(tokens.tolist()) == "héllo ✓"
    with pytest.raises(ValueError, match="tokens"):
        tokenizer.decode([300])
    with pytest.raises(TypeError, match="text"):
        tokenizer.encode(b"bytes")


def test_save_then_load_gives_the_same_model(tmp_path):
    torch.manual_seed(0)
    model = CONFIG.build()
    save_run(tmp_path / "run", model, CONFIG, step=5)
    run = load_run(tmp_path / "run")
    assert run.step == 5 and run.config == CONFIG and not run.model.training
    x = run.tokenizer.encode("def main():\n    return 0\n")[None]
    torch.testing.assert_close(run.model(x), model.eval()(x), rtol=0, atol=0)
    assert isinstance(run.generate("def ", 8, temperature=0), str)
    assert not (tmp_path / "run" / "trainer_state.pt").exists()


def test_save_run_refuses_a_config_that_does_not_describe_the_model(tmp_path):
    model = CONFIG.build()
    with pytest.raises(ValueError, match="config"):
        save_run(tmp_path, model, ModelConfig(dim=64))
    with pytest.raises(TypeError, match="config"):
        save_run(tmp_path, model, {"dim": 32})
    with pytest.raises(TypeError, match="model"):
        save_run(tmp_path, torch.nn.Linear(2, 2), CONFIG)
    assert not (tmp_path / "config.json").exists()


def test_a_saved_run_generates_from_the_cli_but_does_not_resume(tmp_path, capsys):
    save_run(tmp_path, CONFIG.build(), CONFIG)
    assert generate_cli.main(["--checkpoint", str(tmp_path), "--prime", "ab", "--length", "5", "--seed", "0"]) == 0
    assert capsys.readouterr().out.startswith("ab")
    assert train_cli.main(["--out", str(tmp_path), "--resume", "--no-progress"]) == 2
    assert "save_run" in capsys.readouterr().err


def test_loading_a_missing_folder_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_run(tmp_path / "nothing")
