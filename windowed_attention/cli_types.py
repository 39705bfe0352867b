"""What every command of the command line shares: checked number types, the parser, the error line.

A user's mistake never shows a traceback: a bad flag value, a bad file or a full disk is one line on
stderr, `<command>: error: <what and why>`, and exit code 2. Numbers are checked where they are parsed:
finite (no `inf`, no `nan`) and within the flag's range.
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import sys

# Nothing here imports torch (nor anything that does): the command line loads this before it handles Ctrl-C.
from .extras import MissingExtra

INT64_MAX = 2**63 - 1


class Parser(argparse.ArgumentParser):
    """`argparse.ArgumentParser` whose errors are one line (no usage block); subcommand parsers inherit it."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")

    def run(self, argv: list[str] | None = None) -> int:
        """Parse `argv` and run the chosen command (`args.run`); the exit code, also for a bad flag (2)
        or `--help` (0), so that in-process callers get a code instead of `SystemExit`. Ctrl-C anywhere in
        a command is one line and 130; a closed stdout ends quietly."""
        tolerant_console()
        try:
            args = self.parse_args(argv)
        except SystemExit as exit:
            return exit.code if isinstance(exit.code, int) else 2
        return guarded(args.command if getattr(args, "command", None) else self.prog.split()[-1],
                       lambda: args.run(args))


def guarded(command: str, body) -> int:
    """`body()`'s exit code; Ctrl-C (or SIGTERM's `Interrupted`) is one line and 130 (143), a closed
    stdout ends the command quietly (what was written stays written), a missing extra is the command's
    one-line error naming it (2)."""
    try:
        return body() or 0
    except MissingExtra as error:
        say(sys.stderr, f"{_name(command)}: error: {error}\n")
        return 2
    except Interrupted as stop:
        say(sys.stderr, f"{_name(command)}: {stop.message or 'interrupted'}\n")
        return stop.code
    except KeyboardInterrupt:
        say(sys.stderr, f"{_name(command)}: interrupted\n")
        return 130
    except BrokenPipeError:
        silence(sys.stdout)
        return 0


def _name(command: str) -> str:
    return f"windowed-attention {command}" if command else "windowed-attention"


class Interrupted(KeyboardInterrupt):
    """A run ended by a signal before it could finish: `message` (one line) and the exit `code`
    (130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, message: str = "", code: int = 130):
        super().__init__(message)
        self.message, self.code = message, code


def tolerant_console() -> None:
    """stdout and stderr write what their encoding cannot show as backslash escapes instead of raising
    (an ASCII or Latin-1 console never ends a command)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            if getattr(stream, "errors", "strict") == "strict":
                stream.reconfigure(errors="backslashreplace")
        except (AttributeError, ValueError, OSError):
            pass


def silence(stream) -> None:
    """Point `stream`'s descriptor at the null device: a closed pipe (the reader quit) swallows the rest of
    the output, including what is still buffered and Python's flush at exit."""
    try:
        fd = stream.fileno()
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, fd)
        os.close(null)
    except (AttributeError, ValueError, OSError):
        pass


def say(stream, text: str) -> bool:
    """Write `text` to `stream` and flush, whatever happens: characters its encoding cannot show become
    backslash escapes, and a closed pipe silences the stream for good (False) instead of raising."""
    try:
        try:
            stream.write(text)
        except UnicodeEncodeError:
            encoding = getattr(stream, "encoding", None) or "ascii"
            stream.write(text.encode(encoding, "backslashreplace").decode(encoding))
        stream.flush()
        return True
    except BrokenPipeError:
        silence(stream)
        return False
    except OSError as error:
        if error.errno in (errno.EPIPE, errno.EINVAL):
            silence(stream)
            return False
        raise
    except ValueError:  # a closed file object
        return False


def integer(minimum: int = 0, maximum: int = INT64_MAX):
    """An argparse type: an int in `[minimum, maximum]`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not minimum <= value <= maximum:
            bound = f">= {minimum}" if maximum == INT64_MAX else f"in [{minimum}, {maximum}]"
            raise argparse.ArgumentTypeError(f"expected an integer {bound}, got {value}")
        return value

    return parse


def real(minimum: float = -math.inf, maximum: float = math.inf, *, exclusive_minimum: bool = False):
    """An argparse type: a finite float in `[minimum, maximum]` (`(minimum, maximum]` when exclusive)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        low_ok = value > minimum if exclusive_minimum else value >= minimum
        if not (math.isfinite(value) and low_ok and value <= maximum):
            parts = [f"> {minimum:g}" if exclusive_minimum else f">= {minimum:g}"] if minimum > -math.inf else []
            parts += [f"<= {maximum:g}"] if maximum < math.inf else []
            bound = " " + " and ".join(parts) if parts else ""
            raise argparse.ArgumentTypeError(f"expected a finite number{bound}, got {text}")
        return value

    return parse


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on every platform
        return os.cpu_count() or 1


def threads(text: str) -> int:
    """An argparse type: a CPU thread count, 0 (torch's choice) up to the CPUs this process may use."""
    return integer(0, available_cpus())(text)


def is_out_of_memory(error: BaseException) -> bool:
    """An allocation that failed: sizes (batch, length, width, window) too large for this machine."""
    import torch

    return isinstance(error, (MemoryError, torch.OutOfMemoryError)) or (
        isinstance(error, RuntimeError) and "can't allocate memory" in str(error)
    )


def describe(error: BaseException) -> str:
    """One line saying what went wrong."""
    if isinstance(error, OSError) and error.strerror:
        where = f": {error.filename}" if error.filename else ""
        return f"{error.strerror}{where}"
    if is_out_of_memory(error):
        return "out of memory (a size flag such as --batch-size, --seq-len, --dim or --window-size is too large " \
               "for this machine)"
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 400 else text[:397] + "..."


def fail(command: str, error: BaseException) -> int:
    """Print `error` as the command's one-line error on stderr; returns the exit code 2."""
    print(f"windowed-attention {command}: error: {describe(error)}", file=sys.stderr)
    return 2
