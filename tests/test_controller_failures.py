"""Which failures restart the whole training run (issue 15): the control plane's, nothing else."""

from __future__ import annotations

import ray.exceptions as rex

from platform.config import ConfigError
from platform.controller.failures import control_plane_failure
from platform.errors import UserError


def test_a_dead_actor_or_an_unreachable_cluster_is_the_control_planes():
    died = rex.ActorDiedError()
    assert control_plane_failure(died).startswith("a Ray actor died: ActorDiedError")
    assert control_plane_failure(rex.RaySystemError("GCS unreachable")).startswith(
        "the Ray cluster failed: RaySystemError")
    assert control_plane_failure(ConnectionError("head gone")) is not None


def test_a_stop_a_config_error_or_failing_workers_are_not():
    assert control_plane_failure(KeyboardInterrupt()) is None
    assert control_plane_failure(UserError("no such bucket")) is None
    assert control_plane_failure(ConfigError(["train.lr: must be finite"], "job.yaml")) is None
    assert control_plane_failure(RuntimeError("worker 1 failed: NaN loss")) is None
