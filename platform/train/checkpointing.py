"""Save and resume a training run through the job's CheckpointStore, from all ranks.

Rank 0 begins a staging attempt and broadcasts its token; every rank writes
its share of the state into it (platform.checkpoint.trainer_state); rank 0
commits after a barrier, so a checkpoint is either committed with all ranks'
files or not visible at all. Resume: rank 0 finds the newest checkpoint that
verifies (falling back past corrupt or incomplete ones, and saying which),
every rank reads it.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from platform.checkpoint import CheckpointStore
from platform.checkpoint.trainer_state import TrainerState, load_state, save_state
from platform.collectives import barrier, broadcast, gather
from platform.config.schema import JobConfig

log = logging.getLogger("platform.train")


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


def save(store: CheckpointStore, eng, model, *, rank: int, world_size: int, step: int,
         consumed_sequences: int, extra: dict[str, Any], keep_last: int) -> float:
    """Write and commit the checkpoint of `step` (collective). Returns seconds taken."""
    start = time.perf_counter()
    token = broadcast(store.begin(step).token if rank == 0 else None)
    staging = store.attach(token)
    try:
        files = save_state(staging.path, eng, model, rank=rank, world_size=world_size,
                           ep=eng.expert_parallel, step=step,
                           consumed_sequences=consumed_sequences, extra=extra)
        # Each rank hashes (and for S3 uploads) its own files; rank 0 commits them all.
        entries = [e.to_json() for e in store.push(staging, files)]
        pushed = gather(entries)
        if rank == 0:
            store.commit(staging, {"step": step, "consumed_sequences": consumed_sequences,
                                   "expert_parallel": eng.expert_parallel, **extra},
                         world_size=world_size, pushed=[e for part in pushed for e in part])
            store.retain(keep_last)
    except BaseException:
        if rank == 0:
            store.abort(staging)
        raise
    barrier()
    return time.perf_counter() - start


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
