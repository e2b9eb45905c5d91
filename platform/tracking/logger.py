"""Rank 0's MLflow logger: every call returns at once, nothing it does stops training.

A training step must never wait on, or die because of, the tracking server.
Calls only put records in bounded in-memory queues; one background thread
sends them with `MlflowClient.log_batch` (up to 1000 metrics and 100
params/tags a request) and uploads artifacts. When MLflow is unreachable the
thread retries with exponential backoff while the queues buffer; past their
bound the oldest metrics are dropped and counted (metric
`tracking.dropped_metrics`), so memory stays bounded through any outage. One
warning says MLflow went away, one says it is back, and the buffered records
then arrive with their original steps and timestamps.

MLflow's own asynchronous logging (`synchronous=False`) is not used: its
queue is unbounded and a failed batch is dropped, not retried.

A request MLflow *rejects* (an invalid key, a param changed after it was set)
is split until the bad record is isolated; that record is dropped with one
warning and later records under the same key are dropped quietly.
"""

from __future__ import annotations

import atexit
import collections
import datetime
import functools
import json
import logging
import os
import random
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from platform.config import JobConfig
from platform.tracking.redact import Redactor
from platform.tracking.run import MAX_PARAM_VALUE, MAX_TAG_VALUE, as_text
from platform.tracking.store import (
    client as make_client, display_uri, error_code, fail_fast_http, is_transient, resolve, short_error,
)

log = logging.getLogger("platform.tracking")

EVENTS_FILE = "events.jsonl"
DROPPED_METRIC = "tracking.dropped_metrics"
EXPERT_LOAD_DIR = "expert_load"
EXPERT_LOAD_METRIC = "expert_load.max_ratio"
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_TAGS_PER_BATCH = 100
_EVENT_TAG = re.compile(r"^event\.(\d+)\.")
_BAD_EVENT_CHARS = re.compile(r"[^A-Za-z0-9_-]")

_MetricRecord = Tuple[str, float, int, int]   # key, value, timestamp (ms), step


def _now_ms() -> int:
    return int(time.time() * 1000)


def _never_raises(method: Callable) -> Callable:
    """A logging call that fails is reported once per method and otherwise ignored."""

    @functools.wraps(method)
    def guarded(self: "MetricsLogger", *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except Exception:
            if method.__name__ not in self._failed_calls:
                self._failed_calls.add(method.__name__)
                log.exception("MetricsLogger.%s failed; the call was ignored (training goes on)",
                              method.__name__)
            return None

    return guarded


# --- units of work the background thread delivers -----------------------------------

class _Unit:
    """Something to deliver; `send` may be called again after a transient failure."""

    size = 1
    what = "record"

    def send(self, lg: "MetricsLogger") -> None:
        raise NotImplementedError

    def discard(self) -> None:
        """Release local resources (staged files) once delivered or dropped."""


@dataclass
class _Batch(_Unit):
    metrics: List[_MetricRecord] = field(default_factory=list)
    params: List[Tuple[str, str]] = field(default_factory=list)
    tags: List[Tuple[str, str]] = field(default_factory=list)

    @property
    def size(self) -> int:   # type: ignore[override]
        return len(self.metrics) + len(self.params) + len(self.tags)

    @property
    def what(self) -> str:   # type: ignore[override]
        if self.metrics:
            return f"metric {self.metrics[0][0]!r}"
        if self.params:
            return f"param {self.params[0][0]!r}"
        return f"tag {self.tags[0][0]!r}"

    def send(self, lg: "MetricsLogger") -> None:
        from mlflow.entities import Metric, Param, RunTag

        # Keys MLflow refused since this batch was queued: drop their records unsent.
        kept_metrics = [m for m in self.metrics if m[0] not in lg._bad_metric_keys]
        kept_params = [p for p in self.params if p[0] not in lg._bad_param_keys]
        refused = len(self.metrics) - len(kept_metrics) + len(self.params) - len(kept_params)
        if refused:
            self.metrics, self.params = kept_metrics, kept_params
            lg._count_rejected(refused)
        if not self.size:
            return
        lg._client().log_batch(
            lg.run_id,
            metrics=[Metric(k, v, ts, step) for k, v, ts, step in self.metrics],
            params=[Param(k, v) for k, v in self.params],
            tags=[RunTag(k, v) for k, v in self.tags],
            synchronous=True,
        )

    def split(self) -> Tuple["_Batch", "_Batch"]:
        items = [("m", x) for x in self.metrics] + [("p", x) for x in self.params] + \
                [("t", x) for x in self.tags]
        halves = items[: len(items) // 2], items[len(items) // 2:]
        return tuple(_Batch([x for k, x in h if k == "m"], [x for k, x in h if k == "p"],
                            [x for k, x in h if k == "t"]) for h in halves)  # type: ignore[return-value]


@dataclass
class _Upload(_Unit):
    local_path: str
    artifact_path: Optional[str]
    staged_dir: str

    @property
    def what(self) -> str:   # type: ignore[override]
        name = os.path.basename(self.local_path)
        return f"artifact {os.path.join(self.artifact_path or '', name)!r}"

    def send(self, lg: "MetricsLogger") -> None:
        if os.path.isdir(self.local_path):
            lg._client().log_artifacts(lg.run_id, self.local_path, self.artifact_path)
        else:
            lg._client().log_artifact(lg.run_id, self.local_path, self.artifact_path)

    def discard(self) -> None:
        shutil.rmtree(self.staged_dir, ignore_errors=True)


@dataclass
class _Render(_Upload):
    """An expert-load heatmap, drawn in the background thread, then uploaded."""

    steps: Any = None
    shares: Any = None

    def send(self, lg: "MetricsLogger") -> None:
        if not os.path.exists(self.local_path):
            from platform.tracking.plots import expert_load_heatmap, figure_png

            png = figure_png(expert_load_heatmap(self.shares, self.steps))
            with open(self.local_path + ".tmp", "wb") as f:
                f.write(png)
            os.replace(self.local_path + ".tmp", self.local_path)
            self.steps = self.shares = None   # the PNG is all that is needed now
        super().send(lg)


@dataclass
class _EventRecord:
    name: str
    step: int
    time_ms: int
    details: Dict[str, Any]


@dataclass
class _Events(_Unit):
    """Events as tags `event.<n>.<name>`, counter metrics `events.<name>` and lines of
    `events.jsonl`. Numbers and counts continue those already in the run (a restart
    resumes the run), so they are assigned here, after reading the run, not at call time."""

    records: List[_EventRecord]
    assigned: Optional[Tuple[list, list, list]] = None
    appended: bool = False

    @property
    def size(self) -> int:   # type: ignore[override]
        return len(self.records)

    @property
    def what(self) -> str:   # type: ignore[override]
        return f"event {self.records[0].name!r}"

    def send(self, lg: "MetricsLogger") -> None:
        from mlflow.entities import Metric, RunTag

        lg._sync_events()
        if self.assigned is None:
            tags, metrics, lines = [], [], []
            for r in self.records:
                n = lg._event_next
                lg._event_next += 1
                count = lg._event_counts.get(r.name, 0) + 1
                lg._event_counts[r.name] = count
                when = datetime.datetime.fromtimestamp(r.time_ms / 1000, datetime.timezone.utc)
                line = json.dumps({"n": n, "event": r.name, "step": r.step,
                                   "time": when.isoformat(timespec="milliseconds"), **r.details},
                                  default=str)
                tags.append(RunTag(f"event.{n:04d}.{r.name}", _truncate(line, MAX_TAG_VALUE)))
                metrics.append(Metric(f"events.{r.name}", float(count), r.time_ms, r.step))
                lines.append(line)
            self.assigned = (tags, metrics, lines)
        tags, metrics, lines = self.assigned
        lg._client().log_batch(lg.run_id, metrics=metrics, tags=tags, synchronous=True)
        if not self.appended:
            with open(lg._events_path, "a", encoding="utf-8") as f:
                f.writelines(line + "\n" for line in lines)
            self.appended = True
        lg._client().log_artifact(lg.run_id, lg._events_path)


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- the logger ---------------------------------------------------------------------

class MetricsLogger:
    """Non-blocking, outage-proof MLflow logging for rank 0 of the training loop.

    Create it with the job config and the run id from `start_or_resume_run`;
    call `close()` at the end (also done at interpreter exit). `capacity`
    bounds buffered metric points (about 150 bytes each), `max_records` the
    other buffered records (params, tags, events, artifacts).
    """

    def __init__(self, cfg: JobConfig, run_id: str, *, capacity: int = 100_000,
                 max_records: int = 10_000, interval_s: float = 1.0,
                 min_backoff_s: float = 0.5, max_backoff_s: float = 30.0) -> None:
        if capacity < MAX_METRICS_PER_BATCH or max_records < 1:
            raise ValueError(f"capacity must be >= {MAX_METRICS_PER_BATCH} and max_records >= 1")
        fail_fast_http()
        self.run_id = run_id
        self._store = resolve(cfg.tracking)
        self._where = display_uri(self._store.tracking_uri)
        self._redactor = Redactor.for_job(cfg)
        self._capacity, self._max_records = capacity, max_records
        self._interval, self._min_backoff, self._max_backoff = interval_s, min_backoff_s, max_backoff_s

        self._cond = threading.Condition()
        self._metrics: Deque[_MetricRecord] = collections.deque()
        self._records: Deque[Any] = collections.deque()    # params/tags as tuples, events, uploads
        self._redo: Deque[_Unit] = collections.deque()     # halves of rejected batches
        self._inflight: Optional[_Unit] = None
        self._stopping = self._abandoned = self._kick = self._closed = False
        self._flushing = 0
        self._last_send = 0.0

        self._last_step = 0
        self._seq = 0
        self._reachable = True
        self._disabled = False
        self._dropped_metrics = self._dropped_reported = self._dropped_records = 0
        self._warned_full = False
        self._rejected = 0
        self._sent_metrics = 0
        self._bad_metric_keys: set = set()
        self._bad_param_keys: set = set()
        self._warned: set = set()
        self._failed_calls: set = set()

        self._mlflow = None
        self._staging = tempfile.mkdtemp(prefix="dbrx-mlflow-")
        self._events_path = os.path.join(self._staging, EVENTS_FILE)
        self._events_synced = False
        self._event_next = 1
        self._event_counts: Dict[str, int] = {}

        self._thread = threading.Thread(target=self._work, name=f"mlflow-logger-{run_id[:8]}",
                                        daemon=True)
        self._thread.start()
        self._atexit = functools.partial(self.close, timeout=10.0)
        atexit.register(self._atexit)

    # -- calls from the training loop: queue and return ------------------------------

    @_never_raises
    def log_metrics(self, metrics: Mapping[str, Any], step: Optional[int] = None) -> None:
        """Queue metric values at `step` (default: the last step given). Values are taken
        with `float()` now: numbers, numpy scalars, 0-d tensors (a GPU tensor syncs)."""
        step = self._step(step)
        ts = _now_ms()
        points = []
        for key, value in metrics.items():
            key = str(key)
            if key in self._bad_metric_keys:
                continue
            try:
                points.append((key, float(value), ts, step))
            except (TypeError, ValueError):
                self._warn_once(("value", key), "metric %r: %r is not a number; dropped", key, value)
        self._put_metrics(points)

    def log_metric(self, key: str, value: Any, step: Optional[int] = None) -> None:
        self.log_metrics({key: value}, step)

    @_never_raises
    def log_param(self, key: str, value: Any) -> None:
        """Queue a param. MLflow keeps a param's first value: set each key once."""
        key = str(key)
        if key not in self._bad_param_keys:
            self._put_record((key, _truncate(self._redactor.text(as_text(value)), MAX_PARAM_VALUE)), "param")

    def log_params(self, params: Mapping[str, Any]) -> None:
        for key, value in params.items():
            self.log_param(key, value)

    @_never_raises
    def set_tag(self, key: str, value: Any) -> None:
        self._put_record((str(key), _truncate(self._redactor.text(as_text(value)), MAX_TAG_VALUE)), "tag")

    @_never_raises
    def log_artifact(self, local_path: str, artifact_path: Optional[str] = None) -> None:
        """Queue a file or directory for upload. It is snapshotted now (hard links where
        possible), so the caller may change or delete it right after."""
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
        self._put_record(_Upload(target, artifact_path, staged_dir))

    @_never_raises
    def log_figure(self, figure: Any, artifact_file: str) -> None:
        """Queue a matplotlib figure as a PNG (or other format by extension) at `artifact_file`.
        It is rendered now, so the caller may close or reuse the figure."""
        staged_dir = self._new_stage()
        target = os.path.join(staged_dir, os.path.basename(artifact_file))
        figure.savefig(target)
        self._put_record(_Upload(target, os.path.dirname(artifact_file) or None, staged_dir))

    @_never_raises
    def log_expert_load(self, history: Any, step: int, steps: Optional[Sequence[int]] = None) -> None:
        """Queue the expert-load heatmap as `expert_load/step_<step>.png` (drawn in the
        background) and log metric `expert_load.max_ratio`: the busiest expert's load over
        uniform at the latest step (1 balanced, E collapsed onto one expert).

        `history`: an `ExpertLoadHistory`, a mapping step -> [layers, experts], or an
        array [steps, layers, experts]; only a bounded summary is kept from it.
        """
        import numpy as np

        from platform.tracking.plots import load_summary

        step_arr, shares = load_summary(history, steps)
        latest = shares[-1]
        if np.isfinite(latest).any():
            self.log_metrics({EXPERT_LOAD_METRIC: float(np.nanmax(latest)) * latest.shape[-1]}, step)
        staged_dir = self._new_stage()
        target = os.path.join(staged_dir, f"step_{int(step):08d}.png")
        self._put_record(_Render(target, EXPERT_LOAD_DIR, staged_dir, steps=step_arr, shares=shares))

    @_never_raises
    def event(self, name: str, step: Optional[int] = None, **details: Any) -> None:
        """Record a platform event (restart, node_lost, checkpoint_fallback, ...): tag
        `event.<n>.<name>` with the details as JSON, metric `events.<name>` counting it,
        and a line in the `events.jsonl` artifact. Numbering continues across restarts."""
        name = _BAD_EVENT_CHARS.sub("_", str(name)) or "event"
        step = self._step(step)
        details = self._redactor.data({str(k): v for k, v in details.items()})
        log.info("event %s at step %d: %s", name, step, json.dumps(details, default=str))
        self._put_record(_EventRecord(name, step, _now_ms(), details))

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait up to `timeout` s for everything queued to reach MLflow; True if it did.

        Blocking by design: for the end of training and for tests, not every step.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            self._flushing += 1
            self._kick = True
            self._cond.notify_all()
            try:
                while not self._drained():
                    left = deadline - time.monotonic()
                    if left <= 0 or not self._thread.is_alive():
                        return False
                    self._cond.wait(left)
                return True
            finally:
                self._flushing -= 1

    def close(self, timeout: float = 30.0) -> bool:
        """Deliver what is queued (waiting at most `timeout` s), stop the thread, and say
        what was lost. True if everything arrived. Later calls on the logger are ignored."""
        if self._closed:
            return self._drained()
        self._closed = True
        atexit.unregister(self._atexit)
        with self._cond:
            self._stopping = self._kick = True
            self._cond.notify_all()
        self._thread.join(timeout)
        if self._thread.is_alive():
            with self._cond:
                self._abandoned = True
                self._cond.notify_all()
            self._thread.join(1.0)
        with self._cond:
            pending = [u for u in [self._inflight, *self._redo] if u is not None]
            lost_metrics = len(self._metrics) + sum(len(u.metrics) for u in pending if isinstance(u, _Batch))
            lost_records = len(self._records) + sum(u.size for u in pending if not isinstance(u, _Batch))
            drained = self._drained()
        if not drained:
            log.warning("MLflow at %s did not receive %d metric points and %d other records "
                        "of run %s before the logger closed", self._where, lost_metrics,
                        lost_records, self.run_id)
        if not self._thread.is_alive():
            shutil.rmtree(self._staging, ignore_errors=True)
        return drained

    def stats(self) -> Dict[str, Any]:
        """Counters for health checks and tests."""
        with self._cond:
            return {
                "queued_metrics": len(self._metrics), "queued_records": len(self._records),
                "inflight_metrics": len(self._inflight.metrics) if isinstance(self._inflight, _Batch) else 0,
                "dropped_metrics": self._dropped_metrics, "dropped_records": self._dropped_records,
                "rejected": self._rejected, "sent_metrics": self._sent_metrics,
                "reachable": self._reachable, "disabled": self._disabled,
            }

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- queueing (caller side, under the lock for microseconds) ----------------------

    def _step(self, step: Optional[int]) -> int:
        if step is not None:
            self._last_step = int(step)
        return self._last_step

    def _accepting(self) -> bool:
        if self._closed:
            self._warn_once("closed", "MetricsLogger of run %s is closed; records ignored", self.run_id)
        return not (self._closed or self._disabled)

    def _put_metrics(self, points: List[_MetricRecord]) -> None:
        if not points or not self._accepting():
            return
        first_drop = False
        with self._cond:
            if not self._metrics:
                self._cond.notify_all()   # an idle sender waits for the first point
            for point in points:
                if len(self._metrics) >= self._capacity:
                    self._metrics.popleft()
                    self._dropped_metrics += 1
                    first_drop |= not self._warned_full
                    self._warned_full = True
                self._metrics.append(point)
            if len(self._metrics) >= MAX_METRICS_PER_BATCH:
                self._cond.notify_all()
        if first_drop:
            log.warning("MLflow logging buffer is full (%d metric points); dropping the oldest "
                        "until %s is reachable (counted in metric %s)",
                        self._capacity, self._where, DROPPED_METRIC)

    def _put_record(self, record: Any, kind: str = "") -> None:
        if not self._accepting():
            if isinstance(record, _Unit):
                record.discard()
            return
        if kind:
            record = (kind, record)
        dropped = None
        with self._cond:
            if len(self._records) >= self._max_records:
                dropped = self._records.popleft()
                self._dropped_records += 1
            self._records.append(record)
            self._cond.notify_all()
        if dropped is not None:
            if isinstance(dropped, _Unit):
                dropped.discard()
            self._warn_once("records_full", "MLflow logging buffer is full (%d records); dropping "
                            "the oldest until %s is reachable", self._max_records, self._where)

    def _new_stage(self) -> str:
        with self._cond:
            self._seq += 1
            seq = self._seq
        path = os.path.join(self._staging, f"{seq:08d}")
        os.makedirs(path)
        return path

    def _warn_once(self, key: Any, message: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message, *args)

    # -- the background thread -------------------------------------------------------

    def _drained(self) -> bool:
        return not (self._metrics or self._records or self._redo or self._inflight)

    def _client(self):
        if self._mlflow is None:
            self._mlflow = make_client(self._store)
        return self._mlflow

    def _work(self) -> None:
        while True:
            unit = self._next_unit()
            if unit is None:
                return
            try:
                self._deliver(unit)
            except Exception:   # a bug here must not kill the thread and silently stop logging
                log.exception("MLflow logger failed to deliver %s; dropped", unit.what)
                unit.discard()
            with self._cond:
                self._inflight = None
                self._cond.notify_all()

    def _next_unit(self) -> Optional[_Unit]:
        with self._cond:
            while True:
                if self._abandoned or self._disabled and self._stopping:
                    return None
                if self._redo:
                    self._inflight = self._redo.popleft()
                    return self._inflight
                if self._metrics or self._records:
                    wait = self._last_send + self._interval - time.monotonic()
                    if (wait <= 0 or self._records or self._flushing or self._stopping
                            or len(self._metrics) >= MAX_METRICS_PER_BATCH):
                        self._inflight = self._take()
                        return self._inflight
                elif self._stopping:
                    return None
                else:
                    wait = None
                self._cond.notify_all()   # drained: wake flush()
                self._cond.wait(wait)

    def _take(self) -> _Unit:
        """The next unit from the queues (called with the lock held)."""
        front = self._records[0] if self._records else None
        if isinstance(front, _Unit):
            return self._records.popleft()
        if isinstance(front, _EventRecord):
            events = []
            while self._records and isinstance(self._records[0], _EventRecord) and \
                    len(events) < MAX_PARAMS_TAGS_PER_BATCH // 2:
                events.append(self._records.popleft())
            return _Events(events)
        batch = _Batch()
        while self._records and isinstance(self._records[0], tuple) and \
                batch.size < MAX_PARAMS_TAGS_PER_BATCH:
            kind, item = self._records.popleft()
            (batch.params if kind == "param" else batch.tags).append(item)
        if self._dropped_metrics != self._dropped_reported and self._reachable:
            batch.metrics.append((DROPPED_METRIC, float(self._dropped_metrics), _now_ms(), self._last_step))
            self._dropped_reported = self._dropped_metrics
        while self._metrics and batch.size < MAX_METRICS_PER_BATCH:
            batch.metrics.append(self._metrics.popleft())
        return batch

    def _deliver(self, unit: _Unit) -> None:
        delay = self._min_backoff
        while True:
            try:
                unit.send(self)
            except Exception as exc:
                if self._abandoned:   # close() gave up: leave it queued, to be counted as lost
                    with self._cond:
                        self._redo.appendleft(unit)
                    return
                if is_transient(exc):
                    self._set_reachable(False, exc)
                    with self._cond:   # flush()/close() cut the wait short once
                        self._cond.wait_for(lambda: self._kick or self._abandoned,
                                            timeout=delay * random.uniform(0.8, 1.2))
                        self._kick = False
                    delay = min(delay * 2, self._max_backoff)
                    continue
                self._reject(unit, exc)
                return
            self._set_reachable(True)
            self._last_send = time.monotonic()
            if isinstance(unit, _Batch):
                with self._cond:
                    self._sent_metrics += len(unit.metrics)
            unit.discard()
            return

    def _set_reachable(self, reachable: bool, exc: Optional[BaseException] = None) -> None:
        if reachable == self._reachable:
            return
        with self._cond:
            self._reachable = reachable
            queued, dropped = len(self._metrics), self._dropped_metrics
            if reachable:
                self._warned_full = False
        if reachable:
            log.warning("MLflow at %s is reachable again; sending %d buffered metric points "
                        "(%d dropped while it was down)", self._where, queued, dropped)
        else:
            log.warning("MLflow at %s is unreachable (%s); training continues, metrics are "
                        "buffered (up to %d points) and retried", self._where, short_error(exc),
                        self._capacity)

    def _reject(self, unit: _Unit, exc: BaseException) -> None:
        """MLflow refused `unit`: isolate the bad record, or stop if the run itself is gone."""
        if not self._run_usable():
            self._disable(exc)
            unit.discard()
            return
        if isinstance(unit, _Batch) and unit.size > 1:
            first, second = unit.split()
            with self._cond:
                self._redo.extendleft([second, first])
            return
        if isinstance(unit, _Batch):
            if unit.metrics:
                self._bad_metric_keys.add(unit.metrics[0][0])
            elif unit.params:
                self._bad_param_keys.add(unit.params[0][0])
        self._count_rejected(unit.size)
        log.warning("MLflow refused %s of run %s (%s: %s); dropped%s", unit.what, self.run_id,
                    error_code(exc), short_error(exc),
                    ", as will be later values of that key" if isinstance(unit, _Batch) else "")
        unit.discard()

    def _count_rejected(self, n: int) -> None:
        with self._cond:
            self._rejected += n

    def _run_usable(self) -> bool:
        try:
            return self._client().get_run(self.run_id).info.lifecycle_stage == "active"
        except Exception as exc:
            return is_transient(exc)

    def _disable(self, exc: BaseException) -> None:
        log.warning("MLflow run %s at %s is deleted or missing (%s); tracking stops, training "
                    "goes on", self.run_id, self._where, short_error(exc))
        with self._cond:
            self._disabled = True
            units = [r for r in self._records if isinstance(r, _Unit)] + list(self._redo)
            self._rejected += len(self._metrics) + len(self._records) + len(self._redo)
            self._metrics.clear()
            self._records.clear()
            self._redo.clear()
        for u in units:
            u.discard()

    def _sync_events(self) -> None:
        """Continue the run's event numbering, counters and events.jsonl (once per logger)."""
        if self._events_synced:
            return
        client = self._client()
        run = client.get_run(self.run_id)
        numbers = [int(m.group(1)) for m in map(_EVENT_TAG.match, run.data.tags) if m]
        counts = {k[len("events."):]: int(v) for k, v in run.data.metrics.items()
                  if k.startswith("events.")}
        if any(f.path == EVENTS_FILE for f in client.list_artifacts(self.run_id)):
            downloaded = client.download_artifacts(self.run_id, EVENTS_FILE,
                                                   tempfile.mkdtemp(dir=self._staging))
            shutil.move(downloaded, self._events_path)
        else:
            open(self._events_path, "w").close()
        self._event_next = max(numbers, default=0) + 1
        self._event_counts = counts
        self._events_synced = True


def _link_or_copy(src: Union[str, os.PathLike], dst: Union[str, os.PathLike]) -> str:
    """Snapshot a file in O(1) with a hard link (a writer that replaces the file atomically
    leaves our link on the old content); copy across filesystems."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return str(dst)
