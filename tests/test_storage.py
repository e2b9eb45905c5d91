"""platform.storage against a real local folder and a real S3 protocol server (moto)."""

from __future__ import annotations

import http.client
import os
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

import pytest

from platform.storage import (
    AccessDeniedError,
    BucketNotFoundError,
    EndpointUnreachableError,
    InvalidStoreURIError,
    LocalStore,
    ObjectNotFoundError,
    S3Store,
    StorageError,
    open_store,
)


def test_round_trip_overwrite_and_sizes(any_store):
    any_store.write_bytes("a/b/c.bin", b"hello")
    assert any_store.exists("a/b/c.bin")
    assert any_store.read_bytes("a/b/c.bin") == b"hello"
    assert any_store.size("a/b/c.bin") == 5
    any_store.write_bytes("a/b/c.bin", b"")
    assert any_store.read_bytes("a/b/c.bin") == b""
    assert any_store.size("a/b/c.bin") == 0
    assert not any_store.exists("a/b/missing")
    assert not any_store.exists("a/b")  # a folder is not an object


def test_missing_key_names_the_uri(any_store):
    for call in (any_store.read_bytes, any_store.size, any_store.open_read):
        with pytest.raises(ObjectNotFoundError, match="nothing-here") as info:
            call("dir/nothing-here")
        assert any_store.uri in str(info.value)


def test_listing_is_recursive_sorted_and_by_folder(any_store):
    for key in ["b/2", "a/x/1", "a/0", "ab/9", "top"]:
        any_store.write_bytes(key, key.encode())
    assert any_store.list() == ["a/0", "a/x/1", "ab/9", "b/2", "top"]
    assert any_store.list("a") == ["a/0", "a/x/1"]  # never "ab/..."
    assert any_store.list("a/") == ["a/0", "a/x/1"]
    assert any_store.list("nope") == []
    assert any_store.list_dirs() == ["a", "ab", "b"]
    assert any_store.list_dirs("a") == ["x"]
    infos = any_store.list_info("a")
    assert [(i.key, i.size) for i in infos] == [("a/0", 3), ("a/x/1", 5)]
    assert all(abs(i.mtime - time.time()) < 300 for i in infos)


def test_child_store_is_rooted_at_its_prefix(any_store):
    child = any_store.child("jobs/run1")
    child.write_bytes("ckpt/f", b"x")
    assert any_store.read_bytes("jobs/run1/ckpt/f") == b"x"
    assert child.list() == ["ckpt/f"]
    assert child.uri == any_store.uri + "/jobs/run1"
    endpoint = child.endpoint_url if isinstance(child, S3Store) else None
    assert open_store(child.uri, endpoint_url=endpoint).list() == ["ckpt/f"]


def test_streaming_read_and_file_transfer(any_store, tmp_path):
    data = os.urandom(3 * 1024 * 1024 + 17)
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    any_store.upload_file(src, "blobs/big.bin")
    with any_store.open_read("blobs/big.bin") as f:
        chunks = []
        while chunk := f.read(1 << 20):
            chunks.append(chunk)
    assert b"".join(chunks) == data
    dest = tmp_path / "out" / "deep" / "copy.bin"
    any_store.download_file("blobs/big.bin", dest)
    assert dest.read_bytes() == data
    assert sorted(p.name for p in dest.parent.iterdir()) == ["copy.bin"]  # no temp file left
    with pytest.raises(ObjectNotFoundError):
        any_store.download_file("blobs/none.bin", tmp_path / "none.bin")
    assert not (tmp_path / "none.bin").exists()


def test_delete_and_delete_prefix_stay_inside_the_folder(any_store):
    for key in ["step_1/a", "step_1/sub/b", "step_10/a", "step_2/a"]:
        any_store.write_bytes(key, b"1")
    any_store.delete_prefix("step_1")
    assert any_store.list() == ["step_10/a", "step_2/a"]
    any_store.delete("step_2/a")
    any_store.delete("step_2/a")  # idempotent
    any_store.delete_prefix("never-existed")
    assert any_store.list() == ["step_10/a"]
    with pytest.raises(ValueError, match="non-empty"):
        any_store.delete_prefix("")


@pytest.mark.parametrize("key", ["../x", "/abs", "a//b", "a/./b", "", "a\\b"])
def test_keys_cannot_escape_the_root(any_store, key):
    with pytest.raises(ValueError, match="invalid storage key"):
        any_store.write_bytes(key, b"x")


# ----------------------------------------------------------------------------- local


def test_local_writes_are_atomic(tmp_path, monkeypatch):
    store = open_store(str(tmp_path))
    store.write_bytes("f", b"old")

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)  # fails after the new bytes went to the temp file
    with pytest.raises(StorageError, match="No space left"):
        store.write_bytes("f", b"new and longer")
    monkeypatch.undo()
    assert store.read_bytes("f") == b"old"
    assert sorted(os.listdir(tmp_path)) == ["f"]  # the temporary file is gone


def test_listing_ignores_temporary_files_of_writes_in_flight(tmp_path):
    store = open_store(str(tmp_path))
    store.write_bytes("d/real", b"1")
    (tmp_path / "d" / ".dbrx-tmp-0123-real").write_bytes(b"partial")
    assert store.list() == ["d/real"]


def test_local_uri_forms(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    store = open_store("~/ckpts")
    assert isinstance(store, LocalStore) and store.root == tmp_path / "ckpts"
    assert open_store(f"file://{tmp_path}/ckpts").root == tmp_path / "ckpts"
    monkeypatch.chdir(tmp_path)
    assert open_store("rel/dir").root == tmp_path / "rel" / "dir"


@pytest.mark.parametrize(
    "uri, fragment",
    [
        ("s3://", "no bucket"),
        ("s3:///prefix", "no bucket"),
        ("gs://bucket/x", "unsupported scheme"),
        ("s3://bucket/../x", "plain a/b/c path"),
        ("file://otherhost/x", "local path"),
        ("", "empty"),
    ],
)
def test_bad_uris_are_explained(uri, fragment):
    with pytest.raises(InvalidStoreURIError, match=fragment):
        open_store(uri)


# ----------------------------------------------------------------------------- S3


def test_multipart_upload_of_a_big_file(s3_bucket, s3_endpoint, tmp_path):
    store = open_store(f"s3://{s3_bucket}/mp", endpoint_url=s3_endpoint)
    data = os.urandom(9 * 1024 * 1024 + 123)  # above the 8 MiB multipart threshold
    src = tmp_path / "big.bin"
    src.write_bytes(data)
    store.upload_file(src, "big.bin")
    head = store._conn.client.head_object(Bucket=s3_bucket, Key="mp/big.bin")
    assert "-2" in head["ETag"]  # S3 gives multipart objects "<md5>-<parts>" ETags
    assert store.size("big.bin") == len(data)
    store.download_file("big.bin", tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == data


def test_missing_bucket_says_which_and_what_to_do(s3_endpoint, aws_credentials, tmp_path):
    store = open_store("s3://no-such-bucket-here/ckpt", endpoint_url=s3_endpoint)
    src = tmp_path / "f"
    src.write_bytes(b"x")
    calls = [
        lambda: store.list(),
        lambda: store.read_bytes("k"),
        lambda: store.exists("k"),  # a HEAD 404 alone cannot tell bucket from key
        lambda: store.write_bytes("k", b"x"),
        lambda: store.upload_file(src, "k"),
        lambda: store.download_file("k", tmp_path / "g"),
    ]
    for call in calls:
        with pytest.raises(BucketNotFoundError) as info:
            call()
        message = str(info.value)
        assert "'no-such-bucket-here' does not exist" in message
        assert "s3://no-such-bucket-here/ckpt" in message and s3_endpoint in message
        assert "aws s3 mb s3://no-such-bucket-here" in message
        assert info.value.__suppress_context__  # no boto3 traceback chained under it


def test_missing_credentials_are_explained(s3_bucket, s3_endpoint, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    store = open_store(f"s3://{s3_bucket}/x", endpoint_url=s3_endpoint)
    with pytest.raises(AccessDeniedError, match="AWS_ACCESS_KEY_ID") as info:
        store.read_bytes("k")
    assert f"s3://{s3_bucket}/x/k" in str(info.value)


def test_unreachable_endpoint_is_explained(aws_credentials):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once we leave: nothing listens there
    store = open_store("s3://bucket/x", endpoint_url=f"http://127.0.0.1:{port}", max_attempts=2)
    with pytest.raises(EndpointUnreachableError) as info:
        store.list()
    message = str(info.value)
    assert f"http://127.0.0.1:{port}" in message and "after 2 attempts" in message
    assert "AWS_ENDPOINT_URL_S3" in message


def test_endpoint_from_the_environment(s3_bucket, s3_endpoint, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint)
    store = open_store(f"s3://{s3_bucket}")
    assert isinstance(store, S3Store)
    store.write_bytes("k", b"v")
    assert store.read_bytes("k") == b"v"


class _FlakyProxy(ThreadingHTTPServer):
    """Answers the first `failures` requests with 503 SlowDown and forwards the rest."""

    daemon_threads = True

    def __init__(self, upstream: str, failures: int):
        self.upstream = urlparse(upstream)
        self.failures = failures
        self.requests = 0
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _FlakyHandler)


class _FlakyHandler(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def _handle(self) -> None:
        server = self.server
        with server.lock:
            server.requests += 1
            fail = server.requests <= server.failures
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if fail:
            error = b"<?xml version='1.0'?><Error><Code>SlowDown</Code><Message>Reduce your rate</Message></Error>"
            self.send_response(503)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(error)))
            self.end_headers()
            self.wfile.write(error)
            return
        conn = http.client.HTTPConnection(server.upstream.hostname, server.upstream.port, timeout=30)
        conn.request(self.command, self.path, body=body, headers=dict(self.headers))
        resp = conn.getresponse()
        payload = resp.read()
        self.send_response(resp.status)
        for name, value in resp.getheaders():
            if name.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)
        conn.close()

    do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _handle


@pytest.fixture
def flaky_endpoint(s3_endpoint):
    proxy = _FlakyProxy(s3_endpoint, failures=1)
    thread = threading.Thread(target=proxy.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield proxy
    proxy.shutdown()
    proxy.server_close()


def test_transient_errors_are_retried(s3_bucket, flaky_endpoint):
    host, port = flaky_endpoint.server_address[:2]
    store = open_store(f"s3://{s3_bucket}", endpoint_url=f"http://{host}:{port}")
    assert store.list() == []  # first try got 503 SlowDown; botocore retried
    assert flaky_endpoint.requests == 2


def test_without_retries_the_transient_error_surfaces(s3_bucket, flaky_endpoint):
    host, port = flaky_endpoint.server_address[:2]
    store = open_store(f"s3://{s3_bucket}", endpoint_url=f"http://{host}:{port}", max_attempts=1)
    with pytest.raises(StorageError, match="SlowDown"):
        store.list()


def test_unfinished_multipart_uploads_are_aborted(s3_bucket, s3_endpoint):
    store = open_store(f"s3://{s3_bucket}/ck", endpoint_url=s3_endpoint)
    client = store._conn.client
    client.create_multipart_upload(Bucket=s3_bucket, Key="ck/step_000000001/crashed.bin")
    client.create_multipart_upload(Bucket=s3_bucket, Key="elsewhere/other.bin")
    # moto reports a fixed 2010 start time, so only the prefix scoping is testable here.
    aborted = store.abort_multipart_uploads(older_than_s=0)
    assert aborted == [f"s3://{s3_bucket}/ck/step_000000001/crashed.bin (unfinished upload)"]
    remaining = client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", [])
    assert [u["Key"] for u in remaining] == ["elsewhere/other.bin"]
