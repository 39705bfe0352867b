"""Waiting for a training process (started by a test) to save a checkpoint."""

from __future__ import annotations

import time

import pytest

from windowed_attention.training.checkpoint import CheckpointError, load_config


def wait_for_step(out, minimum: int, proc, timeout: float) -> int:
    """Poll the run folder `out` until its checkpoint is at step `minimum` or later and return that step;
    fail the test if `proc` exits first or `timeout` seconds pass (then kill it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"training exited early with {proc.returncode}: {proc.stderr.read()}")
        try:
            step = load_config(out)[2]
            if step >= minimum:
                return step
        except CheckpointError:
            pass
        time.sleep(0.05)
    proc.kill()
    pytest.fail("no checkpoint appeared in time")
