"""Checkpoint errors: each says which checkpoint and what went wrong."""


class CheckpointError(Exception):
    """A checkpoint operation failed."""


class CheckpointNotFoundError(CheckpointError):
    """No committed checkpoint at the requested step."""


class CheckpointCorruptError(CheckpointError):
    """A committed checkpoint does not match its manifest (or has no readable one).

    `step` and `reason` are kept apart so callers can report skipped
    checkpoints as (step, reason) pairs.
    """

    def __init__(self, step: int, reason: str):
        self.step = step
        self.reason = reason
        super().__init__(f"checkpoint step {step} is unusable: {reason}")


class CheckpointCommitError(CheckpointError):
    """A commit was refused; nothing became visible."""
