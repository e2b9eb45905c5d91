"""Stores in a local (or shared, e.g. NFS) directory, with atomic writes."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import BinaryIO, Iterator

from platform.storage.base import (
    TMP_MARK,
    AccessDeniedError,
    ObjectInfo,
    ObjectNotFoundError,
    StorageError,
    Store,
    check_key,
    check_prefix,
    fsync_dir,
)

_COPY_CHUNK = 8 * 1024 * 1024


def _atomic_write(path: Path, fill) -> None:
    """Write `path` through a fsynced temporary sibling and one `os.replace`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{TMP_MARK}{uuid.uuid4().hex}-{path.name}")
    try:
        with open(tmp, "wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


class LocalStore(Store):
    """A store in a local (or shared, e.g. NFS) directory."""

    def __init__(self, root: str | os.PathLike):
        self._root = Path(os.path.abspath(os.path.expanduser(os.fspath(root))))

    @property
    def root(self) -> Path:
        """The directory holding this store's objects."""
        return self._root

    @property
    def uri(self) -> str:
        return str(self._root)

    def path(self, key: str) -> Path:
        """The local file that holds `key`."""
        return self._root.joinpath(*check_key(key))

    def _folder(self, prefix: str) -> Path:
        prefix = check_prefix(prefix)
        return self._root.joinpath(*prefix.split("/")) if prefix else self._root

    @contextlib.contextmanager
    def _errors(self, key: str, action: str) -> Iterator[None]:
        """Turn OS errors into StorageErrors that name the file."""
        where = os.path.join(self.uri, key) if key else self.uri
        try:
            yield
        except StorageError:
            raise
        except FileNotFoundError:
            raise ObjectNotFoundError(f"no such file: {where}") from None
        except (IsADirectoryError, NotADirectoryError):
            raise StorageError(f"cannot {action} {where}: a folder and a file share this name") from None
        except PermissionError as exc:
            raise AccessDeniedError(
                f"permission denied to {action} {where} ({exc.strerror}): "
                "fix the folder's permissions or choose another location in the config"
            ) from None
        except OSError as exc:
            raise StorageError(f"cannot {action} {where}: {exc.strerror or exc}") from None

    def list_info(self, prefix: str = "") -> list[ObjectInfo]:
        base = self._folder(prefix)
        out = []
        for dirpath, _dirnames, filenames in os.walk(base):
            rel_dir = os.path.relpath(dirpath, self._root)
            for name in filenames:
                if name.startswith(TMP_MARK):
                    continue
                full = os.path.join(dirpath, name)
                try:
                    st = os.stat(full)
                except FileNotFoundError:
                    continue  # removed while we walked
                key = name if rel_dir == "." else f"{rel_dir.replace(os.sep, '/')}/{name}"
                out.append(ObjectInfo(key, st.st_size, st.st_mtime))
        out.sort(key=lambda info: info.key)
        return out

    def list_dirs(self, prefix: str = "") -> list[str]:
        try:
            with os.scandir(self._folder(prefix)) as entries:
                return sorted(e.name for e in entries if e.is_dir())
        except (FileNotFoundError, NotADirectoryError):
            return []

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def size(self, key: str) -> int:
        with self._errors(key, "stat"):
            return self.path(key).stat().st_size

    def read_bytes(self, key: str) -> bytes:
        with self._errors(key, "read"):
            return self.path(key).read_bytes()

    def write_bytes(self, key: str, data: bytes) -> None:
        with self._errors(key, "write"):
            _atomic_write(self.path(key), lambda f: f.write(data))

    def open_read(self, key: str) -> BinaryIO:
        with self._errors(key, "open"):
            return open(self.path(key), "rb")

    def upload_file(self, local_path: str | os.PathLike, key: str) -> None:
        with self._errors(key, "write"):
            with open(local_path, "rb") as src:
                _atomic_write(self.path(key), lambda f: shutil.copyfileobj(src, f, _COPY_CHUNK))

    def download_file(self, key: str, local_path: str | os.PathLike) -> None:
        with self._errors(key, "read"):
            with open(self.path(key), "rb") as src:
                _atomic_write(Path(local_path), lambda f: shutil.copyfileobj(src, f, _COPY_CHUNK))

    def delete(self, key: str) -> None:
        with self._errors(key, "delete"), contextlib.suppress(FileNotFoundError):
            self.path(key).unlink()

    def delete_prefix(self, prefix: str) -> None:
        if not check_prefix(prefix):
            raise ValueError("delete_prefix needs a non-empty prefix; refusing to empty the whole store")
        with self._errors(prefix, "delete"), contextlib.suppress(FileNotFoundError):
            shutil.rmtree(self._folder(prefix))

    def child(self, prefix: str) -> "LocalStore":
        return LocalStore(self._folder(prefix))
