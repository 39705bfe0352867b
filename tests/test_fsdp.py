"""`train --fsdp`: the model sharded with FSDP2, checkpoints through torch.distributed.checkpoint (`dcp/`).

One process (`--fsdp` without torchrun: nothing to shard, the checkpoint is still DCP's) runs in this
process: exact resume, the run folder's files, damaged shards. Under torchrun (gloo, spawned, slow tier):
FSDP logs the losses of DDP with the same flags, with context parallelism on a 2-D mesh, and a checkpoint
saved by 4 ranks resumes on 2 ranks and on 1 process with the losses of the DDP run resumed alike.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from windowed_attention.training import cli as train_cli
from windowed_attention.training import load_run
from windowed_attention.training.checkpoint import CheckpointError, load_model
from windowed_attention.training.config import TrainConfig, to_dict
from windowed_attention.training.metrics import read_metrics

TINY = ["--dim", "32", "--depth", "2", "--heads", "2", "--dim-head", "16", "--seq-len", "32", "--window-size", "8",
        "--batch-size", "2", "--eval-batches", "2", "--sample-length", "8", "--no-progress", "--log-every", "1",
        "--lr-decay-steps", "4", "--warmup-steps", "1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "data.txt"
    path.write_text("".join(f"{i} squared is {i * i}\n" for i in range(2000)))
    return path


def train(out, data, *extra) -> int:
    return train_cli.main(["--out", str(out), "--data", str(data), *TINY, *extra])


def torchrun(ranks: int, out, data, *extra) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--standalone",
               "-m", "windowed_attention.training.cli", "--out", str(out), "--data", str(data), *TINY, *extra]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]


def records(out) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(out / "metrics.jsonl")}


def same_losses(a: dict, b: dict, steps) -> None:
    """The logged train losses (and gradient norms, validation losses) agree to float rounding."""
    for step in steps:
        for key in ("train_loss", "grad_norm", "val_loss"):
            if key in a[step] or key in b[step]:
                x, y = a[step][key], b[step][key]
                assert abs(x - y) <= 1e-5 * abs(x), (step, key, x, y)


def shards(out) -> list[str]:
    return sorted(p.name for p in (out / "dcp").iterdir())


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory, data):
    out = tmp_path_factory.mktemp("fsdp1") / "run"
    assert train(out, data, "--fsdp", "--steps", "2", "--eval-every", "2") == 0
    return out


def test_one_process_fsdp_run_saves_dcp_and_resumes_exactly(tmp_path, data, one_process_run):
    """On one process `--fsdp` shards nothing but saves its checkpoint through DCP (`dcp/`, listed in
    SHA256SUMS, format 3); resumed (without the flag: a resumed run keeps it), it computes bitwise the losses
    of the uninterrupted run."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    shutil.copytree(one_process_run, split)
    assert train(straight, data, "--fsdp", "--steps", "4", "--eval-every", "2") == 0
    assert train(split, data, "--steps", "4", "--eval-every", "2", "--resume") == 0  # keeps --fsdp
    assert {s: r["train_loss"] for s, r in records(split).items()} == \
        {s: r["train_loss"] for s, r in records(straight).items()}
    for out in (straight, split):
        assert not (out / "model.safetensors").exists() and shards(out) == [".metadata", "__0_0.distcp"]
        config = json.loads((out / "config.json").read_text())
        assert config["format_version"] == 3 and config["train"]["fsdp"] is True and config["step"] == 4
        listed = [line.split("  ")[1] for line in (out / "SHA256SUMS").read_text().splitlines()]
        assert sorted(listed) == ["config.json", "dcp/.metadata", "dcp/__0_0.distcp", "trainer_state.pt"]
    a, b = load_model(straight)[0].state_dict(), load_run(split).model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_without_fsdp_writes_the_config_an_older_release_wrote():
    assert "fsdp" not in to_dict(TrainConfig()) and to_dict(TrainConfig(fsdp=True))["fsdp"] is True


def damage(out, how: str) -> str:
    """Damage the sharded checkpoint in `out`; returns what the error must name."""
    shard = out / "dcp" / shards(out)[-1]
    if how == "overwrite_shard_bytes":  # same length: only the checksum can tell
        raw = bytearray(shard.read_bytes())
        raw[-64:-32] = bytes(32)
        shard.write_bytes(bytes(raw))
        return f"{shard} is damaged: its SHA-256 differs"
    if how == "truncate_shard":
        shard.write_bytes(shard.read_bytes()[:100])
        return f"{shard} is damaged"
    if how == "missing_shard":
        shard.unlink()
        return f"{shard} is missing"
    (out / "dcp" / ".metadata").unlink()
    return "dcp/.metadata is missing"


@pytest.mark.parametrize("how", ["overwrite_shard_bytes", "truncate_shard", "missing_shard", "missing_metadata"])
def test_damaged_shard_is_a_one_line_error(tmp_path, data, one_process_run, capsys, how):
    out = tmp_path / "run"
    shutil.copytree(one_process_run, out)
    message = damage(out, how)
    capsys.readouterr()
    assert train(out, data, "--fsdp", "--steps", "4", "--resume") == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    with pytest.raises(CheckpointError, match="dcp"):
        load_run(out)


class Payload:
    """Unpickled, it would create the file `path`: what a crafted checkpoint could run instead."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_crafted_sharded_checkpoint_runs_no_code(tmp_path, data, one_process_run):
    """DCP unpickles `.metadata` and the optimizer's hyperparameters: a checkpoint whose pickles call
    anything else (with SHA256SUMS re-recorded to match) is refused, and nothing runs."""
    import hashlib
    import io
    import pickle

    from windowed_attention.training.checkpoint import _checked_planner

    out, marker = tmp_path / "run", tmp_path / "ran"
    shutil.copytree(one_process_run, out)
    (out / "dcp" / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    sums = out / "SHA256SUMS"
    digest = hashlib.sha256((out / "dcp" / ".metadata").read_bytes()).hexdigest()
    sums.write_text("".join(f"{digest}  {name}\n" if name == "dcp/.metadata" else f"{old}  {name}\n"
                            for old, name in (line.split("  ") for line in sums.read_text().splitlines())))
    with pytest.raises(CheckpointError, match=r"\.metadata is refused .*io\.open"):
        load_run(out)
    assert train(out, data, "--steps", "3", "--resume") == 2
    crafted = io.BytesIO()
    torch.save({"lr": Payload(marker)}, crafted)  # as DCP writes a non-tensor value
    crafted.seek(0)
    with pytest.raises(pickle.UnpicklingError):
        _checked_planner().load_bytes(None, crafted)
    assert not marker.exists()


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["shards", "publishing"])
def test_full_disk_during_a_sharded_save_keeps_the_last_checkpoint(tmp_path, data, capsys, monkeypatch, stage):
    """The save of step 4 hits ENOSPC while DCP writes the shards, or while rank 0 writes the rest: one
    line, exit 2, nothing staged left, and the checkpoint of step 2 still loads and resumes."""
    import errno

    import torch.distributed.checkpoint as dcp

    from windowed_attention.training import checkpoint

    calls = {"n": 0}
    target, name = (dcp, "save") if stage == "shards" else (checkpoint, "_write")
    real = getattr(target, name)

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > (1 if stage == "shards" else 4):  # the first save: 1 DCP save, 4 files (3 + COMPLETE)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(target, name, failing)
    out = tmp_path / "run"
    assert train(out, data, "--fsdp", "--steps", "6", "--save-every", "2", "--eval-every", "6") == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "step 4" in err and f"({stage}:" in err
    assert len([line for line in err.splitlines() if "error" in line]) == 1, err
    monkeypatch.setattr(target, name, real)
    assert load_model(out)[2] == 2 and not (out / ".staging").exists()
    assert train(out, data, "--resume", "--steps", "3") == 0


def test_a_whole_run_refuses_fsdp_on_resume(tmp_path, data, capsys):
    """A resumed run keeps its checkpoint's format (a sharded one stays sharded without the flag:
    `test_one_process_fsdp_run_saves_dcp_and_resumes_exactly`)."""
    plain = tmp_path / "plain"
    assert train(plain, data, "--steps", "1") == 0
    capsys.readouterr()
    assert train(plain, data, "--steps", "2", "--resume", "--fsdp") == 2
    err = capsys.readouterr().err
    assert "--fsdp: the checkpoint" in err and "saved whole" in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("flags, message", [
    (["--compile"], "--compile cannot be combined with --fsdp"),
    (["--residual-streams", "2"], "--fsdp cannot shard --residual-streams 2"),  # scalar parameters
])
def test_what_fsdp_cannot_do_is_refused_by_name(tmp_path, data, capsys, flags, message):
    assert train(tmp_path / "run", data, "--fsdp", *flags, "--steps", "1") == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def four_rank_runs(tmp_path_factory, data):
    """DDP and FSDP, each on 4 ranks with --context-parallel 2 (a 2 x 2 mesh), 2 steps of 2 micro-batches."""
    root = tmp_path_factory.mktemp("four")
    flags = ["--steps", "2", "--eval-every", "2", "--grad-accum", "2", "--context-parallel", "2"]
    torchrun(4, root / "ddp", data, *flags)
    torchrun(4, root / "fsdp", data, *flags, "--fsdp")
    return root / "ddp", root / "fsdp"


@pytest.mark.slow
def test_fsdp_with_context_parallel_logs_the_ddp_losses(four_rank_runs):
    """FSDP sharded over all 4 ranks of the 2 x 2 mesh: the losses, gradient norms and validation loss of
    DDP with the same flags, to float rounding; the 4 shards load whole as DDP's weights."""
    ddp, fsdp = four_rank_runs
    same_losses(records(ddp), records(fsdp), [1, 2])
    assert shards(fsdp) == [".metadata", *(f"__{rank}_0.distcp" for rank in range(4))]
    a, b = load_model(ddp)[0].state_dict(), load_model(fsdp)[0].state_dict()
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
def test_four_rank_checkpoint_resumes_on_one_process(tmp_path, data, four_rank_runs):
    """The 4-rank sharded checkpoint resumed on one process: the losses of the DDP checkpoint resumed on one
    process (the optimizer state was resharded 4 -> 1); it then saves one shard."""
    resumed = {}
    for run in four_rank_runs:
        out = resumed[run.name] = tmp_path / run.name
        shutil.copytree(run, out)
        assert train(out, data, "--resume", "--steps", "4", "--context-parallel", "1") == 0
    same_losses(records(resumed["ddp"]), records(resumed["fsdp"]), [3, 4])
    assert shards(resumed["fsdp"]) == [".metadata", "__0_0.distcp"]


@pytest.mark.slow
def test_four_rank_checkpoint_resumes_on_two_ranks_with_fsdp_alone(tmp_path, data, four_rank_runs):
    """The 4-rank sharded checkpoint resumed by FSDP alone on 2 ranks (4 -> 2 shards): the losses of the DDP
    checkpoint resumed by DDP on 2 ranks."""
    resumed = {}
    for run in four_rank_runs:
        out = resumed[run.name] = tmp_path / run.name
        shutil.copytree(run, out)
        torchrun(2, out, data, "--resume", "--steps", "4", "--context-parallel", "1")
    same_losses(records(resumed["ddp"]), records(resumed["fsdp"]), [3, 4])
    assert shards(resumed["fsdp"]) == [".metadata", "__0_0.distcp", "__1_0.distcp"]


@pytest.mark.slow
def test_damaged_shard_of_a_four_rank_checkpoint(tmp_path, data, four_rank_runs, capsys):
    out = tmp_path / "run"
    shutil.copytree(four_rank_runs[1], out)
    message = damage(out, "overwrite_shard_bytes")
    capsys.readouterr()
    assert train(out, data, "--resume", "--steps", "4", "--context-parallel", "1") == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
