"""`windowed-attention generate`: load a checkpoint and stream sampled text to stdout, token by token;
with `--prompts-file`, one line of output per line of the file, generated in batches."""

from __future__ import annotations

import argparse
import codecs
import sys


def _nonneg_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def _positive_int(text: str) -> int:
    value = _nonneg_int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


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
    add("--batch-size", type=_positive_int, default=16, help="prompts generated together with --prompts-file (default: %(default)s)")
    add("--length", type=_nonneg_int, default=500, help="bytes to generate (default: %(default)s)")
    add("--temperature", type=float, default=0.8, help="sampling temperature, 0 = greedy (default: %(default)s)")
    add("--filter-thres", type=float, default=0.9,
        help="top-k: keep the top (1 - F) of the 256 byte values (default: %(default)s)")
    add("--top-p", type=float, default=None, help="nucleus sampling: keep the smallest set with probability P")
    add("--seed", type=int, default=None, help="random seed (default: unseeded)")
    add("--device", choices=["cpu", "cuda"], default="cpu", help="device (default: %(default)s)")
    add("--threads", type=_nonneg_int, default=0,
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
            return _generate_file(model, prompts, args, generator)
        prompt = torch.tensor([list(prime)], dtype=torch.long, device=args.device)
        tokens = stream(model, prompt, args.length, temperature=args.temperature, filter_thres=args.filter_thres,
                        top_p=args.top_p, generator=generator)
        # sample the first token before printing anything, so that argument errors come before output
        first = next(tokens, None)
    except (CheckpointError, ValueError, TypeError) as error:
        print(f"windowed-attention generate: error: {error}", file=sys.stderr)
        return 2

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


def _generate_file(model, prompts: list[bytes], args, generator) -> int:
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
                              top_p=args.top_p, generator=generator).tolist()
            for prompt, new in zip(batch, tokens):
                out.write(_one_line(prompt + bytes(new)) + "\n")
            out.flush()
    except BrokenPipeError:
        return 0
    except KeyboardInterrupt:
        return 130
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="windowed-attention generate", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
