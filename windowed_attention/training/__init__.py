"""Training a byte-level `LocalTransformer`: `data` (corpus and batches), `trainer` (the loop),
`checkpoint` (atomic save, exact resume), `distributed` (torchrun / DDP), `metrics`, `cli`."""

from .checkpoint import CheckpointError, load_model
from .config import ModelConfig, TrainConfig

__all__ = ["CheckpointError", "ModelConfig", "TrainConfig", "load_model"]
