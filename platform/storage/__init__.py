"""One object-store abstraction for checkpoints, corpora and promotion.

`open_store(uri)` returns a `Store` over a local directory (a path or
`file://...`) or an S3 prefix (`s3://bucket/prefix`, any S3-compatible
endpoint). Keys are '/'-separated and relative to the store's root; a prefix
argument always names a *folder* (`list("a")` lists `a/...`, never `ab/...`),
so deleting `step_1` can never touch `step_10`.

Failures a user can cause or fix (missing bucket, bad credentials, an
unreachable endpoint, a missing key) surface as `StorageError` subclasses
whose message names the URI and what to change, not as a stack trace from
deep inside boto3. Transient S3 errors (throttling, 5xx, dropped connections)
are retried by botocore's own retry handler with exponential backoff. Local
writes are atomic: a temporary file in the same folder, fsync, `os.replace`.
"""

from __future__ import annotations

import os
from urllib.parse import urlparse

from platform.storage.base import (
    AccessDeniedError,
    BucketNotFoundError,
    EndpointUnreachableError,
    InvalidStoreURIError,
    ObjectInfo,
    ObjectNotFoundError,
    StorageError,
    Store,
    check_prefix,
    fsync_dir,
)
from platform.storage.local import LocalStore
from platform.storage.s3 import DEFAULT_MAX_ATTEMPTS, S3Store, s3_connection

__all__ = [
    "AccessDeniedError",
    "BucketNotFoundError",
    "EndpointUnreachableError",
    "InvalidStoreURIError",
    "LocalStore",
    "ObjectInfo",
    "ObjectNotFoundError",
    "S3Store",
    "Store",
    "StorageError",
    "fsync_dir",
    "open_store",
]


def open_store(
    uri: str, *, endpoint_url: str | None = None, max_attempts: int = DEFAULT_MAX_ATTEMPTS
) -> Store:
    """Open the store at `uri`: a local path, `file://` URI or `s3://bucket/prefix`.

    For S3 the endpoint is `endpoint_url`, else AWS_ENDPOINT_URL_S3, else
    AWS_ENDPOINT_URL, else AWS itself; credentials come from boto3's usual
    chain. `max_attempts` bounds botocore's retries of transient errors.
    Nothing is contacted until the first operation.
    """
    if not isinstance(uri, str) or not uri.strip():
        raise InvalidStoreURIError(f"empty storage URI {uri!r}: give a directory or s3://bucket/prefix")
    uri = uri.strip()
    if "://" not in uri:
        return LocalStore(uri)
    parsed = urlparse(uri)
    scheme = parsed.scheme.lower()
    if scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise InvalidStoreURIError(f"{uri}: file:// URIs must name a local path (file:///abs/path)")
        return LocalStore(parsed.path)
    if scheme in ("s3", "s3a"):
        if not parsed.netloc:
            raise InvalidStoreURIError(f"{uri}: no bucket; write s3://bucket/prefix")
        if parsed.query or parsed.fragment:
            raise InvalidStoreURIError(f"{uri}: query strings are not supported; pass endpoint_url instead")
        try:
            prefix = check_prefix(parsed.path)
        except ValueError:
            raise InvalidStoreURIError(f"{uri}: the prefix must be a plain a/b/c path") from None
        endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        return S3Store(parsed.netloc, prefix, s3_connection(endpoint or None, max_attempts))
    raise InvalidStoreURIError(f"{uri}: unsupported scheme {parsed.scheme!r}; use a local path or s3://")
