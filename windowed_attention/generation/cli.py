"""`windowed-attention generate`: load a checkpoint and stream sampled text to stdout, token by token;
with `--prompts-file`, one line of output per line of the file, generated in batches."""

from __future__ import annotations

import argparse
import codecs
import sys

from ..cli_types import SEED_MAX, Parser, fail, integer, is_out_of_memory, real, threads


def _read_prompts(path: str) -> list[bytes]:
    try:
        with open(path, "rb") as file:
            lines = file.read().split(b"\n")
    except OSError as error:
        raise ValueError(f"--prompts-file: cannot read {path}: {error.strerror or error}") from None
    if lines and lines[-1] == b"":
        lines.pop()  # the file's final newline ends the last line; it does not start an empty one
    lines = [line[:-1] if line.endswith(b"\r") else line for line in lines]
    if not lines:
        raise ValueError(f"--prompts-file: {path} holds no prompt")
    for number, line in enumerate(lines, 1):
        if not line:
            raise ValueError(f"--prompts-file: line {number} of {path} is empty (every prompt needs at least one byte)")
    return lines


def _one_line(data: bytes) -> str:
    text = data.decode("utf-8", errors="replace")
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--checkpoint", default="runs/latest", help="run folder written by `train` (default: %(default)s)")
    add("--prime", default="\n", help="text to continue (default: a newline)")
    add("--prompts-file", default=None, metavar="FILE",
        help="continue every line of FILE (UTF-8) instead of --prime; prints one line per prompt: the prompt, "
             "then its continuation, with newlines, carriage returns and backslashes written as \\n, \\r, \\\\")
    add("--batch-size", type=integer(1), default=16,
        help="prompts generated together with --prompts-file (default: %(default)s)")
    add("--length", type=integer(0), default=500, help="bytes to generate (default: %(default)s)")
    add("--temperature", type=real(0), default=0.8, help="sampling temperature, 0 = greedy (default: %(default)s)")
    add("--filter-thres", type=real(0, 1), default=0.9,
        help="top-k: keep the top (1 - F) of the 256 byte values (default: %(default)s)")
    add("--top-p", type=real(0, 1, exclusive_minimum=True), default=None,
        help="nucleus sampling: keep the smallest set with probability P")
    add("--seed", type=integer(0, SEED_MAX), default=None, help="random seed, 0 to 2**32 - 1 (default: unseeded)")
    add("--cache-dtype", choices=["model", "bfloat16"], default="model",
        help="what the KV cache stores keys and values in: the model's dtype (exact) or bfloat16 (a float32 "
             "model: half the cache memory and the bytes a step reads, not exact) (default: %(default)s)")
    add("--device", choices=["cpu", "cuda"], default="cpu", help="device (default: %(default)s)")
    add("--threads", type=threads, default=0,
        help="CPU threads for torch (default: torch's choice); 1 is fastest for one-token steps on a busy machine")


def run(args) -> int:
    import torch

    from ..sampling import check_sampling
    from ..training.checkpoint import CheckpointError, load_model
    from .engine import stream

    try:
        check_sampling(args.temperature, args.filter_thres, args.top_p)
        if args.threads:
            torch.set_num_threads(args.threads)
        if args.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: CUDA is not available on this machine")
        prompts = _read_prompts(args.prompts_file) if args.prompts_file is not None else None
        prime = args.prime.encode("utf-8")
        if not prime:
            raise ValueError("--prime must not be empty")
        model, _, _ = load_model(args.checkpoint, device=args.device)
        cache_dtype = _cache_dtype(args.cache_dtype, next(model.parameters()).dtype)
        generator = None
        if args.seed is not None:
            generator = torch.Generator(device=args.device).manual_seed(args.seed)
        if prompts is not None:
            longest = max(len(prompt) for prompt in prompts)
            if model.use_abs_pos_emb and longest + args.length - 1 > model.max_seq_len:
                raise ValueError(
                    f"--prompts-file: the longest prompt ({longest} bytes) + --length {args.length} - 1 exceeds "
                    f"the model's max_seq_len = {model.max_seq_len}"
                )
            return _generate_file(model, prompts, args, generator, cache_dtype)
        prompt = torch.tensor([list(prime)], dtype=torch.long, device=args.device)
        tokens = stream(model, prompt, args.length, temperature=args.temperature, filter_thres=args.filter_thres,
                        top_p=args.top_p, generator=generator, cache_dtype=cache_dtype)
        # sample the first token before printing anything, so that argument errors come before output
        first = next(tokens, None)
    except (CheckpointError, ValueError, TypeError, OSError) as error:
        return fail("generate", error)
    except (MemoryError, RuntimeError) as error:
        if not is_out_of_memory(error):
            raise
        return fail("generate", error)

    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    out = sys.stdout
    out.write(args.prime)
    try:
        token = first
        while token is not None:
            out.write(decoder.decode(bytes([int(token[0, 0])])))
            out.flush()
            token = next(tokens, None)
        out.write(decoder.decode(b"", final=True) + "\n")
        out.flush()
    except BrokenPipeError:  # e.g. piped into `head`
        return 0
    except KeyboardInterrupt:
        out.write("\n")
        return 130
    return 0


def _cache_dtype(name: str, model_dtype):
    """`--cache-dtype` -> the `cache_dtype` of `stream`/`generate` for a model in `model_dtype` (what
    `kv_cache.storage_dtype` allows, under the flag's name)."""
    import torch

    from ..kv_cache import storage_dtype

    if name == "model":
        return None
    try:
        return storage_dtype(model_dtype, getattr(torch, name))
    except ValueError:
        raise ValueError(f"--cache-dtype {name} needs a float32 model, the checkpoint's is {model_dtype}") from None


def _generate_file(model, prompts: list[bytes], args, generator, cache_dtype) -> int:
    """Each batch of `--batch-size` prompts in one generation (prompts of different lengths batch
    together); prints one line per prompt, in the file's order."""
    import torch

    from .engine import generate

    out = sys.stdout
    try:
        for first in range(0, len(prompts), args.batch_size):
            batch = prompts[first:first + args.batch_size]
            rows = [torch.tensor(list(prompt), dtype=torch.long, device=args.device) for prompt in batch]
            tokens = generate(model, rows, args.length, temperature=args.temperature, filter_thres=args.filter_thres,
                              top_p=args.top_p, generator=generator, cache_dtype=cache_dtype).tolist()
            for prompt, new in zip(batch, tokens):
                out.write(_one_line(prompt + bytes(new)) + "\n")
            out.flush()
    except BrokenPipeError:
        return 0
    except KeyboardInterrupt:
        return 130
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="windowed-attention generate", description=__doc__)
    add_arguments(parser)
    parser.set_defaults(run=run)
    return parser.run(argv)


if __name__ == "__main__":
    sys.exit(main())
