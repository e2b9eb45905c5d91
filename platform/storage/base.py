"""The Store interface, its errors and key rules, shared by every backend."""

from __future__ import annotations

import abc
import dataclasses
import os
from typing import BinaryIO

# Temporary files of atomic local writes carry this marker; listings skip them.
TMP_MARK = ".dbrx-tmp-"


class StorageError(Exception):
    """A storage operation failed; the message says which URI and what to do."""


class InvalidStoreURIError(StorageError):
    """The URI names no store this platform can open."""


class ObjectNotFoundError(StorageError):
    """The key does not exist in the store."""


class BucketNotFoundError(StorageError):
    """The S3 bucket does not exist."""


class AccessDeniedError(StorageError):
    """Credentials are missing or wrong, or lack permission for this URI."""


class EndpointUnreachableError(StorageError):
    """The storage endpoint could not be reached, even after retries."""


@dataclasses.dataclass(frozen=True)
class ObjectInfo:
    """One stored object: its key, size in bytes and modification time (Unix s)."""

    key: str
    size: int
    mtime: float


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a directory's entries (creations, renames) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_key(key: str) -> list[str]:
    """Split a key into parts, rejecting anything that could escape the root."""
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\\" in key:
        raise ValueError(f"invalid storage key {key!r}: use a relative 'a/b/c' path without '..'")
    return parts


def check_prefix(prefix: str) -> str:
    """Normalise a folder prefix to '' or 'a/b' (no surrounding slashes)."""
    prefix = prefix.strip("/")
    if prefix:
        check_key(prefix)
    return prefix


class Store(abc.ABC):
    """A folder of objects addressed by '/'-separated keys relative to `uri`."""

    @property
    @abc.abstractmethod
    def uri(self) -> str:
        """The URI this store was opened at (accepted by `open_store`)."""

    @abc.abstractmethod
    def list_info(self, prefix: str = "") -> list[ObjectInfo]:
        """Every object under folder `prefix`, recursively, sorted by key."""

    def list(self, prefix: str = "") -> list[str]:
        """Every key under folder `prefix`, recursively, sorted."""
        return [info.key for info in self.list_info(prefix)]

    @abc.abstractmethod
    def list_dirs(self, prefix: str = "") -> list[str]:
        """Names of the immediate sub-folders of folder `prefix`, sorted."""

    @abc.abstractmethod
    def exists(self, key: str) -> bool:
        """Whether an object exists at `key`."""

    @abc.abstractmethod
    def size(self, key: str) -> int:
        """Size of the object at `key` in bytes."""

    @abc.abstractmethod
    def read_bytes(self, key: str) -> bytes:
        """The whole object at `key` (use `open_read` for big objects)."""

    @abc.abstractmethod
    def write_bytes(self, key: str, data: bytes) -> None:
        """Create or replace the object at `key`; readers see old or new, never half."""

    @abc.abstractmethod
    def open_read(self, key: str) -> BinaryIO:
        """A streaming binary reader for the object at `key`; close it after use."""

    @abc.abstractmethod
    def upload_file(self, local_path: str | os.PathLike, key: str) -> None:
        """Copy a local file to `key` (multipart on S3, so any size streams)."""

    @abc.abstractmethod
    def download_file(self, key: str, local_path: str | os.PathLike) -> None:
        """Copy the object at `key` to a local file, atomically replacing it."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object at `key`; a missing key is not an error."""

    @abc.abstractmethod
    def delete_prefix(self, prefix: str) -> None:
        """Remove every object under folder `prefix` (which must not be empty)."""

    @abc.abstractmethod
    def child(self, prefix: str) -> "Store":
        """The store rooted at folder `prefix` of this one."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"
