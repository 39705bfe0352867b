"""The run's configuration: what the model is and how it is trained, saved as `config.json`.

`ModelConfig` holds exactly the keywords of `LocalTransformer`, so a checkpoint rebuilds its model from
`config.json` alone. `TrainConfig` holds the recipe. The defaults are the quickstart: a small model on
the built-in corpus that reaches about 2.0 bits per byte in 600 steps (2.5M bytes), a few minutes on
two CPU cores. A small, wide-learning-rate model beats a bigger one at this budget: more steps per second.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from ..ops.validation import check_bool, check_int
from ..transformer import LocalTransformer

SEED_MAX = 2**32 - 1  # seeds are 32-bit (as numpy's): room for seed + step arithmetic


def resolve_path(path: str) -> str:
    """`path` made absolute (`~` expanded), so a run resumes from any working directory."""
    return str(Path(path).expanduser().resolve())


def _check_real(name: str, value, low: float, high: float = math.inf, *, open_low: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    above = value > low if open_low else value >= low
    if not (math.isfinite(value) and above and value <= high):
        raise ValueError(f"{name} must be a finite number {'>' if open_low else '>='} {low:g}"
                         f"{'' if high == math.inf else f' and <= {high:g}'}, got {value!r}")
    return float(value)


@dataclass
class ModelConfig:
    num_tokens: int = 256
    max_seq_len: int = 128
    dim: int = 128
    depth: int = 4
    heads: int = 4
    dim_head: int = 32
    local_attn_window_size: int = 64
    use_abs_pos_emb: bool = False  # rotary only: the model can generate past max_seq_len
    # One plain residual stream (the library's default is local-attention's 4 hyper-connection streams):
    # faster on the quickstart's small model. Also what a config.json written before the field existed means.
    num_residual_streams: int = 1
    kv_heads: int | None = None  # grouped-query attention; None: as many as heads
    # Hybrid models: each layer's window (cycled over depth): an int block window, [left, right] a token
    # window, None a global layer; None: local_attn_window_size everywhere. The fields below it were added
    # later too: a config.json without them means their defaults.
    layer_windows: list | None = None
    attn_sinks: bool = False  # a learned sink logit per head
    sink_tokens: int = 0  # the first positions every query sees (StreamingLLM)
    softcap: float | None = None  # scores become softcap * tanh(score / softcap)

    def __post_init__(self):
        # cheap checks of every field by its default's type (a config.json may hold anything); the model
        # checks the rest when it is built
        for field in fields(self):
            value = getattr(self, field.name)
            if isinstance(field.default, bool):
                check_bool(field.name, value)
            elif isinstance(field.default, int):
                check_int(field.name, value, min(field.default, 1))
        if self.layer_windows is not None:
            if not isinstance(self.layer_windows, (list, tuple)):
                raise TypeError(f"layer_windows must be a list of per-layer windows or None, got {self.layer_windows!r}")
            # JSON has no tuples: a token window comes back from config.json as a list
            self.layer_windows = [list(entry) if isinstance(entry, tuple) else entry for entry in self.layer_windows]

    def build(self) -> LocalTransformer:
        return LocalTransformer(**asdict(self))


@dataclass
class TrainConfig:
    data: str | None = None  # None: the built-in corpus
    text_field: str = "text"  # a .jsonl corpus's field holding each document
    pack: bool = False  # batches carry document ids: no attention or target crosses a document
    steps: int = 600
    batch_size: int = 32  # per process and micro-batch
    grad_accum: int = 1
    seq_len: int = 128
    lr: float = 4e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 30
    lr_decay_steps: int | None = None  # the cosine's horizon; None: `steps`
    weight_decay: float = 0.1
    max_grad_norm: float = 0.5
    seed: int = 0
    eval_every: int = 100
    eval_batches: int = 8
    save_every: int = 200
    log_every: int = 10
    sample_length: int = 200
    precision: str = "fp32"
    device: str = "cpu"
    compile: bool = False
    context_parallel: int = 1  # ranks per sequence under torchrun (each holds seq_len / context_parallel)
    fsdp: bool = False  # shard the model over the ranks (FSDP2); checkpoints through DCP (dcp/)

    def __post_init__(self):
        """Every field checked (a config.json may hold anything): ValueError/TypeError naming the field."""
        if self.data is not None:
            if not isinstance(self.data, str) or not self.data:
                raise TypeError(f"data must be a path or None, got {self.data!r}")
            self.data = resolve_path(self.data)
        if not isinstance(self.text_field, str):
            raise TypeError(f"text_field must be a string, got {self.text_field!r}")
        if not self.text_field:
            raise ValueError("text_field must name a field, got an empty string")
        check_bool("pack", self.pack)
        for name in ("steps", "batch_size", "grad_accum", "seq_len", "eval_every", "eval_batches", "save_every",
                     "log_every", "context_parallel"):
            check_int(name, getattr(self, name), 1)
        for name in ("warmup_steps", "sample_length", "seed"):
            check_int(name, getattr(self, name), 0)
        if self.seed > SEED_MAX:
            raise ValueError(f"seed must be at most 2**32 - 1, got {self.seed}")
        if self.lr_decay_steps is not None:
            check_int("lr_decay_steps", self.lr_decay_steps, 1)
        self.lr = _check_real("lr", self.lr, 0, open_low=True)
        self.min_lr_ratio = _check_real("min_lr_ratio", self.min_lr_ratio, 0, 1)
        self.weight_decay = _check_real("weight_decay", self.weight_decay, 0)
        self.max_grad_norm = _check_real("max_grad_norm", self.max_grad_norm, 0, open_low=True)
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {self.precision!r}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        check_bool("compile", self.compile)
        check_bool("fsdp", self.fsdp)

    @property
    def decay_steps(self) -> int:
        return self.steps if self.lr_decay_steps is None else self.lr_decay_steps


# Fields a resumed run may change; every other field must match the checkpoint.
RUN_CONTROL = {"steps", "eval_every", "save_every", "log_every", "sample_length", "device", "compile", "precision",
               "context_parallel"}


def from_dict(cls, data: dict):
    """A dataclass from a dict, with errors that name the bad field."""
    if not isinstance(data, dict):
        raise TypeError(f"{cls.__name__} must be a JSON object, got {type(data).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
    return cls(**data)


# Fields written to config.json only when set: a run without them writes what an older release wrote (and
# that release can read it).
OMITTED_WHEN_OFF = {"fsdp"}


def to_dict(config) -> dict:
    return {name: value for name, value in asdict(config).items() if value or name not in OMITTED_WHEN_OFF}
