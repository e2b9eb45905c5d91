"""How a staged checkpoint becomes visible: one strategy per kind of root, chosen once.

A step folder counts only if its manifest exists, and the manifest appears
only after every file it lists is durable and checked.

* `LocalCommit`, a local (or shared-filesystem) root: writers fill
  `.staging/<token>/` inside the root; commit hashes and fsyncs every file,
  checks sizes, writes the manifest into the staging folder, fsyncs the tree,
  then one `os.rename` moves it to `step_N/`. The rename is the commit: a
  crash before it leaves only staging garbage, a crash after it leaves a
  complete checkpoint.
* `ObjectStoreCommit`, an S3 root: writers fill a local staging folder;
  files are uploaded to `step_N/` (each rank's as it pushes, the rest at
  commit), listed back to check every size, and `manifest.json` is PUT last.
  A PUT is atomic and S3 is strongly consistent, so readers either see the
  manifest with all its files or no manifest (and ignore the folder). Content
  is protected in transit by botocore's upload checksums; sha256 in the
  manifest lets any reader re-check it end to end.
"""

from __future__ import annotations

import abc
import concurrent.futures
import dataclasses
import hashlib
import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Callable, Sequence, TypeVar

from platform.checkpoint.errors import CheckpointCommitError
from platform.checkpoint.manifest import MANIFEST_NAME, FileEntry, Manifest, sha256_stream, size_mismatches, step_dir
from platform.storage import LocalStore, S3Store, Store, fsync_dir

log = logging.getLogger(__name__)

STAGING_DIR = ".staging"
TRASH_DIR = ".trash"
RECORDS_DIR = ".ranks"
_IO_THREADS = 8
T = TypeVar("T")
R = TypeVar("R")


@dataclasses.dataclass(frozen=True)
class Staging:
    """A local folder where one checkpoint is written before it is committed."""

    step: int
    token: str  # names this attempt; broadcast it so other ranks can `attach`
    path: Path

    def file(self, relpath: str) -> Path:
        """Where to write `relpath` ('a/b.safetensors'); parent folders are created."""
        target = self.path_of(relpath)
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def path_of(self, relpath: str) -> Path:
        """Where the file `relpath` of this attempt lies."""
        check_relpath(relpath)
        return self.path.joinpath(*relpath.split("/"))


def check_relpath(relpath: str) -> None:
    """Refuse a staged file name that could escape its folder or pass for the commit marker."""
    parts = relpath.split("/")
    if not relpath or relpath.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\\" in relpath:
        raise ValueError(f"invalid checkpoint file path {relpath!r}: use a relative 'a/b' path")
    if relpath == MANIFEST_NAME:
        raise ValueError(f"{MANIFEST_NAME!r} is reserved for the commit marker")


def parallel(fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """fn over items on a few threads (hashing and boto3 release the GIL)."""
    if len(items) <= 1:
        return [fn(item) for item in items]
    with concurrent.futures.ThreadPoolExecutor(min(_IO_THREADS, len(items))) as pool:
        return list(pool.map(fn, items))


def hash_and_sync(path: Path, relpath: str) -> FileEntry:
    """The manifest entry of a local file, made durable on the way."""
    with open(path, "rb") as f:
        size, digest = sha256_stream(f)
        os.fsync(f.fileno())
    return FileEntry(relpath, size, digest)


def _fsync_tree(root: Path) -> None:
    """fsync every folder under root, deepest first, so all names are durable."""
    for dirpath, _dirs, _files in os.walk(root, topdown=False):
        fsync_dir(dirpath)


class CommitStrategy(abc.ABC):
    """What differs between roots in writing, committing and deleting a checkpoint."""

    def __init__(self, root: Store, staging_root: Path):
        self.root = root
        self.staging_root = staging_root  # where Stagings are made

    @abc.abstractmethod
    def withdraw(self, step: int) -> None:
        """Before a new attempt at `step`: take down what is committed there, if it must go first."""

    @abc.abstractmethod
    def records(self, staging: Staging) -> tuple[Store, str]:
        """(store, folder) where ranks leave their records of an attempt for rank 0."""

    @abc.abstractmethod
    def publish(self, staging: Staging, relpath: str) -> None:
        """A rank pushed this hashed file: move it towards its committed place."""

    @abc.abstractmethod
    def commit(self, staging: Staging, manifest: Manifest, unpushed: list[str]) -> None:
        """Make `manifest` and its files visible at once, or raise and leave them invisible.

        `unpushed` are the staged files nobody pushed (rank 0 hashed them).
        """

    @abc.abstractmethod
    def abort(self, staging: Staging) -> None:
        """Remove what an abandoned attempt already published (its staging folder is gone)."""

    @abc.abstractmethod
    def delete(self, step: int) -> None:
        """Delete a committed checkpoint so that no reader ever sees it half gone."""

    @abc.abstractmethod
    def cleanup(self, older_than_s: float) -> list[str]:
        """Remove this root's own leftovers of crashed writers; returns what was removed."""


class LocalCommit(CommitStrategy):
    """A local or shared-filesystem root: stage inside it, commit with one rename."""

    root: LocalStore

    def __init__(self, root: LocalStore):
        # Inside the root, so that the commit is a same-filesystem rename.
        super().__init__(root, root.root / STAGING_DIR)

    def withdraw(self, step: int) -> None:
        """Nothing: the commit's rename replaces the old checkpoint."""

    def records(self, staging: Staging) -> tuple[Store, str]:
        """In the staging folder, which every rank sees (a shared root)."""
        return LocalStore(staging.path), RECORDS_DIR

    def publish(self, staging: Staging, relpath: str) -> None:
        """Nothing: the file is committed where it lies."""

    def commit(self, staging: Staging, manifest: Manifest, unpushed: list[str]) -> None:
        problems = size_mismatches(LocalStore(staging.path).list_info(), manifest.files)
        if problems:
            raise CheckpointCommitError(f"step {manifest.step} not committed: {'; '.join(problems[:5])}")
        root = self.root.root
        target = root / step_dir(manifest.step)
        LocalStore(staging.path).write_bytes(MANIFEST_NAME, manifest.to_bytes())
        _fsync_tree(staging.path)
        trash = None
        if target.exists():
            # No atomic directory swap in the stdlib: the old one steps aside
            # first, so for an instant readers fall back to the step before.
            log.warning("replacing existing checkpoint %s", target)
            trash = root / TRASH_DIR / staging.token
            trash.parent.mkdir(exist_ok=True)
            os.rename(target, trash)
        os.rename(staging.path, target)  # the commit
        fsync_dir(root)
        fsync_dir(staging.path.parent)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)

    def abort(self, staging: Staging) -> None:
        """Nothing: an attempt publishes nothing before its rename."""

    def delete(self, step: int) -> None:
        name = step_dir(step)
        trash = self.root.root / TRASH_DIR / f"{name}-{uuid.uuid4().hex[:16]}"
        trash.parent.mkdir(exist_ok=True)
        os.rename(self.root.root / name, trash)  # invisible at once
        shutil.rmtree(trash, ignore_errors=True)

    def cleanup(self, older_than_s: float) -> list[str]:
        """Empty the trash: what is in it is already invisible, so this is always safe."""
        trash = self.root.root / TRASH_DIR
        if not trash.is_dir():
            return []
        removed = []
        for entry in trash.iterdir():
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(str(entry))
        return removed


class ObjectStoreCommit(CommitStrategy):
    """An object store root (S3): upload the files, then PUT the manifest last."""

    def __init__(self, root: Store, staging_root: str | os.PathLike | None):
        """`staging_root` defaults to a per-root folder in the temp dir."""
        if staging_root is None:
            tag = hashlib.sha256(root.uri.encode()).hexdigest()[:12]
            staging_root = Path(tempfile.gettempdir()) / "dbrx-checkpoint-staging" / tag
        super().__init__(root, Path(staging_root).expanduser().absolute())

    def withdraw(self, step: int) -> None:
        """S3 has no rename: remove whatever it holds for `step`, manifest first so readers stop at once."""
        name = step_dir(step)
        if self.root.exists(f"{name}/{MANIFEST_NAME}"):
            log.warning("replacing existing checkpoint %s/%s", self.root.uri, name)
            self.root.delete(f"{name}/{MANIFEST_NAME}")
        self.root.delete_prefix(name)

    def records(self, staging: Staging) -> tuple[Store, str]:
        """Beside the attempt's uploads (stagings are host-local), invisible without a manifest."""
        return self.root.child(step_dir(staging.step)), f"{RECORDS_DIR}/{staging.token}"

    def publish(self, staging: Staging, relpath: str) -> None:
        """Upload it and delete the local copy."""
        local = staging.path_of(relpath)
        self.root.child(step_dir(staging.step)).upload_file(local, relpath)
        local.unlink()

    def commit(self, staging: Staging, manifest: Manifest, unpushed: list[str]) -> None:
        folder = self.root.child(step_dir(manifest.step))
        parallel(lambda rel: folder.upload_file(staging.path_of(rel), rel), unpushed)
        problems = size_mismatches(folder.list_info(), manifest.files)
        if problems:
            raise CheckpointCommitError(
                f"step {manifest.step} not committed, {folder.uri} does not match: {'; '.join(problems[:5])}"
            )
        folder.write_bytes(MANIFEST_NAME, manifest.to_bytes())  # the commit
        shutil.rmtree(staging.path, ignore_errors=True)

    def abort(self, staging: Staging) -> None:
        name = step_dir(staging.step)
        if not self.root.exists(f"{name}/{MANIFEST_NAME}"):
            self.root.delete_prefix(name)

    def delete(self, step: int) -> None:
        name = step_dir(step)
        self.root.delete(f"{name}/{MANIFEST_NAME}")  # invisible at once
        self.root.delete_prefix(name)

    def cleanup(self, older_than_s: float) -> list[str]:
        """Abort multipart uploads that crashed writers left open (they are billed)."""
        if isinstance(self.root, S3Store):
            return self.root.abort_multipart_uploads(older_than_s)
        return []


def commit_strategy(root: Store, staging_root: str | os.PathLike | None = None) -> CommitStrategy:
    """The strategy for `root`: a rename on local roots, manifest-last uploads on object stores."""
    if isinstance(root, LocalStore):
        return LocalCommit(root)
    return ObjectStoreCommit(root, staging_root)
