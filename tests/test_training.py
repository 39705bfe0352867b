"""The training loop: schedule, data, metrics, exact resume, precision and accumulation options."""

from __future__ import annotations

import gzip
import json
import math

import pytest
import torch

from windowed_attention.training import cli as train_cli
from windowed_attention.training.config import TrainConfig
from windowed_attention.training.data import BatchSampler, builtin_corpus, eval_batches, load_corpus, split_bytes
from windowed_attention.training.metrics import read_metrics
from windowed_attention.training.trainer import learning_rate

TINY = ["--dim", "32", "--depth", "1", "--heads", "2", "--dim-head", "16", "--seq-len", "32", "--window-size", "16",
        "--batch-size", "4", "--eval-batches", "2", "--sample-length", "8", "--warmup-steps", "3", "--no-progress"]


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    words = ["local", "attention", "window", "token", "cache", "byte", "model", "train"]
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(0, len(words), (6000,), generator=gen).tolist()
    path.write_text(" ".join(words[i] for i in idx) + "\n")
    return path


def train(out, data, *extra) -> int:
    return train_cli.main(["--out", str(out), "--data", str(data), *TINY, *extra])


def losses(out) -> dict[int, float]:
    return {r["step"]: r["train_loss"] for r in read_metrics(out / "metrics.jsonl")}


def test_learning_rate_warmup_then_cosine():
    config = TrainConfig(lr=1e-3, warmup_steps=10, steps=110, min_lr_ratio=0.1)
    rates = [learning_rate(s, config) for s in range(120)]
    assert rates[0] == pytest.approx(1e-4)
    assert all(a < b for a, b in zip(rates[:9], rates[1:10]))
    assert rates[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(rates[10:110], rates[11:111]))
    assert rates[110] == pytest.approx(1e-4) and rates[119] == pytest.approx(1e-4)
    assert rates[60] == pytest.approx(1e-4 + 0.9e-3 * 0.5)


def test_split_rules(tmp_path):
    train, val = split_bytes(bytes(range(200)))
    assert len(train) == 190 and len(val) == 10 and train + val == bytes(range(200))
    big = b"a" * 95_000_100
    train, val = split_bytes(big)
    assert len(train) == 90_000_000 and len(val) == 5_000_000
    path = tmp_path / "x.txt.gz"
    with gzip.open(path, "wb") as f:
        f.write(b"hello world " * 100)
    corpus = load_corpus(path)
    assert bytes(corpus.train.tolist()) + bytes(corpus.val.tolist()) == b"hello world " * 100


def test_builtin_corpus_is_real_python_split_by_file():
    a, b = builtin_corpus(budget=300_000), builtin_corpus(budget=300_000)
    assert torch.equal(a.train, b.train) and torch.equal(a.val, b.val)  # deterministic
    assert 300_000 <= a.train.numel() + a.val.numel() < 2_000_000 and a.val.numel() > 0
    text = bytes(a.train[:5000].tolist()).decode("utf-8", errors="replace")
    assert "import" in text or "def " in text
    val_text = bytes(a.val.tolist())
    assert val_text[:2000] not in bytes(a.train.tolist())  # held-out files are not in train


def test_sampler_ranks_differ_and_state_round_trips():
    data = torch.arange(256, dtype=torch.uint8).repeat(40)
    r0, r1 = (BatchSampler(data, 16, 3, seed=1, rank=r, world_size=2) for r in (0, 1))
    (b0, d0), (b1, _) = r0.next(), r1.next()
    assert b0.shape == (3, 17) and not torch.equal(b0, b1) and d0 is None
    state = r0.state_dict()
    expected = r0.next()[0]
    r0.load_state_dict(state)
    assert torch.equal(r0.next()[0], expected)
    fixed = eval_batches(data, 16, 4, 3)
    assert len(fixed) == 3 and all(torch.equal(x, y) and d is None
                                   for (x, d), (y, _) in zip(fixed, eval_batches(data, 16, 4, 3)))
    with pytest.raises(ValueError, match="seq_len"):
        BatchSampler(data[:10], 16, 3, seed=0)


def test_run_writes_metrics_plot_and_checkpoint(tmp_path, text_file, capsys):
    out = tmp_path / "run"
    assert train(out, text_file, "--steps", "6", "--eval-every", "3", "--log-every", "2") == 0
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [2, 3, 4, 6]
    assert all(math.isfinite(r["train_loss"]) for r in records)
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [3, 6]
    assert evals[-1]["val_bpc"] == pytest.approx(evals[-1]["val_loss"] / math.log(2))
    assert (out / "loss.png").stat().st_size > 1000
    config = json.loads((out / "config.json").read_text())
    assert config["step"] == 6 and config["model"]["dim"] == 32 and config["train"]["steps"] == 6
    assert (out / "model.safetensors").exists() and (out / "trainer_state.pt").exists()
    captured = capsys.readouterr()
    assert "bits/byte" in captured.out + captured.err


def test_loss_goes_down(tmp_path, text_file):
    out = tmp_path / "run"
    assert train(out, text_file, "--steps", "40", "--lr", "3e-3", "--log-every", "1", "--eval-every", "40") == 0
    curve = losses(out)
    assert sum(curve[s] for s in range(36, 41)) / 5 < sum(curve[s] for s in range(1, 6)) / 5 - 1.0


def test_resume_is_exact(tmp_path, text_file):
    """20 steps, then --resume to 30, gives bitwise the losses of 30 uninterrupted steps."""
    common = ["--log-every", "1", "--eval-every", "10", "--save-every", "7", "--lr-decay-steps", "30"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert train(straight, text_file, "--steps", "30", *common) == 0
    assert train(split, text_file, "--steps", "20", *common) == 0
    assert max(losses(split)) == 20
    assert train(split, text_file, "--steps", "30", "--resume", *common) == 0
    assert losses(split) == losses(straight)  # exact float equality, every step
    a, b = (json.loads((d / "config.json").read_text()) for d in (straight, split))
    assert a["step"] == b["step"] == 30
    assert (straight / "model.safetensors").read_bytes() == (split / "model.safetensors").read_bytes()


def test_resume_refuses_a_different_model(tmp_path, text_file, capsys):
    out = tmp_path / "run"
    assert train(out, text_file, "--steps", "2") == 0
    code = train_cli.main(["--out", str(out), "--resume", "--steps", "4", "--dim", "64", "--no-progress"])
    assert code == 2 and "--dim 64" in capsys.readouterr().err


def test_resume_without_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert train_cli.main(["--out", str(tmp_path / "empty"), "--resume", "--no-progress"]) == 2
    assert "no checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("extra", [["--precision", "bf16"], ["--grad-accum", "2", "--max-grad-norm", "0.1"]])
def test_precision_and_accumulation_options_train(tmp_path, text_file, extra):
    out = tmp_path / "run"
    assert train(out, text_file, "--steps", "3", "--log-every", "1", *extra) == 0
    records = read_metrics(out / "metrics.jsonl")
    assert len(records) == 3 and all(math.isfinite(r["train_loss"]) for r in records)
    config = json.loads((out / "config.json").read_text())["train"]
    for flag, value in zip(extra[::2], extra[1::2]):
        assert str(config[flag[2:].replace("-", "_")]) == value


def test_missing_data_file_is_a_clear_error(tmp_path, capsys):
    assert train_cli.main(["--out", str(tmp_path / "r"), "--data", str(tmp_path / "nope.txt"), *TINY]) == 2
    assert "nope.txt" in capsys.readouterr().err
