"""Checkpoints: `config.json`, `model.safetensors` and `trainer_state.pt` in one folder, saved atomically.

Saving stages the three files in `<out>/.staging/`, writes `.staging/COMPLETE` last, then moves each file
into `<out>` with `os.replace`. A crash before COMPLETE leaves the previous checkpoint untouched (the
staging folder is ignored); a crash while moving leaves every file either moved or still staged, and a
complete staging folder is read first, so a load always sees one whole checkpoint (roll forward).

Every file records its step; a load checks that they agree. Anything missing, truncated or
unreadable raises `CheckpointError` with one line saying which file and why.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from .config import ModelConfig, TrainConfig, from_dict, to_dict

CONFIG, WEIGHTS, STATE = "config.json", "model.safetensors", "trainer_state.pt"
FILES = (CONFIG, WEIGHTS, STATE)
STAGING, COMPLETE = ".staging", "COMPLETE"
FORMAT_VERSION = 1


class CheckpointError(Exception):
    """A checkpoint is missing, incomplete or corrupted; the message says which file and why."""


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not supported everywhere (Windows); the renames are still atomic
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(out: str | Path, *, model: torch.nn.Module, model_config: ModelConfig,
                    train_config: TrainConfig | None, step: int, trainer_state: dict | None) -> None:
    """Write the checkpoint of `step` into `out` atomically (see the module docstring). Without a
    `trainer_state` (a model saved from Python: `runs.save_run`) there is no `trainer_state.pt`, and the run
    cannot be resumed."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    staging = out / STAGING
    _finish_interrupted_save(out)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()

    config = {"format_version": FORMAT_VERSION, "step": step, "model": to_dict(model_config),
              "train": None if train_config is None else to_dict(train_config)}
    weights = {name: t.detach().to("cpu").contiguous() for name, t in model.state_dict().items()}
    _write(staging / WEIGHTS, save_safetensors_bytes(weights, metadata={"step": str(step)}))
    if trainer_state is not None:
        state = io.BytesIO()
        torch.save({**trainer_state, "step": step}, state)
        _write(staging / STATE, state.getvalue())
    _write(staging / CONFIG, (json.dumps(config, indent=2) + "\n").encode())
    _fsync_dir(staging)
    _write(staging / COMPLETE, str(step).encode())
    _fsync_dir(staging)
    _finish_interrupted_save(out)


def _finish_interrupted_save(out: Path) -> None:
    """Move a complete staging folder's files into place (roll forward); drop an incomplete one."""
    staging = out / STAGING
    if not staging.is_dir():
        return
    if not (staging / COMPLETE).is_file():
        shutil.rmtree(staging, ignore_errors=True)
        return
    for name in FILES:
        if (staging / name).exists():
            os.replace(staging / name, out / name)
        elif name == STATE:  # a model saved without trainer state: an older run's state must not stay
            (out / name).unlink(missing_ok=True)
    _fsync_dir(out)
    shutil.rmtree(staging, ignore_errors=True)


def _paths(folder: Path) -> dict[str, Path]:
    """Where each file of the newest complete checkpoint is, without changing anything on disk."""
    staging = folder / STAGING
    complete = (staging / COMPLETE).is_file()
    return {name: staging / name if complete and (staging / name).exists() else folder / name for name in FILES}


def has_checkpoint(folder: str | Path) -> bool:
    paths = _paths(Path(folder))
    return any(p.exists() for p in paths.values())


def load_config(folder: str | Path) -> tuple[ModelConfig, TrainConfig | None, int]:
    """`(model_config, train_config, step)` from the checkpoint in `folder` (`train_config` None for a model
    saved from Python, not trained by `train`)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} does not exist")
    path = _paths(folder)[CONFIG]
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: {folder} holds no checkpoint")
    try:
        config = json.loads(path.read_text())
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
        if config.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"format_version {config.get('format_version')!r}, expected {FORMAT_VERSION}")
        step = config["step"]
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step {step!r} is not a non-negative int")
        train = None if config["train"] is None else from_dict(TrainConfig, config["train"])
        return from_dict(ModelConfig, config["model"]), train, step
    except (UnicodeDecodeError, ValueError, TypeError, KeyError) as error:
        raise CheckpointError(f"{path} is corrupted ({type(error).__name__}: {error})") from None


def load_weights(folder: str | Path, model: torch.nn.Module, step: int) -> None:
    """Load `model.safetensors` into `model` (strict), checking it belongs to `step`."""
    path = _paths(Path(folder))[WEIGHTS]
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        raw = path.read_bytes()
        tensors = load_safetensors_bytes(raw)
        header_len = int.from_bytes(raw[:8], "little")
        metadata = json.loads(raw[8:8 + header_len]).get("__metadata__") or {}
    except (SafetensorError, ValueError, OSError) as error:
        raise CheckpointError(f"{path} is corrupted or truncated ({error})") from None
    if metadata.get("step") != str(step):
        raise CheckpointError(f"{path} is from step {metadata.get('step')}, config.json from step {step}")
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as error:
        first = str(error).strip().splitlines()[0]
        raise CheckpointError(f"{path} does not match the model in config.json ({first})") from None


def load_trainer_state(folder: str | Path, step: int) -> dict:
    """The trainer state saved with `step` (optimizer, RNG and sampler states)."""
    path = _paths(Path(folder))[STATE]
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the checkpoint cannot be resumed")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a bad pickle/zip; all mean corrupted
        raise CheckpointError(f"{path} is corrupted or truncated ({type(error).__name__})") from None
    if not isinstance(state, dict) or state.get("step") != step:
        raise CheckpointError(f"{path} does not belong to the checkpoint of step {step}")
    return state


def load_model(folder: str | Path, device: str | torch.device = "cpu"):
    """`(model, model_config, step)`: the trained model of a checkpoint folder, in eval mode."""
    model_config, _, step = load_config(folder)
    try:
        model = model_config.build()
    except (ValueError, TypeError) as error:
        raise CheckpointError(f"{Path(folder) / CONFIG} holds an invalid model config ({error})") from None
    load_weights(folder, model, step)
    return model.to(device).eval(), model_config, step
