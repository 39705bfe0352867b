"""The command line never shows a traceback: every bad value, bad file and failed write is one line on
stderr and exit code 2; checkpoints stay safe under damage, a full disk, a second run and readers.

Cases that need the real entry point run `python -m windowed_attention.cli` in subprocesses (several at
once); the rest call `main()` in-process.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import run_waiting

from windowed_attention import cli
from windowed_attention.cli_types import describe
from windowed_attention.training import checkpoint
from windowed_attention.training.checkpoint import load_config, load_model
from windowed_attention.training.metrics import read_metrics

TINY = ["--dim", "32", "--depth", "1", "--heads", "2", "--dim-head", "16", "--seq-len", "32", "--window-size", "16",
        "--batch-size", "4", "--eval-batches", "2", "--sample-length", "0", "--no-progress"]
ENTRY = [sys.executable, "-m", "windowed_attention.cli"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text("".join(f"line {i}: the quick brown fox {i * 7 % 13}\n" for i in range(2000)))
    return path


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory, corpus):
    out = tmp_path_factory.mktemp("run") / "run"
    assert cli.main(["train", "--out", str(out), "--data", str(corpus), "--steps", "2", *TINY]) == 0
    return out


def one_line_error(err: str, *words: str) -> None:
    assert "Traceback" not in err, err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert "error:" in err
    for word in words:
        assert word in err, (word, err)


def error_after_start(err: str, *words: str) -> None:
    """An error that stops a run already under way: after its opening line, one error line, the last."""
    assert "Traceback" not in err, err
    lines = err.strip("\n").splitlines()
    assert sum("error:" in line for line in lines) == 1, err
    one_line_error(lines[-1] + "\n", *words)


def run_main(capsys, *argv):
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.err


def record_sums(folder):
    names = ("config.json", "model.safetensors", "trainer_state.pt")
    (folder / "SHA256SUMS").write_text("".join(
        f"{hashlib.sha256((folder / name).read_bytes()).hexdigest()}  {name}\n" for name in names))


# ------------------------------------------------------------------------------------- bad numbers

@pytest.mark.parametrize("argv, flag", [
    (["train", "--lr", "inf"], "--lr"),
    (["train", "--lr", "nan"], "--lr"),
    (["train", "--lr", "-1e-3"], "--lr"),
    (["train", "--weight-decay", "nan"], "--weight-decay"),
    (["train", "--weight-decay", "-0.1"], "--weight-decay"),
    (["train", "--max-grad-norm", "inf"], "--max-grad-norm"),
    (["train", "--min-lr-ratio", "nan"], "--min-lr-ratio"),
    (["train", "--min-lr-ratio", "abc"], "--min-lr-ratio"),
    (["train", "--seed", "-1"], "--seed"),
    (["train", "--seed", str(2**64)], "--seed"),
    (["train", "--steps", "0"], "--steps"),
    (["train", "--batch-size", "1e3"], "--batch-size"),
    (["train", "--precision", "fp8"], "--precision"),
    (["generate", "--temperature", "inf"], "--temperature"),
    (["generate", "--top-p", "nan"], "--top-p"),
    (["generate", "--filter-thres", "-inf"], "--filter-thres"),
    (["generate", "--threads", str(10**6)], "--threads"),
    (["generate", "--seed", str(2**64)], "--seed"),
    (["generate", "--length", "-1"], "--length"),
    (["train", "--no-such-flag"], "unrecognized"),
    ([], "required"),
])
def test_bad_numbers_and_flags_are_one_line_exit_2(capsys, argv, flag):
    code, err = run_main(capsys, *argv)
    assert code == 2
    one_line_error(err, flag)


def test_out_of_memory_is_described_in_one_line():
    message = describe(RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0.\n"
                                    "DefaultCPUAllocator: can't allocate memory: you tried"))
    assert "out of memory" in message and "\n" not in message
    assert "\n" not in describe(ValueError("two\nlines"))


# ------------------------------------------------------------------------------------ bad files

def test_bad_data_files_are_one_line_exit_2(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    corrupt = tmp_path / "corrupt.gz"
    corrupt.write_bytes(b"this is not gzip at all" * 10)
    truncated = tmp_path / "truncated.gz"
    truncated.write_bytes(gzip.compress(b"some text to train on " * 500)[:60])
    cases = [(empty, "empty"), (corrupt, "gzip"), (truncated, "gzip"), (tmp_path / "missing.txt", "not found"),
             (tmp_path, "is a directory")]
    for path, word in cases:
        code, err = run_main(capsys, "train", "--out", str(tmp_path / "run"), "--data", str(path), *TINY)
        assert code == 2, path
        one_line_error(err, word)


def test_out_that_is_a_file_or_cannot_be_written(tmp_path, corpus, capsys, monkeypatch):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out in (afile, afile / "below"):
        code, err = run_main(capsys, "train", "--out", str(out), "--data", str(corpus), *TINY)
        assert code == 2
        one_line_error(err, "afile")
    assert afile.read_text() == "x"
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    if os.geteuid() != 0:  # root writes anywhere: then the failure is simulated
        readonly.chmod(0o500)
    else:
        real_open = os.open

        def refuse(path, *args, **kwargs):  # only inside the read-only folder
            if str(path).startswith(str(readonly)):
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return real_open(path, *args, **kwargs)

        monkeypatch.setattr(os, "open", refuse)
    code, err = run_main(capsys, "train", "--out", str(readonly / "run"), "--data", str(corpus), *TINY)
    assert code == 2
    one_line_error(err, "Permission denied")


def test_full_disk_keeps_the_last_complete_checkpoint(tmp_path, corpus, capsys, monkeypatch):
    """The save of step 4 hits ENOSPC: one line, exit 2, and the checkpoint of step 2 still loads."""
    real_write = checkpoint._write
    calls = {"n": 0}

    def write(path, data):
        calls["n"] += 1
        if calls["n"] > 5:  # the first save writes 5 files (4 + COMPLETE); the second fails midway
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real_write(path, data)

    monkeypatch.setattr(checkpoint, "_write", write)
    out = tmp_path / "run"
    code, err = run_main(capsys, "train", "--out", str(out), "--data", str(corpus), "--steps", "6", "--save-every", "2",
                         *TINY)
    assert code == 2
    error_after_start(err, "No space left on device", "step 4")
    monkeypatch.setattr(checkpoint, "_write", real_write)
    _, _, step = load_model(out)
    assert step == 2 and not (out / ".staging").exists()
    code, err = run_main(capsys, "train", "--out", str(out), "--resume", "--steps", "3", "--no-progress")
    assert code == 0, err


def test_impossible_config_values_are_one_line_exit_2(tmp_path, run_folder, capsys):
    import shutil

    for section, field, value in (("train", "steps", -5), ("train", "lr", float("inf")), ("train", "precision", "fp8"),
                                  ("model", "dim", 0), ("model", "heads", "four"), ("train", "seed", 2**70)):
        out = tmp_path / f"{section}-{field}"
        shutil.copytree(run_folder, out)
        config = json.loads((out / "config.json").read_text())
        config[section][field] = value
        (out / "config.json").write_text(json.dumps(config))
        record_sums(out)  # a consistent checkpoint with impossible values, not a damaged one
        for argv in (["train", "--out", str(out), "--resume", "--steps", "9", "--no-progress"],
                     ["generate", "--checkpoint", str(out), "--length", "3"]):
            code, err = run_main(capsys, *argv)
            assert code == 2, argv
            one_line_error(err, "config.json", field)


def test_through_the_real_entry_point(tmp_path, run_folder):
    """A few of the cases above as a user runs them: `python -m windowed_attention.cli ...`."""
    damaged = tmp_path / "damaged"
    import shutil

    shutil.copytree(run_folder, damaged)
    raw = bytearray((damaged / "model.safetensors").read_bytes())
    raw[-64:-32] = bytes(32)  # inside the tensor data: the header still parses
    (damaged / "model.safetensors").write_bytes(bytes(raw))
    corrupt = tmp_path / "corrupt.gz"
    corrupt.write_bytes(b"\x1f\x8b\x08\x00garbage")
    afile = tmp_path / "afile"
    afile.write_text("x")
    cases = [
        (["train", "--lr", "inf"], "--lr"),
        (["train", "--data", str(corrupt), "--out", str(tmp_path / "r1"), *TINY], "gzip"),
        (["train", "--out", str(afile), *TINY], "not a folder"),
        (["generate", "--checkpoint", str(damaged)], "SHA-256"),
    ]
    procs = [subprocess.Popen([*ENTRY, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for argv, _ in cases]
    for proc, (argv, word) in zip(procs, cases):
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 2, (argv, err)
        one_line_error(err, word)
        assert out == ""


# ------------------------------------------------------------------------------- runs and readers

def train_process(out, data, *extra):
    return subprocess.Popen([*ENTRY, "train", "--out", str(out), "--data", str(data), *TINY, "--eval-every", "100000",
                             "--log-every", "1", *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for_step(out, minimum, proc):
    return run_waiting.wait_for_step(out, minimum, proc, timeout=120)


def test_second_run_on_the_same_folder_is_refused_and_the_first_is_unharmed(tmp_path, corpus):
    out = tmp_path / "run"
    first = train_process(out, corpus, "--steps", "100000", "--save-every", "2")
    try:
        wait_for_step(out, 2, first)
        started = time.monotonic()
        second = subprocess.run([*ENTRY, "train", "--out", str(out), "--data", str(corpus), *TINY, "--steps", "3"],
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 2
        one_line_error(second.stderr, "in use by another training run", str(first.pid))
        assert time.monotonic() - started < 60  # refused at once, not after training
        wait_for_step(out, load_config(out)[2] + 2, first)  # the first run goes on saving
    finally:
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=120)
    assert first.returncode == 143, err
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl")]
    assert steps == list(range(1, len(steps) + 1))  # its log was not truncated by the refused runs
    _, _, step = load_model(out)
    assert step == steps[-1]


def test_readers_during_saves_see_one_whole_checkpoint(tmp_path, corpus):
    """A run saving every step while this process loads its folder over and over: every load gives a
    whole checkpoint (a step that only grows), never a false 'damaged' or 'missing' error."""
    out = tmp_path / "run"
    writer = train_process(out, corpus, "--steps", "100000", "--save-every", "1")
    loads, steps = 0, []
    try:
        wait_for_step(out, 1, writer)
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:
            _, _, step = load_model(out)
            steps.append(step)
            loads += 1
    finally:
        writer.send_signal(signal.SIGTERM)
        writer.communicate(timeout=120)
    assert loads > 10 and steps == sorted(steps) and len(set(steps)) > 2


def test_resume_from_another_working_directory(tmp_path, corpus, capsys, monkeypatch):
    """A relative --data is stored resolved: the run resumes from anywhere."""
    here = tmp_path / "here"
    here.mkdir()
    (here / "data.txt").write_bytes(corpus.read_bytes())
    monkeypatch.chdir(here)
    assert cli.main(["train", "--out", "run", "--data", "data.txt", "--steps", "2", *TINY]) == 0
    stored = json.loads((here / "run" / "config.json").read_text())["train"]["data"]
    assert stored == str(here / "data.txt")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert cli.main(["train", "--out", str(here / "run"), "--resume", "--steps", "3", "--no-progress"]) == 0
    # giving the same data again by another relative spelling is no change
    monkeypatch.chdir(here)
    assert cli.main(["train", "--out", "run", "--resume", "--data", "./data.txt", "--steps", "4",
                     "--no-progress"]) == 0
    assert load_config(here / "run")[2] == 4
