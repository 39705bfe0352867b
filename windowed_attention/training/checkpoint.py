"""Checkpoints: `config.json`, `model.safetensors` and `trainer_state.pt` (only for a run of `train`, not
for a model saved from Python) in one folder, with their
SHA-256 in `SHA256SUMS` (the format of `sha256sum`, so `sha256sum -c SHA256SUMS` checks them too),
saved atomically and read consistently.

Saving stages the files in `<out>/.staging/`, writes `SHA256SUMS` and then `.staging/COMPLETE`, then
moves each file into `<out>` with `os.replace` while holding the folder's publishing lock (`locks.py`).
A crash before COMPLETE leaves the previous checkpoint untouched (the staging folder is ignored); a
crash while moving leaves every file either moved or still staged, and a complete staging folder is read
first, so a load always sees one whole checkpoint (roll forward). A save that fails (a full disk)
removes what it staged and raises `CheckpointError`; the previous checkpoint stays loadable.

Readers hold the shared side of that lock while they read, so a load during a save sees the previous
checkpoint or the new one. Every file read is checked against `SHA256SUMS` and every file records its
step; a load checks both. Anything missing, damaged, truncated or unreadable raises `CheckpointError`
with one line saying which file and why.

A sharded run (`train --fsdp`) saves through `torch.distributed.checkpoint` (DCP) instead: its model and
optimizer state are the folder `dcp/` (DCP's `.metadata` and one `__<rank>_0.distcp` file per rank that
saved), written by every rank at once; `config.json` (format version 3) and `trainer_state.pt` (the
sampler and RNG states, no optimizer) come from rank 0, and `SHA256SUMS` lists every file of `dcp/` too
(`dcp/.metadata`, ...). The same staging, `COMPLETE` marker and roll-forward apply, with `dcp/` moved as
one folder. DCP reshards on load: a checkpoint saved by N ranks loads on M ranks, or whole into one
process (`load_model`, `load_sharded_state`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pickle
import shutil
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from . import locks
from .config import ModelConfig, TrainConfig, from_dict, to_dict

CONFIG, WEIGHTS, STATE, SUMS = "config.json", "model.safetensors", "trainer_state.pt", "SHA256SUMS"
DCP = "dcp"  # a sharded run's model and optimizer state (a folder, written by torch.distributed.checkpoint)
DATA_FILES = (CONFIG, WEIGHTS, STATE)
FILES = (*DATA_FILES, SUMS)  # moved into place in this order
STAGING, COMPLETE = ".staging", "COMPLETE"
FORMAT_VERSION = 2  # 2: SHA256SUMS; version 1 checkpoints (no checksums) still load
SHARDED_FORMAT = 3  # a sharded run: dcp/ instead of model.safetensors (an older release refuses it by version)


class CheckpointError(Exception):
    """A checkpoint is missing, incomplete or damaged, or could not be saved; the message says which file
    and why."""


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


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sha256_file(path: Path) -> str:
    """The SHA-256 of a file read in blocks (a shard may be large)."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            sha.update(block)
    return sha.hexdigest()


def save_checkpoint(out: str | Path, *, model: torch.nn.Module, model_config: ModelConfig,
                    train_config: TrainConfig | None, step: int, trainer_state: dict | None,
                    run_id: str | None = None) -> None:
    """Write the checkpoint of `step` into `out` atomically (see the module docstring). Without a
    `trainer_state` (a model saved from Python: `runs.save_run`) there is no `trainer_state.pt`, and the run
    cannot be resumed."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    staging = out / STAGING
    with locks.publishing(out):
        _finish_interrupted_save(out)

    weights = {name: t.detach().to("cpu").contiguous() for name, t in model.state_dict().items()}
    contents = {WEIGHTS: save_safetensors_bytes(weights, metadata={"step": str(step)})}
    if trainer_state is not None:
        contents[STATE] = _state_bytes(trainer_state, step)
    contents[CONFIG] = _config_bytes(FORMAT_VERSION, step, model_config, train_config, run_id)
    contents[SUMS] = "".join(f"{_sha256(data)}  {name}\n" for name, data in contents.items()).encode()

    try:
        staging.mkdir()
        _stage(staging, contents, step)
    except OSError as error:  # a full disk, a quota: keep the previous checkpoint, free what was staged
        shutil.rmtree(staging, ignore_errors=True)
        reason = error.strerror or str(error)
        raise CheckpointError(f"could not save the checkpoint of step {step} in {out} ({reason}); "
                              "the previous checkpoint is unchanged") from None
    with locks.publishing(out):
        _finish_interrupted_save(out)


def _state_bytes(trainer_state: dict, step: int) -> bytes:
    """`trainer_state.pt`: the trainer's state with its step."""
    state = io.BytesIO()
    torch.save({**trainer_state, "step": step}, state)
    return state.getvalue()


def _config_bytes(version: int, step: int, model_config: ModelConfig, train_config: TrainConfig | None,
                  run_id: str | None) -> bytes:
    """`config.json`: the format, the step, both configs and the run that saved it (metrics.jsonl's records
    carry the same id; absent for a model saved from Python)."""
    config = {"format_version": version, "step": step, "model": to_dict(model_config),
              "train": None if train_config is None else to_dict(train_config)}
    if run_id is not None:
        config["run_id"] = run_id
    return (json.dumps(config, indent=2) + "\n").encode()


def _stage(staging: Path, contents: dict[str, bytes], step: int, synced: tuple[Path, ...] = ()) -> None:
    """Write `contents` into the `staging` folder, make them durable (the `synced` folders beside it), then
    mark it complete: what `_finish_interrupted_save` rolls forward."""
    for name, data in contents.items():
        _write(staging / name, data)
    for folder in (*synced, staging):
        _fsync_dir(folder)
    _write(staging / COMPLETE, str(step).encode())
    _fsync_dir(staging)


def _finish_interrupted_save(out: Path) -> None:
    """Move a complete staging folder's files into place (roll forward); drop an incomplete one.
    Called with the publishing lock held."""
    staging = out / STAGING
    if not staging.is_dir():
        return
    if not (staging / COMPLETE).is_file():
        shutil.rmtree(staging, ignore_errors=True)
        return
    sharded = (staging / DCP).is_dir()
    # a folder cannot replace a folder: the old one goes first (reads use the staged one meanwhile); a
    # checkpoint that is not sharded leaves none behind
    shutil.rmtree(out / DCP, ignore_errors=True)
    if sharded:
        os.replace(staging / DCP, out / DCP)
    for name in FILES:
        if (staging / name).exists():
            os.replace(staging / name, out / name)
        elif name == STATE or (name == WEIGHTS and sharded):  # an older checkpoint's file must not stay
            (out / name).unlink(missing_ok=True)
    _fsync_dir(out)
    shutil.rmtree(staging, ignore_errors=True)


def _paths(folder: Path) -> dict[str, Path]:
    """Where each file of the newest complete checkpoint is, without changing anything on disk."""
    staging = folder / STAGING
    complete = (staging / COMPLETE).is_file()
    return {name: staging / name if complete and (staging / name).exists() else folder / name
            for name in (*FILES, DCP)}


def has_checkpoint(folder: str | Path) -> bool:
    paths = _paths(Path(folder))
    return any(p.exists() for p in paths.values())


def _lists_shards(sums: dict[str, str] | None) -> bool:
    """Whether `SHA256SUMS` (name -> digest) lists the files of a sharded checkpoint (`dcp/...`)."""
    return any(name.startswith(DCP + "/") for name in sums or {})


class _Snapshot:
    """The files of the newest complete checkpoint in `folder`, read while the reading lock is held (see
    `reading`) and checked against `SHA256SUMS`."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.paths = _paths(folder)
        self._sums: dict[str, str] | None = None

    def sums(self) -> dict[str, str] | None:
        """name -> sha256 from SHA256SUMS; None when there is none (a version 1 checkpoint)."""
        if self._sums is None and self.paths[SUMS].is_file():
            path = self.paths[SUMS]
            try:
                lines = path.read_text().splitlines()
                self._sums = {name: digest for digest, name in (line.split("  ", 1) for line in lines if line)}
            except (UnicodeDecodeError, ValueError) as error:
                raise CheckpointError(f"{path} is damaged ({type(error).__name__})") from None
            shards = {name for name in self._sums if name.startswith(DCP + "/")}
            weights = {WEIGHTS} if not shards else {f"{DCP}/.metadata"}  # a sharded one: no model.safetensors
            listed = set(self._sums)
            if not {CONFIG, *weights} <= listed <= {*DATA_FILES, *shards} or (shards and WEIGHTS in listed):
                raise CheckpointError(f"{path} is damaged (it lists {sorted(self._sums)})")
        return self._sums

    def sharded_folder(self) -> Path:
        """The `dcp/` folder of a sharded checkpoint, every file of it checked against `SHA256SUMS`."""
        folder, sums = self.paths[DCP], self.sums() or {}
        for name, digest in sums.items():
            if not name.startswith(DCP + "/"):
                continue
            path = folder / name[len(DCP) + 1:]
            if not path.is_file():
                raise CheckpointError(f"{path} is missing: the sharded checkpoint is incomplete")
            if _sha256_file(path) != digest:
                raise CheckpointError(f"{path} is damaged: its SHA-256 differs from the one recorded in {SUMS} "
                                      "at save")
        return folder

    def read(self, name: str, missing: str = "") -> bytes:
        """The bytes of `name`, checked against its recorded SHA-256."""
        path = self.paths[name]
        if not path.is_file():
            raise CheckpointError(f"{path} is missing{missing}")
        data = path.read_bytes()
        sums = self.sums()
        if sums is not None and name not in sums:
            raise CheckpointError(f"{path} is not part of this checkpoint ({SUMS} does not list it){missing}")
        if sums is not None and _sha256(data) != sums[name]:
            raise CheckpointError(f"{path} is damaged: its SHA-256 differs from the one recorded in {SUMS} at save")
        return data


@contextlib.contextmanager
def reading(folder: str | Path):
    """A consistent view of the checkpoint in `folder` for as long as the context lasts: a save running
    at the same time finishes moving its files before or after it, never during it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} does not exist")
    try:
        with locks.reading(folder):
            yield _Snapshot(folder)
    except OSError as error:
        raise CheckpointError(f"{folder} cannot be read ({error.strerror or error})") from None


def _parse_config(snapshot: _Snapshot) -> tuple[ModelConfig, TrainConfig | None, int]:
    path = snapshot.paths[CONFIG]
    raw = snapshot.read(CONFIG, f": {snapshot.folder} holds no checkpoint")
    try:
        config = json.loads(raw.decode())
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
        if config.get("format_version") not in (1, FORMAT_VERSION, SHARDED_FORMAT):
            raise ValueError(f"format_version {config.get('format_version')!r}, expected {FORMAT_VERSION} "
                             f"or {SHARDED_FORMAT} (sharded)")
        if config["format_version"] >= 2 and snapshot.sums() is None:
            raise CheckpointError(f"{snapshot.paths[SUMS]} is missing: the checkpoint cannot be verified")
        if (config["format_version"] == SHARDED_FORMAT) != _lists_shards(snapshot.sums()):
            raise ValueError(f"format_version {config['format_version']} does not match the files {SUMS} lists")
        step = config["step"]
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step {step!r} is not a non-negative int")
        train = None if config["train"] is None else from_dict(TrainConfig, config["train"])
        return from_dict(ModelConfig, config["model"]), train, step
    except (UnicodeDecodeError, ValueError, TypeError, KeyError) as error:
        reason = f"{type(error).__name__}: {error}"
        raise CheckpointError(f"{path} is corrupted or holds impossible values ({reason})") from None


def _load_weights(snapshot: _Snapshot, model: torch.nn.Module, step: int) -> None:
    path = snapshot.paths[WEIGHTS]
    raw = snapshot.read(WEIGHTS)
    try:
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


def load_config(folder: str | Path) -> tuple[ModelConfig, TrainConfig | None, int]:
    """`(model_config, train_config, step)` from the checkpoint in `folder` (`train_config` None for a model
    saved from Python, not trained by `train`)."""
    with reading(folder) as snapshot:
        return _parse_config(snapshot)


def load_run_id(folder: str | Path) -> str | None:
    """The id of the run that saved the checkpoint in `folder` (None for one saved before run ids, or from
    Python)."""
    with reading(folder) as snapshot:
        _parse_config(snapshot)
        run_id = json.loads(snapshot.read(CONFIG).decode()).get("run_id")
    return run_id if isinstance(run_id, str) else None


def remove_checkpoint(folder: str | Path) -> None:
    """Delete the checkpoint in `folder` (config.json first: what is left is no longer a checkpoint)."""
    folder = Path(folder)
    with locks.publishing(folder):
        shutil.rmtree(folder / STAGING, ignore_errors=True)
        for name in (CONFIG, SUMS, WEIGHTS, STATE):
            (folder / name).unlink(missing_ok=True)
        shutil.rmtree(folder / DCP, ignore_errors=True)
        _fsync_dir(folder)


def is_sharded(folder: str | Path) -> bool:
    """Whether the checkpoint in `folder` was saved sharded (`dcp/`, format version 3)."""
    with reading(folder) as snapshot:
        return _lists_shards(snapshot.sums())


def load_weights(folder: str | Path, model: torch.nn.Module, step: int) -> None:
    """Load `model.safetensors` into `model` (strict), checking it belongs to `step`."""
    with reading(folder) as snapshot:
        _load_weights(snapshot, model, step)


def load_trainer_state(folder: str | Path, step: int) -> dict:
    """The trainer state saved with `step` (optimizer, RNG and sampler states)."""
    with reading(folder) as snapshot:
        path = snapshot.paths[STATE]
        raw = snapshot.read(STATE, ": the checkpoint cannot be resumed")
    try:
        state = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a bad pickle/zip; all mean corrupted
        raise CheckpointError(f"{path} is corrupted or truncated ({type(error).__name__})") from None
    if not isinstance(state, dict) or state.get("step") != step:
        raise CheckpointError(f"{path} does not belong to the checkpoint of step {step}")
    return state


def load_model(folder: str | Path, device: str | torch.device = "cpu"):
    """`(model, model_config, step)`: the trained model of a checkpoint folder, in eval mode (config and
    weights read as one consistent checkpoint, even while a run saves into the folder)."""
    with reading(folder) as snapshot:
        model_config, _, step = _parse_config(snapshot)
        try:
            model = model_config.build()
        except (ValueError, TypeError) as error:
            raise CheckpointError(f"{snapshot.paths[CONFIG]} holds an invalid model config ({error})") from None
        except (MemoryError, RuntimeError) as error:
            if "can't allocate memory" not in str(error) and not isinstance(error, MemoryError):
                raise
            raise CheckpointError(f"{snapshot.paths[CONFIG]} holds a model too large for this machine's memory") from None
        if _lists_shards(snapshot.sums()):
            state = {"model": model.state_dict()}
            _load_sharded(snapshot, state, whole=True)
            model.load_state_dict(state["model"], strict=True)
        else:
            _load_weights(snapshot, model, step)
    return model.to(device).eval(), model_config, step


def _dcp_failure(error: BaseException) -> str:
    """One line from what DCP raised (a `CheckpointException` wraps each rank's error)."""
    failures = getattr(error, "failures", None)
    if failures:
        error = next(iter(failures.values()))
        error = getattr(error, "exc", error)  # a rank's failure is a wrapped traceback
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


@contextlib.contextmanager
def _one_process_is_meant():
    """DCP warns that it assumes one process when there is no process group: that is what is meant here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's `.metadata` (a pickle) allowing only the classes it is made of: what a checkpoint
    holds must never run code on load (the whole format's weights load with `weights_only` too)."""

    ALLOWED = {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
               ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"), ("builtins", "set"),
               ("builtins", "frozenset"), *(("pathlib", name) for name in ("PosixPath", "WindowsPath", "PurePosixPath",
                                                                          "PureWindowsPath"))}

    def find_class(self, module, name):
        if (module == "torch.distributed.checkpoint.metadata" or (module, name) in self.ALLOWED
                or module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it refers to {module}.{name}, which a DCP checkpoint does not hold")


def _checked_planner():
    """DCP's default load planner, except that the non-tensor values (the optimizer's hyperparameters) are
    first read with `torch.load(weights_only=True)`: plain data only, never code."""
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class CheckedPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value):
            data = value.read()
            torch.load(io.BytesIO(data), weights_only=True)  # raises on anything but plain data
            super().load_bytes(read_item, io.BytesIO(data))

    return CheckedPlanner()


def _load_sharded(snapshot: _Snapshot, state: dict, whole: bool = False) -> None:
    """Load `state` (`{"model": ..., "optimizer": ...}` as `get_model_state_dict` / `get_optimizer_state_dict`
    give them, or a part) in place from the verified `dcp/` of `snapshot`; `whole`: into this process alone,
    even under a process group. DCP unpickles `.metadata` and the non-tensor values: both are checked
    first with restricted unpicklers, so a crafted checkpoint is refused instead of running code."""
    import torch.distributed.checkpoint as dcp

    folder = snapshot.sharded_folder()
    try:
        with open(folder / ".metadata", "rb") as f:
            _MetadataUnpickler(f).load()
    except Exception as error:  # a bad pickle raises many types
        raise CheckpointError(f"{folder / '.metadata'} is refused ({type(error).__name__}: {error})") from None
    try:
        with _one_process_is_meant():
            dcp.load(state, checkpoint_id=folder, planner=_checked_planner(),
                     no_dist=whole or not torch.distributed.is_initialized())
    except Exception as error:  # DCP raises many types for a bad or mismatched checkpoint
        raise CheckpointError(f"{folder} cannot be loaded into the model in config.json "
                              f"({_dcp_failure(error)})") from None


def load_sharded_state(folder: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load the model and optimizer state of the sharded checkpoint in `folder` into `model` (sharded with
    FSDP over any number of ranks, or whole on one process) and `optimizer`, resharding as needed. Under a
    process group every rank calls it."""
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
    with reading(folder) as snapshot:
        _load_sharded(snapshot, state)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optimizer"])


def save_sharded_checkpoint(out: str | Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                            model_config: ModelConfig, train_config: TrainConfig, step: int, trainer_state: dict,
                            run_id: str, main: bool, any_rank) -> None:
    """Write the sharded checkpoint of `step` into `out` atomically (see the module docstring): every rank
    calls it; each writes its shards of `model` and `optimizer` into the staging folder's `dcp/` (a
    filesystem all ranks share), then `main` (rank 0) writes `config.json`, `trainer_state.pt` (this rank's
    `trainer_state`: sampler and RNG) and `SHA256SUMS` and publishes. `any_rank(flag)` is True on every
    rank when `flag` is on any: a failure on one rank raises `CheckpointError` on all, and the previous
    checkpoint stays."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    out = Path(out)
    staging = out / STAGING
    failure: str | None = None

    def agree(stage: str) -> None:
        if any_rank(failure is not None):
            if main:
                shutil.rmtree(staging, ignore_errors=True)
            reason = failure or "another rank failed"
            raise CheckpointError(f"could not save the checkpoint of step {step} in {out} ({stage}: {reason}); "
                                  "the previous checkpoint is unchanged")

    if main:
        try:
            out.mkdir(parents=True, exist_ok=True)
            with locks.publishing(out):
                _finish_interrupted_save(out)
            staging.mkdir()
        except OSError as error:
            failure = error.strerror or str(error)
    agree("staging")
    try:
        state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
        with _one_process_is_meant():
            dcp.save(state, checkpoint_id=staging / DCP, no_dist=not torch.distributed.is_initialized())
    except Exception as error:  # DCP wraps each rank's OSError in its own exception types
        failure = _dcp_failure(error)
    agree("shards")
    if main:
        contents = {STATE: _state_bytes(trainer_state, step),
                    CONFIG: _config_bytes(SHARDED_FORMAT, step, model_config, train_config, run_id)}
        try:
            sums = {name: _sha256(data) for name, data in contents.items()}
            for path in sorted((staging / DCP).iterdir()):
                sums[f"{DCP}/{path.name}"] = _sha256_file(path)
            contents[SUMS] = "".join(f"{digest}  {name}\n" for name, digest in sums.items()).encode()
            _stage(staging, contents, step, synced=(staging / DCP,))
        except OSError as error:
            failure = error.strerror or str(error)
    agree("publishing")
    if main:
        with locks.publishing(out):
            _finish_interrupted_save(out)
