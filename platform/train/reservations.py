"""Ray Train's cluster reservations: refresh them when nodes change, release a dead run's.

Ray Train (2.5x/2.6x) sizes an elastic worker group from what Ray's
AutoscalingCoordinator actor (a detached actor on the head, from
`ray.data._internal.cluster_autoscaler`) has reserved for the run, under the
requester id "train-<Ray Train run id>". Two consequences for the platform:

* The coordinator re-reads the node table every 20 s. Right after a node dies
  its view still counts the node, so a restart asks for a worker that cannot be
  placed; after a node joins, growth waits for the next refresh.
  `refresh_cluster_view` asks it to recompute now; the controller calls it when
  the live nodes change.
* A reservation outlives a killed driver for 180 s (its expiry). A resubmitted
  job on the same cluster would see every node reserved by its dead
  predecessor and wait. The run's id is recorded when its controller starts
  (`recorder`), and the next submission of the job releases that reservation
  (`release_previous`) before it starts training.

These reach into Ray internals, so each is best effort: where the actor or the
API is missing they do nothing and Ray Train falls back to its own timing.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger("platform.train")

_COORDINATOR = ("AutoscalingCoordinator", "AutoscalingCoordinator")   # actor name, namespace


def _coordinator():
    """The coordinator actor, or None before Ray Train has created one."""
    import ray

    try:
        return ray.get_actor(_COORDINATOR[0], namespace=_COORDINATOR[1])
    except ValueError:
        return None


def refresh_cluster_view() -> None:
    """Make Ray Train see the cluster's current nodes now, not at its next 20 s refresh."""
    import ray

    try:
        coordinator = _coordinator()
        if coordinator is not None:
            ray.get(coordinator.get_reserved_resources.remote("dbrx-platform-controller",
                                                              recompute=True), timeout=30)
    except Exception as exc:  # a Ray without this API, or a busy actor: Ray Train refreshes itself
        log.warning("could not refresh Ray Train's view of the cluster (%s); it refreshes "
                    "on its own within about 20 s", exc)


def recorder(path: str) -> list:
    """Ray Train callbacks that write the run's id to `path` when its controller starts
    (none where this Ray has no controller callbacks)."""
    try:
        from ray.train.v2._internal.execution.callback import ControllerCallback
    except ImportError:
        return []

    class RunIdRecorder(ControllerCallback):
        def after_controller_start(self, train_run_context) -> None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(train_run_context.run_id)

    return [RunIdRecorder()]


def release_previous(path: str) -> None:
    """Release the reservation of the job's previous Ray Train run recorded at `path`.

    One controller runs a job at a time (its Terraform state is locked), so a
    recorded run that is not this one is a dead predecessor's.
    """
    import ray

    try:
        run_id = Path(path).read_text().strip()
    except FileNotFoundError:
        return
    try:
        coordinator = _coordinator()
        if coordinator is not None and run_id:
            ray.get(coordinator.cancel_request.remote(f"train-{run_id}"), timeout=30)
            log.info("released the cluster reservation of this job's previous Ray Train run %s",
                     run_id)
    except Exception as exc:
        log.warning("could not release the previous run's reservation (%s); Ray Train may "
                    "wait up to 3 minutes for it to expire", exc)
    finally:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
