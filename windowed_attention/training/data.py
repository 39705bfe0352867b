"""Byte-level corpora and batches.

A corpus is two uint8 tensors (train, validation). `load_corpus(path)` reads any text file or `.gz`
(enwik8 as is: first 90M bytes train, next 5M validation, as in local-attention's recipe; a smaller file
is split 95/5 at a fixed point). Without a path, `builtin_corpus()` uses the Python standard library's
own `.py` sources, which every machine with Python already has: real text, no download. Its
validation split is by file, so no held-out byte sits inside a file the model trained on.

`BatchSampler` draws random training windows from its own `torch.Generator` (its state is part of a
checkpoint, so a resumed run draws the same batches); `eval_batches` are fixed, evenly spaced windows
of the validation split, the same at every evaluation.
"""

from __future__ import annotations

import gzip
import os
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

ENWIK8_TRAIN, ENWIK8_VAL = 90_000_000, 5_000_000
BUILTIN_BUDGET = 6_000_000  # bytes of stdlib source, train + validation
BUILTIN_VAL_EVERY = 20  # every 20th file (sorted order) is held out


@dataclass
class Corpus:
    """`train`, `val`: uint8 byte tensors `(n,)`; `name` says where they came from."""

    train: torch.Tensor
    val: torch.Tensor
    name: str


def _bytes_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def read_bytes(path: str | Path) -> bytes:
    """All bytes of `path`, gunzipped if it ends in `.gz`. A missing, empty or damaged file is a
    ValueError naming it (an unreadable one an OSError)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"data file {path} is a directory; --data takes a file (raw bytes, or .gz)")
    if not path.exists():
        raise FileNotFoundError(f"data file not found: {path}")
    if not path.is_file():
        raise ValueError(f"data file {path} is not a regular file")
    if path.suffix == ".gz":
        try:
            with gzip.open(path, "rb") as f:
                data = f.read()
        except (gzip.BadGzipFile, EOFError, zlib.error) as error:
            raise ValueError(f"data file {path} is not a valid gzip file ({error})") from None
    else:
        data = path.read_bytes()
    if not data:
        raise ValueError(f"data file {path} is empty")
    return data


def split_bytes(data: bytes) -> tuple[bytes, bytes]:
    """enwik8-sized data: 90M / next 5M; anything smaller: the first 95% / the last 5%."""
    if len(data) >= ENWIK8_TRAIN + ENWIK8_VAL:
        return data[:ENWIK8_TRAIN], data[ENWIK8_TRAIN:ENWIK8_TRAIN + ENWIK8_VAL]
    cut = len(data) * 95 // 100
    return data[:cut], data[cut:]


def stdlib_sources() -> list[Path]:
    """The standard library's `.py` files in sorted order, without installed packages, test suites or
    generated tables (codec maps, pydoc topics): hand-written Python."""
    root = sysconfig.get_paths()["stdlib"]
    skip = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test", "encodings", "pydoc_data"}
    found = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [name for name in subfolders if name not in skip]
        found.extend(Path(folder, name) for name in files if name.endswith(".py"))
    return sorted(found)


def builtin_corpus(budget: int = BUILTIN_BUDGET) -> Corpus:
    """About `budget` bytes of stdlib source (sorted files until the budget is spent); every
    `BUILTIN_VAL_EVERY`-th file goes to validation."""
    train, val, total = [], [], 0
    for index, path in enumerate(stdlib_sources()):
        try:
            text = path.read_bytes()
        except OSError:
            continue
        (val if index % BUILTIN_VAL_EVERY == BUILTIN_VAL_EVERY - 1 else train).append(text)
        total += len(text)
        if total >= budget and val:
            break
    if not val or not train:
        raise RuntimeError(f"the built-in corpus found too little Python source under {sysconfig.get_paths()['stdlib']}")
    return Corpus(_bytes_tensor(b"".join(train)), _bytes_tensor(b"".join(val)), "python-stdlib")


def load_corpus(path: str | Path | None = None) -> Corpus:
    """The corpus of `path` (text or `.gz`), or the built-in one when `path` is None."""
    if path is None:
        return builtin_corpus()
    train, val = split_bytes(read_bytes(path))
    return Corpus(_bytes_tensor(train), _bytes_tensor(val), str(path))


class BatchSampler:
    """Random windows of `seq_len + 1` bytes from `data`, as `(batch, seq_len + 1)` int64.

    Under data parallelism every rank holds the same generator and draws the global batch; rank `r`
    keeps rows `r::world_size`. So ranks see different batches, and one saved state resumes them all.
    """

    def __init__(self, data: torch.Tensor, seq_len: int, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1):
        if data.numel() < seq_len + 2:
            raise ValueError(f"seq_len {seq_len} needs at least {seq_len + 2} bytes of data, got {data.numel()}")
        self.data, self.seq_len, self.batch_size = data, seq_len, batch_size
        self.rank, self.world_size = rank, world_size
        self.generator = torch.Generator().manual_seed(seed)
        self._offsets = torch.arange(seq_len + 1)

    def next(self) -> torch.Tensor:
        starts = torch.randint(0, self.data.numel() - self.seq_len - 1, (self.batch_size * self.world_size,),
                               generator=self.generator)
        starts = starts[self.rank::self.world_size]
        return self.data[starts[:, None] + self._offsets].long()

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def eval_batches(data: torch.Tensor, seq_len: int, batch_size: int, num_batches: int) -> list[torch.Tensor]:
    """`num_batches` fixed batches `(batch_size, seq_len + 1)` of evenly spaced validation windows."""
    count = batch_size * num_batches
    last = data.numel() - seq_len - 1
    if last < 0:
        raise ValueError(f"the validation split ({data.numel()} bytes) is shorter than seq_len + 1 = {seq_len + 1}")
    starts = torch.linspace(0, last, count).long()
    windows = data[starts[:, None] + torch.arange(seq_len + 1)].long()
    return list(windows.split(batch_size))


def decode_bytes(tokens) -> str:
    """Byte tokens -> text (invalid UTF-8 replaced)."""
    return bytes(int(t) for t in tokens).decode("utf-8", errors="replace")


def encode_text(text: str) -> torch.Tensor:
    """Text -> `(n,)` int64 byte tokens (UTF-8)."""
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
