"""`windowed-attention bench` through the command's entry point: flags, skips, output folder, plots."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from windowed_attention import cli
from windowed_attention.bench import cli as bench_cli


def _bench(argv, capsys):
    """`windowed-attention bench ARGV` as the console script runs it: (exit code, stdout, stderr)."""
    try:
        code = cli.main(["bench", *argv])
    except SystemExit as exit:
        code = exit.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("argv, names", [
    (["--reps", "0"], "--reps"),
    (["--reps", "two"], "--reps"),
    (["--sizes", "-5"], "--sizes"),
    (["--sizes"], "--sizes"),
    (["--windows", "0"], "--windows"),
    (["--dense-max", "-1"], "--dense-max"),
    (["--flex-max", "x"], "--flex-max"),
    (["--max-seconds", "nan"], "--max-seconds"),
    (["--max-seconds", "inf"], "--max-seconds"),
    (["--max-seconds", "0"], "--max-seconds"),
    (["--impls", "nobody"], "--impls"),
    (["--no-such-flag"], "--no-such-flag"),
    (["--sizes", "100", "--windows", "64"], "every N"),
    (["--headline", "--quick"], "--headline"),
])
def test_bad_flags_are_one_line_and_exit_2(argv, names, capsys, tmp_path):
    code, out, err = _bench([*argv, "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and names in err, err


def test_bad_out_folder_is_one_line_and_exit_2(capsys, tmp_path):
    file = tmp_path / "file"
    file.write_text("")
    for out in (file, file / "below"):
        code, _, err = _bench(["--quick", "--out", str(out)], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and "--out" in err, err


def test_the_console_script_gives_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "windowed_attention.cli", "bench", "--reps", "0", "--out", str(tmp_path)],
                          capture_output=True, text=True)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines() == ["windowed-attention bench: error: argument --reps: expected an integer >= 1, got 0"]


def test_defaults_write_a_run_folder_and_quick_leaves_out_compiled_flex(capsys):
    args = cli.build_parser().parse_args(["bench", "--quick"])
    assert args.out == "runs/bench"  # not the committed benchmarks/
    points, skipped = bench_cli._points(args)
    assert {impl for impl, _, _ in points} == {"ours", "ours-sdpa", "local-attention", "dense-sdpa"}
    assert any(reason.startswith("flex-compiled") and "--quick" in reason for reason in skipped)
    assert any(reason.startswith("dense-sdpa at N = 8192") for reason in skipped)


def test_a_small_sweep_writes_results_skips_and_plots(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(bench_cli.impls, "installed", lambda name: name != "local-attention")
    monkeypatch.setattr(bench_cli.measure, "matmul_peak", lambda: 100.0)
    code, out, err = _bench(["--sizes", "64", "128", "--windows", "16", "--impls", "ours", "local-attention",
                             "dense-sdpa", "--dense-max", "64", "--reps", "1", "--no-memory", "--out", str(tmp_path)],
                            capsys)
    assert code == 0
    assert "skipped local-attention: not installed" in err
    assert "skipped dense-sdpa at N = 128: above --dense-max 64" in err
    result = json.loads((tmp_path / "results.json").read_text())
    assert {(r["impl"], r["n"], r["backward"]) for r in result["rows"]} == {
        ("ours", 64, False), ("ours", 64, True), ("ours", 128, False), ("ours", 128, True),
        ("dense-sdpa", 64, False), ("dense-sdpa", 64, True)}
    assert len(result["skipped"]) == 2
    assert (tmp_path / "time_vs_n.png").is_file()
    assert not (tmp_path / "memory_vs_n.png").exists()  # nothing measured: no empty plot


def test_a_busy_machine_is_warned_about(monkeypatch):
    monkeypatch.setattr(bench_cli.os, "getloadavg", lambda: (9.5, 9.0, 8.0))
    monkeypatch.setattr(bench_cli.os, "cpu_count", lambda: 2)
    assert "busy (load average 9.5 on 2 cores)" in bench_cli.busy_warning()
    monkeypatch.setattr(bench_cli.os, "getloadavg", lambda: (1.5, 1.0, 1.0))
    assert bench_cli.busy_warning() is None
