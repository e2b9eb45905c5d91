"""Stores under s3://bucket/prefix, on AWS or any S3-compatible endpoint (boto3).

boto3 is imported on first use, so local-only processes never pay for it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import uuid
from pathlib import Path
from typing import BinaryIO, Iterator

from platform.storage.base import (
    TMP_MARK,
    AccessDeniedError,
    BucketNotFoundError,
    EndpointUnreachableError,
    ObjectInfo,
    ObjectNotFoundError,
    StorageError,
    Store,
    check_key,
    check_prefix,
)

# s3transfer switches to multipart above this size; parts are this big.
MULTIPART_THRESHOLD = 8 * 1024 * 1024
MULTIPART_CHUNKSIZE = 8 * 1024 * 1024
DEFAULT_MAX_ATTEMPTS = 6  # total tries per S3 request, first one included

_MISSING_KEY_CODES = {"NoSuchKey", "404", "NotFound"}
_ACCESS_CODES = {
    "AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch",
    "ExpiredToken", "InvalidToken", "TokenRefreshRequired", "AllAccessDisabled", "AccountProblem",
}


@dataclasses.dataclass
class _S3Connection:
    """What every S3Store opened from one `open_store` call shares."""

    client: object
    endpoint_url: str | None
    max_attempts: int
    transfer_config: object
    bucket_exists: bool = False  # set once a request proved it


class S3Store(Store):
    """A store under `s3://bucket/prefix` on AWS S3 or any S3-compatible endpoint."""

    def __init__(self, bucket: str, prefix: str, conn: _S3Connection):
        self._bucket = bucket
        self._prefix = prefix.strip("/")
        self._conn = conn

    @property
    def bucket(self) -> str:
        return self._bucket

    @property
    def prefix(self) -> str:
        """The key prefix of this store inside the bucket ('' for the bucket root)."""
        return self._prefix

    @property
    def endpoint_url(self) -> str | None:
        """The custom endpoint, if any: pass it with `uri` to reopen this store elsewhere."""
        return self._conn.endpoint_url

    @property
    def uri(self) -> str:
        return f"s3://{self._bucket}/{self._prefix}" if self._prefix else f"s3://{self._bucket}"

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self._prefix}/{key}" if self._prefix else key

    def _folder_key(self, prefix: str) -> str:
        """The bucket key prefix ('.../') that lists folder `prefix` of this store."""
        prefix = check_prefix(prefix)
        joined = "/".join(p for p in (self._prefix, prefix) if p)
        return f"{joined}/" if joined else ""

    def _where(self, key: str) -> str:
        where = f"{self.uri}/{key}" if key else self.uri
        return f"{where} (endpoint {self._conn.endpoint_url})" if self._conn.endpoint_url else where

    def _bucket_missing(self) -> bool:
        """Whether the bucket is absent: HEAD 404s do not say if key or bucket is."""
        if self._conn.bucket_exists:
            return False
        from botocore.exceptions import ClientError

        try:
            self._conn.client.head_bucket(Bucket=self._bucket)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            return code in ("404", "NoSuchBucket", "NotFound")
        self._conn.bucket_exists = True
        return False

    def _translate(self, exc: BaseException, key: str, action: str) -> StorageError:
        from botocore.exceptions import (
            ClientError,
            ConnectionError as BotoConnectionError,
            CredentialRetrievalError,
            NoCredentialsError,
            PartialCredentialsError,
            ReadTimeoutError,
        )

        where = self._where(key)
        if isinstance(exc, ClientError):
            err = exc.response.get("Error", {})
            code, message = str(err.get("Code", "")), err.get("Message", "")
            said = f"S3 said {code}: {message}" if message else f"S3 said {code}"
            if code == "NoSuchBucket" or (code in _MISSING_KEY_CODES and self._bucket_missing()):
                return BucketNotFoundError(
                    f"S3 bucket {self._bucket!r} does not exist ({where}): create it "
                    f"(aws s3 mb s3://{self._bucket}) or fix the bucket name in the config"
                )
            if code in _MISSING_KEY_CODES:
                return ObjectNotFoundError(f"no such object: {where}")
            if code in _ACCESS_CODES:
                return AccessDeniedError(
                    f"access denied to {action} {where} ({said}): check the AWS credentials "
                    "(AWS_PROFILE, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or the node's role) "
                    "and that they may read and write this bucket"
                )
            return StorageError(f"cannot {action} {where} ({said})")
        if isinstance(exc, (NoCredentialsError, PartialCredentialsError, CredentialRetrievalError)):
            return AccessDeniedError(
                f"no usable AWS credentials to {action} {where}: set AWS_PROFILE or "
                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or run on a node with an instance role"
            )
        if isinstance(exc, (BotoConnectionError, ReadTimeoutError)):
            return EndpointUnreachableError(
                f"cannot reach the S3 endpoint to {action} {where} after "
                f"{self._conn.max_attempts} attempts ({type(exc).__name__}): check the endpoint "
                "(endpoint_url, AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL) and the network"
            )
        return StorageError(f"cannot {action} {where}: {exc}")

    @contextlib.contextmanager
    def _errors(self, key: str, action: str) -> Iterator[None]:
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except StorageError:
            raise
        except S3UploadFailedError as exc:
            # boto3 wraps the ClientError it caught; translate that one.
            cause = exc.__cause__ or exc.__context__
            raise self._translate(cause if cause is not None else exc, key, action) from None
        except (ClientError, BotoCoreError) as exc:
            raise self._translate(exc, key, action) from None

    def list_info(self, prefix: str = "") -> list[ObjectInfo]:
        folder = self._folder_key(prefix)
        strip = len(self._prefix) + 1 if self._prefix else 0
        out = []
        with self._errors(check_prefix(prefix), "list"):
            pages = self._conn.client.get_paginator("list_objects_v2").paginate(
                Bucket=self._bucket, Prefix=folder
            )
            for page in pages:
                for obj in page.get("Contents", ()):
                    if obj["Key"].endswith("/"):
                        continue  # a console-made "folder" placeholder, not data
                    out.append(ObjectInfo(obj["Key"][strip:], obj["Size"], obj["LastModified"].timestamp()))
        self._conn.bucket_exists = True
        out.sort(key=lambda info: info.key)
        return out

    def list_dirs(self, prefix: str = "") -> list[str]:
        folder = self._folder_key(prefix)
        names = []
        with self._errors(check_prefix(prefix), "list"):
            pages = self._conn.client.get_paginator("list_objects_v2").paginate(
                Bucket=self._bucket, Prefix=folder, Delimiter="/"
            )
            for page in pages:
                for common in page.get("CommonPrefixes", ()):
                    names.append(common["Prefix"][len(folder):].rstrip("/"))
        return sorted(names)

    def _head(self, key: str) -> dict:
        with self._errors(key, "read"):
            return self._conn.client.head_object(Bucket=self._bucket, Key=self._key(key))

    def exists(self, key: str) -> bool:
        try:
            self._head(key)
        except ObjectNotFoundError:
            return False
        return True

    def size(self, key: str) -> int:
        return int(self._head(key)["ContentLength"])

    def read_bytes(self, key: str) -> bytes:
        with self._errors(key, "read"):
            body = self._conn.client.get_object(Bucket=self._bucket, Key=self._key(key))["Body"]
            with contextlib.closing(body):
                return body.read()

    def write_bytes(self, key: str, data: bytes) -> None:
        with self._errors(key, "write"):
            self._conn.client.put_object(Bucket=self._bucket, Key=self._key(key), Body=data)

    def open_read(self, key: str) -> BinaryIO:
        with self._errors(key, "read"):
            body = self._conn.client.get_object(Bucket=self._bucket, Key=self._key(key))["Body"]
        # StreamingBody checks the byte count at EOF; buffering makes small reads cheap.
        return io.BufferedReader(body, buffer_size=1024 * 1024)

    def upload_file(self, local_path: str | os.PathLike, key: str) -> None:
        with self._errors(key, "write"):
            self._conn.client.upload_file(
                os.fspath(local_path), self._bucket, self._key(key), Config=self._conn.transfer_config
            )

    def download_file(self, key: str, local_path: str | os.PathLike) -> None:
        dest = Path(local_path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f"{TMP_MARK}{uuid.uuid4().hex}-{dest.name}")
        try:
            with self._errors(key, "read"):
                self._conn.client.download_file(
                    self._bucket, self._key(key), os.fspath(tmp), Config=self._conn.transfer_config
                )
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, dest)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    def delete(self, key: str) -> None:
        with self._errors(key, "delete"):
            self._conn.client.delete_object(Bucket=self._bucket, Key=self._key(key))

    def delete_prefix(self, prefix: str) -> None:
        if not check_prefix(prefix):
            raise ValueError("delete_prefix needs a non-empty prefix; refusing to empty the whole store")
        keys = [self._key(info.key) for info in self.list_info(prefix)]
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = [{"Key": k} for k in keys[start:start + 1000]]
            with self._errors(prefix, "delete"):
                resp = self._conn.client.delete_objects(
                    Bucket=self._bucket, Delete={"Objects": batch, "Quiet": True}
                )
            if resp.get("Errors"):
                first = resp["Errors"][0]
                raise StorageError(
                    f"cannot delete {len(resp['Errors'])} objects under {self._where(prefix)} "
                    f"(first: {first.get('Key')}: {first.get('Code')} {first.get('Message', '')})"
                )

    def abort_multipart_uploads(self, older_than_s: float, prefix: str = "") -> list[str]:
        """Abort unfinished multipart uploads under folder `prefix` started over
        `older_than_s` ago; a crashed upload otherwise keeps its parts (and the
        bill) forever unless the bucket has a lifecycle rule. Returns their URIs."""
        import datetime as dt

        folder = self._folder_key(prefix)
        cutoff = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=older_than_s)
        aborted = []
        with self._errors(check_prefix(prefix), "clean up"):
            pages = self._conn.client.get_paginator("list_multipart_uploads").paginate(
                Bucket=self._bucket, Prefix=folder
            )
            for page in pages:
                for upload in page.get("Uploads", ()):
                    if upload["Initiated"] <= cutoff:
                        self._conn.client.abort_multipart_upload(
                            Bucket=self._bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                        )
                        aborted.append(f"s3://{self._bucket}/{upload['Key']} (unfinished upload)")
        return aborted

    def child(self, prefix: str) -> "S3Store":
        return S3Store(self._bucket, self._folder_key(prefix).rstrip("/"), self._conn)


_model_loader = None  # botocore's parsed service models, shared by every session


def _new_session():
    """A fresh boto3 session (credentials resolved anew) that reuses the parsed
    service models: opening a store then costs ~25 ms instead of ~130 ms."""
    import boto3
    import botocore.session

    global _model_loader
    core = botocore.session.get_session()
    if _model_loader is None:
        _model_loader = core.get_component("data_loader")
    else:
        core.register_component("data_loader", _model_loader)
    return boto3.session.Session(botocore_session=core)


def s3_connection(endpoint_url: str | None, max_attempts: int) -> _S3Connection:
    """A client with retries, timeouts and addressing set for `endpoint_url`."""
    from boto3.s3.transfer import TransferConfig
    from botocore.config import Config

    config = Config(
        retries={"total_max_attempts": max_attempts, "mode": "standard"},
        connect_timeout=10,
        read_timeout=120,
        max_pool_connections=32,
        # Custom endpoints (MinIO, moto, on-prem gateways) rarely resolve virtual-host names.
        s3={"addressing_style": "path"} if endpoint_url else {},
    )
    client = _new_session().client("s3", endpoint_url=endpoint_url, config=config)
    transfer = TransferConfig(
        multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_CHUNKSIZE, max_concurrency=8
    )
    return _S3Connection(client, endpoint_url, max_attempts, transfer)
