"""Save and resume a training run through the job's CheckpointStore, from all ranks.

A save has two halves. In the training thread, a collective: rank 0 begins a
staging attempt and broadcasts its token, and every rank copies its share of
the state into host memory (platform.checkpoint.snapshot). That is all
training waits for. Then a background thread per rank, while training goes
on: the rank writes its share into the staging, hashes (and for S3 uploads)
it, and posts a record of it (manifest entries, RNG state, bytes, seconds)
through the store; rank 0's thread collects every rank's record, writes
trainer.json, commits and applies retention. The background never calls
torch.distributed (the training thread's collectives own the process group),
so ranks meet through the store instead (CheckpointStore.post / collect).

- At most one save is in flight: a save first waits for this rank's previous
  one (rank 0's ends with its commit); only then are the host buffers refilled.
- `Checkpointer.wait` (a preemption checkpoint, the end of training) returns on
  every rank once the last save is committed or has failed.
- A failed save (any rank's write or push, a rank silent for
  `commit_timeout_s`, the commit) is logged and reported (`SaveReport.error`);
  rank 0 aborts the attempt, so it never becomes visible and the previous
  checkpoint stays the latest. Training goes on.
- `async_save=False` runs the same steps in the training thread and waits for
  the commit: the same files, the old stall.

Resume: rank 0 finds the newest checkpoint that verifies (falling back past
corrupt or incomplete ones, and saying which), every rank reads it.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from platform.checkpoint import CheckpointCommitError, CheckpointStore, Staging
from platform.checkpoint.snapshot import HostBuffers, Snapshot, my_units, take_snapshot
from platform.checkpoint.trainer_state import (
    RankPart, TrainerState, load_state, write_snapshot, write_trainer_state,
)
from platform.collectives import barrier, broadcast
from platform.config.schema import JobConfig

log = logging.getLogger("platform.train")

# How long rank 0 waits for every rank's record of a save before it gives the save up.
COMMIT_TIMEOUT_S = 1800.0


def job_checkpoint_uri(cfg: JobConfig) -> str:
    base = cfg.checkpoint.uri.rstrip("/")
    if "://" not in base:
        base = os.path.abspath(os.path.expanduser(base))
    return f"{base}/{cfg.name}"


def open_checkpoints(cfg: JobConfig) -> CheckpointStore:
    return CheckpointStore(job_checkpoint_uri(cfg), endpoint_url=cfg.checkpoint.s3_endpoint_url)


@dataclass
class Resumed:
    state: TrainerState
    step: int
    skipped: list[tuple[int, str]]   # newer checkpoints that failed verification, and why
    seconds: float


@dataclass(frozen=True)
class SaveReport:
    """How one save went, as this rank saw it (rank 0: the whole checkpoint)."""

    step: int
    total_s: float              # from the start of the save to its commit (or failure)
    bytes: int                  # files written (rank 0: by all ranks)
    rank_mb_per_s: float        # the slowest rank's write rate: its bytes over its writing time
    error: Optional[str] = None


@dataclass(frozen=True)
class _Pending:
    """A save whose state is in host memory, to be written and committed."""

    step: int
    consumed_sequences: int
    extra: dict[str, Any]
    staging: Staging
    snapshot: Snapshot
    start: float


class Checkpointer:
    """One worker's saves: taken in the training thread, written and committed in the background."""

    def __init__(self, store: CheckpointStore, eng, model, *, rank: int, world_size: int,
                 keep_last: int, async_save: bool = True, commit_timeout_s: float = COMMIT_TIMEOUT_S,
                 chunk_bytes: Optional[int] = None) -> None:
        """`chunk_bytes`: the largest dense piece (default: placement's, from the world size)."""
        self.store, self.eng, self.model = store, eng, model
        self.rank, self.world_size, self.keep_last = rank, world_size, keep_last
        self.async_save, self.commit_timeout_s = async_save, commit_timeout_s
        self._units = my_units(model, rank=rank, world_size=world_size, ep=eng.expert_parallel,
                               chunk_bytes=chunk_bytes)
        self._buffers = HostBuffers()
        self._thread: Optional[threading.Thread] = None
        self._outcome: Optional[SaveReport] = None   # the thread's report, set before it ends
        self._reports: list[SaveReport] = []
        self._last_committed = True

    def save(self, step: int, *, consumed_sequences: int, extra: dict[str, Any]) -> float:
        """Take the checkpoint of `step` (collective); returns the seconds training was blocked."""
        start = time.perf_counter()
        self._join()
        token = broadcast(self.store.begin(step).token if self.rank == 0 else None)
        staging = self.store.attach(token)
        try:
            snapshot = take_snapshot(self.eng, self.model, self._units, self._buffers)
        except BaseException:
            if self.rank == 0:
                self.store.abort(staging)
            raise
        pending = _Pending(step, consumed_sequences, dict(extra), staging, snapshot, start)
        if not self.async_save:
            self._settle(self._write_and_commit(pending))
            self.wait()
            return time.perf_counter() - start
        self._thread = threading.Thread(target=self._run, args=(pending,), name=f"checkpoint-{step}",
                                        daemon=True)
        self._thread.start()
        return time.perf_counter() - start

    def wait(self) -> bool:
        """Block until the last save is committed or failed, on every rank (collective).

        True if it was committed (rank 0's word, the same on every rank).
        """
        self._join()
        return broadcast(self._last_committed if self.rank == 0 else None)

    def finished(self) -> list[SaveReport]:
        """Reports of the saves that ended since the last call; never blocks."""
        if self._thread is not None and not self._thread.is_alive():
            self._join()
        reports, self._reports = self._reports, []
        return reports

    def _run(self, pending: _Pending) -> None:
        self._outcome = self._write_and_commit(pending)

    def _join(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            self._settle(self._outcome)

    def _settle(self, report: SaveReport) -> None:
        self._reports.append(report)
        self._last_committed = report.error is None

    def _write_and_commit(self, pending: _Pending) -> SaveReport:
        record = self._write(pending)
        if self.rank == 0:
            records, error = self._commit(pending, record)
        else:
            unposted = self._post(pending.staging, record)
            records, error = [record], record["error"] or unposted
        rates = [r["bytes"] / r["seconds"] / 1e6 for r in records if r["bytes"] and r["seconds"] > 0]
        return SaveReport(pending.step, time.perf_counter() - pending.start,
                          sum(r["bytes"] for r in records), min(rates, default=0.0), error)

    def _write(self, pending: _Pending) -> dict[str, Any]:
        """Write, hash and push this rank's share; its record for rank 0 (errors included)."""
        began = time.perf_counter()
        record: dict[str, Any] = {"rank": self.rank, "sets": [], "rng": pending.snapshot.rng,
                                  "entries": [], "bytes": 0, "error": None}
        try:
            record["sets"], files = write_snapshot(pending.staging.path, pending.snapshot, self.rank)
            entries = self.store.push(pending.staging, files)
            record.update(entries=[e.to_json() for e in entries], bytes=sum(e.size for e in entries))
        except Exception as exc:
            record["error"] = f"rank {self.rank}: {type(exc).__name__}: {exc}"
            log.warning("checkpoint step %d: writing failed on rank %d: %s",
                        pending.step, self.rank, record["error"])
        record["seconds"] = time.perf_counter() - began
        return record

    def _post(self, staging: Staging, record: dict[str, Any]) -> Optional[str]:
        try:
            self.store.post(staging, self.rank, record)
            return None
        except Exception as exc:   # rank 0 gives the save up when it does not hear from us
            log.warning("checkpoint step %d: rank %d could not post its record: %s",
                        staging.step, self.rank, exc)
            return f"rank {self.rank}: {type(exc).__name__}: {exc}"

    def _commit(self, pending: _Pending, own: dict[str, Any]) -> tuple[list[dict[str, Any]], Optional[str]]:
        """Rank 0: every rank's record, then trainer.json and the commit, or abort; then retention."""
        records = [own]
        staging, step, ep = pending.staging, pending.step, self.eng.expert_parallel
        try:
            records += self.store.collect(staging, range(1, self.world_size), self.commit_timeout_s)
            errors = [r["error"] for r in records if r["error"]]
            if errors:
                raise CheckpointCommitError("; ".join(errors[:3]))
            parts = [RankPart(r["rank"], r["sets"], r["rng"]) for r in records]
            write_trainer_state(staging.path, parts, step=step,
                                consumed_sequences=pending.consumed_sequences,
                                adam_step=pending.snapshot.adam_step, world_size=self.world_size,
                                ep=ep, extra=pending.extra)
            self.store.commit(staging, {"step": step, "consumed_sequences": pending.consumed_sequences,
                                        "expert_parallel": ep, **pending.extra},
                              world_size=self.world_size, pushed=[e for r in records for e in r["entries"]])
        except Exception as exc:
            log.warning("checkpoint step %d not committed (%s); the previous checkpoint stays the "
                        "latest", step, exc)
            try:
                self.store.abort(staging)
            except Exception as abort_exc:
                log.warning("checkpoint step %d: could not remove the attempt: %s", step, abort_exc)
            return records, f"{type(exc).__name__}: {exc}"
        try:
            self.store.retain(self.keep_last)
        except Exception as exc:   # the checkpoint is committed; retention runs again next time
            log.warning("checkpoint retention after step %d failed: %s", step, exc)
        return records, None


def resume(store: CheckpointStore, eng, model, *, rank: int, world_size: int) -> Optional[Resumed]:
    """Load the newest checkpoint that verifies (collective); None when the job has none.

    Rank 0 checks every file against its manifest (size and sha256) before
    anyone reads, so a corrupt or half-written checkpoint is skipped in favour
    of the one before it. A checkpoint that verifies but does not fit the
    model (a changed config) is an error, not a silent restart from scratch.
    """
    start = time.perf_counter()
    choice: tuple[Optional[int], list] = (None, [])
    if rank == 0:
        # Whatever a crashed writer left (staging folders, uncommitted uploads) is garbage
        # now: Ray Train stops a worker group before it starts the next, so no writer of
        # this job is at work while its workers resume.
        store.cleanup(older_than_s=0)
        ckpt, skipped = store.latest_valid(verify=True)
        choice = (None if ckpt is None else ckpt.step, skipped)
    step, skipped = broadcast(choice)
    if step is None:
        return None
    ckpt = store.get(step, verify=False)
    local = ckpt.local_path
    if local is None:  # remote store: every rank reads its own verified copy
        local = Path(tempfile.mkdtemp(prefix=f"dbrx-resume-{step}-"))
        store.download(ckpt, local, verify=True)
    state = load_state(Path(local), eng, model, rank=rank, world_size=world_size)
    barrier()
    return Resumed(state, step, [tuple(s) for s in skipped], time.perf_counter() - start)
