"""The one exception the data layer raises for problems a user can fix."""

from __future__ import annotations

from platform.errors import UserError


class DataError(UserError):
    """A data problem a user can fix: a missing path, an empty or unreadable source, bad weights.

    `str()` is the whole message shown to users. It names the source (and the file where
    there is one), so `platform.errors.run_cli` prints it without a stack trace. The
    message is kept apart from `args` because Ray appends retry advice to the args of
    exceptions raised in Ray Data tasks.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message
