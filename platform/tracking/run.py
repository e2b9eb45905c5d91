"""One MLflow run per job, whatever happens to the job's processes.

A job is restarted many times: Ray Train restarts its workers after a node
loss, and a user resubmits the same job file after the driver died. Each time
training carries on from the last checkpoint, so its metrics must carry on in
the same MLflow run. `start_or_resume_run` finds the job's run by the
`dbrx.job_name` tag (the newest one not FINISHED) or creates it, and records
what the run is: the resolved config as params and `config.yaml` (secrets
masked), the plan as `plan.json`, and the code version. Call it once per
submission on the driver and hand the run id to rank 0's `MetricsLogger`.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import shlex
import subprocess
import time
from typing import Any, Callable, Mapping, NamedTuple, Optional, TypeVar

from platform.config import JobConfig, flatten, to_dict
from platform.errors import UserError
from platform.retry import Backoff
from platform.tracking.redact import Redactor
from platform.tracking.store import (
    Store, client as make_client, display_uri, is_transient, resolve, short_error,
)

log = logging.getLogger("platform.tracking")

JOB_TAG = "dbrx.job_name"
CODE_VERSION_TAG = "dbrx.code_version"
CONFIG_CHANGED_TAG = "dbrx.config_changed"
SUPERSEDED_TAG = "dbrx.superseded_by"
# MLflow 3's UI opens an experiment of this kind in its model-training view (charts of
# metrics), not in the GenAI view it guesses for untagged ones (traces, "Evaluations").
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
FINISHED = "FINISHED"
END_STATUSES = ("FINISHED", "FAILED", "KILLED")

# MLflow's limits (mlflow.utils.validation): longer values are refused, not cut.
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000
PARAMS_PER_BATCH = 100

T = TypeVar("T")


class TrackingError(UserError):
    """MLflow cannot record this job; the message says what to change."""


# --- what the run records -----------------------------------------------------------

def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _expand_lists(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Lists of mappings (data sources, curriculum stages) as `key.<i>.field` params."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for i, item in enumerate(value):
                out.update(_expand_lists(flatten(item, f"{key}.{i}.")))
        else:
            out[key] = value
    return out


_BAD_KEY_CHARS = re.compile(r"[^\w.\- /:]")


def as_text(value: Any) -> str:
    """A param/tag value as MLflow stores it: strings as they are, the rest as JSON."""
    return value if isinstance(value, str) else json.dumps(value, default=str)


def config_params(cfg: JobConfig, redactor: Optional[Redactor] = None) -> dict[str, str]:
    """The config as MLflow params: dotted keys, string values within MLflow's limit, no secrets."""
    redactor = redactor or Redactor.for_job(cfg)
    params = {}
    for key, value in _expand_lists(flatten(to_dict(cfg, redact=True))).items():
        key = _BAD_KEY_CHARS.sub("_", redactor.text(key))   # user-named keys (cluster.tags.*)
        params[key] = _truncate(redactor.text(as_text(value)), MAX_PARAM_VALUE)
    return params


def _yaml(tree: Any) -> str:
    import yaml

    return yaml.safe_dump(tree, sort_keys=False, default_flow_style=False, allow_unicode=True)


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """`git describe` of the checkout this package runs from, else the installed version."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        top = subprocess.run(["git", "-C", root, "rev-parse", "--show-toplevel"],
                             capture_output=True, text=True, timeout=10)
        # Only our own checkout counts, not a repository that happens to contain a venv.
        if top.returncode == 0 and os.path.samefile(top.stdout.strip(), root):
            described = subprocess.run(
                ["git", "-C", root, "describe", "--tags", "--always", "--dirty"],
                capture_output=True, text=True, timeout=10)
            if described.returncode == 0 and described.stdout.strip():
                return described.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("dbrx-platform")
    except PackageNotFoundError:
        import platform

        return getattr(platform, "__version__", "unknown")


# --- talking to MLflow with a deadline ----------------------------------------------

def _retrying(store: Store, what: str, fn: Callable[[], T], timeout_s: float) -> T:
    """`fn()`, retried on transient failures until `timeout_s`; then one clear error."""
    deadline = time.monotonic() + timeout_s
    backoff = Backoff(0.5, 5.0)
    while True:
        try:
            return fn()
        except TrackingError:
            raise
        except Exception as exc:
            where = display_uri(store.tracking_uri)
            if not is_transient(exc):
                raise TrackingError(f"MLflow at {where} refused to {what}: {short_error(exc)}") from exc
            delay = backoff.failed()
            if time.monotonic() + delay > deadline:
                raise TrackingError(
                    f"MLflow at {where} is unreachable (tried for {timeout_s:.0f} s to {what}): "
                    f"{short_error(exc)}. Start the tracking server, or set "
                    f"tracking.tracking_uri to one that is running.") from exc
            time.sleep(delay)


def _experiment_id(mlflow_client, store: Store, name: str) -> str:
    """The experiment `name`, created if missing, tagged as a model-training experiment."""
    from mlflow.exceptions import MlflowException

    exp = mlflow_client.get_experiment_by_name(name)
    if exp is None:
        try:
            return mlflow_client.create_experiment(name, artifact_location=store.artifact_location,
                                                   tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            exp = mlflow_client.get_experiment_by_name(name)   # created concurrently
            if exp is None:
                raise
    if exp.lifecycle_stage != "active":
        raise TrackingError(
            f"MLflow experiment {name!r} is deleted; restore it (mlflow experiments restore "
            f"--experiment-id {exp.experiment_id}) or set tracking.experiment to another name")
    if exp.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
        mlflow_client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return exp.experiment_id


def _quote(value: str) -> str:
    """A string literal for an MLflow search filter."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise ValueError(f"job name {value!r} contains both quote characters")


def _job_runs(mlflow_client, experiment_id: str, job_name: str) -> list:
    """The job's runs that are not FINISHED nor superseded by a fresh start, newest first."""
    runs = mlflow_client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{JOB_TAG}` = {_quote(job_name)} and attributes.status != '{FINISHED}'",
        order_by=["attributes.start_time DESC"],
        max_results=100,
    )
    return [r for r in runs if SUPERSEDED_TAG not in r.data.tags]


def _log_params(mlflow_client, run, params: Mapping[str, str]) -> None:
    """Log the params the run lacks; params MLflow already holds with another value
    (MLflow never changes a param) are named in a tag and a warning instead."""
    from mlflow.entities import Param, RunTag

    existing = run.data.params
    new = [Param(k, v) for k, v in params.items() if k not in existing]
    for i in range(0, len(new), PARAMS_PER_BATCH):
        mlflow_client.log_batch(run.info.run_id, params=new[i:i + PARAMS_PER_BATCH], synchronous=True)
    changed = sorted(k for k, v in params.items() if k in existing and existing[k] != v)
    if changed:
        log.warning("job config changed since MLflow run %s started; MLflow keeps the first "
                    "values of: %s (config.yaml has the current config)",
                    run.info.run_id, ", ".join(changed))
        mlflow_client.log_batch(run.info.run_id, synchronous=True, tags=[
            RunTag(CONFIG_CHANGED_TAG, _truncate(", ".join(changed), MAX_TAG_VALUE))])


def start_or_resume_run(cfg: JobConfig, job_name: Optional[str] = None, *,
                        plan: Optional[Mapping[str, Any]] = None, resume: Optional[bool] = None,
                        timeout_s: float = 60.0) -> str:
    """The id of the job's MLflow run: its newest unfinished run, or a new one.

    `resume` defaults to `cfg.checkpoint.resume`: a job that starts training
    from scratch gets a fresh run (its old unfinished runs are marked KILLED),
    so that step 0 never lands on top of an earlier curve. `plan` is the
    plan's JSON dict (`make_plan(cfg).to_json()`); anything with `to_json()`
    is accepted too. Raises `TrackingError` when MLflow stays unreachable for
    `timeout_s` or refuses the run.
    """
    from mlflow.entities import RunTag

    job_name = job_name or cfg.name
    resume = cfg.checkpoint.resume if resume is None else resume
    store = resolve(cfg.tracking)
    redactor = Redactor.for_job(cfg)
    params = config_params(cfg, redactor)
    if plan is not None and hasattr(plan, "to_json"):
        plan = plan.to_json()
    plan = redactor.data(dict(plan)) if plan is not None else None
    if plan is not None:
        params.update({f"plan.{k}": _truncate(as_text(v), MAX_PARAM_VALUE) for k, v in plan.items()
                       if isinstance(v, (str, int, float, bool))})
    version = code_version()
    mlflow_client = _retrying(store, "open the tracking store", lambda: make_client(store), timeout_s)

    def find_or_create():
        experiment_id = _experiment_id(mlflow_client, store, cfg.tracking.experiment)
        runs = _job_runs(mlflow_client, experiment_id, job_name)
        if resume and runs:
            run = runs[0]
            if run.info.status != "RUNNING":
                mlflow_client.update_run(run.info.run_id, status="RUNNING")
            mlflow_client.set_tag(run.info.run_id, CODE_VERSION_TAG, version)
            log.info("resuming MLflow run %s of job %s", run.info.run_id, job_name)
            return run, runs[1:]
        run = mlflow_client.create_run(
            experiment_id, run_name=job_name, tags={JOB_TAG: job_name, CODE_VERSION_TAG: version})
        return run, runs

    run, stale = _retrying(store, f"open the run of job {job_name!r}", find_or_create, timeout_s)
    run_id = run.info.run_id

    def record():
        _log_params(mlflow_client, mlflow_client.get_run(run_id), params)
        mlflow_client.log_text(run_id, _yaml(redactor.data(to_dict(cfg, redact=True))), "config.yaml")
        if plan is not None:
            mlflow_client.log_text(run_id, json.dumps(plan, indent=2, default=str), "plan.json")
        for old in stale:   # superseded by a fresh start: no longer "running"
            mlflow_client.log_batch(old.info.run_id, tags=[RunTag(SUPERSEDED_TAG, run_id)],
                                    synchronous=True)
            if old.info.status == "RUNNING":
                mlflow_client.set_terminated(old.info.run_id, status="KILLED")

    _retrying(store, f"record the config of run {run_id}", record, timeout_s)
    return run_id


def finish_run(cfg: JobConfig, run_id: str, status: str = FINISHED, *,
               timeout_s: float = 30.0) -> bool:
    """Mark the run ended (FINISHED, FAILED or KILLED).

    The job's work is already saved when this is called, so an unreachable
    MLflow only costs the status: a warning and False, never an exception.
    """
    status = status.upper()
    if status not in END_STATUSES:
        raise ValueError(f"status must be one of {', '.join(END_STATUSES)}, not {status!r}")
    store = resolve(cfg.tracking)
    try:
        mlflow_client = _retrying(store, "open the tracking store", lambda: make_client(store), timeout_s)
        _retrying(store, f"mark run {run_id} {status}",
                  lambda: mlflow_client.set_terminated(run_id, status=status), timeout_s)
        return True
    except TrackingError as exc:
        log.warning("could not mark MLflow run %s %s: %s", run_id, status, exc)
        return False


# --- where to look ------------------------------------------------------------------

class RunLink(NamedTuple):
    """Where the run shows in the MLflow UI; `ui_command` starts a UI when none serves the store."""

    url: str
    ui_command: Optional[str] = None

    def __str__(self) -> str:
        if self.ui_command:
            return f"MLflow UI: run\n  {self.ui_command}\nthen open {self.url}"
        return f"MLflow run: {self.url}"


def run_url(cfg: JobConfig, run_id: str, experiment_id: Optional[str] = None) -> RunLink:
    """The UI address of the run (and, for a local store, the command that serves the UI).

    Without `experiment_id` it is looked up; if MLflow cannot answer, the link
    uses the UI's experiment-less `/#/runs/<id>` route, which redirects.
    """
    store = resolve(cfg.tracking)
    if experiment_id is None:
        try:
            experiment_id = _retrying(store, f"look up run {run_id}",
                                      lambda: make_client(store).get_run(run_id).info.experiment_id,
                                      timeout_s=5.0)
        except TrackingError:
            experiment_id = None
    route = f"#/experiments/{experiment_id}/runs/{run_id}" if experiment_id else f"#/runs/{run_id}"
    if store.is_http:
        return RunLink(f"{display_uri(store.tracking_uri)}/{route}")
    host = cfg.tracking.ui_host
    url_host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    command = ["mlflow", "ui", "--backend-store-uri", display_uri(store.tracking_uri)]
    if store.artifact_location:
        command += ["--default-artifact-root", store.artifact_location]
    command += ["--host", host, "--port", str(cfg.tracking.ui_port)]
    return RunLink(f"http://{url_host}:{cfg.tracking.ui_port}/{route}",
                   " ".join(shlex.quote(c) for c in command))
