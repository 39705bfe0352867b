"""`windowed-attention train`: parse the flags, build the configs, call the trainer.

Flags left out take the quickstart defaults (`config.py`). With `--resume` the run's configuration comes
from the checkpoint in `--out`; flags given on the command line may change how the run is driven
(`--steps`, `--eval-every`, `--compile`/`--no-compile`, ...) but not what it trains (model, data,
optimizer): those must match. A new run refuses an `--out` that holds a checkpoint unless `--overwrite`.
Ctrl-C: see `trainer.StopSignal`.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

from ..cli_types import Parser, fail, integer, is_out_of_memory, real, say
from .checkpoint import CheckpointError, has_checkpoint, load_config
from .config import RUN_CONTROL, SEED_MAX, ModelConfig, TrainConfig, resolve_path
from .data import is_jsonl
from .locks import RunFolderBusy
from .metrics import MetricsMismatch

# flag -> (config, field)
MODEL_FLAGS = {"dim": "dim", "depth": "depth", "heads": "heads", "dim_head": "dim_head",
               "window_size": "local_attn_window_size", "residual_streams": "num_residual_streams",
               "kv_heads": "kv_heads", "layer_windows": "layer_windows", "attn_sinks": "attn_sinks",
               "sink_tokens": "sink_tokens", "softcap": "softcap"}
TRAIN_FLAGS = ["data", "steps", "batch_size", "grad_accum", "seq_len", "lr", "warmup_steps", "lr_decay_steps",
               "min_lr_ratio", "weight_decay", "max_grad_norm", "seed", "eval_every", "eval_batches", "save_every",
               "log_every", "sample_length", "precision", "device", "compile", "context_parallel"]
TRAIN_FLAGS += ["text_field", "pack", "fsdp"]


def layer_windows(text: str) -> list:
    """An argparse type: comma-separated per-layer windows, each an int >= 1 (a block window), `full` (a
    global layer) or `left:right` (a token window, -1 unbounded): `64,64,64,full` -> `[64, 64, 64, None]`."""
    windows = []
    for entry in text.split(","):
        entry = entry.strip()
        try:
            if entry == "full":
                windows.append(None)
            elif ":" in entry:
                left, right = (int(side) for side in entry.split(":"))
                if left < -1 or right < -1:
                    raise ValueError
                windows.append([left, right])
            else:
                windows.append(integer(1)(entry))
        except (ValueError, argparse.ArgumentTypeError):
            raise argparse.ArgumentTypeError(f"expected comma-separated windows, each an integer >= 1, 'full' or "
                                             f"left:right (ints >= -1), got {entry!r} in {text!r}") from None
    return windows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d_model, d_train = ModelConfig(), TrainConfig()
    pos, nonneg = integer(1), integer(0)
    positive, fraction = real(0, exclusive_minimum=True), real(0, 1)
    add = parser.add_argument
    # every default is None so that a resumed run knows which flags were given
    add("--data", help="text file or .gz to train on (enwik8 works as is), or .jsonl (one document per line); "
                       "default: the built-in corpus (Python standard library sources)")
    add("--text-field", help="with --data FILE.jsonl (one JSON object per line): the field holding each "
                             "document (default: text)")
    add("--pack", action=argparse.BooleanOptionalAction, default=None,
        help="pack documents into the training sequences with their ids: no attention or target crosses a "
             "document, in training and validation (default: no, documents are concatenated)")
    add("--out", default="runs/latest", help="run folder: checkpoint, metrics.jsonl, loss.png (default: %(default)s)")
    add("--steps", type=pos, help=f"optimizer steps in total (default: {d_train.steps})")
    add("--batch-size", type=pos, help=f"sequences per micro-batch and process (default: {d_train.batch_size})")
    add("--grad-accum", type=pos, help=f"micro-batches per optimizer step (default: {d_train.grad_accum})")
    add("--seq-len", type=pos, help=f"training sequence length (default: {d_train.seq_len})")
    add("--window-size", type=pos, help=f"local attention window (default: {d_model.local_attn_window_size})")
    add("--dim", type=pos, help=f"model width (default: {d_model.dim})")
    add("--depth", type=pos, help=f"number of layers (default: {d_model.depth})")
    add("--heads", type=pos, help=f"attention heads (default: {d_model.heads})")
    add("--dim-head", type=pos, help=f"dimension per head (default: {d_model.dim_head})")
    add("--residual-streams", type=pos, help="hyper-connection residual streams, 1 = a plain residual "
                                              f"(default: {d_model.num_residual_streams}; the library's default is 4)")
    add("--kv-heads", type=pos, help="key/value heads for grouped-query attention, dividing --heads (default: --heads)")
    add("--layer-windows", type=layer_windows, help="per-layer windows, cycled over --depth: an integer (a window "
                                                    "block, as --window-size), 'full' (a global layer: full causal "
                                                    "attention, cached in generate) or left:right (a token window); "
                                                    "e.g. 64,64,64,full (default: --window-size for every layer)")
    add("--attn-sinks", action="store_true", default=None, help="a learned sink logit per head (gpt-oss)")
    add("--sink-tokens", type=nonneg, help="first positions every query sees besides its window (StreamingLLM; "
                                           "default: 0)")
    add("--softcap", type=positive, help="cap the attention scores at C with C * tanh(score / C) (default: none)")
    add("--lr", type=positive, help=f"peak learning rate (default: {d_train.lr})")
    add("--warmup-steps", type=nonneg, help=f"linear warmup steps (default: {d_train.warmup_steps})")
    add("--lr-decay-steps", type=pos, help="step at which the cosine reaches its floor (default: --steps); give "
                                           "the final step count when training in several runs with --resume")
    add("--min-lr-ratio", type=fraction, help=f"cosine floor as a fraction of --lr (default: {d_train.min_lr_ratio})")
    add("--weight-decay", type=real(0), help=f"AdamW weight decay (default: {d_train.weight_decay})")
    add("--max-grad-norm", type=positive, help=f"gradient clipping norm (default: {d_train.max_grad_norm})")
    add("--seed", type=integer(0, SEED_MAX), help=f"random seed, 0 to 2**32 - 1 (default: {d_train.seed})")
    add("--eval-every", type=pos, help=f"evaluate every N steps (default: {d_train.eval_every})")
    add("--eval-batches", type=pos, help=f"validation batches per evaluation (default: {d_train.eval_batches})")
    add("--save-every", type=pos, help=f"checkpoint every N steps (default: {d_train.save_every})")
    add("--log-every", type=pos, help=f"write metrics.jsonl every N steps (default: {d_train.log_every})")
    add("--sample-length", type=nonneg, help=f"bytes sampled at each evaluation (default: {d_train.sample_length})")
    add("--precision", choices=["fp32", "bf16"], help="fp32, or bf16 autocast (default: fp32)")
    add("--device", choices=["cpu", "cuda"], help="cpu or cuda (default: cpu)")
    add("--compile", action=argparse.BooleanOptionalAction, default=None,
        help="torch.compile the model (default: no; a resumed run keeps its setting unless given)")
    add("--context-parallel", type=pos, help="under torchrun: ranks that split each sequence (it divides the "
                                             "number of processes; the rest are data-parallel; default: 1)")
    add("--fsdp", action="store_true", default=None,
        help="under torchrun: shard the model, its gradients and optimizer state over the processes (FSDP2; "
             "with --context-parallel over all of them), checkpoints through torch.distributed.checkpoint, "
             "resumable on any number of processes (a resumed run keeps it; default: no, DDP)")
    start = parser.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true", help="continue the run whose checkpoint is in --out")
    start.add_argument("--overwrite", action="store_true",
                       help="start a new run in an --out that holds another run's checkpoint, deleting that run "
                            "(its checkpoint, metrics.jsonl and loss.png); without it such a folder is refused")
    add("--no-progress", action="store_true", help="no progress bar")


def configs_from_args(args) -> tuple[ModelConfig, TrainConfig, int | None]:
    """`(model_config, train_config, resume_step)` from parsed flags (and the checkpoint with --resume)."""
    model_given = {field: getattr(args, flag) for flag, field in MODEL_FLAGS.items() if getattr(args, flag) is not None}
    train_given = {name: getattr(args, name) for name in TRAIN_FLAGS if getattr(args, name) is not None}
    if "data" in train_given:  # stored resolved, so that --resume works from any directory
        train_given["data"] = resolve_path(train_given["data"])
    if "text_field" in train_given and not (args.resume or is_jsonl(train_given.get("data", ""))):
        raise ValueError("--text-field needs --data FILE.jsonl (one JSON object per line)")
    if not args.resume:
        if "layer_windows" in model_given and "local_attn_window_size" in model_given:
            raise ValueError("--window-size and --layer-windows: give one (--layer-windows sets every layer's window)")
        model_config = ModelConfig(**model_given)
        if model_config.kv_heads is not None and model_config.heads % model_config.kv_heads:
            raise ValueError(f"--kv-heads {model_config.kv_heads} must divide --heads {model_config.heads}")
        train_config = TrainConfig(**train_given)
        seq_len = train_config.seq_len
        return replace(model_config, max_seq_len=max(model_config.max_seq_len, seq_len)), train_config, None

    if not has_checkpoint(args.out):
        raise CheckpointError(f"--resume: no checkpoint in {args.out}")
    model_config, train_config, step = load_config(args.out)
    if train_config is None:
        raise CheckpointError(f"--resume: {args.out} holds a model saved from Python (save_run), not a run of train")
    for field, value in model_given.items():
        if getattr(model_config, field) != value:
            flag = next(f for f, name in MODEL_FLAGS.items() if name == field).replace("_", "-")
            raise ValueError(f"--{flag} {value} differs from the checkpoint's {getattr(model_config, field)}; "
                             "a resumed run keeps its model")
    if train_given.get("fsdp", train_config.fsdp) != train_config.fsdp:
        how = "sharded (with --fsdp)" if train_config.fsdp else "whole (without --fsdp)"
        raise ValueError(f"--fsdp: the checkpoint in {args.out} was saved {how}; a resumed run keeps its "
                         "checkpoint's format")
    for name, value in train_given.items():
        if name not in RUN_CONTROL and getattr(train_config, name) != value:
            raise ValueError(f"--{name.replace('_', '-')} {value} differs from the checkpoint's "
                             f"{getattr(train_config, name)}; a resumed run keeps its data and optimizer settings")
    train_config = replace(train_config, **{k: v for k, v in train_given.items() if k in RUN_CONTROL})
    if train_config.steps < step:
        raise ValueError(f"--steps {train_config.steps} is below the checkpoint's step {step}")
    return model_config, train_config, step


def run(args) -> int:
    from .trainer import RunFolderTaken, train  # torch-heavy imports only when the command runs

    try:
        model_config, train_config, resume_step = configs_from_args(args)
        if train_config.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise ValueError("--device cuda: CUDA is not available on this machine")
        result = train(model_config, train_config, args.out, resume_step=resume_step, progress=not args.no_progress,
                       overwrite=args.overwrite)
    except (CheckpointError, RunFolderBusy, RunFolderTaken, MetricsMismatch, ValueError, TypeError, OSError) as error:
        return fail("train", error)
    except (MemoryError, RuntimeError) as error:
        if not is_out_of_memory(error):
            raise
        return fail("train", error)
    if not result.main:  # under torchrun rank 0 reports the run
        return 130 if result.stopped_by == "SIGINT" else 143 if result.stopped_by else 0
    if result.stopped_by is not None:
        say(sys.stderr, f"stopped by {result.stopped_by} at step {result.step}; checkpoint saved in {args.out} "
                        "(continue with --resume)\n")
        return 130 if result.stopped_by == "SIGINT" else 143
    summary = f"done: step {result.step} in {result.seconds:.0f} s"
    if result.val_bpc is not None:
        summary += f", validation {result.val_bpc:.3f} bits/byte"
    say(sys.stderr, f"{summary}; checkpoint in {args.out}\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="windowed-attention train", description=__doc__)
    add_arguments(parser)
    parser.set_defaults(run=run)
    return parser.run(argv)


if __name__ == "__main__":
    sys.exit(main())
