"""Run folders from Python: load a trained model with its byte tokenizer, save a model as a run folder.

A run folder is what `windowed-attention train` writes (`config.json`, `model.safetensors`, ...; a sharded
run of `train --fsdp` holds `dcp/` instead of `model.safetensors`, read here as one whole model);
`load_run` gives back the `LocalTransformer` (eval mode), its `ModelConfig`, step and tokenizer;
`save_run` writes a model in the same format (atomically), so `load_run` and
`windowed-attention generate --checkpoint` read it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..transformer import LocalTransformer
from .checkpoint import load_model, save_checkpoint
from .config import ModelConfig
from .data import decode_bytes, encode_text


@dataclass(frozen=True)
class ByteTokenizer:
    """The byte-level tokenizer of `train`'s models: text <-> UTF-8 bytes, one token (0..255) per byte."""

    vocab_size: int = 256

    def encode(self, text: str) -> torch.Tensor:
        """`text` -> `(n,)` int64 tokens."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return encode_text(text)

    def decode(self, tokens) -> str:
        """`(n,)` tokens (a tensor or a list of ints) -> text; invalid UTF-8 becomes U+FFFD."""
        tokens = tokens.tolist() if isinstance(tokens, torch.Tensor) else list(tokens)
        if any(isinstance(t, list) for t in tokens):
            raise ValueError("tokens must be one sequence (n,); decode each row of a batch on its own")
        if any(not 0 <= int(t) < self.vocab_size for t in tokens):
            raise ValueError(f"tokens must be byte values in [0, {self.vocab_size})")
        return decode_bytes(tokens)


@dataclass
class Run:
    """A loaded run folder: `model` (eval mode, on the device asked for), its `config`, `step`, `tokenizer`."""

    model: LocalTransformer
    config: ModelConfig
    step: int
    tokenizer: ByteTokenizer = field(default_factory=ByteTokenizer)

    def generate(self, prompt: str, length: int, **sampling) -> str:
        """Continue `prompt` by `length` bytes (keywords as `LocalTransformer.generate`); the new text only."""
        device = next(self.model.parameters()).device
        prime = self.tokenizer.encode(prompt).to(device)[None]
        return self.tokenizer.decode(self.model.generate(prime, length, **sampling)[0])


def load_run(folder: str | Path, device: str | torch.device = "cpu") -> Run:
    """The model of the run folder `folder` (its last complete checkpoint), ready to use.

    Raises `CheckpointError` (one line: which file, why) for a missing or damaged folder."""
    model, config, step = load_model(folder, device=device)
    return Run(model, config, step)


def save_run(folder: str | Path, model: torch.nn.Module, config: ModelConfig, *, step: int = 0) -> None:
    """Write `model` (built from `config`, e.g. `config.build()` or `load_run(...).model`) into the run
    folder `folder`: `config.json` and `model.safetensors`, atomically. It loads with `load_run` and
    `generate --checkpoint`; without optimizer state it cannot be resumed by `train --resume`."""
    if not isinstance(config, ModelConfig):
        raise TypeError(f"config must be the ModelConfig the model was built from, got {type(config).__name__}")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper holds the model itself
    if not isinstance(model, LocalTransformer):
        raise TypeError(f"model must be a LocalTransformer, got {type(model).__name__}")
    with torch.device("meta"):
        expected = {name: t.shape for name, t in config.build().state_dict().items()}
    actual = {name: t.shape for name, t in model.state_dict().items()}
    if actual != expected:
        differ = sorted(set(actual) ^ set(expected)) or [n for n in actual if actual[n] != expected[n]]
        raise ValueError(f"config does not describe this model (it builds a different one: {differ[0]} differs); "
                         "pass the ModelConfig the model was built from")
    save_checkpoint(folder, model=model, model_config=config, train_config=None, step=step, trainer_state=None)
