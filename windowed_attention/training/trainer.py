"""The training loop, top to bottom: data, model, optimizer, (resume), then steps of
[sample batches -> forward/backward (accumulated) -> clip -> AdamW step], with evaluation, samples,
logs and checkpoints along the way.

Everything random comes from seeded generators whose states are checkpointed (torch CPU/CUDA, Python
`random`, the batch sampler's generator), and evaluation and samples use their own generators, so a
resumed run computes bitwise the same losses as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import shutil
import signal
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import parallel
from ..attention import LocalAttention
from ..generation import generate
from ..ops import backends
from ..ops.call import AttentionCall
from . import distributed
from ..cli_types import Interrupted, say
from ..compiling import inductor_options
from ..extras import require
from .checkpoint import (CheckpointError, has_checkpoint, load_config, load_run_id, load_sharded_state,
                         load_trainer_state, load_weights, remove_checkpoint, save_checkpoint, save_sharded_checkpoint)
from .config import ModelConfig, TrainConfig
from .data import BatchSampler, decode_bytes, eval_batches, load_corpus
from .locks import RunFolderBusy, RunLock
from .metrics import METRICS, PLOT, MetricsLog, bits_per_byte, plot_metrics


@dataclass
class TrainResult:
    step: int
    train_loss: float | None
    val_loss: float | None
    val_bpc: float | None
    seconds: float
    stopped_by: str | None = None  # "SIGINT" / "SIGTERM" when a signal ended the run early
    main: bool = True  # whether this process reports the run (rank 0; the only one without torchrun)


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warmup over `warmup_steps`, then cosine from `lr` down to `lr * min_lr_ratio` at `decay_steps`."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(config.decay_steps - config.warmup_steps, 1)
    progress = min((step - config.warmup_steps) / span, 1.0)
    floor = config.lr * config.min_lr_ratio
    return floor + (config.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (not on norms, biases or embeddings)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (decay if param.ndim >= 2 and "emb" not in name else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # the fused kernel does the whole update in one pass (CPU too), instead of a dozen elementwise ops
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in decay + no_decay)
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95), fused=fused)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def batch_loss(model: torch.nn.Module, batch: torch.Tensor, info: distributed.DistInfo,
               ignore_index: int, documents: torch.Tensor | None = None) -> torch.Tensor:
    """The mean next-token loss of `batch` `(b, seq_len + 1)`; with `documents` (its ids, packed) every
    document counts as if alone: no attention and no target crosses a document. Under context parallelism
    this rank computes its shard of every sequence (inputs and targets are sharded alike) and the loss is
    still the whole batch's, on every rank of the group."""
    if info.cp_group is None:
        return model(batch, return_loss=True, **({} if documents is None else {"documents": documents}))
    targets, extra = batch[:, 1:], {}
    if documents is not None:  # a document's last token predicts nothing
        targets = targets.masked_fill(documents[:, 1:] != documents[:, :-1], ignore_index)
        extra["documents"] = parallel.shard(documents[:, :-1], info.cp_group)
    inputs, targets = (parallel.shard(t, info.cp_group) for t in (batch[:, :-1], targets))
    return parallel.cross_entropy(model(inputs, group=info.cp_group, **extra), targets, info.cp_group, ignore_index)


def target_count(batch: torch.Tensor, documents: torch.Tensor | None) -> int:
    """The targets `batch_loss` counts: every next token, but none that starts another document."""
    if documents is None:
        return batch.shape[0] * (batch.shape[1] - 1)
    return int((documents[:, 1:] == documents[:, :-1]).sum())


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: list, device: torch.device, autocast,
             info: distributed.DistInfo = distributed.DistInfo()) -> float:
    """Mean validation loss (nats per predicted byte) over the fixed batches `(tokens, documents)`,
    each batch weighted by the targets it counts (with packed documents, fewer than its bytes)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch, documents in batches:
        targets = target_count(batch, documents)
        if targets == 0:  # documents of one byte each: nothing to predict
            continue
        with autocast():
            loss = batch_loss(model, batch.to(device), info, model.ignore_index,
                              None if documents is None else documents.to(device))
        total, count = total + loss.item() * targets, count + targets
    model.train(was_training)
    return total / count if count else math.nan


def whole_model(model: torch.nn.Module, model_config: ModelConfig, device: torch.device,
                info: distributed.DistInfo) -> torch.nn.Module | None:
    """The sharded `model` gathered whole into a plain copy on rank 0 (None on the other ranks, which must
    call it too), built without drawing from the seeded generators (a resumed run draws what an
    uninterrupted one draws)."""
    state = distributed.whole_state(model)
    if not info.is_main:
        return None
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        copy = model_config.build()
    copy.load_state_dict(state)
    return copy.to(device)


def sample_text(model, prime: torch.Tensor, length: int, seed: int, device: torch.device) -> str:
    generator = torch.Generator(device=device).manual_seed(seed)
    tokens = generate(model, prime[None].to(device), length, temperature=0.8, filter_thres=0.9, generator=generator)
    return decode_bytes(tokens[0].tolist())


def attention_backend(model: torch.nn.Module, device: torch.device, precision: str) -> str:
    """The backend `auto` picks for the model's attention on this device and precision."""
    attention = next(m for m in model.modules() if isinstance(m, LocalAttention))
    used = AttentionCall(attention.spec, 1.0, mask_self=attention.shared_qk).features() | {
        name for name, on in (("attn_bias", getattr(model, "dynamic_pos_bias", None) is not None),
                              ("xpos", attention.use_xpos), ("dropout", attention.dropout.p > 0)) if on}
    return backends.decide(device.type, torch.bfloat16 if precision == "bf16" else torch.float32, frozenset(used),
                           available=backends.availability())


def _bytes(count: int) -> str:
    for power, unit in ((9, "GB"), (6, "MB"), (3, "kB")):
        if count >= 10**power:
            return f"{count / 10**power:.1f} {unit}"
    return f"{count} bytes"


def opening_line(model: torch.nn.Module, corpus, config: TrainConfig, device: torch.device,
                 info: distributed.DistInfo) -> str:
    """What is about to train: parameters, corpus, sequence and window, backend."""
    params = sum(p.numel() for p in model.parameters())
    corpus_name = "the built-in corpus of Python standard-library sources" if config.data is None else corpus.name
    windows = [m.window_size for m in model.modules() if isinstance(m, LocalAttention)]
    window = windows[0] if len(set(windows)) == 1 else ",".join(  # as --layer-windows spells them
        str(w) if isinstance(w, int) else "full" if w[0] == -1 else f"{w[0]}:{w[1]}" for w in windows)
    backend = attention_backend(model, device, config.precision)
    extra = ", compiled" if config.compile else ""
    extra += ", packed documents" if config.pack else ""
    extra += f", {info.world_size} processes" if info.world_size > 1 else ""
    extra += f", context parallel {info.context_parallel}" if info.context_parallel > 1 else ""
    extra += ", FSDP" if info.sharded else ""
    return (f"training {params / 1e6:.2f}M parameters on {corpus_name} ({_bytes(corpus.train.numel())} train, "
            f"{_bytes(corpus.val.numel())} validation), sequence {config.seq_len}, window {window}, "
            f"attention backend {backend} ({device.type}, {config.precision}{extra})")


class StopSignal:
    """SIGINT/SIGTERM during a run. Before the loop starts (`armed` False) a signal stops at once
    (`Interrupted`). In the loop the first one sets a flag the loop checks after each step (the step
    finishes, the run saves, skips its evaluation and sample, and stops) and says so at once on stderr;
    a second one aborts (`Interrupted`), except while a checkpoint is being saved: then the save finishes
    first."""

    def __init__(self, announce: bool = True):
        self.received: str | None = None
        self.armed = False
        self.next_step = 0  # the step a first signal now would save
        self._announce = announce
        self._saving = 0
        self._abort_after_save: str | None = None
        self._previous = {}

    @staticmethod
    def _code(name: str) -> int:
        return 130 if name == "SIGINT" else 143

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if not self.armed:
            raise Interrupted(f"{name} during start-up: stopped, nothing saved", self._code(name))
        if self.received is not None:
            if self._saving:
                self._abort_after_save = name
                return
            raise Interrupted(name, self._code(name))
        self.received = name
        if self._announce:
            again = "Ctrl-C again to abort" if name == "SIGINT" else "a second signal aborts"
            with contextlib.suppress(OSError):  # os.write: safe inside a handler, even mid-print
                os.write(2, f"\nstopping ({name}): saving a checkpoint at step {self.next_step}; {again}\n".encode())

    @contextlib.contextmanager
    def saving(self):
        """A checkpoint save: a second signal waits until it is complete."""
        self._saving += 1
        try:
            yield
        finally:
            self._saving -= 1
        if not self._saving and self._abort_after_save is not None:
            name, self._abort_after_save = self._abort_after_save, None
            raise Interrupted(name, self._code(name))

    def __enter__(self):
        with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def train(model_config: ModelConfig, config: TrainConfig, out: str | Path, *, resume_step: int | None = None,
          progress: bool = True, overwrite: bool = False) -> TrainResult:
    """Train (or, with `resume_step`, continue from the checkpoint in `out`) until `config.steps`.

    A new run refuses a folder that holds a checkpoint (`RunFolderTaken`) unless `overwrite`, which
    removes the old run's checkpoint, metrics and plot first. A folder this call created and never saved
    a checkpoint into (an error or a signal before the first save) is removed again. A signal raises
    `Interrupted` (see `StopSignal`) unless the run saved and stopped (`TrainResult.stopped_by`). Needs the
    `train` extra (`MissingExtra` before anything starts otherwise)."""
    started = time.perf_counter()
    require_extras()
    if config.seq_len % config.context_parallel:
        raise ValueError(f"--seq-len {config.seq_len} must divide by --context-parallel {config.context_parallel}")
    if config.compile and config.context_parallel > 1:
        raise ValueError("--compile cannot be combined with --context-parallel (the halo exchange is not compiled)")
    if config.compile and config.fsdp:
        raise ValueError("--compile cannot be combined with --fsdp (a compiled sharded model is not tested here)")
    if config.fsdp and model_config.num_residual_streams > 1:
        raise ValueError(f"--fsdp cannot shard --residual-streams {model_config.num_residual_streams}: hyper-connections "
                         "hold scalar parameters, which FSDP's fully_shard refuses; use --residual-streams 1")
    out = Path(out)
    created = not out.exists()
    info = distributed.setup(config.device, config.context_parallel, config.fsdp)
    lock = RunLock(out)
    finished = False
    with StopSignal(announce=info.is_main) as stop:
        try:
            _lock_run(lock, info, config.device, claim=None if resume_step is not None else overwrite)
            result = _train(model_config, config, out, resume_step, progress and info.is_main, info, started, stop)
            finished = True
            return result
        except Interrupted as interrupted:
            if interrupted.message in ("SIGINT", "SIGTERM"):  # an abort in the loop: name the last checkpoint
                raise Interrupted(f"aborted by a second {interrupted.message}; {_last_checkpoint(out)}",
                                  interrupted.code) from None
            raise
        finally:
            try:
                lock.release()
                if created and info.is_main:
                    _remove_if_unsaved(out)
            finally:
                distributed.teardown(info, finished)


class RunFolderTaken(Exception):
    """A new run was started in a folder that holds another run's checkpoint."""


def _claim_folder(out: Path, overwrite: bool) -> None:
    """Make `out` (locked) hold no other run: refuse a folder with a checkpoint, or with `overwrite`
    remove that run's checkpoint first, then its metrics and plot."""
    if not has_checkpoint(out):
        return
    if not overwrite:
        try:
            what = f"the checkpoint of step {load_config(out)[2]}"
        except CheckpointError:
            what = "a checkpoint"
        raise RunFolderTaken(f"{out} holds {what} of another run; continue it with --resume, replace it with "
                             "--overwrite, or choose another --out")
    remove_checkpoint(out)
    for name in (METRICS, PLOT):
        (out / name).unlink(missing_ok=True)


def _last_checkpoint(out: Path) -> str:
    try:
        return f"the last checkpoint is step {load_config(out)[2]} in {out} (continue with --resume)"
    except CheckpointError:
        return "no checkpoint was saved"


def _remove_if_unsaved(out: Path) -> None:
    """Remove the run folder `out` (created by this run) if it holds no checkpoint, only what a run
    writes before its first save."""
    with contextlib.suppress(OSError):
        if has_checkpoint(out):
            return
        if {p.name for p in out.iterdir()} <= {".run.lock", ".checkpoint.lock", ".staging", METRICS, PLOT}:
            shutil.rmtree(out, ignore_errors=True)


def _lock_run(lock: RunLock, info, device_type: str, claim: bool | None = None) -> None:
    """Rank 0 takes the run folder's lock before anything is written there and, for a new run (`claim`
    not None: whether to overwrite), makes sure the folder holds no other run (`_claim_folder`); when it
    cannot (another run holds it, the folder cannot be written, it holds a checkpoint), every rank stops
    with that error."""
    error = None
    if info.is_main:
        try:
            lock.acquire()
            if claim is not None:
                _claim_folder(lock.folder, claim)
        except (RunFolderBusy, RunFolderTaken, OSError) as caught:
            error = caught
    if distributed.any_rank(error is not None, info, distributed.device_for(device_type, info)):
        raise error if error is not None else RunFolderBusy(f"rank 0 could not lock the run folder {lock.folder}")


def require_extras() -> None:
    """The optional packages training uses (the `train` extra): tqdm (the progress bar) and matplotlib
    (loss.png), checked before a run starts rather than when its plot is drawn; `MissingExtra` names the
    extra."""
    require("tqdm", "train", "training (its progress bar)")
    require("matplotlib", "train", "training (its loss plot)")


def _train(model_config, config, out, resume_step, progress, info, started, stop: StopSignal) -> TrainResult:
    from tqdm import tqdm  # the train extra, checked by train()

    device = distributed.device_for(config.device, info)
    torch.manual_seed(config.seed)
    random.seed(config.seed)

    # data
    corpus = load_corpus(config.data, config.text_field)
    # --pack: batches carry their document ids, so no attention or target crosses a document
    train_documents, val_documents = (corpus.train_documents, corpus.val_documents) if config.pack else (None, None)
    # the ranks of one context-parallel group draw the same batch (each then takes its shard of it)
    sampler = BatchSampler(corpus.train, config.seq_len, config.batch_size, config.seed, info.dp_rank, info.dp_size,
                           documents=train_documents)
    val_batches = eval_batches(corpus.val, config.seq_len, config.batch_size, config.eval_batches, val_documents)
    prime = corpus.val[: min(64, corpus.val.numel())]

    # model and optimizer
    model = model_config.build().to(device)
    step = 0
    run_id = uuid.uuid4().hex[:16]  # ties metrics.jsonl to its checkpoint
    if config.fsdp:  # sharded in place before the optimizer is made: it holds the shards
        train_model = distributed.wrap(model, info, device, bf16=config.precision == "bf16")
    optimizer = make_optimizer(model, config)
    if resume_step is not None:
        run_id = load_run_id(out) or run_id
        if not config.fsdp:
            load_weights(out, model, resume_step)
        state = load_trainer_state(out, resume_step)
        if config.fsdp:  # dcp/: model and optimizer, resharded from any number of ranks
            load_sharded_state(out, model, optimizer)
        else:
            optimizer.load_state_dict(state["optimizer"])
        sampler.load_state_dict(state["sampler"])
        set_rng_state(state["rng"])
        step = resume_step
    if not config.fsdp:
        train_model = distributed.wrap(model, info, device)
    if config.compile:
        train_model = torch.compile(train_model, options=inductor_options())
    use_bf16 = config.precision == "bf16"

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)

    metrics = MetricsLog(out, resume_step, run_id) if info.is_main else None
    if info.is_main:
        say(sys.stderr, opening_line(model, corpus, config, device, info) + "\n")
    tokens_per_step = config.batch_size * config.grad_accum * info.dp_size * config.seq_len

    def checkpoint():
        if config.fsdp:  # every rank writes its shards
            state = {"sampler": sampler.state_dict(), "rng": rng_state()}
            agree = lambda flag: distributed.any_rank(flag, info, device)  # noqa: E731
            with stop.saving():
                save_sharded_checkpoint(out, model=model, optimizer=optimizer, model_config=model_config,
                                        train_config=config, step=step, trainer_state=state, run_id=run_id,
                                        main=info.is_main, any_rank=agree)
        elif info.is_main:
            state = {"optimizer": optimizer.state_dict(), "sampler": sampler.state_dict(), "rng": rng_state()}
            with stop.saving():
                save_checkpoint(out, model=model, model_config=model_config, train_config=config, step=step,
                                trainer_state=state, run_id=run_id)
        distributed.barrier(info)

    def show(text: str) -> None:  # stdout, around the progress bar; a closed stdout never ends the run
        with tqdm.external_write_mode(file=sys.stdout):
            say(sys.stdout, text + "\n")

    bar = tqdm(total=config.steps, initial=step, disable=not progress, dynamic_ncols=True, unit="step")
    result = TrainResult(step, None, None, None, 0.0, main=info.is_main)
    stop.next_step, stop.armed = step + 1, True
    while step < config.steps:
        tick = time.perf_counter()
        lr = learning_rate(step, config)
        for group in optimizer.param_groups:
            group["lr"] = lr

        # one optimizer step over grad_accum micro-batches; gradients sync on the last one only
        loss_sum = torch.zeros((), device=device)
        for micro in range(config.grad_accum):
            batch, documents = sampler.next()
            batch, documents = batch.to(device), None if documents is None else documents.to(device)
            # (FSDP reduce-scatters every micro-batch's gradients: no whole gradient is kept between them)
            sync = micro == config.grad_accum - 1 or not info.enabled or info.sharded
            with (contextlib.nullcontext() if sync else train_model.no_sync()), autocast():
                loss = batch_loss(train_model, batch, info, model.ignore_index, documents)
            # each rank's gradient is its share of its sequences'; DDP averages over all ranks, so the
            # context_parallel factor makes that the mean over data-parallel rows of the sums over shards
            (loss * info.context_parallel / config.grad_accum).backward()
            loss_sum += loss.detach().float()
        grad_norm = distributed.local_value(torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        train_loss = distributed.mean(loss_sum / config.grad_accum, info).item()
        result.step, result.train_loss = step, train_loss
        elapsed = time.perf_counter() - tick
        bar.update(1)
        bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{tokens_per_step / elapsed:,.0f}")

        stopped = distributed.any_rank(stop.received is not None, info, device)
        stop.next_step = step if stopped else step + 1  # a signal from now on: after the next step
        last = step == config.steps
        record = {"step": step, "train_loss": train_loss, "lr": lr, "grad_norm": float(grad_norm),
                  "tokens": step * tokens_per_step}
        evaluating = (step % config.eval_every == 0 or last) and not stopped  # a stop saves first, at once
        if (info.dp_rank == 0 or info.sharded) and evaluating:  # the first mesh row (a sharded model: all) evaluates
            val_loss = evaluate(model, val_batches, device, autocast, info)
        sample_from = None if info.sharded else model
        if info.sharded and evaluating and config.sample_length > 0:  # samples from the whole model, on rank 0
            if not distributed.any_rank(stop.received is not None, info, device):
                sample_from = whole_model(model, model_config, device, info)
        if info.is_main and evaluating:
            record.update(val_loss=val_loss, val_bpc=bits_per_byte(val_loss))
            result.val_loss, result.val_bpc = val_loss, record["val_bpc"]
            show(f"step {step}: train loss {train_loss:.4f}, val loss {val_loss:.4f}, "
                 f"val {record['val_bpc']:.3f} bits/byte")
            if config.sample_length > 0 and stop.received is None and sample_from is not None:
                text = sample_text(sample_from, prime, config.sample_length, config.seed + step, device)
                show(f"--- sample after {decode_bytes(prime.tolist())!r} ---\n{text}\n---")
        if info.is_main and (step % config.log_every == 0 or "val_loss" in record or last or stopped):
            record["elapsed_s"] = round(time.perf_counter() - started, 3)
            metrics.log(record)
        if step % config.save_every == 0 or last or stopped:
            checkpoint()
        if stopped:
            result.stopped_by = stop.received or "signal"
            break
    bar.close()
    if info.is_main:
        plot_metrics(out)
    result.seconds = time.perf_counter() - started
    return result
