"""Training under torchrun: two CPU processes (gloo) with DistributedDataParallel."""

from __future__ import annotations

import json
import subprocess
import sys

from windowed_attention.training.checkpoint import load_model
from windowed_attention.training.metrics import read_metrics

TINY = ["--dim", "32", "--depth", "1", "--heads", "2", "--dim-head", "16", "--seq-len", "32", "--window-size", "16",
        "--batch-size", "2", "--eval-batches", "2", "--sample-length", "8", "--no-progress"]


def test_two_processes_train_with_ddp(tmp_path):
    data = tmp_path / "data.txt"
    data.write_text("".join(f"{i} squared is {i * i}\n" for i in range(2000)))
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
               "-m", "windowed_attention.training.cli", "--out", str(out), "--data", str(data), "--steps", "4",
               "--log-every", "1", "--eval-every", "2", "--save-every", "2", "--grad-accum", "2", *TINY]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]  # each step logged once (rank 0 only)
    assert [r["step"] for r in records if "val_loss" in r] == [2, 4]
    # tokens per step count both ranks: 2 ranks * batch 2 * grad_accum 2 * seq_len 32
    assert records[0]["tokens"] == 2 * 2 * 2 * 32
    assert done.stdout.count("step 4: train loss") + done.stderr.count("step 4: train loss") == 1
    assert (done.stdout + done.stderr).count("done: step 4") == 1  # rank 0 alone reports the run
    config = json.loads((out / "config.json").read_text())
    assert config["step"] == 4
    load_model(out)
    assert not (out / ".staging").exists()


def test_context_parallel_training_logs_the_single_process_losses(tmp_path):
    """`--context-parallel 2` under torchrun: each rank holds half of every sequence; the logged losses are
    those of the single-process run with the same flags and seed (to float rounding)."""
    from windowed_attention.training import cli as train_cli

    data = tmp_path / "data.txt"
    data.write_text("".join(f"{i} squared is {i * i}\n" for i in range(2000)))
    flags = ["--data", str(data), "--steps", "3", "--log-every", "1", "--eval-every", "3", *TINY,
             "--depth", "2", "--window-size", "8"]
    assert train_cli.main(["--out", str(tmp_path / "single"), *flags]) == 0
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
               "-m", "windowed_attention.training.cli", "--out", str(tmp_path / "cp"), "--context-parallel", "2",
               *flags]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    single = read_metrics(tmp_path / "single" / "metrics.jsonl")
    sharded = read_metrics(tmp_path / "cp" / "metrics.jsonl")
    assert [r["step"] for r in sharded] == [1, 2, 3] and sharded[0]["tokens"] == single[0]["tokens"]
    for a, b in zip(single, sharded):
        assert abs(a["train_loss"] - b["train_loss"]) < 1e-5 * a["train_loss"], (a, b)
    assert abs(single[-1]["val_loss"] - sharded[-1]["val_loss"]) < 1e-5 * single[-1]["val_loss"]
    load_model(tmp_path / "cp")


def test_context_parallel_must_divide_the_world_and_seq_len(tmp_path, capsys):
    from windowed_attention.training import cli as train_cli

    data = tmp_path / "data.txt"
    data.write_text("abc " * 500)
    assert train_cli.main(["--out", str(tmp_path / "a"), "--data", str(data), "--context-parallel", "2", *TINY]) == 2
    assert "--context-parallel 2" in capsys.readouterr().err
    assert train_cli.main(["--out", str(tmp_path / "b"), "--data", str(data), "--context-parallel", "3", *TINY]) == 2
    assert "--seq-len 32 must divide by --context-parallel 3" in capsys.readouterr().err


def test_teardown_meets_at_a_barrier_only_after_a_finished_run(tmp_path, monkeypatch, capsys):
    """A rank whose run finished waits for the others before leaving the group; a failed one leaves at once
    (a barrier there could wait on ranks that died); a barrier that fails (a rank never came) is reported and
    the group still left. One gloo process stands in for the group."""
    import torch.distributed as dist

    from windowed_attention.training import distributed

    met = []

    def barrier(**kw):
        met.append(kw["timeout"].total_seconds())
        if len(met) == 2:
            raise RuntimeError("Rank 1 failed to pass monitoredBarrier in 60000 ms\nmore")

    monkeypatch.setattr(dist, "monitored_barrier", barrier)
    info = distributed.DistInfo(rank=0, world_size=2)  # `enabled`; the group itself has one rank
    try:
        for case, (finished, expected) in enumerate(((False, []), (True, [60.0]), (True, [60.0, 60.0]))):
            dist.init_process_group("gloo", init_method=f"file://{tmp_path / str(case)}", rank=0, world_size=1)
            distributed.teardown(info, finished)
            assert not dist.is_initialized()
            assert met == expected
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert capsys.readouterr().err == ("rank 0: another rank did not reach the end of the run (Rank 1 failed to pass "
                                       "monitoredBarrier in 60000 ms)\n")


def test_training_tells_teardown_whether_the_run_finished(tmp_path, monkeypatch):
    from windowed_attention.training import cli as train_cli
    from windowed_attention.training import distributed

    seen = []
    monkeypatch.setattr(distributed, "teardown", lambda info, finished=False: seen.append(finished))
    data = tmp_path / "data.txt"
    data.write_text("".join(f"{i} squared is {i * i}\n" for i in range(500)))
    assert train_cli.main(["--out", str(tmp_path / "run"), "--data", str(data), "--steps", "1", *TINY]) == 0
    assert train_cli.main(["--out", str(tmp_path / "run"), "--data", str(data), "--steps", "1", *TINY]) == 2  # taken
    assert seen == [True, False]
