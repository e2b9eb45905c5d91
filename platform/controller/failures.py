"""Which failures of a training run are the control plane's, and so worth a job-level restart.

Ray Train restarts its workers itself (train.max_failures). What it cannot
survive is the death of what drives it: its TrainController actor (Ray's
out-of-memory killer picks it like any other process), the driver's own
actors, or the Ray head. The training state is safe in the latest verified
checkpoint, so the job restarts the run from there (train.max_job_restarts).
A user's stop, a config error and workers failing past max_failures are not
the control plane's and end the job as before.
"""

from __future__ import annotations

from typing import Optional

from platform.errors import UserError


def control_plane_failure(error: BaseException) -> Optional[str]:
    """The cause, in a few words, when `error` says part of Ray's control plane died;
    None for every other failure."""
    import ray.exceptions as rex

    if isinstance(error, (KeyboardInterrupt, UserError)):
        return None
    if isinstance(error, rex.RayActorError):          # ActorDiedError, ActorUnavailableError
        return f"a Ray actor died: {_first_line(error)}"
    if isinstance(error, (rex.RaySystemError, rex.NodeDiedError, rex.ObjectLostError,
                          rex.OwnerDiedError, rex.RpcError, ConnectionError)):
        return f"the Ray cluster failed: {_first_line(error)}"
    return None


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200] if text else ''}"
