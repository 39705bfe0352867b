"""The `windowed-attention` command: parses arguments and hands them to the subcommand's module."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module with add_arguments(parser) and run(args) -> int, one-line help)
COMMANDS = {
    "train": ("windowed_attention.training.cli", "train a byte-level language model"),
    "generate": ("windowed_attention.generation.cli", "generate text from a trained checkpoint"),
    "bench": ("windowed_attention.bench.cli", "run the side-by-side benchmark"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="windowed-attention", description=__doc__)

    def error(message: str):  # one line on stderr (no usage block), exit code 2
        print(f"{parser.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)

    parser.error = error
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        command = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(command)
        command.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args) or 0


if __name__ == "__main__":
    sys.exit(main())
