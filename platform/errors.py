"""Errors a user can cause or fix, and how command-line entry points show them.

Anything raised as a `UserError` ends a command with its message and exit
code, never a stack trace; everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from typing import Callable


class UserError(Exception):
    """A failure with a message that says what to change. Exit code 1."""

    exit_code = 1


def run_cli(main: Callable[[list[str]], int], argv: list[str] | None = None) -> None:
    """Run a CLI `main`, turning user errors into one message and an exit code."""
    from platform.config import ConfigError

    try:
        code = main(sys.argv[1:] if argv is None else argv)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 2
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)
