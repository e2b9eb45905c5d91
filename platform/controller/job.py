"""A job's life on the head, as the state machine of platform.controller.state:

    PLANNED -> PROVISIONING -> TRAINING -> PROMOTING -> RELEASING [-> SERVING] -> FINISHED

    Controller(cfg, plan).run()  ->  exit code

`_step` does one state's work and returns the next state; a failure or a stop
goes through RELEASING like a success, so the MLflow run is marked and the
nodes are released in one place, and the final line is said in one place.

It is safe to kill and run again with the same job name: the Terraform state,
the MLflow run and the checkpoints are all keyed by the job name, so a second
submission adopts the nodes, resumes the run and continues from the latest
checkpoint (autoresume).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
import uuid
from typing import NoReturn, Optional

from platform.config import state_dir
from platform.config.schema import JobConfig
from platform.controller.failures import control_plane_failure
from platform.controller.state import (
    FINISHED, FAILED, Ended, Finished, Outcome, Planned, Promoting, Provisioning, Releasing,
    Resources, Serving, State, Training, after_error, after_release,
)
from platform.errors import UserError
from platform.plan import Plan

log = logging.getLogger("platform.controller")

TRAINING_STOP = "stop requested (SIGTERM): tearing the job down; submit it again to resume"
SERVING_STOP = "stop requested (SIGTERM)"


def say(message: str) -> None:
    """Progress for the person at the terminal (stderr keeps --json output clean)."""
    print(message, file=sys.stderr, flush=True)


class Controller:
    def __init__(self, cfg: JobConfig, plan: Plan, *, stop_after_step: Optional[int] = None) -> None:
        self.cfg, self.plan = cfg, plan
        self.stop_after_step = stop_after_step
        self.state: State = Planned()

    def run(self, start: Optional[State] = None) -> int:
        """Step from `start` (a new job: PLANNED) until the job ends; its exit code.

        A failure is raised again after the final line (the command line shows its
        message and exit code), a stop as KeyboardInterrupt; a refused job raises
        before anything starts."""
        _stop_on_sigterm(TRAINING_STOP)
        self.state = start or Planned()
        while not self.state.is_terminal:
            previous = self.state
            try:
                self.state = self._step(previous)
            except (Exception, KeyboardInterrupt) as exc:
                self.state = after_error(previous, exc)
            log.info("job %s: %s -> %s", self.cfg.name, previous.kind.name, self.state.kind.name)
        return self._end(self.state)

    def _step(self, state: State) -> State:
        """Do the work of `state`; the state it leads to."""
        if isinstance(state, Planned):
            return self._plan()
        if isinstance(state, Provisioning):
            return self._provision(state)
        if isinstance(state, Training):
            return self._train(state)
        if isinstance(state, Promoting):
            return self._promote(state)
        if isinstance(state, Releasing):
            return self._release(state)
        if isinstance(state, Serving):
            return self._serve()
        raise ValueError(f"no step from {state!r}")

    # -- the states' work -------------------------------------------------------

    def _plan(self) -> State:
        """Train, or skip to promotion when the job's final step is already checkpointed:
        resubmitting a finished job must not provision a cluster (64 nodes for the 132B
        job) only to load that checkpoint and find nothing left to train."""
        done = self._final_checkpoint()      # may refuse the job, before anything starts
        if done is None:
            return Provisioning()
        say(f"job {self.cfg.name} has already trained all {self.plan.total_steps} steps: its "
            f"checkpoint of step {done.step} is at {done.uri}; nothing to train (a new job name "
            f"trains from scratch)")
        return Promoting(Resources(), Outcome(FINISHED, final_step=done.step,
                                              world_size=done.manifest.world_size,
                                              eval_loss=done.metadata.get("eval_loss")))

    def _final_checkpoint(self):
        """The job's committed checkpoint of its last step, if it has one.

        With checkpoint.resume=false a job that already has checkpoints is refused:
        training from scratch would commit new steps among the old ones, and its
        restarts after a fault would resume from whichever is newest.
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

    def _provision(self, state: Provisioning) -> Training:
        """Data, the Ray cluster, the MLflow run and the nodes, each recorded in
        `state.resources` as soon as it is held."""
        from platform.controller.capacity import CapacityPolicy
        from platform.data.prepare import ensure_prepared
        from platform.provision.nodes import Provisioner

        res, c = state.resources, self.cfg.cluster
        data_path = ensure_prepared(self.cfg, progress=True).path
        address = self._connect(res)
        self._start_tracking(res)
        res.provisioner = Provisioner.for_job(self.cfg, address)
        say(f"provisioning {c.max_nodes} {c.provider} node(s) through Terraform "
            f"({res.provisioner.terraform.workdir})")
        capacity = CapacityPolicy(res.provisioner, c.max_nodes, c.min_nodes, event=res.events.event)
        capacity.acquire()
        live = res.provisioner.wait_for_nodes(c.min_nodes)
        say(f"{len(live)} node(s) joined the Ray cluster: {', '.join(sorted(live))}")
        return Training(res, data_path, capacity, restarts=state.restarts)

    def _connect(self, res: Resources) -> str:
        import ray

        from platform.provision.head import LocalHead, enable_token_auth_in_process

        c = self.cfg.cluster
        if c.ray_address:
            enable_token_auth_in_process()
            address = c.ray_address
        else:
            head = LocalHead(port=c.head_port, dashboard_port=c.dashboard_port)
            os.environ["RAY_ADDRESS"] = head.address
            res.head = head.start()
            address = res.head.address
        # Every process of the job (head, Terraform's nodes, Ray Train's actors)
        # inherits this, so Ray's own address lookups never pick another Ray
        # instance that happens to run on the same host.
        os.environ["RAY_ADDRESS"] = address
        context = ray.init(address=address, log_to_driver=True, configure_logging=False)
        _stop_on_sigterm(TRAINING_STOP)   # again: ray.init installs its own (exit, no teardown)
        dashboard = res.head.dashboard_url if res.head else _with_scheme(context.dashboard_url)
        say(f"Ray cluster: {address}   dashboard: {dashboard}")
        return address

    def _start_tracking(self, res: Resources) -> None:
        from platform.tracking import MetricsLogger, run_url, start_or_resume_run

        if res.events is not None:      # a job restart that provisions again keeps its run
            return
        res.run_id = start_or_resume_run(self.cfg, plan=self.plan.to_json())
        res.events = MetricsLogger(self.cfg, res.run_id)
        say(str(run_url(self.cfg, res.run_id)))

    def _train(self, state: Training) -> State:
        from platform.controller.progress import ProgressBar
        from platform.controller.reconcile import Reconciler
        from platform.train.reservations import refresh_cluster_view
        from platform.train.trainer import run_training

        res = state.resources
        reconciler = Reconciler(state.capacity, event=res.events.event,
                                interval_s=min(10.0, self.cfg.cluster.resize_check_interval_s),
                                on_change=refresh_cluster_view)
        reconciler.start()
        board = f"progress-{self.cfg.name}-{uuid.uuid4().hex[:8]}"
        storage = os.path.join(state_dir(), "ray-train")
        last: dict = {}
        try:
            # The bar starts where the workers resume: a resubmitted or restarted run does
            # not count its checkpointed steps again.
            with ProgressBar(board, self.plan.total_steps, start=self._committed_step()) as bar:
                result = run_training(self.cfg, run_id=res.run_id, data_path=state.data_path,
                                      total_steps=self.plan.total_steps, storage_path=storage,
                                      progress_actor=board, stop_after_step=self.stop_after_step,
                                      env=_worker_env())
            last = bar.last or {}
        except Exception as exc:
            cause = control_plane_failure(exc)
            if cause is None or state.restarts >= self.cfg.train.max_job_restarts:
                raise
            return self._restart(state, cause)
        finally:
            reconciler.stop()
        outcome = self._outcome(FAILED if result.error else FINISHED, last,
                                capacity_failures=state.capacity.failures,
                                error=str(result.error or ""))
        return Promoting(res, outcome) if outcome.status == FINISHED else Releasing(res, outcome)

    def _restart(self, state: Training, cause: str) -> State:
        """Restart the training run after the control plane died, from the latest verified
        checkpoint (the workers resume from it by themselves). On the same cluster when Ray
        still answers; otherwise the job's head and nodes are released and provisioned again."""
        from platform.retry import Backoff

        n, res = state.restarts + 1, state.resources
        step = self._committed_step()
        wait = Backoff(10.0, 120.0).delay(n - 1)
        say(f"the training run's control plane failed ({cause}); restarting it from the "
            f"checkpoint of step {step} in {wait:.0f} s (job restart {n} of "
            f"{self.cfg.train.max_job_restarts})")
        res.events.event("job_restart", step=step, attempt=n, cause=cause)
        time.sleep(wait)
        if _ray_answers():
            return dataclasses.replace(state, restarts=n)
        say("the Ray cluster is gone with it: provisioning the job's cluster again")
        self._release_cluster(res)
        return Provisioning(Resources(run_id=res.run_id, events=res.events), restarts=n)

    def _committed_step(self) -> int:
        from platform.train.checkpointing import open_checkpoints

        steps = open_checkpoints(self.cfg).list_committed()
        return steps[-1] if steps else 0

    def _outcome(self, status: str, board: dict, **fields) -> Outcome:
        """What training came to. The step, workers and eval loss are the latest committed
        checkpoint's when there is one: the truth even when the progress board died on the
        way (its numbers are the fallback, and say what was trained after that checkpoint)."""
        from platform.checkpoint.manifest import Verify
        from platform.train.checkpointing import open_checkpoints

        ckpt, _ = open_checkpoints(self.cfg).latest_valid(verify=Verify.SIZE)
        if ckpt is not None and ckpt.step >= board.get("step", 0):
            return Outcome(status, final_step=ckpt.step, world_size=ckpt.manifest.world_size,
                           eval_loss=ckpt.metadata.get("eval_loss"), **fields)
        return Outcome(status, final_step=board.get("step", 0),
                       world_size=board.get("world_size", 0), eval_loss=board.get("eval_loss"),
                       **fields)

    def _promote(self, state: Promoting) -> Releasing:
        """Register the final checkpoint behind promote.alias, when promote.auto says so."""
        if self.cfg.promote.auto:
            from platform.registry.promotion import promote

            try:
                say(str(promote(self.cfg)))
            except UserError as exc:  # a gate refusal is an answer, not a failed job
                say(f"not promoted: {exc}")
        return Releasing(state.resources, state.outcome)

    def _release(self, state: Releasing) -> State:
        """Mark the MLflow run with the outcome and release the nodes and the Ray head this
        job started (all kept with cluster.keep_cluster=true), whatever the way here."""
        res, keep = state.resources, self.cfg.cluster.keep_cluster
        if res.events is not None:
            res.events.close(timeout=30)
        if res.run_id:
            from platform.tracking import finish_run

            finish_run(self.cfg, res.run_id, state.outcome.status)
        if not keep:
            self._release_cluster(res)
        return after_release(state, serve=self.cfg.serve.start_after_training)

    def _release_cluster(self, res: Resources) -> None:
        """Tear down the job's nodes and stop the Ray head it started."""
        if res.provisioner is not None:
            say("tearing down the job's nodes (cluster.keep_cluster=false)")
            try:
                res.provisioner.down()
            except Exception as exc:
                say(f"warning: teardown failed, nodes may still run: {exc}")
        if res.head is not None and res.head.owned:
            import ray

            ray.shutdown()
            res.head.stop()
            os.environ.pop("RAY_ADDRESS", None)   # set for that head, which is gone

    def _serve(self) -> NoReturn:
        """Serve the promoted model until Ctrl-C or SIGTERM (`after_error` turns that stop
        into FINISHED). Serve runs on the Ray the job is still connected to (a kept cluster,
        or cluster.ray_address), else on a local Ray of its own: the embedded head, CPU-less
        by design, went with the training nodes."""
        from platform.serving.launch import start_serving

        _stop_on_sigterm(SERVING_STOP)
        serving = start_serving(self.cfg)   # on failure, leaves nothing it started behind
        try:
            say(f"OpenAI-compatible endpoint: {serving.base_url}  (Ctrl-C to stop)")
            while True:
                time.sleep(3600)
        finally:
            say("stopping the endpoint")
            serving.shutdown()

    def _end(self, state: Ended) -> int:
        """The final line; then the failure or stop that ended the job, if one did."""
        say(_summary(self.cfg, state.outcome))
        if state.error is not None:
            raise state.error
        return 0 if isinstance(state, Finished) else 1


def _ray_answers(timeout_s: float = 10.0) -> bool:
    """Does the Ray cluster this process is connected to still answer (its head alive)?"""
    import concurrent.futures

    import ray

    if not ray.is_initialized():
        return False
    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        return bool(pool.submit(ray.nodes).result(timeout=timeout_s))
    except Exception:   # GCS unreachable, or no answer in time
        return False
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _with_scheme(url: Optional[str]) -> str:
    if not url:
        return "(no dashboard on this cluster)"
    return url if "://" in url else f"http://{url}"


def _stop_on_sigterm(message: str) -> None:
    """SIGTERM (`platform.stop`, Ray's job supervisor, a scheduler) ends the job like Ctrl-C,
    after saying `message`: the nodes are torn down and the MLflow run is marked KILLED
    instead of being left behind (while serving, the endpoint stops and the job finishes).
    The latest checkpoint stays, so submitting the job again resumes it."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return

    def interrupt(signum, _frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)   # a second one must not cut the teardown
        say(message)
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
