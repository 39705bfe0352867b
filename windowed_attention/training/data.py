"""Byte-level corpora and batches.

A corpus is two uint8 tensors (train, validation), each the concatenation of its documents, with the
document id of every byte beside it when the source has documents. `load_corpus(path)` reads any text
file or `.gz` (enwik8 as is: first 90M bytes train, next 5M validation, as in local-attention's recipe; a
smaller file is split 95/5 at a fixed point; one document). A `.jsonl` (or `.jsonl.gz`) file holds one
document per line, a JSON object whose `text` field (or another, `text_field`) is the document, the
format corpora ship in. Without a path, `builtin_corpus()` uses the Python standard library's own `.py`
sources, which every machine with Python already has: real text, no download, one document per file.
Documents are split whole: every 20th goes to validation, so no held-out byte sits inside a document the
model trained on.

`BatchSampler` draws random training windows from its own `torch.Generator` (its state is part of a
checkpoint, so a resumed run draws the same batches); `eval_batches` are fixed, evenly spaced windows
of the validation split, the same at every evaluation. A batch is `(tokens, documents)`: `documents`
`(b, seq_len + 1)` holds the windows' document ids when packing (`LocalTransformer.forward(documents=)`
then keeps attention, positions and targets inside each document), else None (windows run across
documents, as one text).
"""

from __future__ import annotations

import gzip
import json
import os
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

ENWIK8_TRAIN, ENWIK8_VAL = 90_000_000, 5_000_000
BUILTIN_BUDGET = 6_000_000  # bytes of stdlib source, train + validation
VAL_EVERY = 20  # every 20th document (in order) is held out
BUILTIN_VAL_EVERY = VAL_EVERY


@dataclass
class Corpus:
    """`train`, `val`: uint8 byte tensors `(n,)`; `train_documents`, `val_documents`: int32 document ids
    `(n,)`, non-decreasing (None: the split is one text); `name` says where they came from."""

    train: torch.Tensor
    val: torch.Tensor
    name: str
    train_documents: torch.Tensor | None = None
    val_documents: torch.Tensor | None = None


def _bytes_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _document_ids(texts: list[bytes]) -> torch.Tensor:
    """`(sum of lengths,)` int32: the index of the document every byte of `b"".join(texts)` belongs to."""
    lengths = torch.tensor([len(text) for text in texts], dtype=torch.long)
    return torch.repeat_interleave(torch.arange(len(texts), dtype=torch.int32), lengths)


def documents_corpus(documents: list[bytes], name: str) -> Corpus:
    """A corpus of whole documents: every `VAL_EVERY`-th (in order) to validation, the last one when there
    are fewer; the rest to training."""
    documents = [text for text in documents if text]
    if len(documents) < 2:
        raise ValueError(f"{name} holds {len(documents)} non-empty document(s); it needs at least 2 (validation "
                         "holds out whole documents)")
    held = set(range(VAL_EVERY - 1, len(documents), VAL_EVERY)) or {len(documents) - 1}
    train = [text for index, text in enumerate(documents) if index not in held]
    val = [text for index, text in enumerate(documents) if index in held]
    return Corpus(_bytes_tensor(b"".join(train)), _bytes_tensor(b"".join(val)), name,
                  _document_ids(train), _document_ids(val))


def is_jsonl(path: str | Path) -> bool:
    """Whether `path` names a JSON Lines file (`.jsonl`, or `.jsonl.gz`): one document per line."""
    name = Path(path).name.lower()
    return name.endswith(".jsonl") or name.endswith(".jsonl.gz")


def read_jsonl(path: str | Path, text_field: str = "text") -> list[bytes]:
    """The documents of a JSON Lines file (UTF-8 bytes of each line's `text_field`, a string; blank lines
    skipped). A line that is no JSON object, or lacks the field, is a ValueError naming the file and line."""
    data = read_bytes(path)
    documents = []
    for number, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            reason = error.msg if isinstance(error, json.JSONDecodeError) else "not UTF-8"
            raise ValueError(f"{path} line {number}: not valid JSON ({reason})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path} line {number}: expected a JSON object with a {text_field!r} field, "
                             f"got a JSON {type(record).__name__}")
        if text_field not in record:
            raise ValueError(f"{path} line {number}: no {text_field!r} field (choose the field with --text-field)")
        text = record[text_field]
        if not isinstance(text, str):
            raise ValueError(f"{path} line {number}: the {text_field!r} field must be a string, "
                             f"got {type(text).__name__}")
        documents.append(text.encode("utf-8", errors="surrogatepass"))
    if not any(documents):
        raise ValueError(f"data file {path} holds no documents (no line with a non-empty {text_field!r} field)")
    return documents


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
    """About `budget` bytes of stdlib source (sorted files until the budget is spent), one document per
    file; every `BUILTIN_VAL_EVERY`-th file goes to validation."""
    train, val, total = [], [], 0
    for index, path in enumerate(stdlib_sources()):
        try:
            text = path.read_bytes()
        except OSError:
            continue
        if not text:  # an empty __init__.py is no document (and no id)
            continue
        (val if index % BUILTIN_VAL_EVERY == BUILTIN_VAL_EVERY - 1 else train).append(text)
        total += len(text)
        if total >= budget and val:
            break
    if not val or not train:
        raise RuntimeError(f"the built-in corpus found too little Python source under {sysconfig.get_paths()['stdlib']}")
    return Corpus(_bytes_tensor(b"".join(train)), _bytes_tensor(b"".join(val)), "python-stdlib",
                  _document_ids(train), _document_ids(val))


def load_corpus(path: str | Path | None = None, text_field: str = "text") -> Corpus:
    """The corpus of `path` (text or `.gz`: one document; `.jsonl`: its documents, see `read_jsonl`), or
    the built-in one when `path` is None."""
    if path is None:
        return builtin_corpus()
    if is_jsonl(path):
        return documents_corpus(read_jsonl(path, text_field), str(path))
    train, val = split_bytes(read_bytes(path))
    return Corpus(_bytes_tensor(train), _bytes_tensor(val), str(path))


class BatchSampler:
    """Random windows of `seq_len + 1` bytes from `data`: batches `(tokens, documents)`, `tokens`
    `(batch, seq_len + 1)` int64 and `documents` the same windows of `documents` (`(n,)` ids of `data`'s
    bytes; int64), or None without them.

    Under data parallelism every rank holds the same generator and draws the global batch; rank `r`
    keeps rows `r::world_size`. So ranks see different batches, and one saved state resumes them all.
    """

    def __init__(self, data: torch.Tensor, seq_len: int, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1, documents: torch.Tensor | None = None):
        if data.numel() < seq_len + 2:
            raise ValueError(f"seq_len {seq_len} needs at least {seq_len + 2} bytes of data, got {data.numel()}")
        self.data, self.documents, self.seq_len, self.batch_size = data, documents, seq_len, batch_size
        self.rank, self.world_size = rank, world_size
        self.generator = torch.Generator().manual_seed(seed)
        self._offsets = torch.arange(seq_len + 1)

    def next(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        starts = torch.randint(0, self.data.numel() - self.seq_len - 1, (self.batch_size * self.world_size,),
                               generator=self.generator)
        index = starts[self.rank::self.world_size, None] + self._offsets
        return self.data[index].long(), None if self.documents is None else self.documents[index].long()

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def eval_batches(data: torch.Tensor, seq_len: int, batch_size: int, num_batches: int,
                 documents: torch.Tensor | None = None) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """`num_batches` fixed batches `(tokens, documents)` of evenly spaced validation windows, `tokens`
    `(batch_size, seq_len + 1)` (`documents` as `BatchSampler`'s)."""
    count = batch_size * num_batches
    last = data.numel() - seq_len - 1
    if last < 0:
        raise ValueError(f"the validation split ({data.numel()} bytes) is shorter than seq_len + 1 = {seq_len + 1}")
    index = torch.linspace(0, last, count).long()[:, None] + torch.arange(seq_len + 1)
    windows = data[index].long().split(batch_size)
    if documents is None:
        return [(tokens, None) for tokens in windows]
    return list(zip(windows, documents[index].long().split(batch_size)))


def decode_bytes(tokens) -> str:
    """Byte tokens -> text (invalid UTF-8 replaced)."""
    return bytes(int(t) for t in tokens).decode("utf-8", errors="replace")


def encode_text(text: str) -> torch.Tensor:
    """Text -> `(n,)` int64 byte tokens (UTF-8)."""
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
