"""The on-disk cache of a prepared corpus: its key, its manifest, and atomic publication.

A cache lives at <data.cache_dir>/<key>/ and holds, per source, `<name>.train.u32` and
`<name>.eval.u32` (flat little-endian uint32 token streams, EOS after every document)
plus `manifest.json`. The key hashes everything that changes those bytes: the tokenizer,
each source's definition and file listing (relative paths and sizes, so added, removed
or rewritten files rebuild), the eval fraction and the cache format. It leaves out what
only changes how the streams are read: mixture weights, curriculum, seed, batch sizes
and seq_len (windows are cut at read time; see platform.data.packing), so retuning a
mixture or the context length reuses the tokenized corpus.

A cache directory is published with one rename after its manifest is written, so a
reader sees a complete cache or none; a file lock makes concurrent preparers of one
key wait for each other instead of building twice.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import uuid
from typing import Iterator, Sequence

from platform.data.errors import DataError
from platform.data.sources import SourceFile

CACHE_FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "eval")


def cache_root(cache_dir: str) -> str:
    return os.path.abspath(os.path.expanduser(cache_dir))


def cache_key(sources: Sequence, listings: Sequence[Sequence[SourceFile]], eval_fraction: float,
              tokenizer_fingerprint: str) -> str:
    """Hash of everything that determines the cached token streams (see module doc)."""
    spec = {
        "format": CACHE_FORMAT_VERSION,
        "tokenizer": tokenizer_fingerprint,
        "eval_fraction": float(eval_fraction),
        "sources": [
            {
                "name": s.name, "path": s.path, "format": s.format, "text_field": s.text_field,
                "include": list(s.include), "exclude": list(s.exclude),
                "files": hashlib.sha256("\n".join(f"{f.relpath}\t{f.size}\t{f.format}" for f in files)
                                        .encode()).hexdigest(),
            }
            for s, files in zip(sources, listings)
        ],
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]


@dataclasses.dataclass(frozen=True)
class PreparedData:
    """A complete prepared corpus on local disk (what `ensure_prepared` returns)."""

    path: str
    manifest: dict

    @property
    def key(self) -> str:
        return self.manifest["key"]

    @property
    def source_names(self) -> list[str]:
        return list(self.manifest["sources"])

    def stream_path(self, source: str, split: str) -> str:
        return os.path.join(self.path, f"{source}.{split}.u32")

    def num_tokens(self, source: str, split: str) -> int:
        return int(self.manifest["sources"][source]["tokens"][split])

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PreparedData":
        path = os.path.abspath(os.path.expanduser(os.fspath(path)))
        try:
            with open(os.path.join(path, MANIFEST), encoding="utf-8") as f:
                manifest = json.load(f)
        except FileNotFoundError:
            raise DataError(f"no prepared data at {path}: run `python -m platform.data.prepare CONFIG`") from None
        except (OSError, ValueError) as exc:
            raise DataError(f"prepared data at {path} is unreadable ({exc}); delete it and prepare again") from None
        if manifest.get("format") != CACHE_FORMAT_VERSION:
            raise DataError(f"prepared data at {path} has format {manifest.get('format')}, this version "
                            f"reads {CACHE_FORMAT_VERSION}; prepare again")
        data = cls(path, manifest)
        for name in data.source_names:
            for split in SPLITS:
                want = data.num_tokens(name, split) * 4
                p = data.stream_path(name, split)
                have = os.path.getsize(p) if os.path.exists(p) else -1
                if have != want:
                    raise DataError(f"prepared data at {path} is damaged: {os.path.basename(p)} has "
                                    f"{have} bytes, the manifest says {want}; delete it and prepare again")
        return data


@contextlib.contextmanager
def key_lock(root: str, key: str) -> Iterator[None]:
    """Hold an exclusive lock on one cache key (blocks while another process builds it)."""
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, f".{key}.lock"), "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def staging_dir(root: str, key: str) -> Iterator[str]:
    """A private directory to build a cache in; removed unless published."""
    path = os.path.join(root, f".tmp-{key}-{uuid.uuid4().hex[:8]}")
    os.makedirs(path)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def publish(staging: str, root: str, key: str, manifest: dict) -> PreparedData:
    """Write the manifest into `staging`, then make it the cache for `key` in one rename."""
    with open(os.path.join(staging, MANIFEST), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    final = os.path.join(root, key)
    if os.path.exists(final):  # an explicit rebuild: move the old one aside first
        old = os.path.join(root, f".old-{key}-{uuid.uuid4().hex[:8]}")
        os.rename(final, old)
        shutil.rmtree(old, ignore_errors=True)
    os.rename(staging, final)
    return PreparedData.load(final)
