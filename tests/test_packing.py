"""Documents in the data: `.jsonl` corpora (and their errors, one line each on the command line), the
built-in corpus as one document per file, and `--pack`: a packed batch trains and validates every document
as if it were alone (loss and gradients, float64), with no target crossing a document."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
import torch.nn.functional as F

from windowed_attention import LocalTransformer, cli
from windowed_attention.ops.call import segments
from windowed_attention.training.checkpoint import load_config
from windowed_attention.training.data import (BUILTIN_VAL_EVERY, BatchSampler, builtin_corpus, documents_corpus, eval_batches,
                                              load_corpus, read_jsonl, stdlib_sources)
from windowed_attention.training.distributed import DistInfo
from windowed_attention.training.trainer import batch_loss, evaluate

TINY = ["--dim", "32", "--depth", "1", "--heads", "2", "--dim-head", "16", "--seq-len", "32", "--window-size", "16",
        "--batch-size", "4", "--eval-batches", "2", "--sample-length", "0", "--no-progress", "--steps", "2"]


def _documents(count: int, seed: int = 0) -> list[bytes]:
    """Documents of 1 to 40 bytes, each its own vocabulary so that a document boundary matters."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 41, (count,), generator=g).tolist()
    return [bytes(((i * 37 + j * (i % 5 + 1)) % 90 + 32) for j in range(n)) for i, n in enumerate(lengths)]


def _model() -> LocalTransformer:
    torch.manual_seed(0)
    return LocalTransformer(num_tokens=256, max_seq_len=64, dim=16, depth=2, heads=2, dim_head=8,
                            local_attn_window_size=8, num_residual_streams=1).double()


def _alone(model, tokens: torch.Tensor, documents: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The summed next-token loss of every document of every row run alone, and the targets counted."""
    total, count = torch.zeros((), dtype=torch.float64), 0
    for row, ids in zip(tokens, documents):
        for start, end in segments(ids):
            if end - start < 2:  # one byte: no target
                continue
            logits = model(row[None, start:end])[0, :-1]
            total = total + F.cross_entropy(logits, row[start + 1:end], reduction="sum")
            count += end - start - 1
    return total, count


def _jsonl(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def _jsonl_corpus(path, count: int = 60, field: str = "text"):
    return _jsonl(path, [json.dumps({field: text.decode(), "id": i}) for i, text in enumerate(_documents(count))])


# ------------------------------------------------------------------------------------- the corpus

def test_documents_split_whole_and_ids_mark_every_byte():
    documents = _documents(45)
    corpus = documents_corpus(documents + [b""], "corpus")  # an empty document is dropped
    held = [documents[i] for i in (19, 39)]
    assert bytes(corpus.val.tolist()) == b"".join(held)
    assert bytes(corpus.train.tolist()) == b"".join(d for i, d in enumerate(documents) if i not in (19, 39))
    for data, ids, texts in ((corpus.train, corpus.train_documents, [d for i, d in enumerate(documents)
                                                                      if i not in (19, 39)]),
                             (corpus.val, corpus.val_documents, held)):
        assert ids.shape == data.shape and bool((ids[1:] >= ids[:-1]).all())
        assert [end - start for start, end in segments(ids)] == [len(t) for t in texts]
    few = documents_corpus(documents[:3], "few")  # fewer than 20: the last one is held out
    assert bytes(few.val.tolist()) == documents[2]


def test_builtin_corpus_is_one_document_per_file():
    corpus = builtin_corpus(budget=300_000)
    files = [(index, path.read_bytes()) for index, path in enumerate(stdlib_sources()[:400])]
    for data, ids, held in ((corpus.train, corpus.train_documents, False), (corpus.val, corpus.val_documents, True)):
        assert ids.shape == data.shape and bool((ids[1:] >= ids[:-1]).all())
        texts = [text for index, text in files if text and (index % BUILTIN_VAL_EVERY == BUILTIN_VAL_EVERY - 1) == held]
        found = [bytes(data[start:end].tolist()) for start, end in segments(ids)]
        assert len(found) >= 1 and found == texts[:len(found)]
    assert len(segments(corpus.train_documents)) > 1


def test_jsonl_reads_each_line_and_the_named_field(tmp_path):
    path = _jsonl(tmp_path / "c.jsonl", ['{"text": "first doc", "body": "x"}', "", '{"text": "\\u00e9t\\u00e9", '
                                         '"body": "y"}', '  ', '{"text": "", "body": "z"}'])
    assert read_jsonl(path) == [b"first doc", "été".encode(), b""]
    assert read_jsonl(path, "body") == [b"x", b"y", b"z"]
    corpus = load_corpus(path, "body")
    assert bytes(corpus.train.tolist()) + bytes(corpus.val.tolist()) == b"xyz"


@pytest.mark.parametrize("lines, words", [
    (['{"text": "a"}', '{"text": "b"', '{"text": "c"}'], ["line 2", "not valid JSON"]),
    (['{"text": "a"}', '{"body": "b"}'], ["line 2", "no 'text' field", "--text-field"]),
    (['{"text": "a"}', '["text"]'], ["line 2", "JSON object"]),
    (['{"text": "a"}', '{"text": 3}'], ["line 2", "must be a string"]),
    (["", '{"text": ""}'], ["no documents"]),
    (['{"text": "only one"}'], ["at least 2"]),
])
def test_jsonl_errors_name_the_file_and_line(tmp_path, lines, words):
    path = _jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(ValueError) as error:
        load_corpus(path)
    for word in [str(path), *words]:
        assert word in str(error.value), (word, str(error.value))


# ------------------------------------------------------------------------------------- packed = alone

def test_packed_training_equals_each_document_trained_alone():
    corpus = documents_corpus(_documents(200), "docs")
    sampler = BatchSampler(corpus.train, 48, 6, seed=3, documents=corpus.train_documents)
    tokens, documents = sampler.next()
    assert bool((documents[:, 1:] >= documents[:, :-1]).all())
    assert any(len(segments(row)) > 2 for row in documents)  # the test covers rows of several documents

    packed_model, alone_model = _model(), _model()
    packed = batch_loss(packed_model, tokens, DistInfo(), packed_model.ignore_index, documents)
    packed.backward()
    total, count = _alone(alone_model, tokens, documents)
    (total / count).backward()
    torch.testing.assert_close(packed, total / count, atol=1e-12, rtol=0)
    for (name, p), q in zip(packed_model.named_parameters(), alone_model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-12, rtol=0, msg=name)
    # and it is not what the concatenated batch trains
    plain = batch_loss(_model(), tokens, DistInfo(), -1)
    assert abs(plain.item() - packed.item()) > 1e-3


def test_packed_validation_counts_only_targets_inside_a_document():
    corpus = documents_corpus(_documents(400), "docs")
    model = _model().eval()
    batches = eval_batches(corpus.val, 32, 3, 2, corpus.val_documents)
    total, count = torch.zeros((), dtype=torch.float64), 0
    with torch.no_grad():
        for tokens, documents in batches:
            alone, targets = _alone(model, tokens, documents)
            total, count = total + alone, count + targets
        value = evaluate(model, batches, torch.device("cpu"), contextlib.nullcontext)
    assert count < sum(t.shape[0] * (t.shape[1] - 1) for t, _ in batches)  # some targets crossed documents
    assert value == pytest.approx(float(total / count), abs=1e-10)
    plain = evaluate(model, [(t, None) for t, _ in batches], torch.device("cpu"), contextlib.nullcontext)
    assert abs(plain - value) > 1e-3


# ------------------------------------------------------------------------------------- the command line

def test_train_on_jsonl_packed_records_pack_and_field_and_resume_keeps_them(tmp_path, capsys):
    data = _jsonl_corpus(tmp_path / "c.jsonl", field="body")
    out = tmp_path / "run"
    assert cli.main(["train", "--data", str(data), "--text-field", "body", "--pack", "--out", str(out), *TINY]) == 0
    assert "packed documents" in capsys.readouterr().err
    _, config, _ = load_config(out)
    assert config.pack is True and config.text_field == "body"
    code = cli.main(["train", "--out", str(out), "--resume", "--no-pack", "--steps", "3", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--pack" in err and "Traceback" not in err, err


@pytest.mark.parametrize("lines, extra, words", [
    (['{"text": "a"}', "{oops"], [], ["line 2", "not valid JSON"]),
    (['{"text": "a"}', '{"body": "b"}'], [], ["line 2", "'text'"]),
    (['{"text": "a"}', '{"text": "b"}'], ["--text-field", "body"], ["line 1", "'body'"]),
    ([], [], ["empty"]),
    (["", '{"text": ""}'], [], ["no documents"]),
])
def test_jsonl_mistakes_are_one_line_and_exit_2(tmp_path, capsys, lines, extra, words):
    data = _jsonl(tmp_path / "c.jsonl", lines) if lines else tmp_path / "c.jsonl"
    if not lines:
        data.write_bytes(b"")
    code = cli.main(["train", "--data", str(data), "--out", str(tmp_path / "run"), *extra, *TINY])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "error:" in err and "Traceback" not in err, err
    assert str(data) in err, err
    for word in words:
        assert word in err, (word, err)
    assert not (tmp_path / "run").exists()


def test_text_field_without_jsonl_is_one_line_and_exit_2(tmp_path, capsys):
    data = tmp_path / "c.txt"
    data.write_text("plain text " * 100)
    code = cli.main(["train", "--data", str(data), "--text-field", "body", "--out", str(tmp_path / "run"), *TINY])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--text-field" in err and ".jsonl" in err, err


def test_packed_context_parallel_training_logs_the_single_process_losses(tmp_path):
    """`--pack --context-parallel 2` under torchrun: the sharded run's losses are the single process's."""
    import os
    import subprocess
    import sys

    from windowed_attention.training.metrics import read_metrics

    data = _jsonl_corpus(tmp_path / "c.jsonl", count=300)
    flags = ["--data", str(data), "--pack", "--log-every", "1", "--eval-every", "2", *TINY, "--steps", "2",
             "--depth", "2", "--window-size", "8"]
    assert cli.main(["train", "--out", str(tmp_path / "single"), *flags]) == 0
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
               "-m", "windowed_attention.training.cli", "--out", str(tmp_path / "cp"), "--context-parallel", "2",
               *flags]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    single = read_metrics(tmp_path / "single" / "metrics.jsonl")
    sharded = read_metrics(tmp_path / "cp" / "metrics.jsonl")
    assert [r["step"] for r in sharded] == [1, 2]
    for a, b in zip(single, sharded):
        assert abs(a["train_loss"] - b["train_loss"]) < 1e-5 * a["train_loss"], (a, b)
    assert abs(single[-1]["val_loss"] - sharded[-1]["val_loss"]) < 1e-5 * single[-1]["val_loss"]
