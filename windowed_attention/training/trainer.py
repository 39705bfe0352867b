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
import random
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from .. import parallel
from ..attention import LocalAttention
from ..generation import generate
from ..ops import backends
from ..ops.call import AttentionCall
from . import distributed
from .checkpoint import load_trainer_state, load_weights, save_checkpoint
from .config import ModelConfig, TrainConfig
from .data import BatchSampler, decode_bytes, eval_batches, load_corpus
from .locks import RunFolderBusy, RunLock
from .metrics import MetricsLog, bits_per_byte, plot_metrics


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
               ignore_index: int) -> torch.Tensor:
    """The mean next-token loss of `batch` `(b, seq_len + 1)`. Under context parallelism this rank computes
    its shard of every sequence (inputs and targets are sharded alike) and the loss is still the whole
    batch's, on every rank of the group."""
    if info.cp_group is None:
        return model(batch, return_loss=True)
    inputs, targets = (parallel.shard(t, info.cp_group) for t in (batch[:, :-1], batch[:, 1:]))
    return parallel.cross_entropy(model(inputs, group=info.cp_group), targets, info.cp_group, ignore_index)


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: list[torch.Tensor], device: torch.device, autocast,
             info: distributed.DistInfo = distributed.DistInfo()) -> float:
    """Mean validation loss (nats per byte) over the fixed batches."""
    was_training = model.training
    model.eval()
    total = 0.0
    for batch in batches:
        with autocast():
            total += batch_loss(model, batch.to(device), info, model.ignore_index).item()
    model.train(was_training)
    return total / len(batches)


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
    window = next(m for m in model.modules() if isinstance(m, LocalAttention)).window_size
    backend = attention_backend(model, device, config.precision)
    extra = ", compiled" if config.compile else ""
    extra += f", {info.world_size} processes" if info.world_size > 1 else ""
    extra += f", context parallel {info.context_parallel}" if info.context_parallel > 1 else ""
    return (f"training {params / 1e6:.2f}M parameters on {corpus_name} ({_bytes(corpus.train.numel())} train, "
            f"{_bytes(corpus.val.numel())} validation), sequence {config.seq_len}, window {window}, "
            f"attention backend {backend} ({device.type}, {config.precision}{extra})")


class StopSignal:
    """Turns SIGINT/SIGTERM into a flag the loop checks after each step (the step finishes, the run
    saves and stops); a second signal of the same kind raises KeyboardInterrupt at once."""

    def __init__(self):
        self.received: str | None = None
        self._previous = {}

    def _handle(self, signum, frame):
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def __enter__(self):
        with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def train(model_config: ModelConfig, config: TrainConfig, out: str | Path, *, resume_step: int | None = None,
          progress: bool = True) -> TrainResult:
    """Train (or, with `resume_step`, continue from the checkpoint in `out`) until `config.steps`."""
    started = time.perf_counter()
    if config.seq_len % config.context_parallel:
        raise ValueError(f"--seq-len {config.seq_len} must divide by --context-parallel {config.context_parallel}")
    if config.compile and config.context_parallel > 1:
        raise ValueError("--compile cannot be combined with --context-parallel (the halo exchange is not compiled)")
    info = distributed.setup(config.device, config.context_parallel)
    lock = RunLock(out)
    try:
        _lock_run(lock, info, config.device)
        return _train(model_config, config, Path(out), resume_step, progress and info.is_main, info, started)
    finally:
        lock.release()
        distributed.teardown(info)


def _lock_run(lock: RunLock, info, device_type: str) -> None:
    """Rank 0 takes the run folder's lock before anything is written there; when it cannot (another run
    holds it, the folder cannot be written), every rank stops with that error."""
    error = None
    if info.is_main:
        try:
            lock.acquire()
        except (RunFolderBusy, OSError) as caught:
            error = caught
    if distributed.any_rank(error is not None, info, distributed.device_for(device_type, info)):
        raise error if error is not None else RunFolderBusy(f"rank 0 could not lock the run folder {lock.folder}")


def _train(model_config, config, out, resume_step, progress, info, started) -> TrainResult:
    device = distributed.device_for(config.device, info)
    torch.manual_seed(config.seed)
    random.seed(config.seed)

    # data
    corpus = load_corpus(config.data)
    # the ranks of one context-parallel group draw the same batch (each then takes its shard of it)
    sampler = BatchSampler(corpus.train, config.seq_len, config.batch_size, config.seed, info.dp_rank, info.dp_size)
    val_batches = eval_batches(corpus.val, config.seq_len, config.batch_size, config.eval_batches)
    prime = corpus.val[: min(64, corpus.val.numel())]

    # model and optimizer
    model = model_config.build().to(device)
    optimizer = make_optimizer(model, config)
    step = 0
    if resume_step is not None:
        load_weights(out, model, resume_step)
        state = load_trainer_state(out, resume_step)
        optimizer.load_state_dict(state["optimizer"])
        sampler.load_state_dict(state["sampler"])
        set_rng_state(state["rng"])
        step = resume_step
    train_model = distributed.wrap(model, info, device)
    if config.compile:
        train_model = torch.compile(train_model)
    use_bf16 = config.precision == "bf16"

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)

    if info.is_main:
        print(opening_line(model, corpus, config, device, info), file=sys.stderr, flush=True)
    metrics = MetricsLog(out, resume_step) if info.is_main else None
    tokens_per_step = config.batch_size * config.grad_accum * info.dp_size * config.seq_len

    def checkpoint():
        if info.is_main:
            state = {"optimizer": optimizer.state_dict(), "sampler": sampler.state_dict(), "rng": rng_state()}
            save_checkpoint(out, model=model, model_config=model_config, train_config=config, step=step,
                            trainer_state=state)
        distributed.barrier(info)

    bar = tqdm(total=config.steps, initial=step, disable=not progress, dynamic_ncols=True, unit="step")
    result = TrainResult(step, None, None, None, 0.0, main=info.is_main)
    with StopSignal() as stop:
        while step < config.steps:
            tick = time.perf_counter()
            lr = learning_rate(step, config)
            for group in optimizer.param_groups:
                group["lr"] = lr

            # one optimizer step over grad_accum micro-batches; gradients sync on the last one only
            loss_sum = torch.zeros((), device=device)
            for micro in range(config.grad_accum):
                batch = sampler.next().to(device)
                sync = micro == config.grad_accum - 1 or not info.enabled
                with (contextlib.nullcontext() if sync else train_model.no_sync()), autocast():
                    loss = batch_loss(train_model, batch, info, model.ignore_index)
                # each rank's gradient is its share of its sequences'; DDP averages over all ranks, so the
                # context_parallel factor makes that the mean over data-parallel rows of the sums over shards
                (loss * info.context_parallel / config.grad_accum).backward()
                loss_sum += loss.detach().float()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1

            train_loss = distributed.mean(loss_sum / config.grad_accum, info).item()
            result.step, result.train_loss = step, train_loss
            elapsed = time.perf_counter() - tick
            bar.update(1)
            bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{tokens_per_step / elapsed:,.0f}")

            stopped = distributed.any_rank(stop.received is not None, info, device)
            last = step == config.steps or stopped
            record = {"step": step, "train_loss": train_loss, "lr": lr, "grad_norm": float(grad_norm),
                      "tokens": step * tokens_per_step}
            if info.dp_rank == 0 and (step % config.eval_every == 0 or last):  # the first mesh row evaluates
                val_loss = evaluate(model, val_batches, device, autocast, info)
            if info.is_main and (step % config.eval_every == 0 or last):
                record.update(val_loss=val_loss, val_bpc=bits_per_byte(val_loss))
                result.val_loss, result.val_bpc = val_loss, record["val_bpc"]
                bar.write(f"step {step}: train loss {train_loss:.4f}, val loss {val_loss:.4f}, "
                          f"val {record['val_bpc']:.3f} bits/byte")
                if config.sample_length > 0:
                    text = sample_text(model, prime, config.sample_length, config.seed + step, device)
                    bar.write(f"--- sample after {decode_bytes(prime.tolist())!r} ---\n{text}\n---")
            if info.is_main and (step % config.log_every == 0 or "val_loss" in record or last):
                record["elapsed_s"] = round(time.perf_counter() - started, 3)
                metrics.log(record)
            if step % config.save_every == 0 or last:
                checkpoint()
            if stopped:
                result.stopped_by = stop.received or "signal"
                break
    bar.close()
    if info.is_main:
        plot_metrics(out)
    result.seconds = time.perf_counter() - started
    return result
