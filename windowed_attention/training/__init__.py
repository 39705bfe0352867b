"""Training a byte-level `LocalTransformer`: `data` (corpus and batches), `trainer` (the loop),
`checkpoint` (atomic save, exact resume), `runs` (run folders from Python), `distributed` (torchrun /
DDP), `metrics`, `cli`."""

from .checkpoint import CheckpointError, load_model
from .config import ModelConfig, TrainConfig
from .runs import ByteTokenizer, Run, load_run, save_run

__all__ = ["ByteTokenizer", "CheckpointError", "ModelConfig", "Run", "TrainConfig", "load_model", "load_run", "save_run"]
