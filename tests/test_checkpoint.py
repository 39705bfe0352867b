"""Checkpoints: atomic saves, clear errors for missing/partial/corrupted files, SIGKILL and SIGTERM."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys

import pytest
import run_waiting
import torch

from windowed_attention.training import cli as train_cli
from windowed_attention.training.checkpoint import (
    CheckpointError,
    load_config,
    load_model,
    load_trainer_state,
    save_checkpoint,
)
from windowed_attention.training.config import ModelConfig, TrainConfig
from windowed_attention.training.metrics import read_metrics

TINY = ["--dim", "32", "--depth", "1", "--heads", "2", "--dim-head", "16", "--seq-len", "32", "--window-size", "16",
        "--batch-size", "4", "--eval-batches", "2", "--sample-length", "0", "--warmup-steps", "3", "--no-progress"]
MODEL = ModelConfig(max_seq_len=32, dim=32, depth=1, heads=2, dim_head=16, local_attn_window_size=16)


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("".join(f"line {i}: the quick brown fox {i * 7 % 13}\n" for i in range(3000)))
    return path


def save(out, step, seed=0):
    torch.manual_seed(seed)
    model = MODEL.build()
    save_checkpoint(out, model=model, model_config=MODEL, train_config=TrainConfig(), step=step,
                    trainer_state={"optimizer": {}, "note": seed})
    return model


def test_round_trip(tmp_path):
    model = save(tmp_path, 7)
    loaded, config, step = load_model(tmp_path)
    assert step == 7 and config == MODEL and not loaded.training
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert load_trainer_state(tmp_path, 7)["note"] == 0
    assert not (tmp_path / ".staging").exists()


def test_interrupted_save_before_complete_keeps_the_old_checkpoint(tmp_path):
    save(tmp_path, 3, seed=0)
    staging = tmp_path / ".staging"  # a save of step 4 killed while staging: no COMPLETE marker
    staging.mkdir()
    (staging / "model.safetensors").write_bytes(b"partial")
    assert load_config(tmp_path)[2] == 3
    load_model(tmp_path)
    save(tmp_path, 5, seed=1)  # the next save clears the debris
    assert load_config(tmp_path)[2] == 5 and not staging.exists()


def test_interrupted_save_while_moving_rolls_forward(tmp_path):
    save(tmp_path, 3, seed=0)
    newer = tmp_path / "newer"
    new_model = save(newer, 4, seed=1)
    staging = tmp_path / ".staging"
    staging.mkdir()
    for name in ("config.json", "trainer_state.pt", "SHA256SUMS"):
        os.replace(newer / name, staging / name)
    (staging / "COMPLETE").write_text("4")
    os.replace(newer / "model.safetensors", tmp_path / "model.safetensors")  # moved before the crash
    model, _, step = load_model(tmp_path)
    assert step == 4 and torch.equal(model.to_logits[1].weight, new_model.to_logits[1].weight)
    assert load_trainer_state(tmp_path, 4)["note"] == 1


def record_sums(folder):
    """Re-record SHA256SUMS after editing files, as if the edited checkpoint had been saved so: the
    checks behind the checksums must catch it."""
    names = ("config.json", "model.safetensors", "trainer_state.pt")
    (folder / "SHA256SUMS").write_text("".join(
        f"{hashlib.sha256((folder / name).read_bytes()).hexdigest()}  {name}\n" for name in names))


@pytest.mark.parametrize("damage, message", [
    ("truncate_weights", "model.safetensors"),
    ("overwrite_tensor_bytes", "model.safetensors is damaged: its SHA-256 differs"),
    ("overwrite_config_value", "config.json is damaged"),
    ("garbage_config", "config.json"),
    ("missing_config", "config.json"),
    ("missing_sums", "SHA256SUMS is missing"),
    ("garbage_sums", "SHA256SUMS is damaged"),
    ("wrong_step_weights", "step"),
    ("bad_model_config", "config.json"),
    ("impossible_train_config", "config.json .*lr"),
])
def test_damaged_checkpoint_is_a_one_line_error(tmp_path, damage, message):
    save(tmp_path, 2)
    weights, config = tmp_path / "model.safetensors", tmp_path / "config.json"
    if damage == "overwrite_tensor_bytes":  # same length, valid header: only the checksum can tell
        raw = bytearray(weights.read_bytes())
        raw[-40:-20] = bytes(20)
        weights.write_bytes(bytes(raw))
    elif damage == "overwrite_config_value":
        config.write_text(config.read_text().replace('"lr": 0.004', '"lr": 0.005'))
    elif damage == "missing_sums":
        (tmp_path / "SHA256SUMS").unlink()
    elif damage == "garbage_sums":
        (tmp_path / "SHA256SUMS").write_bytes(b"\xff\x00 nothing")
    elif damage == "truncate_weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "garbage_config":
        config.write_bytes(b"\x00\xffnot json{")
    elif damage == "missing_config":
        config.unlink()
    elif damage == "wrong_step_weights":
        data = json.loads(config.read_text())
        data["step"] = 9
        config.write_text(json.dumps(data))
    elif damage == "bad_model_config":
        data = json.loads(config.read_text())
        data["model"]["dim"] = -3
        config.write_text(json.dumps(data))
    elif damage == "impossible_train_config":
        data = json.loads(config.read_text())
        data["train"]["lr"] = float("nan")
        config.write_text(json.dumps(data))
    if damage in ("wrong_step_weights", "bad_model_config", "impossible_train_config"):
        record_sums(tmp_path)
    with pytest.raises(CheckpointError, match=message) as info:
        load_model(tmp_path)
    assert "\n" not in str(info.value)


def test_missing_or_corrupted_trainer_state_stops_resume_with_exit_2(tmp_path, text_file, capsys):
    out = tmp_path / "run"
    assert train_cli.main(["--out", str(out), "--data", str(text_file), "--steps", "2", *TINY]) == 0
    capsys.readouterr()
    state = out / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:100])
    assert train_cli.main(["--out", str(out), "--resume", "--steps", "4", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "trainer_state.pt" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    state.unlink()
    assert train_cli.main(["--out", str(out), "--resume", "--steps", "4", "--no-progress"]) == 2
    assert "trainer_state.pt is missing" in capsys.readouterr().err


def train_command(out, data, *extra):
    return [sys.executable, "-m", "windowed_attention.training.cli", "--out", str(out), "--data", str(data),
            *TINY, *extra]


def wait_for_step(out, minimum, proc):
    return run_waiting.wait_for_step(out, minimum, proc, timeout=90)


def test_sigkill_resumes_from_last_complete_checkpoint(tmp_path, text_file):
    """Kill -9 a run mid-way; --resume continues from its last complete checkpoint and reproduces the
    losses of an uninterrupted run exactly."""
    common = ["--log-every", "1", "--eval-every", "1000", "--save-every", "2", "--lr-decay-steps", "400"]
    out = tmp_path / "killed"
    proc = subprocess.Popen(train_command(out, text_file, "--steps", "400", *common),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_step(out, 6, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _, _, step = load_config(out)  # whatever was last complete
    load_model(out)
    target = step + 3
    assert train_cli.main(["--out", str(out), "--resume", "--steps", str(target), "--no-progress"]) == 0
    reference = tmp_path / "reference"
    assert train_cli.main(["--out", str(reference), "--data", str(text_file), "--steps", str(target), *TINY,
                           *common]) == 0
    resumed = {r["step"]: r["train_loss"] for r in read_metrics(out / "metrics.jsonl")}
    straight = {r["step"]: r["train_loss"] for r in read_metrics(reference / "metrics.jsonl")}
    assert resumed == straight and max(resumed) == target


def test_sigterm_finishes_the_step_saves_and_exits_nonzero(tmp_path, text_file):
    out = tmp_path / "run"
    proc = subprocess.Popen(train_command(out, text_file, "--steps", "100000", "--save-every", "3",
                                          "--log-every", "1", "--eval-every", "100000"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_step(out, 3, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "SIGTERM" in err and "--resume" in err
    _, _, step = load_config(out)
    records = read_metrics(out / "metrics.jsonl")
    assert records[-1]["step"] == step  # the checkpoint is of the last finished step
    assert train_cli.main(["--out", str(out), "--resume", "--steps", str(step + 1), "--no-progress"]) == 0
