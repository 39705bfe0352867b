"""`metrics.jsonl` (one JSON object per logged step) and the loss curve drawn from it."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from ..extras import require

METRICS, PLOT = "metrics.jsonl", "loss.png"


def bits_per_byte(loss_nats: float) -> float:
    return loss_nats / math.log(2)


class MetricsMismatch(Exception):
    """metrics.jsonl was written by another run than the checkpoint beside it."""


class MetricsLog:
    """Appends one line per logged step to `<out>/metrics.jsonl`, flushed at once (a killed run keeps
    what it logged). With a `run_id` every record carries it (`"run"`), and a resumed run refuses a log
    written by another run than its checkpoint (`MetricsMismatch`)."""

    def __init__(self, out: str | Path, resume_step: int | None = None, run_id: str | None = None):
        self.path = Path(out) / METRICS
        self.run_id = run_id
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        else:  # drop what a killed run logged after its last checkpoint: those steps run again
            records = read_metrics(self.path)
            others = {r.get("run") for r in records} - {run_id} if run_id is not None else set()
            if others:
                raise MetricsMismatch(f"--resume: {self.path} was written by another run than the checkpoint "
                                      f"beside it (run {sorted(map(str, others))[0]}, the checkpoint's is {run_id}); "
                                      "move it away to resume without that history")
            kept = [r for r in records if r.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def log(self, record: dict) -> None:
        if self.run_id is not None:
            record = {**record, "run": self.run_id}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics file (a torn last line, from a killed run, is skipped)."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def plot_metrics(out: str | Path) -> Path | None:
    """Train and validation loss (bits per byte) against step, saved as `<out>/loss.png` (needs matplotlib,
    the `train` extra)."""
    matplotlib = require("matplotlib", "train", "plotting the loss")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(Path(out) / METRICS)
    train = [(r["step"], bits_per_byte(r["train_loss"])) for r in records if "train_loss" in r]
    val = [(r["step"], r["val_bpc"]) for r in records if "val_bpc" in r]
    if not train and not val:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("bits per byte")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(out) / PLOT
    partial = path.with_name(f".{PLOT}.partial.png")
    try:  # drawn aside and moved into place: an interrupted save leaves the previous plot, not half of one
        fig.savefig(partial, dpi=100)
        os.replace(partial, path)
    finally:
        plt.close(fig)
        partial.unlink(missing_ok=True)
    return path
