"""Listing and reading sources: directories, globs, single files, text/JSONL/Parquet, S3."""

from __future__ import annotations

import gzip
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from platform.config import DataSource
from platform.data.errors import DataError
from platform.data.sources import glob_to_regex, iter_documents, list_files


def _docs(source: DataSource, endpoint=None) -> dict[str, list[str]]:
    return {f.relpath: list(iter_documents(source.name, f, source.text_field, endpoint))
            for f in list_files(source, endpoint)}


@pytest.fixture
def tree(tmp_path):
    files = {
        "a.py": "print('a')\n",
        "pkg/b.py": "x = 1\n",
        "pkg/tests/test_b.py": "assert x\n",
        "test/test_a.py": "assert a\n",
        "notes.md": "# Notes\n",
        "pkg/data.bin": None,
    }
    for rel, text in files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if text is None:
            p.write_bytes(b"\x00\x01\x02binary")
        else:
            p.write_text(text)
    return tmp_path


def test_patterns_name_or_path():
    assert glob_to_regex("*.py").match("deep/down/x.py")        # no '/': any depth
    assert not glob_to_regex("*.py").match("x.pyc")
    assert glob_to_regex("test/**").match("test/a/b.py")
    assert not glob_to_regex("test/**").match("pkg/test/a.py")  # with '/': from the root
    assert glob_to_regex("**/tests/**").match("tests/a.py")
    assert glob_to_regex("**/tests/**").match("pkg/tests/a.py")
    assert not glob_to_regex("pkg/*.py").match("pkg/sub/a.py")  # '*' stays in one folder
    assert glob_to_regex("data_[0-9].txt").match("data_7.txt")


def test_directory_with_include_exclude(tree):
    src = DataSource(name="code", path=str(tree), include=["*.py"], exclude=["test/**", "**/tests/**"])
    files = list_files(src)
    assert [f.relpath for f in files] == ["a.py", "pkg/b.py"]
    assert all(f.format == "text" for f in files)
    assert _docs(src) == {"a.py": ["print('a')\n"], "pkg/b.py": ["x = 1\n"]}


def test_glob_path_and_single_file(tree):
    assert [f.relpath for f in list_files(DataSource(name="g", path=f"{tree}/pkg/*.py"))] == ["b.py"]
    assert [f.relpath for f in list_files(DataSource(name="g", path=f"{tree}/**/*.md"))] == ["notes.md"]
    single = list_files(DataSource(name="one", path=str(tree / "notes.md")))
    assert [(f.relpath, f.uri) for f in single] == [("notes.md", str(tree / "notes.md"))]


def test_binary_files_yield_no_documents(tree):
    src = DataSource(name="all", path=str(tree / "pkg"), exclude=["*.py"])
    assert _docs(src) == {"data.bin": []}


def test_jsonl_parquet_and_gzip_by_extension(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n\n{"text": "two", "id": 2}\n')
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(b'{"text": "three"}\n'))
    pq.write_table(pa.table({"text": ["four", None, "five"], "n": [1, 2, 3]}), tmp_path / "c.parquet",
                   row_group_size=2)
    (tmp_path / "d.txt.gz").write_bytes(gzip.compress("six\n".encode()))
    src = DataSource(name="mix", path=str(tmp_path))
    assert [f.format for f in list_files(src)] == ["jsonl", "jsonl", "parquet", "text"]
    assert _docs(src) == {"a.jsonl": ["one", "two"], "b.jsonl.gz": ["three"],
                          "c.parquet": ["four", "", "five"], "d.txt.gz": ["six\n"]}


def test_text_field_is_configurable(tmp_path):
    (tmp_path / "code.jsonl").write_text(json.dumps({"content": "def f(): pass"}) + "\n")
    src = DataSource(name="code", path=str(tmp_path), text_field="content")
    assert _docs(src) == {"code.jsonl": ["def f(): pass"]}


def test_invalid_utf8_is_replaced_not_fatal(tmp_path):
    (tmp_path / "x.txt").write_bytes(b"caf\xe9 ok")
    assert _docs(DataSource(name="t", path=str(tmp_path))) == {"x.txt": ["caf\ufffd ok"]}


@pytest.mark.parametrize("path, match", [
    ("/does/not/exist", "'src': /does/not/exist does not exist"),
    ("/does/not/*.txt", "'src': /does/not/\\*.txt does not exist"),
])
def test_missing_path(path, match):
    with pytest.raises(DataError, match=match):
        list_files(DataSource(name="src", path=path))


def test_nothing_matches(tree):
    with pytest.raises(DataError, match=r"data source 'src': no files at .* \(include=\['\*.rs'\]"):
        list_files(DataSource(name="src", path=str(tree), include=["*.rs"]))
    empty = tree / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="data source 'src': no files at"):
        list_files(DataSource(name="src", path=str(empty)))


def test_bad_names_and_formats(tree):
    with pytest.raises(DataError, match="name 'a/b' is not allowed"):
        list_files(DataSource(name="a/b", path=str(tree)))
    with pytest.raises(DataError, match="unknown data format 'csv'"):
        list_files(DataSource(name="a", path=str(tree), format="csv"))


@pytest.mark.parametrize("name, content, match", [
    ("bad.jsonl", b'{"text": "ok"}\n{oops\n', r"'src': .*bad.jsonl line 2 is not valid JSON"),
    ("nofield.jsonl", b'{"body": "x"}\n', r"'src': .*nofield.jsonl line 1 has no string field 'text'"),
    ("bad.parquet", b"PAR1 this is not parquet", r"'src': cannot read .*bad.parquet as Parquet"),
    ("bad.jsonl.gz", b"not gzip at all", r"'src': cannot read .*bad.jsonl.gz"),
])
def test_unreadable_files_name_source_and_file(tmp_path, name, content, match):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=match):
        _docs(DataSource(name="src", path=str(tmp_path)))


def test_parquet_without_the_text_column(tmp_path):
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "x.parquet")
    with pytest.raises(DataError, match=r"'src': .*x.parquet has no column 'text' \(columns: body\)"):
        _docs(DataSource(name="src", path=str(tmp_path)))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_permission_denied(tmp_path):
    p = tmp_path / "secret.txt"
    p.write_text("x")
    p.chmod(0)
    with pytest.raises(DataError, match=r"'src': cannot read .*secret.txt"):
        _docs(DataSource(name="src", path=str(tmp_path)))


@pytest.fixture
def s3(monkeypatch):
    """A moto S3 endpoint with bucket 'corpus'."""
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket="corpus")
    yield endpoint, client
    server.stop()


def test_s3_prefix_glob_and_object(s3, tmp_path):
    endpoint, client = s3
    client.put_object(Bucket="corpus", Key="web/a.jsonl", Body=b'{"text": "hi"}\n{"text": "there"}\n')
    client.put_object(Bucket="corpus", Key="web/sub/b.md", Body=b"# page")
    pq.write_table(pa.table({"text": ["row one", "row two"]}), tmp_path / "c.parquet")
    client.upload_file(str(tmp_path / "c.parquet"), "corpus", "web/c.parquet")
    src = DataSource(name="web", path="s3://corpus/web/")
    assert _docs(src, endpoint) == {"a.jsonl": ["hi", "there"], "c.parquet": ["row one", "row two"],
                                    "sub/b.md": ["# page"]}
    assert [f.relpath for f in list_files(DataSource(name="w", path="s3://corpus/web/*.jsonl"), endpoint)] \
        == ["a.jsonl"]
    assert [f.uri for f in list_files(DataSource(name="w", path="s3://corpus/web/c.parquet"), endpoint)] \
        == ["s3://corpus/web/c.parquet"]


def test_s3_errors_name_the_source(s3):
    endpoint, _ = s3
    with pytest.raises(DataError, match="data source 'web': .*bucket 'nobucket' does not exist"):
        list_files(DataSource(name="web", path="s3://nobucket/web/"), endpoint)
    with pytest.raises(DataError, match="data source 'web': no files at s3://corpus/nothing/"):
        list_files(DataSource(name="web", path="s3://corpus/nothing/"), endpoint)
