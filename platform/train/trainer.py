"""Launch the job's training as a Ray Train (V2) TorchTrainer.

Ray Train owns the worker group: it places one worker per GPU (one per
`node_slot` on CPU clusters), restarts the group after failures up to
`train.max_failures`, and, with `num_workers=(min, max)`, restarts it at a
new size when nodes come or go. Every (re)start runs `train_worker`, which
resumes from the latest checkpoint with the layout of the new size.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Dict, Optional

from ray.train import UserCallback

from platform.config.schema import JobConfig
from platform.layout import allowed_layouts
from platform.train import reservations
from platform.train.worker import WorkerArgs, train_worker

log = logging.getLogger("platform.train")


def _entry(config: Dict[str, Any]) -> None:
    train_worker(config["args"])


class RestartRecorder(UserCallback):
    """Records each worker-group failure (rank -> cause) in the job's MLflow run.

    Runs in the Ray Train controller, which sees the failures the workers
    cannot report themselves (a SIGKILLed worker never gets to log).
    """

    def __init__(self, cfg: JobConfig, run_id: Optional[str]) -> None:
        self.cfg, self.run_id, self._logger = cfg, run_id, None

    def after_exception(self, run_context, worker_exceptions) -> None:
        causes = "; ".join(f"rank {r}: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
                           for r, e in sorted(worker_exceptions.items()))
        log.warning("training workers failed (%s); Ray Train restarts them from the latest "
                    "checkpoint", causes)
        if not self.run_id:
            return
        if self._logger is None:
            from platform.tracking import MetricsLogger

            self._logger = MetricsLogger(self.cfg, self.run_id)
        self._logger.event("restart", cause=causes)
        self._logger.flush(timeout=10)


def worker_count_range(cfg: JobConfig) -> tuple[int, int]:
    allowed = allowed_layouts(cfg)[0]
    return allowed[0].world_size, allowed[-1].world_size


def run_training(cfg: JobConfig, *, run_id: Optional[str], data_path: str, total_steps: int,
                 storage_path: str, progress_actor: Optional[str] = None,
                 stop_after_step: Optional[int] = None, env: Optional[Dict[str, str]] = None):
    """Run training to the end (blocking); returns Ray Train's Result."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    c = cfg.cluster
    # Read by Ray Train's controller (propagated from this process): a worker group that
    # cannot be placed in time is given up and sized again from the live nodes.
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(c.worker_start_timeout_s)
    # Ray Train's preemption watcher (an actor per worker group) reads node drains issued through
    # Ray's own autoscaler; this platform's nodes come from Terraform and announce preemption by
    # the provider's notice (platform.provision.preemption), so it would watch for nothing.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    lo, hi = worker_count_range(cfg)
    resources: Dict[str, float] = {"CPU": c.cpus_per_worker}
    if c.gpus_per_node == 0:
        resources["node_slot"] = 1  # one worker per provisioned node
    scaling = ray.train.ScalingConfig(
        num_workers=(lo, hi) if lo != hi else hi,
        use_gpu=c.gpus_per_node > 0,
        resources_per_worker=resources,
        elastic_resize_monitor_interval_s=c.resize_check_interval_s,
    )
    args = WorkerArgs(cfg=cfg, run_id=run_id, data_path=data_path, total_steps=total_steps,
                      progress_actor=progress_actor, stop_after_step=stop_after_step)
    run_file = os.path.join(storage_path, f".{cfg.name}.ray-train-run")
    reservations.release_previous(run_file)
    trainer = TorchTrainer(
        _entry,
        train_loop_config={"args": args},
        scaling_config=scaling,
        torch_config=TorchConfig(backend="nccl" if c.gpus_per_node else "gloo"),
        run_config=ray.train.RunConfig(
            name=cfg.name,
            storage_path=storage_path,
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            callbacks=[RestartRecorder(cfg, run_id), *reservations.recorder(run_file)],
            worker_runtime_env={"env_vars": dict(env or {})},
            # Ray Train's INFO lines repeat every resize check; warnings still show.
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
    )
    return trainer.fit()
