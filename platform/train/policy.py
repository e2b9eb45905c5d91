"""When a worker checkpoints and evaluates: one policy each, and the preemption notice they heed.

Every rank must take the same decision at the same step (a checkpoint and an
evaluation are collectives), so the policies are pure functions of the step
and of a flag all ranks agreed on (`any_rank(watch.pending())`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CheckpointPolicy:
    """Checkpoint every `every_steps`, on a preemption notice, and at the last step."""

    every_steps: int
    total_steps: int

    def should_checkpoint(self, step: int, preempted: bool) -> bool:
        return preempted or step % self.every_steps == 0 or step == self.total_steps


@dataclass(frozen=True)
class EvalPolicy:
    """Evaluate on the held-out split every `every_steps` and at the last step."""

    every_steps: int
    total_steps: int

    def should_evaluate(self, step: int) -> bool:
        return step % self.every_steps == 0 or step == self.total_steps


class PreemptionWatch:
    """Has this node been told it will be reclaimed? Checked once per step.

    The node agent (the IMDS spot watcher on AWS, `platform.provision.preemption
    notify` locally) writes a notice file in the node's directory and signals
    registered workers; Ray Train runs the training loop off the main thread,
    where no signal handler can be installed, so the file is polled: one stat
    per step. Each notice triggers one checkpoint, also across worker restarts
    on the node (the node directory remembers which notice was answered).
    """

    def __init__(self) -> None:
        from platform.provision import preemption

        self._preemption = preemption
        self._notice = None
        preemption.register_worker()

    def pending(self) -> bool:
        self._notice = self._preemption.unhandled_notice()
        return self._notice is not None

    def handled(self) -> None:
        if self._notice is not None:
            self._preemption.mark_handled(self._notice)
        self._notice = None

    def close(self) -> None:
        self._preemption.unregister_worker()
