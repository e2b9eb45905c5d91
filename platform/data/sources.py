"""Where documents come from: listing a source's files and reading documents out of them.

A source (`DataSource` in the job config) is a local directory, a single file, a glob, or
an `s3://bucket/prefix` (read through `platform.storage`, so one set of credentials,
endpoints and error messages serves checkpoints and corpora). Its files hold documents:

  text     one document per file (.txt, .md, .py, ...; `.gz` is decompressed)
  jsonl    one document per line, the string at `text_field` (`.jsonl`, `.json`, `.ndjson`, `.gz`)
  parquet  one document per row, the string column `text_field`

Listing happens once, on the driver, so every file problem a user can fix (missing path,
nothing matching, an empty folder) is reported before any work starts; reading happens
in Ray Data tasks. Every failure becomes one `DataError` naming the source and the file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gzip
import io
import json
import os
import re
import tempfile
import zlib
from typing import BinaryIO, Iterator, Sequence

from platform.data.errors import DataError

FORMATS = ("text", "jsonl", "parquet")
_JSONL_EXTS = (".jsonl", ".ndjson", ".json")
_PARQUET_EXTS = (".parquet", ".pq")
_GLOB_CHARS = re.compile(r"[*?\[]")
_SOURCE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# Sniff this many leading bytes of a text file for NUL: binary files are skipped, not trained on.
_BINARY_SNIFF = 8192


@dataclasses.dataclass(frozen=True)
class SourceFile:
    """One file of a source. `relpath` (relative to the source root) names its documents
    in the eval split, so the split survives moving the corpus to another machine."""

    root: str      # local directory or s3:// URI the relpath is relative to
    relpath: str   # '/'-separated
    size: int
    format: str    # text | jsonl | parquet (resolved from "auto")

    @property
    def uri(self) -> str:
        if self.root.startswith("s3://"):
            return f"{self.root.rstrip('/')}/{self.relpath}"
        return os.path.join(self.root, *self.relpath.split("/"))


def check_source_name(name: str) -> None:
    """Source names become cache file names and mixture keys: keep them plain."""
    if not isinstance(name, str) or not _SOURCE_NAME.fullmatch(name):
        raise DataError(f"data source name {name!r} is not allowed: use letters, digits, '_', '.', '-'")


def glob_to_regex(pattern: str, anchored: bool = False) -> re.Pattern:
    """Compile a path pattern: `*` and `?` stay within one folder, `**` spans folders.

    An include/exclude pattern without '/' matches a file name at any depth ("*.py"); one
    with '/' (or any `anchored` one, like the glob in a source's path) matches the whole
    path relative to the source root ("test/**", "**/tests/**").
    """
    if "/" not in pattern and not anchored:
        pattern = "**/" + pattern
    out, i, n = [], 0, len(pattern)
    while i < n:
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:[^/]*/)*")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif c == "*":
            out.append("[^/]*")
            i += 1
        elif c == "?":
            out.append("[^/]")
            i += 1
        elif c == "[":
            end = pattern.find("]", i + 2 if pattern[i + 1:i + 2] in ("!", "]") else i + 1)
            if end < 0:
                out.append(re.escape(c))
                i += 1
            else:
                body = pattern[i + 1:end]
                body = "^" + body[1:] if body.startswith("!") else body
                out.append(f"[{body.replace(chr(92), chr(92) * 2)}]")
                i = end + 1
        else:
            out.append(re.escape(c))
            i += 1
    return re.compile("".join(out) + r"\Z")


def _matcher(include: Sequence[str], exclude: Sequence[str], extra: str | None = None):
    inc = [glob_to_regex(p) for p in include]
    exc = [glob_to_regex(p) for p in exclude]
    must = glob_to_regex(extra, anchored=True) if extra else None

    def keep(relpath: str) -> bool:
        if must is not None and not must.match(relpath):
            return False
        if inc and not any(r.match(relpath) for r in inc):
            return False
        return not any(r.match(relpath) for r in exc)

    return keep


def resolve_format(declared: str, relpath: str) -> str:
    """The format of one file: the declared one, or from its extension under "auto"."""
    if declared != "auto":
        if declared not in FORMATS:
            raise DataError(f"unknown data format {declared!r}: use one of auto, {', '.join(FORMATS)}")
        return declared
    name = relpath.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    if name.endswith(_JSONL_EXTS):
        return "jsonl"
    if name.endswith(_PARQUET_EXTS):
        return "parquet"
    return "text"


def _split_glob(path: str) -> tuple[str, str | None]:
    """('a/b', 'c/*.txt') for 'a/b/c/*.txt': the fixed root and the pattern under it."""
    if not _GLOB_CHARS.search(path):
        return path, None
    parts = path.split("/")
    first = next(i for i, p in enumerate(parts) if _GLOB_CHARS.search(p))
    root = "/".join(parts[:first]) or ("/" if path.startswith("/") else ".")
    return root, "/".join(parts[first:])


def list_files(source, endpoint_url: str | None = None) -> list[SourceFile]:
    """Every file of `source` (a `DataSource`), sorted by relative path.

    Raises DataError naming the source when the path is missing or nothing matches.
    """
    check_source_name(source.name)
    if not source.path:
        raise DataError(f"data source {source.name!r} has no path")
    resolve_format(source.format, "")  # validates the declared format early
    if source.path.startswith("s3://"):
        files = _list_s3(source, endpoint_url)
    else:
        files = _list_local(source)
    if not files:
        filters = ""
        if source.include or source.exclude:
            filters = f" (include={list(source.include)}, exclude={list(source.exclude)})"
        raise DataError(f"data source {source.name!r}: no files at {source.path}{filters}")
    return files


def _list_local(source) -> list[SourceFile]:
    path = os.path.abspath(os.path.expanduser(source.path))
    root, pattern = _split_glob(path)
    if pattern is None and os.path.isfile(root):
        return [SourceFile(os.path.dirname(root), os.path.basename(root), os.path.getsize(root),
                           resolve_format(source.format, os.path.basename(root)))]
    if not os.path.isdir(root):
        raise DataError(f"data source {source.name!r}: {source.path} does not exist")
    keep = _matcher(source.include, source.exclude, pattern)

    def unreadable(exc: OSError) -> None:  # os.walk would otherwise skip the folder silently
        raise DataError(f"data source {source.name!r}: cannot read {exc.filename}: {exc.strerror or exc}")

    out = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable):
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, root).replace(os.sep, "/")
        for name in filenames:
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            if not keep(rel):
                continue
            full = os.path.join(dirpath, name)
            try:
                size = os.stat(full).st_size
            except OSError as exc:
                raise DataError(f"data source {source.name!r}: cannot read {full}: "
                                f"{exc.strerror or exc}") from None
            out.append(SourceFile(root, rel, size, resolve_format(source.format, rel)))
    out.sort(key=lambda f: f.relpath)
    return out


def _list_s3(source, endpoint_url: str | None) -> list[SourceFile]:
    from platform.storage import StorageError

    root, pattern = _split_glob(source.path.rstrip("/"))
    keep = _matcher(source.include, source.exclude, pattern)
    try:
        store = _open_store(root, endpoint_url)
        infos = store.list_info()
        if not infos and pattern is None and "/" in root[len("s3://"):]:
            # The path may name one object rather than a folder.
            parent, name = root.rsplit("/", 1)
            parent_store = _open_store(parent, endpoint_url)
            if parent_store.exists(name):
                return [SourceFile(parent, name, parent_store.size(name),
                                   resolve_format(source.format, name))]
    except StorageError as exc:
        raise DataError(f"data source {source.name!r}: {exc}") from None
    return [SourceFile(root, info.key, info.size, resolve_format(source.format, info.key))
            for info in infos if keep(info.key)]


@functools.lru_cache(maxsize=32)
def _open_store(uri: str, endpoint_url: str | None):
    from platform.storage import open_store

    return open_store(uri, endpoint_url=endpoint_url)


# --------------------------------------------------------------------------- reading


@contextlib.contextmanager
def _open_binary(file: SourceFile, endpoint_url: str | None) -> Iterator[BinaryIO]:
    if file.root.startswith("s3://"):
        stream = _open_store(file.root, endpoint_url).open_read(file.relpath)
    else:
        stream = open(file.uri, "rb")
    try:
        if file.relpath.lower().endswith(".gz"):
            with gzip.GzipFile(fileobj=stream) as gz:
                yield gz
        else:
            yield stream
    finally:
        stream.close()


def iter_documents(source_name: str, file: SourceFile, text_field: str = "text",
                   endpoint_url: str | None = None) -> Iterator[str]:
    """The documents of one file, in file order; empty documents included (callers skip them
    after numbering, so a document keeps its index, and its eval-split fate, whatever
    other documents contain).

    Binary files under the text format yield nothing: they are not text to train on.
    """
    from platform.storage import StorageError

    try:
        if file.format == "text":
            yield from _text_documents(file, endpoint_url)
        elif file.format == "jsonl":
            yield from _jsonl_documents(source_name, file, text_field, endpoint_url)
        else:
            yield from _parquet_documents(source_name, file, text_field, endpoint_url)
    except DataError:
        raise
    except StorageError as exc:
        raise DataError(f"data source {source_name!r}: {exc}") from None
    except (OSError, EOFError, UnicodeDecodeError, zlib.error) as exc:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise DataError(f"data source {source_name!r}: cannot read {file.uri}: {reason}") from None


def _text_documents(file: SourceFile, endpoint_url: str | None) -> Iterator[str]:
    with _open_binary(file, endpoint_url) as f:
        data = f.read()
    if b"\0" in data[:_BINARY_SNIFF]:
        return
    # Invalid UTF-8 becomes U+FFFD: one odd byte should not cost a whole corpus build.
    yield data.decode("utf-8", errors="replace")


def _jsonl_documents(source_name: str, file: SourceFile, text_field: str,
                     endpoint_url: str | None) -> Iterator[str]:
    with _open_binary(file, endpoint_url) as f:
        for lineno, line in enumerate(io.TextIOWrapper(f, encoding="utf-8", errors="replace"), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"data source {source_name!r}: {file.uri} line {lineno} is not "
                                f"valid JSON ({exc.msg})") from None
            text = record.get(text_field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise DataError(f"data source {source_name!r}: {file.uri} line {lineno} has no "
                                f"string field {text_field!r} (set text_field in the source)")
            yield text


def _parquet_documents(source_name: str, file: SourceFile, text_field: str,
                       endpoint_url: str | None) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with contextlib.ExitStack() as stack:
        if file.root.startswith("s3://"):
            # Parquet needs random access: stage the object on local disk first.
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="dbrx-data-"))
            local = os.path.join(tmp, "part.parquet")
            _open_store(file.root, endpoint_url).download_file(file.relpath, local)
        else:
            local = file.uri
        try:
            pf = pq.ParquetFile(local)
        except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as exc:
            raise DataError(f"data source {source_name!r}: cannot read {file.uri} as Parquet: {exc}") from None
        if text_field not in pf.schema_arrow.names:
            raise DataError(f"data source {source_name!r}: {file.uri} has no column {text_field!r} "
                            f"(columns: {', '.join(pf.schema_arrow.names)}); set text_field in the source")
        try:
            for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
                for text in batch.column(0).to_pylist():
                    yield text if isinstance(text, str) else ""
        except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as exc:
            raise DataError(f"data source {source_name!r}: cannot read {file.uri} as Parquet: {exc}") from None
