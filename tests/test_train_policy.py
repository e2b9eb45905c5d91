"""When a worker checkpoints and evaluates: the same answer on every rank for the same step."""

from __future__ import annotations

from platform.train.policy import CheckpointPolicy, EvalPolicy


def test_checkpoints_every_n_steps_on_a_notice_and_at_the_end():
    policy = CheckpointPolicy(every_steps=4, total_steps=10)
    assert [s for s in range(1, 11) if policy.should_checkpoint(s, preempted=False)] == [4, 8, 10]
    assert policy.should_checkpoint(5, preempted=True)          # within the step of the notice


def test_evaluates_every_n_steps_and_at_the_end():
    policy = EvalPolicy(every_steps=3, total_steps=7)
    assert [s for s in range(1, 8) if policy.should_evaluate(s)] == [3, 6, 7]
