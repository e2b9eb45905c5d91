"""Tokenizing a corpus in parallel with Ray Data, into one token stream per source and split.

The unit of parallel work is a run of files of about equal bytes: Ray Data tasks read
and parse them (platform.data.sources), split documents into train/eval, tokenize them
and append EOS after each (platform.data.packing); the driver appends the results, in
file order, to the streams on disk. Keeping file order (Ray Data's `preserve_order`)
makes the cache a deterministic function of the files, whatever the number of workers
or their speed.

Files are read inside the tasks rather than with Ray Data's own `read_*` datasources so
that local folders and S3 go through the same `platform.storage` (one set of endpoints,
credentials and error messages) and every document keeps its identity (file, index)
for the eval split and the order.

The eval split is decided per document from a hash of (source, file path, document
index), before packing: a held-out document never contributes a token to training, and
its fate does not change when other files are added or the job runs elsewhere.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
from typing import Iterator, Sequence

import numpy as np

from platform.data.errors import DataError
from platform.data.packing import TOKEN_DTYPE, StreamWriter
from platform.data.sources import SourceFile, iter_documents

log = logging.getLogger(__name__)

# A local Ray instance started for data preparation stays small: it shares the machine
# with training, and Ray Data streams (backpressure) rather than holding the corpus.
LOCAL_OBJECT_STORE_BYTES = 256 * 1024 ** 2
# Bytes of input files per Ray Data task: about 4 tasks per worker, within these bounds
# (big enough to amortise a task, small enough to balance workers and show progress).
MIN_UNIT_BYTES = 256 * 1024
MAX_UNIT_BYTES = 64 * 1024 ** 2
# Beyond this many units a block holds several (the driver's bookkeeping stays small).
MAX_BLOCKS = 4096
# A task yields its output in batches of about this many tokens (16 MB), bounding the
# memory one huge JSONL or Parquet file can take in the object store.
BATCH_TOKENS = 4 * 1024 ** 2


def in_eval_split(source: str, relpath: str, doc_index: int, eval_fraction: float) -> bool:
    """Whether a document is held out: a stable hash of its identity against the fraction."""
    if eval_fraction <= 0:
        return False
    digest = hashlib.blake2b(f"{relpath}#{doc_index}".encode(), digest_size=8,
                             key=source.encode()[:64]).digest()
    return int.from_bytes(digest, "little") < eval_fraction * 2.0 ** 64


def work_units(files: Sequence[tuple[int, SourceFile]], num_workers: int) -> list[list[int]]:
    """Contiguous runs of file indices of about equal bytes: the Ray Data tasks.

    Contiguous, so that units in order are files in order; about equal, so that two
    workers finish together (splitting by file count would put all 38 plays in one task).
    """
    total = sum(f.size for _, f in files)
    target = min(MAX_UNIT_BYTES, max(MIN_UNIT_BYTES, total // max(1, 4 * num_workers)))
    units, current, size = [], [], 0
    for i, (_, f) in enumerate(files):
        current.append(i)
        size += f.size
        if size >= target:
            units.append(current)
            current, size = [], 0
    if current:
        units.append(current)
    return units


def encode_unit(files: Sequence[tuple[int, SourceFile]], indices: Sequence[int]) -> str:
    """A work unit as one JSON string: its files travel with it, not with every task."""
    return json.dumps([[i, files[i][0], *dataclasses.astuple(files[i][1])] for i in indices])


def decode_unit(unit: str) -> Iterator[tuple[int, int, SourceFile]]:
    for file_idx, src, *fields in json.loads(unit):
        yield file_idx, src, SourceFile(*fields)


def tokenize_files(batch: dict, *, source_names: Sequence[str], text_fields: Sequence[str],
                   vocab_size: int, eval_fraction: float, endpoint_url: str | None) -> Iterator[dict]:
    """Ray Data UDF: work units (JSON lists of files, see `encode_unit`) in, token chunks out.

    Output rows, in file order, one or more per file: file index, chunk number within the
    file, whether it is the file's last chunk, the train and eval tokens (little-endian
    uint32 bytes, EOS after every document), their document counts, and whether the
    file was skipped as binary.
    """
    from platform.data.tokenizer import get_tokenizer

    tok = get_tokenizer(vocab_size)
    eos = np.array([tok.eos_id], dtype=TOKEN_DTYPE)
    out: dict[str, list] = {k: [] for k in ("file", "chunk", "last", "train", "eval",
                                            "train_docs", "eval_docs", "binary")}
    buffered = 0

    def emit(file_idx, chunk, last, parts, docs, binary):
        nonlocal buffered
        for split in ("train", "eval"):
            data = np.concatenate(parts[split]) if parts[split] else np.empty(0, dtype=TOKEN_DTYPE)
            out[split].append(data.tobytes())
            buffered += len(data)
        out["file"].append(file_idx)
        out["chunk"].append(chunk)
        out["last"].append(last)
        out["train_docs"].append(docs["train"])
        out["eval_docs"].append(docs["eval"])
        out["binary"].append(binary)

    def flush():
        nonlocal buffered
        result = {k: list(v) for k, v in out.items()}
        for v in out.values():
            v.clear()
        buffered = 0
        return result

    for unit in batch["unit"]:
        for file_idx, src, file in decode_unit(str(unit)):
            name = source_names[src]
            parts: dict[str, list] = {"train": [], "eval": []}
            docs = {"train": 0, "eval": 0}
            pending, chunk, seen = 0, 0, 0
            for doc_index, text in enumerate(iter_documents(name, file, text_fields[src], endpoint_url)):
                seen += 1
                if not text.strip():
                    continue
                split = "eval" if in_eval_split(name, file.relpath, doc_index, eval_fraction) else "train"
                ids = tok.encode_numpy(text)
                parts[split] += (ids, eos)
                docs[split] += 1
                pending += len(ids) + 1
                if pending >= BATCH_TOKENS:
                    emit(int(file_idx), chunk, False, parts, docs, False)
                    parts = {"train": [], "eval": []}
                    docs = {"train": 0, "eval": 0}
                    pending, chunk = 0, chunk + 1
                    yield flush()
            binary = file.format == "text" and seen == 0 and file.size > 0
            emit(int(file_idx), chunk, True, parts, docs, binary)
            if buffered >= BATCH_TOKENS:
                yield flush()
    if out["file"]:
        yield flush()


@contextlib.contextmanager
def ray_session(address: str = "", num_cpus: int = 2) -> Iterator[None]:
    """Use the Ray the caller is connected to; else join `address` (or $RAY_ADDRESS);
    else start a small private local instance (capped CPUs and object store, no dashboard).
    A joined cluster with no CPU yet (a head with num-cpus=0 before its worker nodes
    join: the embedded head of a detached job) is left for a private local instance.

    Only an instance started or joined here is shut down (disconnected) here.
    """
    import ray

    if ray.is_initialized():
        yield
        return
    address = address or os.environ.get("RAY_ADDRESS", "")
    if address:
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
        if not ray.cluster_resources().get("CPU"):
            log.info("the Ray cluster at %s has no CPU yet; tokenizing on a local instance", address)
            ray.shutdown()
            address = ""
    if not address:
        ray.init(address="local", num_cpus=num_cpus, object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                 include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    try:
        yield
    finally:
        ray.shutdown()


@contextlib.contextmanager
def _ordered_quiet_data_context() -> Iterator[None]:
    """Ray Data keeps file order, raises a UDF's own exception, and leaves the console to
    our progress bar (its logs still go to the Ray session's log folder); then restores."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    fields = {"enable_progress_bars": False, "print_on_execution_start": False,
              "raise_original_map_exception": True}
    saved = {k: getattr(ctx, k) for k in fields}
    saved_order = ctx.execution_options.preserve_order
    data_log = logging.getLogger("ray.data")
    saved_level = data_log.level
    for k, v in fields.items():
        setattr(ctx, k, v)
    ctx.execution_options.preserve_order = True
    data_log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(ctx, k, v)
        ctx.execution_options.preserve_order = saved_order
        data_log.setLevel(saved_level)


def _find_data_error(exc: BaseException) -> DataError | None:
    """The DataError a Ray task raised, however Ray wrapped it on the way to the driver."""
    seen = set()
    stack = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, DataError):
            return e
        stack.extend([e.__cause__, e.__context__, getattr(e, "cause", None)])
    return None


def _user_message(err: DataError) -> str:
    """The task's own message, without the traceback and retry advice Ray adds to it."""
    return getattr(err, "message", None) or str(err).splitlines()[0]


def tokenize_corpus(files: Sequence[tuple[int, SourceFile]], source_names: Sequence[str],
                    text_fields: Sequence[str], out_dir: str, *, vocab_size: int,
                    eval_fraction: float, endpoint_url: str | None = None, num_workers: int = 2,
                    ray_address: str = "", progress: bool = True) -> list[dict]:
    """Tokenize `files` ((source index, file), grouped by source) into `out_dir`.

    Writes `<source>.train.u32` and `<source>.eval.u32` per source and returns, per
    source, the counts the manifest records. Raises DataError for unreadable or empty
    sources (with the message of the task that found it).
    """
    import ray
    from tqdm import tqdm

    units = work_units(files, num_workers)
    stats = [{"files": 0, "binary_files_skipped": 0, "documents": {"train": 0, "eval": 0},
              "tokens": {"train": 0, "eval": 0}} for _ in source_names]
    source_of = [s for s, _ in files]
    with contextlib.ExitStack() as stack:
        writers = []
        for name in source_names:
            writers.append({split: StreamWriter(stack.enter_context(
                open(os.path.join(out_dir, f"{name}.{split}.u32"), "wb"))) for split in ("train", "eval")})
        stack.enter_context(ray_session(ray_address, num_cpus=max(1, min(num_workers, os.cpu_count() or 1))))
        stack.enter_context(_ordered_quiet_data_context())
        bar = stack.enter_context(tqdm(total=len(files), unit="file", desc="tokenizing",
                                       disable=not progress, dynamic_ncols=True))
        ds = ray.data.from_items([{"unit": encode_unit(files, u)} for u in units],
                                 override_num_blocks=min(len(units), MAX_BLOCKS)).map_batches(
            tokenize_files, batch_size=None, batch_format="numpy", num_cpus=1,
            compute=ray.data.TaskPoolStrategy(size=max(1, min(num_workers, len(units)))),
            fn_kwargs={"source_names": list(source_names), "text_fields": list(text_fields),
                       "vocab_size": vocab_size, "eval_fraction": eval_fraction,
                       "endpoint_url": endpoint_url})
        expect_file, expect_chunk, tokens = 0, 0, 0
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=2):
                for row in batch.to_pylist():
                    if (row["file"], row["chunk"]) != (expect_file, expect_chunk):
                        raise RuntimeError(f"Ray Data returned file {row['file']} chunk {row['chunk']}, "
                                           f"expected file {expect_file} chunk {expect_chunk}")
                    s = source_of[row["file"]]
                    for split in ("train", "eval"):
                        writers[s][split].write(row[split])
                        stats[s]["documents"][split] += row[f"{split}_docs"]
                        tokens += len(row[split]) // TOKEN_DTYPE.itemsize
                    if row["last"]:
                        stats[s]["files"] += 1
                        stats[s]["binary_files_skipped"] += int(row["binary"])
                        expect_file, expect_chunk = expect_file + 1, 0
                        bar.update(1)
                        bar.set_postfix(tokens=f"{tokens / 1e6:.1f}M", refresh=False)
                    else:
                        expect_chunk += 1
        except Exception as exc:  # noqa: BLE001 - re-raised below unless it is a user's data problem
            err = _find_data_error(exc)
            if err is None:
                raise
            raise DataError(_user_message(err)) from None
        if expect_file != len(files):
            raise RuntimeError(f"Ray Data returned {expect_file} of {len(files)} files")
    for s, name in enumerate(source_names):
        for split in ("train", "eval"):
            stats[s]["tokens"][split] = writers[s][split].num_tokens
    return stats
