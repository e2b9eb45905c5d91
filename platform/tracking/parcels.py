"""What the tracking logger delivers to MLflow, as parcels for the outbox (outbox.py).

Each parcel is one MLflow request, within its limits (1000 metrics or 100
params/tags per `log_batch`): metric batches, params, tags, artifact
uploads, expert-load artifacts (drawn in the sender thread, off the training
step) and events. `MlflowRun` is the destination they share: the client,
which failures may pass, and the keys MLflow refused.

A request MLflow refuses is split until the bad record is alone; that record
is dropped, and later records under its key are dropped without a request.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, List, Optional, Tuple

from platform.tracking.keys import EVENT_COUNT_PREFIX
from platform.tracking.outbox import Parcel
from platform.tracking.run import MAX_TAG_VALUE
from platform.tracking.store import (
    Store, client as make_client, display_uri, error_code, is_transient, short_error,
)

EVENTS_FILE = "events.jsonl"
EXPERT_LOAD_DIR = "expert_load"
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_TAGS_PER_BATCH = 100
MAX_EVENTS_PER_BATCH = 50   # each event is a tag and a metric
_EVENT_TAG = re.compile(r"^event\.(\d+)\.")


def truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


class MlflowRun:
    """The MLflow run parcels go to (an outbox.Destination). The client is made on first
    use, in the sender thread: for a SQLite store that opens and migrates the database."""

    def __init__(self, store: Store, run_id: str) -> None:
        self.store, self.run_id = store, run_id
        self.where = f"MLflow run {run_id} at {display_uri(store.tracking_uri)}"
        self.refused_keys: Dict[str, set] = {"metric": set(), "param": set(), "tag": set()}
        self._client = None

    def client(self):
        if self._client is None:
            self._client = make_client(self.store)
        return self._client

    def log_batch(self, **records: Any) -> None:
        self.client().log_batch(self.run_id, synchronous=True, **records)

    def is_transient(self, exc: BaseException) -> bool:
        return is_transient(exc)

    def exists(self) -> bool:
        try:
            return self.client().get_run(self.run_id).info.lifecycle_stage == "active"
        except Exception as exc:
            return is_transient(exc)

    def explain(self, exc: BaseException) -> str:
        return f"{error_code(exc)}: {short_error(exc)}"


# --- metrics, params and tags: one log_batch each ------------------------------------

class _Batch(Parcel):
    """Records of one kind, keyed by their first field."""

    kind: ClassVar[str]
    limit: ClassVar[int]

    def __init__(self, run: MlflowRun, items: List[tuple]) -> None:
        self.run, self.items = run, items

    @property
    def size(self) -> int:   # type: ignore[override]
        return len(self.items)

    def __str__(self) -> str:
        return f"{self.kind} {self.items[0][0]!r}"

    def absorb(self, other: Parcel) -> bool:
        if type(other) is not type(self) or self.size + other.size > self.limit:
            return False
        self.items.extend(other.items)   # type: ignore[attr-defined]
        return True

    def refuse(self) -> List[Parcel]:
        refused = self.run.refused_keys[self.kind]
        kept = [item for item in self.items if item[0] not in refused]
        if len(kept) < len(self.items):   # keys refused since this was queued
            return [type(self)(self.run, kept)] if kept else []
        if len(self.items) > 1:
            half = len(self.items) // 2
            return [type(self)(self.run, self.items[:half]), type(self)(self.run, self.items[half:])]
        refused.add(self.items[0][0])
        return []


class Metrics(_Batch):
    """Metric points (key, value, timestamp ms, step)."""

    kind, limit, batched = "metric", MAX_METRICS_PER_BATCH, True

    def send(self) -> None:
        from mlflow.entities import Metric

        self.run.log_batch(metrics=[Metric(*point) for point in self.items])


class Params(_Batch):
    kind, limit = "param", MAX_PARAMS_TAGS_PER_BATCH

    def send(self) -> None:
        from mlflow.entities import Param

        self.run.log_batch(params=[Param(k, v) for k, v in self.items])


class Tags(_Batch):
    kind, limit = "tag", MAX_PARAMS_TAGS_PER_BATCH

    def send(self) -> None:
        from mlflow.entities import RunTag

        self.run.log_batch(tags=[RunTag(k, v) for k, v in self.items])


# --- files -----------------------------------------------------------------------------

class Upload(Parcel):
    """A file or directory snapshotted into `staged_dir`, uploaded under `artifact_path`."""

    def __init__(self, run: MlflowRun, local_path: str, artifact_path: Optional[str],
                 staged_dir: str) -> None:
        self.run, self.local_path, self.artifact_path, self.staged_dir = \
            run, local_path, artifact_path, staged_dir

    def __str__(self) -> str:
        name = os.path.basename(self.local_path)
        return f"artifact {os.path.join(self.artifact_path or '', name)!r}"

    def send(self) -> None:
        client = self.run.client()
        if os.path.isdir(self.local_path):
            client.log_artifacts(self.run.run_id, self.local_path, self.artifact_path)
        else:
            client.log_artifact(self.run.run_id, self.local_path, self.artifact_path)

    def discard(self) -> None:
        shutil.rmtree(self.staged_dir, ignore_errors=True)


class ExpertLoadFiles(Upload):
    """`expert_load/step_<N>.png` (heatmap) and `.parquet` (table) of one snapshot of the
    load history, written in the sender thread, then uploaded."""

    def __init__(self, run: MlflowRun, staged_dir: str, step: int, steps: Any, shares: Any) -> None:
        super().__init__(run, staged_dir, EXPERT_LOAD_DIR, staged_dir)
        self.name = f"step_{int(step):08d}"
        self._snapshot: Optional[Tuple[Any, Any]] = (steps, shares)

    def __str__(self) -> str:
        return f"artifacts {EXPERT_LOAD_DIR}/{self.name}.png and .parquet"

    def send(self) -> None:
        if self._snapshot is not None:
            from platform.tracking.expert_load import expert_load_table
            from platform.tracking.plots import expert_load_heatmap, figure_png

            steps, shares = self._snapshot
            base = os.path.join(self.staged_dir, self.name)
            expert_load_table(shares, steps).to_parquet(base + ".parquet", index=False)
            with open(base + ".png", "wb") as f:
                f.write(figure_png(expert_load_heatmap(shares, steps)))
            self._snapshot = None   # the files are all that is needed now
        super().send()


# --- events ----------------------------------------------------------------------------

@dataclass
class EventRecord:
    name: str
    step: int
    time_ms: int
    details: Dict[str, Any]


class EventLog:
    """The run's event numbers, counters and `events.jsonl`. A restarted job resumes its
    run, so they continue what the run holds: read once, in the sender thread."""

    def __init__(self, run: MlflowRun, staging: str) -> None:
        self.run, self.staging = run, staging
        self.path = os.path.join(staging, EVENTS_FILE)
        self._next: Optional[int] = None
        self._counts: Dict[str, int] = {}

    def number(self, records: List[EventRecord]) -> Tuple[list, list, List[str]]:
        """Tags `event.<n>.<name>`, counter metrics `events.<name>` and JSON lines."""
        from mlflow.entities import Metric, RunTag

        if self._next is None:
            self._sync()
        tags, metrics, lines = [], [], []
        for r in records:
            n, self._next = self._next, self._next + 1
            count = self._counts[r.name] = self._counts.get(r.name, 0) + 1
            when = datetime.datetime.fromtimestamp(r.time_ms / 1000, datetime.timezone.utc)
            line = json.dumps({"n": n, "event": r.name, "step": r.step,
                               "time": when.isoformat(timespec="milliseconds"), **r.details}, default=str)
            tags.append(RunTag(f"event.{n:04d}.{r.name}", truncate(line, MAX_TAG_VALUE)))
            metrics.append(Metric(f"{EVENT_COUNT_PREFIX}{r.name}", float(count), r.time_ms, r.step))
            lines.append(line)
        return tags, metrics, lines

    def _sync(self) -> None:
        client = self.run.client()
        run = client.get_run(self.run.run_id)
        numbers = [int(m.group(1)) for m in map(_EVENT_TAG.match, run.data.tags) if m]
        self._counts = {k[len(EVENT_COUNT_PREFIX):]: int(v) for k, v in run.data.metrics.items()
                        if k.startswith(EVENT_COUNT_PREFIX)}
        if any(f.path == EVENTS_FILE for f in client.list_artifacts(self.run.run_id)):
            downloaded = client.download_artifacts(self.run.run_id, EVENTS_FILE,
                                                   tempfile.mkdtemp(dir=self.staging))
            shutil.move(downloaded, self.path)
        else:
            open(self.path, "w").close()
        self._next = max(numbers, default=0) + 1


class Events(Parcel):
    """Events as tags, counters and lines of `events.jsonl`, numbered when first sent (not
    when logged) so that numbering continues the run's; a retry resends the same numbers."""

    def __init__(self, log: EventLog, records: List[EventRecord]) -> None:
        self.log, self.records = log, records
        self._numbered: Optional[Tuple[list, list, List[str]]] = None
        self._appended = False

    @property
    def size(self) -> int:   # type: ignore[override]
        return len(self.records)

    def __str__(self) -> str:
        return f"event {self.records[0].name!r}"

    def absorb(self, other: Parcel) -> bool:
        if not isinstance(other, Events) or self._numbered or \
                self.size + other.size > MAX_EVENTS_PER_BATCH:
            return False
        self.records.extend(other.records)
        return True

    def send(self) -> None:
        if self._numbered is None:
            self._numbered = self.log.number(self.records)
        tags, metrics, lines = self._numbered
        run = self.log.run
        run.log_batch(metrics=metrics, tags=tags)
        if not self._appended:
            with open(self.log.path, "a", encoding="utf-8") as f:
                f.writelines(line + "\n" for line in lines)
            self._appended = True
        run.client().log_artifact(run.run_id, self.log.path)
