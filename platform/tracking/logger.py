"""Rank 0's MLflow logger: every call returns at once, nothing it does stops training.

A small facade: calls are turned into parcels (parcels.py: metric batches,
params, tags, uploads, expert-load artifacts, events) and put in an outbox
(outbox.py), whose thread delivers them with retries and backoff in bounded
memory. Through an MLflow outage the buffered records arrive later with
their original steps and timestamps; past the bound the oldest metric points
are dropped and counted in metric `tracking.dropped_metrics`.

MLflow's own asynchronous logging (`synchronous=False`) is not used: its
queue is unbounded and a failed batch is dropped, not retried.
"""

from __future__ import annotations

import atexit
import functools
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from typing import Any, Callable, Mapping, Optional, Sequence, Union

from platform.config import JobConfig
from platform.tracking.keys import DROPPED_METRIC, EXPERT_LOAD_MAX_RATIO
from platform.tracking.outbox import Outbox, Parcel
from platform.tracking.parcels import (
    MAX_METRICS_PER_BATCH, EventLog, EventRecord, Events, ExpertLoadFiles, Metrics, MlflowRun, Params,
    Tags, Upload, truncate,
)
from platform.tracking.redact import Redactor
from platform.tracking.run import MAX_PARAM_VALUE, MAX_TAG_VALUE, as_text
from platform.tracking.store import fail_fast_http, resolve

log = logging.getLogger("platform.tracking")

_BAD_EVENT_CHARS = re.compile(r"[^A-Za-z0-9_-]")


def _now_ms() -> int:
    return int(time.time() * 1000)


def _never_raises(method: Callable) -> Callable:
    """A logging call that fails is reported once per method and otherwise ignored."""

    @functools.wraps(method)
    def guarded(self: "MetricsLogger", *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except Exception:
            if self._warn_first(("failed", method.__name__)):
                log.exception("MetricsLogger.%s failed; the call was ignored (training goes on)",
                              method.__name__)
            return None

    return guarded


class MetricsLogger:
    """Non-blocking, outage-proof MLflow logging for rank 0 of the training loop.

    Create it with the job config and the run id from `start_or_resume_run`;
    call `close()` at the end (also done at interpreter exit). `capacity`
    bounds buffered metric points (about 150 bytes each), `max_records` the
    other buffered records (params, tags, events, artifacts); retries wait at most
    `max_backoff_s` (default: the job's tracking.max_retry_s). With
    `system_metrics`, MLflow's GPU utilisation and memory are logged too
    where CUDA is available (platform.tracking.system).
    """

    def __init__(self, cfg: JobConfig, run_id: str, *, capacity: int = 100_000,
                 max_records: int = 10_000, interval_s: float = 1.0,
                 min_backoff_s: float = 0.5, max_backoff_s: float | None = None,
                 system_metrics: bool = False) -> None:
        if capacity < MAX_METRICS_PER_BATCH or max_records < 1:
            raise ValueError(f"capacity must be >= {MAX_METRICS_PER_BATCH} and max_records >= 1")
        fail_fast_http()
        self.run_id = run_id
        self._redactor = Redactor.for_job(cfg)
        self._run = MlflowRun(resolve(cfg.tracking), run_id)
        self._staging = tempfile.mkdtemp(prefix="dbrx-mlflow-")
        self._events = EventLog(self._run, self._staging)
        if max_backoff_s is None:
            max_backoff_s = cfg.tracking.max_retry_s
        self._outbox = Outbox(self._run, name=f"mlflow-logger-{run_id[:8]}", capacity=capacity,
                              max_records=max_records, full_batch=MAX_METRICS_PER_BATCH,
                              interval_s=interval_s, min_backoff_s=min_backoff_s,
                              max_backoff_s=max_backoff_s)
        self._dropped_reported = 0
        self._last_step = 0
        self._warned: set = set()
        self._lock = threading.Lock()   # guards the two above: any thread may log
        self._system = None
        if system_metrics:
            from platform.tracking.system import start_system_metrics

            self._system = start_system_metrics(cfg, run_id)
        self._atexit = functools.partial(self.close, timeout=10.0)
        atexit.register(self._atexit)

    # -- calls from the training loop: queue and return ------------------------------

    @_never_raises
    def log_metrics(self, metrics: Mapping[str, Any], step: Optional[int] = None) -> None:
        """Queue metric values at `step` (default: the last step given). Values are taken
        with `float()` now: numbers, numpy scalars, 0-d tensors (a GPU tensor syncs)."""
        step = self._step(step)
        ts = _now_ms()
        refused = self._run.refused_keys["metric"]
        points = []
        for key, value in metrics.items():
            key = str(key)
            if key in refused:
                continue
            try:
                points.append((key, float(value), ts, step))
            except (TypeError, ValueError):
                if self._warn_first(("value", key)):
                    log.warning("metric %r: %r is not a number; dropped", key, value)
        dropped = self._outbox.dropped_metrics
        if dropped != self._dropped_reported and self._outbox.reachable:
            points.append((DROPPED_METRIC, float(dropped), ts, step))
            self._dropped_reported = dropped
        for i in range(0, len(points), MAX_METRICS_PER_BATCH):
            self._put(Metrics(self._run, points[i:i + MAX_METRICS_PER_BATCH]))

    def log_metric(self, key: str, value: Any, step: Optional[int] = None) -> None:
        self.log_metrics({key: value}, step)

    @_never_raises
    def log_param(self, key: str, value: Any) -> None:
        """Queue a param. MLflow keeps a param's first value: set each key once."""
        key = str(key)
        if key not in self._run.refused_keys["param"]:
            value = truncate(self._redactor.text(as_text(value)), MAX_PARAM_VALUE)
            self._put(Params(self._run, [(key, value)]))

    def log_params(self, params: Mapping[str, Any]) -> None:
        for key, value in params.items():
            self.log_param(key, value)

    @_never_raises
    def set_tag(self, key: str, value: Any) -> None:
        key = str(key)
        if key not in self._run.refused_keys["tag"]:
            value = truncate(self._redactor.text(as_text(value)), MAX_TAG_VALUE)
            self._put(Tags(self._run, [(key, value)]))

    @_never_raises
    def log_artifact(self, local_path: str, artifact_path: Optional[str] = None) -> None:
        """Queue a file or directory for upload. It is snapshotted now (hard links where
        possible), so the caller may change or delete it right after."""
        if not self._accepting():
            return
        staged_dir = self._new_stage()
        target = os.path.join(staged_dir, os.path.basename(os.path.normpath(local_path)))
        try:
            if os.path.isdir(local_path):
                shutil.copytree(local_path, target, copy_function=_link_or_copy)
            else:
                _link_or_copy(local_path, target)
        except OSError as exc:
            shutil.rmtree(staged_dir, ignore_errors=True)
            log.warning("cannot log artifact %s: %s", local_path, exc)
            return
        self._put(Upload(self._run, target, artifact_path, staged_dir))

    @_never_raises
    def log_figure(self, figure: Any, artifact_file: str) -> None:
        """Queue a matplotlib figure as a PNG (or other format by extension) at `artifact_file`.
        It is rendered now, so the caller may close or reuse the figure."""
        if not self._accepting():
            return
        staged_dir = self._new_stage()
        target = os.path.join(staged_dir, os.path.basename(artifact_file))
        figure.savefig(target)
        self._put(Upload(self._run, target, os.path.dirname(artifact_file) or None, staged_dir))

    @_never_raises
    def log_expert_load(self, history: Any, step: int, steps: Optional[Sequence[int]] = None) -> None:
        """At a checkpoint: queue `expert_load/step_<step>.png` (heatmap) and `.parquet`
        (table: step, layer, expert, fraction), both written in the background, and log
        metric `expert_load.max_ratio`: the busiest expert's load over uniform at the latest
        step, over all layers (1 balanced, E collapsed onto one expert).

        `history`: an `ExpertLoadHistory`, a mapping step -> [layers, experts], or an
        array [steps, layers, experts]; a bounded snapshot of it is taken now.
        """
        import numpy as np

        from platform.tracking.plots import load_summary

        if not self._accepting():
            return
        step_arr, shares = load_summary(history, steps)
        latest = shares[-1]
        if np.isfinite(latest).any():
            self.log_metrics({EXPERT_LOAD_MAX_RATIO: float(np.nanmax(latest)) * latest.shape[-1]}, step)
        self._put(ExpertLoadFiles(self._run, self._new_stage(), step, step_arr, shares))

    @_never_raises
    def event(self, name: str, step: Optional[int] = None, **details: Any) -> None:
        """Record a platform event (restart, node_lost, checkpoint_fallback, ...): tag
        `event.<n>.<name>` with the details as JSON, metric `events.<name>` counting it,
        and a line in the `events.jsonl` artifact. Numbering continues across restarts."""
        name = _BAD_EVENT_CHARS.sub("_", str(name)) or "event"
        step = self._step(step)
        details = self._redactor.data({str(k): v for k, v in details.items()})
        log.info("event %s at step %d: %s", name, step, json.dumps(details, default=str))
        self._put(Events(self._events, [EventRecord(name, step, _now_ms(), details)]))

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait up to `timeout` s for everything queued to reach MLflow; True if it did.

        Blocking by design: for the end of training and for tests, not every step.
        """
        return self._outbox.flush(timeout)

    def deliver_now(self, timeout: float = 5.0) -> bool:
        """Send what is queued without waiting for the batching interval, and wait up to
        `timeout` s for it to arrive; while MLflow is unreachable, return False at once
        (the records stay buffered and retried, and the caller does not wait on an outage)."""
        return self._outbox.reachable and self._outbox.flush(timeout)

    def close(self, timeout: float = 30.0) -> bool:
        """Deliver what is queued (waiting at most `timeout` s), stop the thread, and say
        what was lost. True if everything arrived. Later calls on the logger are ignored."""
        atexit.unregister(self._atexit)
        if self._system is not None:
            self._system.finish()
            self._system = None
        drained = self._outbox.close(timeout)
        shutil.rmtree(self._staging, ignore_errors=True)
        return drained

    def stats(self) -> dict:
        """Counters for health checks and tests: queued, in flight, dropped, rejected and
        sent metric points and records; whether MLflow is reachable; whether the run is gone."""
        return self._outbox.stats()

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- helpers ------------------------------------------------------------------------

    def _step(self, step: Optional[int]) -> int:
        with self._lock:
            if step is not None:
                self._last_step = int(step)
            return self._last_step

    def _accepting(self) -> bool:
        if not self._outbox.open and self._warn_first("closed"):
            log.warning("MetricsLogger of run %s is closed or its run is gone; records ignored",
                        self.run_id)
        return self._outbox.open

    def _put(self, parcel: Parcel) -> None:
        if self._accepting():
            self._outbox.put(parcel)
        else:
            parcel.discard()

    def _new_stage(self) -> str:
        return tempfile.mkdtemp(dir=self._staging)

    def _warn_first(self, key: Any) -> bool:
        with self._lock:
            first = key not in self._warned
            self._warned.add(key)
        return first


def _link_or_copy(src: Union[str, os.PathLike], dst: Union[str, os.PathLike]) -> str:
    """Snapshot a file in O(1) with a hard link (a writer that replaces the file atomically
    leaves our link on the old content); copy across filesystems."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return str(dst)
