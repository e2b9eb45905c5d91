"""Commit, find, verify, protect and prune checkpoints under one root Store.

Layout of a job's checkpoint root:

    step_000000123/manifest.json   the commit marker, written last
    step_000000123/<files>         everything the manifest lists
    .protected/step_000000123      "promoted, keep forever" markers, one object each
    .staging/step_000000130-<id>/  (local roots) checkpoints being written
    .trash/step_000000100-<id>/    (local roots) checkpoints being deleted

Commit protocol ("complete and verified, or invisible"): a step folder counts
only if its manifest exists. How the manifest and its files become visible
differs between a local root (one rename) and S3 (manifest PUT last); the
store picks that strategy once, from its root (`platform.checkpoint.commit`).

Multi-rank protocol: rank 0 calls `begin(step)` and broadcasts the staging
`token`; every other rank calls `attach(token)` to get its own `Staging`
(the same folder when ranks share a host or the root is on a shared
filesystem; a host-local folder for S3 roots). Ranks write their files, then
call `push(staging, their_paths)`, which hashes (and, for S3, uploads) them and
returns their manifest entries; these are gathered to rank 0 (e.g.
`torch.distributed.gather_object`), which calls `commit(staging, metadata,
pushed=entries)` after a barrier. Pushing spreads hashing and upload over
all ranks; rank 0 checks sizes and only hashes what nobody pushed. On a
single host ranks may skip `push` entirely: rank 0 hashes everything.
A job has one committer at a time (Ray Train runs one worker group).

Without collectives (a save committed off the training thread, where no
torch.distributed call may run): each rank `post`s its pushed entries and
whatever else rank 0 needs as a small JSON record of the attempt, and rank 0
`collect`s every rank's record (waiting up to a timeout) before it commits or
aborts. Records live with the attempt and never become part of a checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Iterable, Mapping

from platform.checkpoint.commit import Staging, check_relpath, commit_strategy, hash_and_sync, parallel
from platform.checkpoint.errors import CheckpointCommitError, CheckpointCorruptError, CheckpointNotFoundError
from platform.checkpoint.manifest import (
    MANIFEST_NAME,
    FileEntry,
    Manifest,
    Verify,
    parse_step_dir,
    read_manifest,
    sha256_stream,
    step_dir,
    verify_files,
)
from platform.storage import LocalStore, ObjectNotFoundError, Store, open_store

log = logging.getLogger(__name__)

PROTECTED_DIR = ".protected"
_TOKEN_RE = re.compile(r"step_\d{9,}-[0-9a-f]{16}")


@dataclasses.dataclass(frozen=True)
class CommittedCheckpoint:
    """A committed checkpoint: its manifest and a Store rooted at its folder."""

    step: int
    manifest: Manifest
    store: Store  # read files with store.open_read(path) or load_tensors(store, name)

    @property
    def uri(self) -> str:
        return self.store.uri

    @property
    def metadata(self) -> Mapping[str, Any]:
        return self.manifest.metadata

    @property
    def local_path(self) -> Path | None:
        """The folder itself when the root is local, so loaders can read in place."""
        return self.store.root if isinstance(self.store, LocalStore) else None


def _newest_mtime(path: Path) -> float:
    newest = path.stat().st_mtime
    for dirpath, _dirs, files in os.walk(path):
        for name in [*files, "."]:
            try:
                newest = max(newest, os.stat(os.path.join(dirpath, name)).st_mtime)
            except FileNotFoundError:
                pass
    return newest


class CheckpointStore:
    """The checkpoints of one job, under one root Store (local folder or s3://)."""

    def __init__(
        self,
        root: Store | str,
        *,
        staging_root: str | os.PathLike | None = None,
        endpoint_url: str | None = None,
    ):
        """`staging_root` is the local folder for S3 stagings (default: a
        per-root folder in the temp dir); local roots always stage inside
        themselves so that the commit is a same-filesystem rename."""
        self._root = open_store(root, endpoint_url=endpoint_url) if isinstance(root, str) else root
        self._strategy = commit_strategy(self._root, staging_root)

    @property
    def root(self) -> Store:
        return self._root

    @property
    def staging_root(self) -> Path:
        """The local folder attempts are written in before their commit (for tools and tests)."""
        return self._strategy.staging_root

    def __repr__(self) -> str:
        return f"CheckpointStore({self._root.uri!r})"

    # ----------------------------------------------------------------- writing

    def begin(self, step: int) -> Staging:
        """Start writing the checkpoint of `step` (rank 0; broadcast `.token`).

        Re-saving a step that is already committed replaces it at commit; on
        S3, which has no rename, the old one is withdrawn here. Protected
        steps are never replaced.
        """
        self._refuse_protected(step)
        self._strategy.withdraw(step)
        staging = self._staging(f"{step_dir(step)}-{uuid.uuid4().hex[:16]}")
        staging.path.mkdir(parents=True)
        return staging

    def attach(self, token: str) -> Staging:
        """The Staging of an attempt another rank began, on this host."""
        if not isinstance(token, str) or not _TOKEN_RE.fullmatch(token):
            raise ValueError(f"not a staging token: {token!r}")
        staging = self._staging(token)
        staging.path.mkdir(parents=True, exist_ok=True)
        return staging

    def push(self, staging: Staging, paths: Iterable[str] | None = None) -> list[FileEntry]:
        """Hash (and for S3 roots upload) this rank's files; send the result to rank 0.

        `paths` are relative to the staging folder (default: every file in
        it; ranks sharing a folder must each name their own). For S3 roots
        the uploaded local copies are deleted.
        """
        rels = sorted(paths) if paths is not None else LocalStore(staging.path).list()
        for rel in rels:
            check_relpath(rel)

        def one(rel: str) -> FileEntry:
            entry = hash_and_sync(staging.path_of(rel), rel)
            self._strategy.publish(staging, rel)
            return entry

        return parallel(one, rels)

    def commit(
        self,
        staging: Staging,
        metadata: Mapping[str, Any] | None = None,
        *,
        world_size: int = 1,
        pushed: Iterable[FileEntry | Mapping[str, Any]] = (),
    ) -> CommittedCheckpoint:
        """Make the staged checkpoint visible, or raise and leave it invisible.

        `pushed` are the entries other ranks returned from `push`; their
        files are size-checked, not re-hashed. `metadata` must be plain JSON.
        After an error the staging is kept (fix and retry, or `abort` it);
        `cleanup` removes abandoned ones.
        """
        if not staging.path.is_dir():
            raise CheckpointCommitError(f"staging folder {staging.path} is gone; was it committed or aborted?")
        entries = {e.path: e for e in (p if isinstance(p, FileEntry) else FileEntry.from_json(p) for p in pushed)}
        local = [rel for rel in LocalStore(staging.path).list() if rel not in entries]
        if MANIFEST_NAME in local:
            raise CheckpointCommitError(f"{MANIFEST_NAME} is reserved; rename that file in {staging.path}")
        hashed = parallel(lambda rel: hash_and_sync(staging.path_of(rel), rel), local)
        entries.update((e.path, e) for e in hashed)
        manifest = Manifest.build(staging.step, world_size, entries.values(), metadata)
        self._refuse_protected(staging.step)
        self._strategy.commit(staging, manifest, local)
        ckpt = CommittedCheckpoint(staging.step, manifest, self._root.child(step_dir(staging.step)))
        log.info(
            "committed checkpoint step %d (%d files, %.1f MB) at %s",
            ckpt.step, len(manifest.files), manifest.total_size / 1e6, ckpt.uri,
        )
        return ckpt

    def post(self, staging: Staging, rank: int, record: Mapping[str, Any]) -> None:
        """Leave this rank's record (plain JSON) of the attempt for rank 0's `collect`."""
        store, folder = self._strategy.records(staging)
        store.write_bytes(f"{folder}/rank-{rank:05d}.json", json.dumps(record).encode())

    def collect(self, staging: Staging, ranks: Iterable[int], timeout_s: float,
                poll_s: float = 0.05) -> list[dict[str, Any]]:
        """The records `ranks` posted for this attempt, in that order, once all are there.

        Removes them (they are not part of the checkpoint). Raises
        CheckpointCommitError naming the missing ranks after `timeout_s`.
        """
        store, folder = self._strategy.records(staging)
        names = [f"{folder}/rank-{rank:05d}.json" for rank in ranks]
        deadline = time.monotonic() + timeout_s
        while True:
            missing = sorted(set(names) - set(store.list(folder)))
            if not missing:
                break
            if time.monotonic() > deadline:
                raise CheckpointCommitError(
                    f"step {staging.step}: {len(missing)} rank(s) posted no record after {timeout_s:g} s "
                    f"({', '.join(m.rsplit('/', 1)[-1] for m in missing[:5])})")
            time.sleep(poll_s)
            poll_s = min(2 * poll_s, 0.25)
        records = [json.loads(store.read_bytes(name)) for name in names]
        store.delete_prefix(folder)
        return records

    def abort(self, staging: Staging) -> None:
        """Drop an attempt: its local folder and, on S3, anything already pushed."""
        shutil.rmtree(staging.path, ignore_errors=True)
        self._strategy.abort(staging)

    def _staging(self, token: str) -> Staging:
        step = parse_step_dir(token.rsplit("-", 1)[0])
        if step is None:
            raise ValueError(f"not a staging token: {token!r}")
        return Staging(step, token, self._strategy.staging_root / token)

    def _refuse_protected(self, step: int) -> None:
        """Protected (promoted) steps are never replaced."""
        if self._root.exists(f"{step_dir(step)}/{MANIFEST_NAME}") and step in self.protected():
            raise CheckpointCommitError(
                f"step {step} at {self._root.uri} is protected (promoted); unprotect it before re-saving"
            )

    # ----------------------------------------------------------------- reading

    def list_committed(self) -> list[int]:
        """Steps whose manifest exists, ascending (not verified)."""
        steps = []
        for name in self._root.list_dirs():
            step = parse_step_dir(name)
            if step is not None and self._root.exists(f"{name}/{MANIFEST_NAME}"):
                steps.append(step)
        return sorted(steps)

    def get(self, step: int, verify: bool | str | Verify = Verify.SIZE) -> CommittedCheckpoint:
        """The committed checkpoint of `step`, checked to `verify` level."""
        name = step_dir(step)
        if not self._root.exists(f"{name}/{MANIFEST_NAME}"):
            raise CheckpointNotFoundError(f"no committed checkpoint for step {step} at {self._root.uri}")
        manifest = read_manifest(self._root, step)
        folder = self._root.child(name)
        verify_files(folder, manifest, Verify.of(verify))
        return CommittedCheckpoint(step, manifest, folder)

    def latest_valid(
        self, verify: bool | str | Verify = True
    ) -> tuple[CommittedCheckpoint | None, list[tuple[int, str]]]:
        """The newest checkpoint that passes verification, and why newer ones did not.

        Returns (checkpoint or None, [(step, reason), ...] newest first).
        """
        level = Verify.of(verify)
        skipped: list[tuple[int, str]] = []
        for step in reversed(self.list_committed()):
            try:
                return self.get(step, level), skipped
            except CheckpointCorruptError as exc:
                reason = exc.reason
            except CheckpointNotFoundError:
                reason = "deleted while being read"
            log.warning("skipping checkpoint step %d at %s: %s", step, self._root.uri, reason)
            skipped.append((step, reason))
        return None, skipped

    def download(
        self, ckpt: CommittedCheckpoint, local_dir: str | os.PathLike, verify: bool | str | Verify = True
    ) -> Path:
        """Copy a checkpoint into `local_dir` (manifest included), checking every file.

        Raises CheckpointCorruptError on a mismatch; callers resuming from S3
        use `latest_valid("size")`, then `download`, and on that error fall
        back to the next older step.
        """
        level = Verify.of(verify)
        dest = Path(local_dir).expanduser().absolute()

        def one(entry: FileEntry) -> None:
            target = dest.joinpath(*entry.path.split("/"))
            try:
                ckpt.store.download_file(entry.path, target)
            except ObjectNotFoundError:
                raise CheckpointCorruptError(ckpt.step, f"{entry.path} is missing") from None
            if level is Verify.FULL:
                with open(target, "rb") as f:
                    size, digest = sha256_stream(f)
            else:
                size, digest = target.stat().st_size, entry.sha256
            if size != entry.size or digest != entry.sha256:
                raise CheckpointCorruptError(ckpt.step, f"{entry.path} does not match its manifest after download")

        parallel(one, list(ckpt.manifest.files))
        LocalStore(dest).write_bytes(MANIFEST_NAME, ckpt.manifest.to_bytes())
        return dest

    # ----------------------------------------------------------------- retention

    def protect(self, step: int, reason: str = "") -> None:
        """Keep `step` through every `retain`, across restarts (e.g. it was promoted)."""
        name = step_dir(step)
        if not self._root.exists(f"{name}/{MANIFEST_NAME}"):
            raise CheckpointNotFoundError(f"cannot protect step {step}: no committed checkpoint at {self._root.uri}")
        marker = {"step": step, "reason": reason, "protected_at": time.time()}
        self._root.write_bytes(f"{PROTECTED_DIR}/{name}", json.dumps(marker).encode())

    def unprotect(self, step: int) -> None:
        """Let retention delete `step` again."""
        self._root.delete(f"{PROTECTED_DIR}/{step_dir(step)}")

    def protected(self) -> list[int]:
        """Steps with a protection marker, ascending."""
        steps = (parse_step_dir(key.rsplit("/", 1)[-1]) for key in self._root.list(PROTECTED_DIR))
        return sorted(s for s in steps if s is not None)

    def retain(
        self, keep_last: int, protected_steps: Iterable[int] = (), verify: bool | str | Verify = Verify.SIZE
    ) -> list[int]:
        """Delete committed checkpoints beyond the newest `keep_last`; returns the deleted steps.

        Never deletes protected steps (markers or `protected_steps`) nor the
        latest checkpoint that passes `verify`, even if newer ones are broken.
        """
        if keep_last < 0:
            raise ValueError(f"keep_last must be >= 0, got {keep_last}")
        committed = self.list_committed()
        keep = set(committed[max(0, len(committed) - keep_last):]) if keep_last else set()
        keep.update(protected_steps)
        keep.update(self.protected())
        latest, _ = self.latest_valid(verify)
        if latest is not None:
            keep.add(latest.step)
        deleted = []
        for step in committed:
            if step not in keep:
                self._strategy.delete(step)
                deleted.append(step)
        if deleted:
            log.info("retention deleted checkpoint steps %s at %s", deleted, self._root.uri)
        return deleted

    def cleanup(self, older_than_s: float = 3600.0) -> list[str]:
        """Remove what crashed writers left behind; returns what was removed.

        Uncommitted step folders, staging folders and (S3) unfinished
        multipart uploads count as abandoned once untouched for
        `older_than_s`, so a writer still at work is left alone.
        """
        removed: list[str] = []
        cutoff = time.time() - older_than_s
        for name in self._root.list_dirs():
            if parse_step_dir(name) is None or self._root.exists(f"{name}/{MANIFEST_NAME}"):
                continue
            infos = self._root.list_info(name)
            if max((i.mtime for i in infos), default=0.0) <= cutoff:
                self._root.delete_prefix(name)
                removed.append(f"{self._root.uri}/{name}")
        staging_root = self._strategy.staging_root
        if staging_root.is_dir():
            for entry in staging_root.iterdir():
                if entry.is_dir() and _TOKEN_RE.fullmatch(entry.name) and _newest_mtime(entry) <= cutoff:
                    shutil.rmtree(entry, ignore_errors=True)
                    removed.append(str(entry))
        removed.extend(self._strategy.cleanup(older_than_s))
        if removed:
            log.info("checkpoint cleanup removed %s", removed)
        return removed


__all__ = [
    "CheckpointStore",
    "CommittedCheckpoint",
]
