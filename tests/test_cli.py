"""The `train` and `generate` commands end to end on a tiny model."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest

from windowed_attention.generation import cli as generate_cli
from windowed_attention.training import cli as train_cli

TINY = ["--dim", "32", "--depth", "1", "--heads", "2", "--dim-head", "16", "--seq-len", "32", "--window-size", "16",
        "--batch-size", "4", "--eval-batches", "2", "--sample-length", "16", "--no-progress"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    data = root / "data.txt"
    data.write_text("hello windowed attention, " * 800)
    out = root / "run"
    assert train_cli.main(["--out", str(out), "--data", str(data), "--steps", "3", "--eval-every", "3", *TINY]) == 0
    return out


def test_train_writes_the_run_folder(trained):
    for name in ("config.json", "model.safetensors", "trainer_state.pt", "metrics.jsonl", "loss.png"):
        assert (trained / name).is_file(), name
    assert json.loads((trained / "config.json").read_text())["step"] == 3


def test_generate_streams_text(trained, capsys):
    args = ["--checkpoint", str(trained), "--prime", "héllo", "--length", "40", "--seed", "1"]
    assert generate_cli.main(args) == 0
    first = capsys.readouterr().out
    assert first.startswith("héllo") and first.endswith("\n")
    assert generate_cli.main(args) == 0
    assert capsys.readouterr().out == first  # seeded: reproducible


def test_generate_greedy_and_top_p(trained, capsys):
    assert generate_cli.main(["--checkpoint", str(trained), "--prime", "a", "--length", "10",
                              "--temperature", "0"]) == 0
    assert generate_cli.main(["--checkpoint", str(trained), "--prime", "a", "--length", "10", "--top-p", "0.9",
                              "--seed", "0"]) == 0
    assert capsys.readouterr().out.count("\n") >= 2


def test_generate_prompts_file_one_line_per_prompt(trained, tmp_path, capsys):
    """Prompts of different lengths, generated in batches of 2: each output line is its prompt and the
    continuation that prompt alone gets (greedy), with newlines escaped."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello\nwindowed attention\nx\na\\b\n", encoding="utf-8")
    common = ["--checkpoint", str(trained), "--length", "12", "--temperature", "0"]
    assert generate_cli.main([*common, "--prompts-file", str(prompts), "--batch-size", "2"]) == 0
    lines = capsys.readouterr().out.split("\n")
    assert lines[-1] == "" and len(lines) == 5
    for line, prompt in zip(lines, ["hello", "windowed attention", "x", "a\\\\b"]):
        assert line.startswith(prompt)
    single = tmp_path / "single.txt"
    single.write_text("windowed attention\n", encoding="utf-8")
    assert generate_cli.main([*common, "--prompts-file", str(single)]) == 0
    assert lines[1] + "\n" == capsys.readouterr().out


def test_generate_cache_dtype_reaches_the_engine(trained, tmp_path, capsys, monkeypatch):
    """`--cache-dtype bfloat16` decodes with a bfloat16 cache, for one prime and for a prompts file."""
    import torch

    from windowed_attention.generation import engine

    seen = []
    prefill = engine.prefill

    def watch(model, prompt, lengths=None, cache_dtype=None):
        logits, caches = prefill(model, prompt, lengths, cache_dtype)
        seen.append({cache.dtype for cache in caches})
        return logits, caches

    monkeypatch.setattr(engine, "prefill", watch)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello\nx\n", encoding="utf-8")
    common = ["--checkpoint", str(trained), "--length", "8", "--cache-dtype", "bfloat16"]
    assert generate_cli.main([*common, "--prime", "ab"]) == 0
    assert generate_cli.main([*common, "--prompts-file", str(prompts)]) == 0
    assert capsys.readouterr().out.count("\n") == 3
    assert seen == [{torch.bfloat16}, {torch.bfloat16}]
    assert generate_cli.main(["--checkpoint", str(trained), "--length", "8"]) == 0
    assert seen[-1] == {torch.float32}  # the default: the model's dtype
    with pytest.raises(ValueError, match="--cache-dtype"):
        generate_cli._cache_dtype("bfloat16", torch.float64)


@pytest.mark.parametrize("content, message", [(b"", "holds no prompt"), (b"a\n\nb\n", "line 2")])
def test_generate_bad_prompts_file_exits_2(trained, tmp_path, capsys, content, message):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(content)
    assert generate_cli.main(["--checkpoint", str(trained), "--prompts-file", str(prompts)]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and captured.out == "" and "Traceback" not in captured.err
    assert generate_cli.main(["--checkpoint", str(trained), "--prompts-file", str(tmp_path / "none.txt")]) == 2
    assert "--prompts-file" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--temperature", "-1"], "--temperature"),
    (["--filter-thres", "3"], "--filter-thres"),
    (["--top-p", "0"], "--top-p"),
    (["--prime", ""], "prime"),
])
def test_generate_bad_arguments_exit_2(trained, capsys, args, message):
    assert generate_cli.main(["--checkpoint", str(trained), *args]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and captured.out == ""


def test_generate_bad_checkpoint_exits_2(tmp_path, capsys):
    assert generate_cli.main(["--checkpoint", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "config.json").write_text("{garbage")
    assert generate_cli.main(["--checkpoint", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "config.json is corrupted" in err and "Traceback" not in err


def test_console_entry_point_train_then_generate(tmp_path):
    """`python -m windowed_attention.cli train ...` then `... generate ...`, as a user runs them."""
    data = tmp_path / "data.txt"
    data.write_text("abc def ghi " * 500)
    out = tmp_path / "run"
    command = [sys.executable, "-m", "windowed_attention.cli"]
    done = subprocess.run([*command, "train", "--out", str(out), "--data", str(data), "--steps", "3", *TINY],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "done: step 3" in done.stderr
    done = subprocess.run([*command, "generate", "--checkpoint", str(out), "--prime", "abc", "--length", "25",
                           "--threads", "1"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("abc") and len(done.stdout.encode()) >= 3 + 1
    bad = subprocess.run([*command, "generate", "--checkpoint", str(tmp_path / "nope")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1


def as_older_run(out, fields) -> None:
    """Rewrite the run folder `out` as a release before the model `fields` existed wrote it: `config.json`
    without them, and `SHA256SUMS` recording the new file (a changed file is refused as damaged)."""
    config = json.loads((out / "config.json").read_text())
    for field in fields:
        del config["model"][field]
    (out / "config.json").write_text(json.dumps(config))
    sums = out / "SHA256SUMS"
    digest = hashlib.sha256((out / "config.json").read_bytes()).hexdigest()
    sums.write_text("".join(f"{digest}  config.json\n" if line.endswith("  config.json") else line + "\n"
                            for line in sums.read_text().splitlines()))


def test_residual_streams_and_kv_heads_are_saved_and_used_by_generate_and_resume(tmp_path, capsys):
    from windowed_attention.training.checkpoint import load_config

    data = tmp_path / "data.txt"
    data.write_text("grouped queries on residual streams, " * 400)
    out = tmp_path / "run"
    shape = ["--residual-streams", "2", "--kv-heads", "1", "--lr-decay-steps", "3"]
    assert train_cli.main(["--out", str(out), "--data", str(data), "--steps", "2", *shape, *TINY]) == 0
    model = json.loads((out / "config.json").read_text())["model"]
    assert model["num_residual_streams"] == 2 and model["kv_heads"] == 1
    assert generate_cli.main(["--checkpoint", str(out), "--prime", "grouped", "--length", "8", "--seed", "0"]) == 0
    assert train_cli.main(["--out", str(out), "--data", str(data), "--steps", "3", "--resume", *shape, *TINY]) == 0
    capsys.readouterr()
    assert train_cli.main(["--out", str(out), "--steps", "4", "--resume", "--kv-heads", "2", "--no-progress"]) == 2
    assert "--kv-heads" in capsys.readouterr().err
    # a config.json written before these fields existed means one stream and kv_heads = heads
    as_older_run(out, ("num_residual_streams", "kv_heads"))
    model_config, _, _ = load_config(out)
    assert model_config.num_residual_streams == 1 and model_config.kv_heads is None


def test_kv_heads_must_divide_heads(tmp_path, capsys):
    assert train_cli.main(["--out", str(tmp_path / "run"), "--heads", "4", "--kv-heads", "3", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--kv-heads" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
