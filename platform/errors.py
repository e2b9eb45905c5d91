"""Errors a user can cause or fix, and how command-line entry points show them.

Anything raised as a `UserError` ends a command with its message and exit
code, never a stack trace; everything else is a bug and keeps its traceback.
Exit code 2 means the input itself (a job config, a command-line value) can
never work as given: fix it and run again. Exit code 1 means the input was
fine but something it needs failed or refused (a missing checkpoint, a gate).
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Callable, NoReturn

# What one error message may take: a huge input is cut, not echoed in full.
MAX_LINE = 500
MAX_LINES = 60


class UserError(Exception):
    """A failure with a message that says what to change. Exit code 1."""

    exit_code = 1


class InputError(UserError):
    """The command's input cannot work as given (a config or an argument). Exit code 2."""

    exit_code = 2


def redact(message: str) -> str:
    """`message` with the value of every `secret.key=value` (schema.SECRET_KEYS) replaced by ***."""
    from platform.config.schema import SECRET_KEYS

    keys = "|".join(re.escape(k) for k in sorted(SECRET_KEYS))
    value = r"""(?:'[^']*'|"[^"]*"|[^\s'"]+)"""
    return re.sub(rf"((?:{keys})=){value}", r"\1***", message)


def clip(message: str, max_line: int = MAX_LINE, max_lines: int = MAX_LINES) -> str:
    """`message` cut to a readable size, secrets redacted: long lines and lists are shortened."""
    message = redact(message)
    lines = [line if len(line) <= max_line else f"{line[:max_line]}... ({len(line)} characters)"
             for line in message.splitlines()[:max_lines]]
    extra = len(message.splitlines()) - max_lines
    if extra > 0:
        lines.append(f"  ... and {extra} more lines")
    return "\n".join(lines)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with exit 2 and a clipped message that never repeats a huge argument."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {clip(message, max_line=200)}\n")


def run_cli(main: Callable[[list[str]], int], argv: list[str] | None = None) -> None:
    """Run a CLI `main`, turning user errors into one message and an exit code."""
    try:
        code = main(sys.argv[1:] if argv is None else argv)
    except UserError as exc:
        print(f"error: {clip(str(exc))}", file=sys.stderr)
        code = exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)
