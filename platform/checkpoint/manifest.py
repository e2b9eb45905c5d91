"""The manifest: the list of a checkpoint's files, and its commit marker.

A checkpoint folder counts only once `manifest.json` is in it, and the
manifest names every file with its size and sha256, so a reader can tell a
complete, intact checkpoint from a damaged one without trusting anything else.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import enum
import hashlib
import json
import re
from typing import Any, BinaryIO, Iterable, Mapping

from platform.checkpoint.errors import CheckpointCorruptError
from platform.storage import ObjectInfo, ObjectNotFoundError, Store

FORMAT = "dbrx-platform/checkpoint"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
_STEP_RE = re.compile(r"step_(\d{9,})")
_HASH_CHUNK = 8 * 1024 * 1024


def step_dir(step: int) -> str:
    """Folder name of a step; zero-padded so names sort like numbers."""
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"checkpoint step must be a non-negative int, got {step!r}")
    return f"step_{step:09d}"


def parse_step_dir(name: str) -> int | None:
    """The step a folder name stands for, or None if it is not a step folder."""
    match = _STEP_RE.fullmatch(name)
    return int(match.group(1)) if match else None


def sha256_stream(f: BinaryIO) -> tuple[int, str]:
    """(size, sha256 hex) of everything left in a binary stream."""
    digest, size = hashlib.sha256(), 0
    while chunk := f.read(_HASH_CHUNK):
        digest.update(chunk)
        size += len(chunk)
    return size, digest.hexdigest()


class Verify(str, enum.Enum):
    """How hard a reader checks a checkpoint against its manifest.

    SIZE costs one listing; FULL reads every byte (sha256), which for a
    multi-terabyte checkpoint on S3 is a full download.
    """

    NONE = "none"  # the manifest exists and parses
    SIZE = "size"  # plus every file exists with the right size
    FULL = "full"  # plus every file's sha256 matches

    @classmethod
    def of(cls, value: "bool | str | Verify") -> "Verify":
        if value is True:
            return cls.FULL
        if value is False:
            return cls.NONE
        return cls(value)


@dataclasses.dataclass(frozen=True)
class FileEntry:
    """One file of a checkpoint, relative to its step folder."""

    path: str
    size: int
    sha256: str

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "sha256": self.sha256}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "FileEntry":
        path, size, sha = data["path"], data["size"], data["sha256"]
        if not isinstance(path, str) or not isinstance(size, int) or not isinstance(sha, str) or len(sha) != 64:
            raise ValueError(f"bad file entry {dict(data)!r}")
        return cls(path, size, sha)


@dataclasses.dataclass(frozen=True)
class Manifest:
    """What a committed checkpoint holds, and who wrote it when."""

    step: int
    world_size: int
    files: tuple[FileEntry, ...]
    metadata: Mapping[str, Any]
    created: str  # ISO 8601, UTC

    @classmethod
    def build(
        cls, step: int, world_size: int, files: Iterable[FileEntry], metadata: Mapping[str, Any] | None
    ) -> "Manifest":
        """A new manifest; refuses metadata that would not survive a JSON round trip."""
        metadata = dict(metadata or {})
        try:
            json.dumps(metadata, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"checkpoint metadata must be plain JSON (str keys, no NaN): {exc}") from None
        created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")
        return cls(step, world_size, tuple(sorted(files, key=lambda e: e.path)), metadata, created)

    @property
    def total_size(self) -> int:
        return sum(entry.size for entry in self.files)

    def to_bytes(self) -> bytes:
        doc = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "step": self.step,
            "created": self.created,
            "world_size": self.world_size,
            "total_size": self.total_size,
            "files": [entry.to_json() for entry in self.files],
            "metadata": self.metadata,
        }
        return (json.dumps(doc, indent=1, allow_nan=False) + "\n").encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> "Manifest":
        """Parse a manifest; any damage raises ValueError with the reason."""
        try:
            doc = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"manifest is not valid JSON ({exc})") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ValueError("manifest has an unknown format")
        if doc.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"manifest format_version {doc.get('format_version')!r} is not {FORMAT_VERSION}")
        try:
            files = tuple(FileEntry.from_json(e) for e in doc["files"])
            manifest = cls(int(doc["step"]), int(doc["world_size"]), files, dict(doc["metadata"]), str(doc["created"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"manifest is incomplete ({exc})") from None
        if doc.get("total_size") != manifest.total_size:
            raise ValueError("manifest total_size does not match its file list")
        return manifest


def read_manifest(store: Store, step: int) -> Manifest:
    """The manifest of `step` under a checkpoint root.

    A missing or damaged manifest raises CheckpointCorruptError; storage
    failures (credentials, network) propagate, since they say nothing about
    the checkpoint itself.
    """
    try:
        data = store.read_bytes(f"{step_dir(step)}/{MANIFEST_NAME}")
    except ObjectNotFoundError:
        raise CheckpointCorruptError(step, "its manifest.json is missing") from None
    try:
        manifest = Manifest.from_bytes(data)
    except ValueError as exc:
        raise CheckpointCorruptError(step, str(exc)) from None
    if manifest.step != step:
        raise CheckpointCorruptError(step, f"its manifest says step {manifest.step}")
    return manifest


def size_mismatches(listing: Iterable[ObjectInfo], files: Iterable[FileEntry]) -> list[str]:
    """Problems found comparing a folder listing with manifest entries."""
    sizes = {info.key: info.size for info in listing}
    problems = []
    for entry in files:
        actual = sizes.get(entry.path)
        if actual is None:
            problems.append(f"{entry.path} is missing")
        elif actual != entry.size:
            problems.append(f"{entry.path} has {actual} bytes, manifest says {entry.size}")
    return problems


def verify_files(folder: Store, manifest: Manifest, level: Verify) -> None:
    """Check a step folder against its manifest; CheckpointCorruptError on any mismatch."""
    if level is Verify.NONE:
        return
    problems = size_mismatches(folder.list_info(), manifest.files)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CheckpointCorruptError(manifest.step, f"{problems[0]}{more}")
    if level is Verify.FULL:
        for entry in manifest.files:
            try:
                with folder.open_read(entry.path) as f:
                    _, digest = sha256_stream(f)
            except ObjectNotFoundError:
                raise CheckpointCorruptError(manifest.step, f"{entry.path} is missing") from None
            if digest != entry.sha256:
                raise CheckpointCorruptError(manifest.step, f"{entry.path} fails its sha256 check")
