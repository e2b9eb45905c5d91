"""A job's states, the data each carries, and where a failure or a stop leads.

Modelled on Ray Train V2's controller: an enum of states, one small class per
state holding what that state needs, and one step function that moves between
them (`platform.controller.job.Controller`):

    PLANNED       -> PROVISIONING, or PROMOTING when the final step is already checkpointed
    PROVISIONING  -> TRAINING
    TRAINING      -> PROMOTING when training finished, else RELEASING; after a death of the
                     control plane (platform.controller.failures) TRAINING again, or
                     PROVISIONING when the Ray head went with it, up to train.max_job_restarts
    PROMOTING     -> RELEASING
    RELEASING     -> SERVING (training finished and serve.start_after_training),
                     else FINISHED, FAILED or STOPPED
    SERVING       -> FINISHED on Ctrl-C or SIGTERM, FAILED if the endpoint cannot start

A failure or a stop (Ctrl-C, SIGTERM) in PROVISIONING, TRAINING or PROMOTING
leads to RELEASING too (`after_error`): it is where every way out of a job
meets, marking the MLflow run (FINISHED, FAILED or KILLED) and releasing the
nodes and the Ray head the job started, however far it got. SERVING comes
only after it, so the model is served with the run FINISHED and the training
nodes gone.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, ClassVar, Optional

if TYPE_CHECKING:
    from platform.controller.capacity import CapacityPolicy
    from platform.provision.head import LocalHead
    from platform.provision.nodes import Provisioner
    from platform.tracking import MetricsLogger

# MLflow's end statuses of a run, which the job's outcome carries.
FINISHED, FAILED, KILLED = "FINISHED", "FAILED", "KILLED"


class JobState(Enum):
    PLANNED = "planned"              # nothing started: is there anything to train?
    PROVISIONING = "provisioning"    # data, Ray, the MLflow run, the nodes
    TRAINING = "training"
    PROMOTING = "promoting"
    RELEASING = "releasing"          # the run's status to MLflow; nodes (and our head) released
    SERVING = "serving"              # the promoted model, until Ctrl-C or SIGTERM
    FINISHED = "finished"
    FAILED = "failed"
    STOPPED = "stopped"

    @property
    def is_terminal(self) -> bool:
        return self in (JobState.FINISHED, JobState.FAILED, JobState.STOPPED)


@dataclass
class Resources:
    """What the job holds, filled in as it acquires each part, so that releasing frees
    exactly that, however far the job got before it failed or was stopped."""

    head: Optional["LocalHead"] = None           # the Ray head, when the job started or found it
    run_id: Optional[str] = None                 # the job's MLflow run
    events: Optional["MetricsLogger"] = None     # its event and metric logger
    provisioner: Optional["Provisioner"] = None  # the job's Terraform nodes


@dataclass(frozen=True)
class Outcome:
    """What training came to: the MLflow run's status and the job's final line."""

    status: str                      # FINISHED | FAILED | KILLED
    final_step: int = 0
    world_size: int = 0
    eval_loss: Optional[float] = None
    capacity_failures: list[str] = field(default_factory=list)
    error: str = ""


@dataclass(frozen=True)
class State:
    kind: ClassVar[JobState]

    @property
    def is_terminal(self) -> bool:
        return self.kind.is_terminal


@dataclass(frozen=True)
class Planned(State):
    kind = JobState.PLANNED


@dataclass(frozen=True)
class Provisioning(State):
    kind = JobState.PROVISIONING
    resources: Resources = field(default_factory=Resources)
    restarts: int = 0                        # job-level restarts so far


@dataclass(frozen=True)
class Training(State):
    kind = JobState.TRAINING
    resources: Resources
    data_path: str
    capacity: "CapacityPolicy"
    restarts: int = 0                        # job-level restarts so far


@dataclass(frozen=True)
class Promoting(State):
    kind = JobState.PROMOTING
    resources: Resources
    outcome: Outcome


@dataclass(frozen=True)
class Releasing(State):
    kind = JobState.RELEASING
    resources: Resources
    outcome: Outcome
    error: Optional[BaseException] = None   # raised again once the job has ended


@dataclass(frozen=True)
class Serving(State):
    kind = JobState.SERVING
    outcome: Outcome


@dataclass(frozen=True)
class Ended(State):
    """A terminal state: the final line comes from `outcome`; `error`, if any, is raised
    again afterwards, so the command line shows its message and exit code."""

    outcome: Outcome
    error: Optional[BaseException] = None


@dataclass(frozen=True)
class Finished(Ended):
    kind = JobState.FINISHED


@dataclass(frozen=True)
class Failed(Ended):
    kind = JobState.FAILED


@dataclass(frozen=True)
class Stopped(Ended):
    kind = JobState.STOPPED


def after_release(state: Releasing, serve: bool) -> State:
    """Where the job goes once its run is marked and its nodes are released."""
    if state.error is not None:
        return _ended(state.outcome, state.error)
    if state.outcome.status != FINISHED:
        return Failed(state.outcome)
    return Serving(state.outcome) if serve else Finished(state.outcome)


def after_error(state: State, error: BaseException) -> State:
    """Where a failure (an exception) or a stop (KeyboardInterrupt: Ctrl-C, SIGTERM) in
    `state` leads. In PLANNED nothing has started, so the error itself is the answer
    (a refused job) and is raised at once."""
    stopped = isinstance(error, KeyboardInterrupt)
    if isinstance(state, Planned):
        raise error
    if isinstance(state, Serving):      # serving runs until stopped: that is its normal end
        return Finished(state.outcome) if stopped else Failed(state.outcome, error)
    if isinstance(state, Releasing):    # release once; the job ends with its first error
        return _ended(state.outcome, state.error or error)
    so_far = state.outcome if isinstance(state, Promoting) else Outcome(FAILED)
    outcome = dataclasses.replace(so_far, status=KILLED if stopped else FAILED,
                                  error="interrupted" if stopped else "")
    return Releasing(state.resources, outcome, error)


def _ended(outcome: Outcome, error: BaseException) -> Ended:
    return Stopped(outcome, error) if isinstance(error, KeyboardInterrupt) else Failed(outcome, error)
