"""The `windowed-attention` command: parses arguments and hands them to the subcommand's module."""

from __future__ import annotations

import importlib
import sys

from .cli_types import Parser, guarded  # torch-free: Ctrl-C is handled before torch loads

# subcommand -> (module with add_arguments(parser) and run(args) -> int, one-line help)
COMMANDS = {
    "train": ("windowed_attention.training.cli", "train a byte-level language model"),
    "generate": ("windowed_attention.generation.cli", "generate text from a trained checkpoint"),
    "bench": ("windowed_attention.bench.cli", "run the side-by-side benchmark"),
}


def build_parser() -> Parser:
    parser = Parser(prog="windowed-attention", description=__doc__)  # one-line errors, subcommands too
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        command = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(command)
        command.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    # the subcommands' imports (torch) take seconds: a Ctrl-C then is one line too. Nothing imported before
    # this point loads torch (the package's names are lazy), so no Ctrl-C can end in a traceback there.
    try:
        parser = build_parser()
    except KeyboardInterrupt:
        return guarded("", _raise_interrupt)
    return parser.run(argv)


def _raise_interrupt():
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
