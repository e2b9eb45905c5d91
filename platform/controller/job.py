"""A job's life on the head: prepare data, provision, train, reconcile, tear down.

    Controller(cfg, plan).run()  ->  exit code

It is safe to kill and run again with the same job name: the Terraform state,
the MLflow run and the checkpoints are all keyed by the job name, so a second
submission adopts the nodes, resumes the run and continues from the latest
checkpoint (autoresume).
"""

from __future__ import annotations

import logging
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Optional

from platform.config import state_dir
from platform.config.schema import JobConfig
from platform.errors import UserError
from platform.plan import Plan

log = logging.getLogger("platform.controller")


def say(message: str) -> None:
    """Progress for the person at the terminal (stderr keeps --json output clean)."""
    print(message, file=sys.stderr, flush=True)


@dataclass
class Outcome:
    status: str                      # FINISHED | FAILED | KILLED
    final_step: int = 0
    world_size: int = 0
    eval_loss: Optional[float] = None
    capacity_failures: list[str] = field(default_factory=list)
    error: str = ""


class Controller:
    def __init__(self, cfg: JobConfig, plan: Plan, *, stop_after_step: Optional[int] = None) -> None:
        self.cfg, self.plan = cfg, plan
        self.stop_after_step = stop_after_step
        self.head = None
        self.provisioner = None
        self.run_id: Optional[str] = None
        self.events = None

    # -- the steps of a job ----------------------------------------------------

    def run(self) -> int:
        done = self._final_checkpoint()      # may refuse the job, before anything starts
        outcome = Outcome(status="FAILED")
        _stop_on_sigterm()
        try:
            if done is not None:
                outcome = self._already_trained(done)
                return 0
            data_path = self._prepare_data()
            self._connect()
            self._start_tracking()
            self._provision()
            outcome = self._train(data_path)
        except KeyboardInterrupt:
            outcome = Outcome(status="KILLED", error="interrupted")
            raise
        finally:
            self._finish(outcome)
        return 0 if outcome.status == "FINISHED" else 1

    def _final_checkpoint(self):
        """The job's committed checkpoint of its last step, if it has one.

        Resubmitting a job that has finished must not provision a cluster (64 nodes for
        the 132B job) only to load that checkpoint and find nothing left to train. With
        checkpoint.resume=false a job that already has checkpoints is refused: training
        from scratch would commit new steps among the old ones, and its restarts after a
        fault would resume from whichever is newest.
        """
        from platform.checkpoint.manifest import Verify
        from platform.train.checkpointing import open_checkpoints

        store = open_checkpoints(self.cfg)
        steps = store.list_committed()
        if not self.cfg.checkpoint.resume:
            if steps:
                raise UserError(f"job {self.cfg.name!r} already has checkpoints (steps {steps[0]}.."
                                f"{steps[-1]}) at {store.root.uri} and checkpoint.resume=false: "
                                f"give the job a new name to train from scratch, or drop the "
                                f"override to resume from step {steps[-1]}")
            return None
        # The checkpoint the workers would resume from (a damaged final one is skipped, as
        # they skip it), checked by size only: a full check reads every byte.
        ckpt, _ = store.latest_valid(verify=Verify.SIZE)
        return ckpt if ckpt is not None and ckpt.step >= self.plan.total_steps else None

    def _already_trained(self, ckpt) -> Outcome:
        say(f"job {self.cfg.name} has already trained all {self.plan.total_steps} steps: its "
            f"checkpoint of step {ckpt.step} is at {ckpt.uri}; nothing to train (a new job name "
            f"trains from scratch)")
        if self.cfg.serve.start_after_training:
            self._connect()
        self._after_training()
        return Outcome(status="FINISHED", final_step=ckpt.step, world_size=ckpt.manifest.world_size,
                       eval_loss=ckpt.metadata.get("eval_loss"))

    def _prepare_data(self) -> str:
        from platform.data.prepare import ensure_prepared

        prepared = ensure_prepared(self.cfg, progress=True)
        return prepared.path

    def _connect(self) -> None:
        import ray

        from platform.provision.head import LocalHead, enable_token_auth_in_process

        c = self.cfg.cluster
        if c.ray_address:
            enable_token_auth_in_process()
            address = c.ray_address
        else:
            head = LocalHead(port=c.head_port, dashboard_port=c.dashboard_port)
            os.environ["RAY_ADDRESS"] = head.address
            self.head = head.start()
            address = self.head.address
        # Every process of the job (head, Terraform's nodes, Ray Train's actors)
        # inherits this, so Ray's own address lookups never pick another Ray
        # instance that happens to run on the same host.
        os.environ["RAY_ADDRESS"] = address
        context = ray.init(address=address, log_to_driver=True, configure_logging=False)
        _stop_on_sigterm()   # again: ray.init installs a SIGTERM handler of its own (exit, no teardown)
        self.address = address
        dashboard = self.head.dashboard_url if self.head else _with_scheme(context.dashboard_url)
        say(f"Ray cluster: {address}   dashboard: {dashboard}")

    def _start_tracking(self) -> None:
        from platform.tracking import MetricsLogger, run_url, start_or_resume_run

        self.run_id = start_or_resume_run(self.cfg, plan=self.plan.to_json())
        self.events = MetricsLogger(self.cfg, self.run_id)
        say(str(run_url(self.cfg, self.run_id)))

    def _event(self, name: str, **details) -> None:
        if self.events is not None:
            self.events.event(name, **details)

    def _provision(self) -> None:
        from platform.provision.errors import ProvisionError
        from platform.provision.nodes import Provisioner

        c = self.cfg.cluster
        self.provisioner = Provisioner.for_job(self.cfg, self.address)
        say(f"provisioning {c.max_nodes} {c.provider} node(s) through Terraform "
            f"({self.provisioner.terraform.workdir})")
        self.capacity_failures: list[str] = []
        try:
            self.provisioner.up(c.max_nodes)
        except ProvisionError as exc:
            # Take what we can get: fall back node by node down to the minimum.
            self.capacity_failures.append(str(exc).splitlines()[0][:300])
            self._event("capacity_short", detail=self.capacity_failures[-1])
            self._provision_at_least(c.min_nodes)
        live = self.provisioner.wait_for_nodes(c.min_nodes)
        say(f"{len(live)} node(s) joined the Ray cluster: {', '.join(sorted(live))}")

    def _provision_at_least(self, minimum: int) -> None:
        from platform.provision.errors import ProvisionError

        for n in range(self.cfg.cluster.max_nodes - 1, minimum - 1, -1):
            try:
                self.provisioner.scale_to(n)
                return
            except ProvisionError as exc:
                last = exc
        raise UserError(f"could not provision even cluster.min_nodes={minimum} node(s): "
                        f"{last}") from None

    def _train(self, data_path: str) -> Outcome:
        from platform.controller.progress import ProgressBar
        from platform.controller.reconcile import Reconciler
        from platform.train.reservations import refresh_cluster_view
        from platform.train.trainer import run_training

        c = self.cfg.cluster
        reconciler = Reconciler(self.provisioner, c.max_nodes, c.min_nodes, event=self._event,
                                interval_s=min(10.0, c.resize_check_interval_s),
                                on_change=refresh_cluster_view)
        reconciler.capacity.failures.extend(self.capacity_failures)
        reconciler.start()
        board = f"progress-{self.cfg.name}-{uuid.uuid4().hex[:8]}"
        storage = os.path.join(state_dir(), "ray-train")
        try:
            with ProgressBar(board, self.plan.total_steps) as bar:
                result = run_training(self.cfg, run_id=self.run_id, data_path=data_path,
                                      total_steps=self.plan.total_steps, storage_path=storage,
                                      progress_actor=board, stop_after_step=self.stop_after_step,
                                      env=_worker_env())
            last = bar.last or {}
        finally:
            reconciler.stop()
        outcome = Outcome(status="FAILED" if result.error else "FINISHED",
                          final_step=last.get("step", 0), world_size=last.get("world_size", 0),
                          eval_loss=last.get("eval_loss"),
                          capacity_failures=reconciler.capacity.failures,
                          error=str(result.error or ""))
        if outcome.status == "FINISHED":
            self._after_training()
        return outcome

    def _after_training(self) -> None:
        """Promote the final checkpoint and start serving it, when the config says so."""
        if self.cfg.promote.auto:
            from platform.registry.promotion import promote

            try:
                say(str(promote(self.cfg)))
            except UserError as exc:  # a gate refusal is an answer, not a failed job
                say(f"not promoted: {exc}")
        if self.cfg.serve.start_after_training:
            from platform.serving.launch import start_serving

            serving = start_serving(self.cfg)
            say(f"OpenAI-compatible endpoint: {serving.base_url}  (Ctrl-C to stop)")
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                serving.stop()

    def _finish(self, outcome: Outcome) -> None:
        from platform.tracking import finish_run

        if self.events is not None:
            self.events.close(timeout=30)
        if self.run_id:
            finish_run(self.cfg, self.run_id, outcome.status)
        if self.provisioner is not None and not self.cfg.cluster.keep_cluster:
            say("tearing down the job's nodes (cluster.keep_cluster=false)")
            try:
                self.provisioner.down()
            except Exception as exc:
                say(f"warning: teardown failed, nodes may still run: {exc}")
        if self.head is not None and self.head.owned and not self.cfg.cluster.keep_cluster:
            import ray

            ray.shutdown()
            self.head.stop()
        say(_summary(self.cfg, outcome))


def _with_scheme(url: Optional[str]) -> str:
    if not url:
        return "(no dashboard on this cluster)"
    return url if "://" in url else f"http://{url}"


def _stop_on_sigterm() -> None:
    """SIGTERM (`platform.stop`, Ray's job supervisor, a scheduler) ends the job like Ctrl-C:
    the nodes are torn down and the MLflow run is marked KILLED instead of being left behind.
    The latest checkpoint stays, so submitting the job again resumes it."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return

    def interrupt(signum, _frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)   # a second one must not cut the teardown
        say("stop requested (SIGTERM): tearing the job down; submit it again to resume")
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def _worker_env() -> dict[str, str]:
    """Environment of the training workers: thread caps, DeepSpeed's build cache, auth."""
    env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "TOKENIZERS_PARALLELISM": "false"}
    for key in ("TORCH_EXTENSIONS_DIR", "DBRX_PLATFORM_HOME", "AWS_ENDPOINT_URL_S3",
                "AWS_ENDPOINT_URL", "MLFLOW_TRACKING_URI"):
        if os.environ.get(key):
            env[key] = os.environ[key]
    return env


def _summary(cfg: JobConfig, outcome: Outcome) -> str:
    lines = [f"job {cfg.name}: {outcome.status.lower()} at step {outcome.final_step}"
             + (f" on {outcome.world_size} worker(s)" if outcome.world_size else "")
             + (f", eval loss {outcome.eval_loss:.4f}" if outcome.eval_loss is not None else "")]
    if outcome.capacity_failures:
        lines.append(f"capacity was short: {len(outcome.capacity_failures)} provisioning "
                     f"attempt(s) failed; first: {outcome.capacity_failures[0]}")
    if outcome.error:
        lines.append(f"error: {outcome.error.splitlines()[0][:500]}")
    return "\n".join(lines)
