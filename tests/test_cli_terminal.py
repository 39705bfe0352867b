"""The command line at a terminal (#27): Ctrl-C and SIGTERM (real signals, also while torch is imported,
during start-up and twice), a closed stdout, a console that is not UTF-8, an old run folder, bench's output folder and
plots, escapes and per-prompt seeds of `generate`, and flags that are checked only where they act.

Processes that must be stopped at a known point run the real entry point with one function wrapped to
wait (`BLOCK`): it touches a marker file and waits for a `.go` file, so a signal lands exactly there.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import windowed_attention
from windowed_attention import cli
from windowed_attention.generation.cli import Escaper, unescape
from windowed_attention.training import cli as train_cli
from windowed_attention.training.checkpoint import load_config
from windowed_attention.training.metrics import read_metrics

TINY = ["--dim", "32", "--depth", "1", "--heads", "2", "--dim-head", "16", "--seq-len", "32", "--window-size", "16",
        "--batch-size", "4", "--eval-batches", "2", "--sample-length", "0", "--no-progress"]
ENTRY = [sys.executable, "-m", "windowed_attention.cli"]
ROOT = Path(windowed_attention.__file__).resolve().parent.parent  # subprocesses run the code under test
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}

BLOCK = """
import importlib, pathlib, sys, time
marker, target, name = sys.argv[1:4]
module = importlib.import_module(target)
original = getattr(module, name)
def blocked(*args, **kwargs):
    pathlib.Path(marker).touch()
    while not pathlib.Path(marker + ".go").exists():
        time.sleep(0.02)
    return original(*args, **kwargs)
setattr(module, name, blocked)
from windowed_attention import cli
sys.exit(cli.main(sys.argv[4:]))
"""


def blocked_process(marker: Path, target: str, name: str, *argv, **popen):
    return subprocess.Popen([sys.executable, "-c", BLOCK, str(marker), target, name, *argv], env=ENV,
                            stdout=popen.pop("stdout", subprocess.DEVNULL), stderr=subprocess.PIPE, text=True, **popen)


def wait_for(path: Path, proc, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"exited with {proc.returncode} before {path.name}: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{path.name} never appeared")
        time.sleep(0.02)


def no_traceback_last_line(err: str) -> str:
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    return err.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text("".join(f"line {i}: the quick brown fox héllo ✓ {i * 7 % 13}\n" for i in range(2000)),
                    encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus):
    out = tmp_path_factory.mktemp("run") / "run"
    assert cli.main(["train", "--out", str(out), "--data", str(corpus), "--steps", "3", *TINY]) == 0
    return out


# ---------------------------------------------------------------------------------- one run per folder

def test_a_new_run_refuses_a_folder_holding_a_checkpoint(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "--out", str(out), "--data", str(corpus), "--steps", "2", *TINY]) == 0
    before = {name: (out / name).read_bytes() for name in ("config.json", "model.safetensors", "metrics.jsonl")}
    capsys.readouterr()
    assert cli.main(["train", "--out", str(out), "--data", str(corpus), "--steps", "3", *TINY]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--resume" in err and "--overwrite" in err and "step 2" in err, err
    assert {name: (out / name).read_bytes() for name in before} == before  # nothing touched, not even metrics

    # --overwrite: the new run replaces the old one whole (one run id in the metrics, its own steps)
    assert cli.main(["train", "--out", str(out), "--data", str(corpus), "--steps", "1", "--overwrite", *TINY]) == 0
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1] and load_config(out)[2] == 1
    assert json.loads((out / "config.json").read_text())["run_id"] == records[0]["run"]
    assert cli.main(["train", "--out", str(out), "--resume", "--overwrite", "--no-progress"]) == 2


def test_resume_refuses_metrics_of_another_run(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "--out", str(out), "--data", str(corpus), "--steps", "2", "--log-every", "1", *TINY]) == 0
    records = read_metrics(out / "metrics.jsonl")
    (out / "metrics.jsonl").write_text("".join(json.dumps({**r, "run": "0123456789abcdef"}) + "\n" for r in records))
    capsys.readouterr()
    assert cli.main(["train", "--out", str(out), "--resume", "--steps", "3", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "another run" in err and "metrics.jsonl" in err, err
    assert load_config(out)[2] == 2


# --------------------------------------------------------------------------------------------- signals

def test_signals_during_start_up_are_one_line_and_leave_no_new_folder(tmp_path, trained):
    """Ctrl-C (or SIGTERM) while `train` loads its data, `generate` its model, `bench` its first
    measurement: one line, 130 (143), no traceback; a run folder the run created is gone, one that
    existed before keeps what it held."""
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    cases = [  # (marker, module, function, argv, signal, code, folder)
        ("new", "windowed_attention.training.trainer", "load_corpus",
         ["train", "--out", str(tmp_path / "new" / "run"), *TINY], signal.SIGINT, 130, tmp_path / "new" / "run"),
        ("existing", "windowed_attention.training.trainer", "load_corpus",
         ["train", "--out", str(existing), *TINY], signal.SIGTERM, 143, existing),
        ("generate", "windowed_attention.training.checkpoint", "load_model",
         ["generate", "--checkpoint", str(trained), "--length", "5"], signal.SIGINT, 130, None),
        ("bench", "windowed_attention.bench.measure", "matmul_peak",
         ["bench", "--sizes", "64", "--windows", "16", "--impls", "ours", "--out", str(tmp_path / "bench")],
         signal.SIGINT, 130, None),
    ]
    procs = [blocked_process(tmp_path / marker, module, function, *argv)
             for marker, module, function, argv, _, _, _ in cases]
    for proc, (marker, _, _, argv, signum, code, folder) in zip(procs, cases):
        wait_for(tmp_path / marker, proc)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == code, (argv[0], err)
        assert "windowed-attention " + argv[0] in no_traceback_last_line(err), err
        assert err.count("\n") == 1 or argv[0] == "bench", err  # bench may warn of a busy machine first
    assert not (tmp_path / "new" / "run").exists()
    assert (existing / "notes.txt").read_text() == "mine"
    assert not {p.name for p in existing.iterdir()} - {"notes.txt", ".run.lock"}


# the import of torch stalls (as if slow) until a signal ends it: `windowed-attention` as its console script
# runs it (`from windowed_attention.cli import main`), or as `python -m windowed_attention.cli`
STALLED_IMPORT = """
import pathlib, runpy, sys, time
marker, how, argv = sys.argv[1], sys.argv[2], sys.argv[3:]

class StallTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            pathlib.Path(marker).touch()
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                time.sleep(0.02)
        return None

sys.meta_path.insert(0, StallTorch())
if how == "script":
    sys.argv = ["windowed-attention", *argv]
    from windowed_attention.cli import main
    sys.exit(main())
sys.argv = ["windowed_attention.cli", *argv]
runpy.run_module("windowed_attention.cli", run_name="__main__", alter_sys=True)
"""


@pytest.mark.parametrize("how", ["script", "-m"])
def test_ctrl_c_while_torch_is_imported_is_one_line(tmp_path, how):
    """Ctrl-C in the first seconds of any command, while torch loads: one line, 130, no traceback."""
    marker = tmp_path / "importing"
    proc = subprocess.Popen([sys.executable, "-c", STALLED_IMPORT, str(marker), how, "train", "--out",
                             str(tmp_path / "run"), *TINY], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    wait_for(marker, proc, timeout=60)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert no_traceback_last_line(err) == "windowed-attention: interrupted" and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()


def test_the_command_line_loads_no_torch_before_it_handles_ctrl_c():
    probe = "import sys; import windowed_attention.cli; print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", probe], env=ENV, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "[]", (result.stdout, result.stderr)


@pytest.mark.parametrize("during", ["save_checkpoint", "plot_metrics"])
def test_first_ctrl_c_says_so_and_saves_a_second_aborts_after_the_save(tmp_path, corpus, during):
    """The first Ctrl-C says at once that it saves, and saves without evaluating; a second one during
    that save lets the save finish (or, during the loss plot, stops it), then ends with one line naming
    the checkpoint, exit 130."""
    out = tmp_path / "run"
    marker = tmp_path / "saving"
    proc = blocked_process(marker, "windowed_attention.training.trainer", during,
                           "train", "--out", str(out), "--data", str(corpus), *TINY, "--steps", "100000",
                           "--log-every", "1", "--eval-every", "1", "--save-every", "100000")
    deadline = time.monotonic() + 180
    while not read_metrics(out / "metrics.jsonl"):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else "timeout"
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    wait_for(marker, proc)
    proc.send_signal(signal.SIGINT)  # during the save (or the plot)
    time.sleep(0.5)
    Path(str(marker) + ".go").touch()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    step = load_config(out)[2]  # the save went through
    assert f"stopping (SIGINT): saving a checkpoint at step {step}; Ctrl-C again to abort" in err
    last = no_traceback_last_line(err)
    assert "aborted" in last and f"step {step}" in last and "--resume" in last, err
    records = read_metrics(out / "metrics.jsonl")
    assert records[-1]["step"] == step and "val_loss" not in records[-1]  # the stop did not evaluate


def test_stop_signal_defers_a_second_signal_during_a_save():
    from windowed_attention.cli_types import Interrupted
    from windowed_attention.training.trainer import StopSignal

    with StopSignal(announce=False) as stop:
        with pytest.raises(Interrupted):  # not started yet: at once
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        stop.armed = True
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        assert stop.received == "SIGINT"
        with pytest.raises(Interrupted) as aborted:
            with stop.saving():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.01)
                finished = True  # the save's body ran to its end
        assert finished and aborted.value.code == 130


# --------------------------------------------------------------------------- closed stdout, encodings

def test_closed_stdout_and_an_ascii_console_never_end_training(tmp_path, corpus):
    """`train ... | head -c 5` (stdout closed at once) and PYTHONIOENCODING=ascii with a non-ASCII sample:
    both train to the end and save."""
    common = ["train", "--data", str(corpus), *TINY, "--steps", "4", "--eval-every", "2", "--sample-length", "8"]
    closed = subprocess.Popen([*ENTRY, *common, "--out", str(tmp_path / "closed")], env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    closed.stdout.close()  # the reader is gone before the first line
    ascii_run = subprocess.Popen([*ENTRY, *common, "--out", str(tmp_path / "ascii")],
                                 env={**ENV, "PYTHONIOENCODING": "ascii"}, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE)
    _, err = closed.communicate(timeout=180)
    assert closed.returncode == 0 and b"done: step 4" in err, err
    assert load_config(tmp_path / "closed")[2] == 4
    out, err = ascii_run.communicate(timeout=180)
    assert ascii_run.returncode == 0 and b"done: step 4" in err, err
    assert load_config(tmp_path / "ascii")[2] == 4
    assert b"h\\xe9llo" in out  # the prime's repr, escaped


def test_generate_on_an_ascii_console(tmp_path, trained):
    """--prime and --prompts-file on PYTHONIOENCODING=ascii: what cannot be shown is escaped, one note."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("café\n".encode() + b"\xff\xfe raw\n")
    common = [*ENTRY, "generate", "--checkpoint", str(trained), "--length", "6", "--seed", "1"]
    env = {**ENV, "PYTHONIOENCODING": "ascii"}
    prime = subprocess.run([*common, "--prime", "héllo"], env=env, capture_output=True, timeout=120)
    assert prime.returncode == 0, prime.stderr
    assert prime.stdout.startswith(b"h\\xc3\\xa9llo") and prime.stdout.isascii()
    assert prime.stderr.count(b"note:") == 1 and b"ascii" in prime.stderr
    lines = subprocess.run([*common, "--prompts-file", str(prompts)], env=env, capture_output=True, timeout=120)
    assert lines.returncode == 0, lines.stderr
    out = lines.stdout.decode("ascii").split("\n")
    assert len(out) == 3 and out[-1] == ""
    assert unescape(out[0]).startswith("café".encode()) and unescape(out[1]).startswith(b"\xff\xfe raw")
    assert lines.stderr.count(b"note:") == 1


def test_prompts_file_output_escapes_reversibly(tmp_path, trained, capsys):
    """Bytes that are not UTF-8 and control characters (an ESC from a prompt) are \\xNN escapes: one line
    per prompt, and `unescape` gives back the prompt's bytes exactly; no raw ESC reaches stdout."""
    raw = [b"\x1b[31mred", b"caf\xe9 latin-1", b"back\\slash\ttab", "✓ ok".encode()]
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"\n".join(raw) + b"\n")
    assert cli.main(["generate", "--checkpoint", str(trained), "--prompts-file", str(prompts), "--length", "4",
                     "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\ufffd" not in out
    lines = out.split("\n")[:-1]
    assert len(lines) == len(raw)
    for line, prompt in zip(lines, raw):
        assert unescape(line)[:len(prompt)] == prompt and len(unescape(line)) == len(prompt) + 4
    assert lines[0].startswith("\\x1b[31mred") and lines[1].startswith("caf\\xe9 latin-1")
    assert cli.main(["generate", "--checkpoint", str(trained), "--prime", "\x1b[31m", "--length", "2"]) == 0
    assert capsys.readouterr().out.startswith("\\x1b[31m")


# ------------------------------------------------------------------------------------ seeds, flags

def test_seeded_prompts_file_lines_equal_prime_at_any_batch_size(tmp_path, trained, capsys):
    lines = ["hello", "the quick", "x"]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(line + "\n" for line in lines))
    common = ["generate", "--checkpoint", str(trained), "--length", "12", "--seed", "7", "--temperature", "1"]
    outputs = []
    for batch in ("1", "3"):
        assert cli.main([*common, "--prompts-file", str(prompts), "--batch-size", batch]) == 0
        outputs.append(capsys.readouterr().out.split("\n")[:-1])
    assert outputs[0] == outputs[1]
    stream = Escaper("utf-8", reversible=False)
    for line, prompt in zip(outputs[0], lines):
        assert cli.main([*common, "--prime", prompt]) == 0
        alone = capsys.readouterr().out
        assert stream(unescape(line).decode("utf-8", "surrogateescape")) + "\n" == alone


@pytest.mark.parametrize("argv, words", [
    (["--prompts-file", "P", "--prime", "x"], ["--prime", "--prompts-file"]),
    (["--prompts-file", "P", "--prime", ""], ["--prime", "--prompts-file"]),
    (["--batch-size", "4"], ["--batch-size", "--prompts-file"]),
])
def test_generate_flags_that_would_do_nothing_are_refused(tmp_path, trained, capsys, argv, words):
    (tmp_path / "P").write_text("a\n")
    argv = [str(tmp_path / "P") if a == "P" else a for a in argv]
    assert cli.main(["generate", "--checkpoint", str(trained), *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert all(word in captured.err for word in words), captured.err


def test_too_long_prompts_name_the_flags_and_the_line(tmp_path, capsys):
    from windowed_attention.training.config import ModelConfig
    from windowed_attention.training.runs import save_run

    config = ModelConfig(dim=16, depth=1, heads=2, dim_head=8, max_seq_len=16, local_attn_window_size=8,
                         use_abs_pos_emb=True)
    save_run(tmp_path / "abs", config.build(), config)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("short\n" + "y" * 14 + "\n")
    base = ["generate", "--checkpoint", str(tmp_path / "abs"), "--length", "4"]
    assert cli.main([*base, "--prompts-file", str(prompts)]) == 2
    err = capsys.readouterr().err
    assert "line 2" in err and "--length 4" in err and "max_new_tokens" not in err and "max_seq_len" not in err, err
    assert cli.main([*base, "--prime", "z" * 15]) == 2
    err = capsys.readouterr().err
    assert "--prime" in err and "--length 4" in err and "max_new_tokens" not in err, err


def test_no_compile_overrides_a_resumed_runs_compile(trained, monkeypatch):
    from dataclasses import replace

    from windowed_attention.cli_types import Parser

    parser = Parser(prog="windowed-attention train")
    train_cli.add_arguments(parser)
    original = train_cli.load_config

    def compiled(out):  # as if the run had been started with --compile
        model, train, step = original(out)
        return model, replace(train, compile=True), step

    monkeypatch.setattr(train_cli, "load_config", compiled)
    _, config, _ = train_cli.configs_from_args(parser.parse_args(["--out", str(trained), "--resume", "--no-compile"]))
    assert config.compile is False
    _, config, _ = train_cli.configs_from_args(parser.parse_args(["--out", str(trained), "--resume"]))
    assert config.compile is True


# ------------------------------------------------------------------------------------------------ bench

BENCH_TINY = ["--sizes", "64", "128", "--windows", "16", "--impls", "ours", "--reps", "1", "--no-memory"]


def test_bench_never_replaces_earlier_results_and_removes_stale_plots(tmp_path, capsys, monkeypatch):
    from windowed_attention.bench import cli as bench_cli

    monkeypatch.setattr(bench_cli.measure, "matmul_peak", lambda: 100.0)
    out = tmp_path / "bench"
    out.mkdir()
    (out / "results.json").write_text("{}\n")
    (out / "memory_vs_n.png").write_bytes(b"an old plot")
    assert cli.main(["bench", *BENCH_TINY, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "results.json" in err and "--overwrite" in err, err
    assert (out / "results.json").read_text() == "{}\n"
    assert cli.main(["bench", *BENCH_TINY, "--out", str(out), "--overwrite"]) == 0
    assert json.loads((out / "results.json").read_text())["rows"]
    assert (out / "time_vs_n.png").is_file() and not (out / "memory_vs_n.png").exists()  # --no-memory: no plot
    assert "removed" in capsys.readouterr().err
    if bench_cli.impls.installed("local-attention"):  # --headline checks that first
        (out / "headline.json").write_text("{}\n")
        assert cli.main(["bench", "--headline", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "headline.json" in err and "--overwrite" in err, err


def test_bench_with_a_closed_stdout_saves_everything(tmp_path):
    proc = subprocess.Popen([*ENTRY, "bench", *BENCH_TINY, "--out", str(tmp_path)], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 0 and "Traceback" not in err, err
    assert json.loads((tmp_path / "results.json").read_text())["rows"] and (tmp_path / "time_vs_n.png").is_file()


def test_bench_plots_fit_their_legend_and_label_every_length(tmp_path, monkeypatch):
    """One window (the --quick layout): the legend lies inside the figure and every measured N is a
    labelled tick, also within one decade."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from windowed_attention.bench import cli as bench_cli

    seen = []
    savefig = Figure.savefig

    def check(fig, *args, **kwargs):
        savefig(fig, *args, **kwargs)
        renderer = fig.canvas.get_renderer()
        figure_box = fig.bbox
        legend_box = fig.legends[0].get_window_extent(renderer)
        seen.append((legend_box.x0 >= figure_box.x0 - 1 and legend_box.x1 <= figure_box.x1 + 1,
                     [t.get_text() for t in fig.axes[0].get_xticklabels() if t.get_text()]))

    monkeypatch.setattr(Figure, "savefig", check)
    impls = ["ours", "ours-sdpa", "local-attention", "dense-sdpa"]
    rows = [dict(impl=impl, w=256, n=n, backward=backward, ms=1.0 + i + n / 1000, peak_rise_mib=10.0 + i)
            for i, impl in enumerate(impls) for n in (2048, 8192) for backward in (False, True)]
    bench_cli.plot(rows, tmp_path)
    assert len(seen) == 2
    for fits, labels in seen:
        assert fits
        assert labels == ["2k", "8k"]
