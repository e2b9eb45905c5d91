"""Packing: every token kept, documents always separated by EOS, windows overlap by one."""

from __future__ import annotations

import io

import numpy as np
import pytest

from platform.data.packing import StreamWriter, gather_sequences, num_sequences, open_stream, pack_documents

EOS = 100257


def _random_docs(rng, n):
    return [rng.integers(0, 1000, size=int(rng.integers(0, 40))).tolist() for _ in range(n)]


def test_documents_are_separated_by_eos_and_nothing_is_lost():
    rng = np.random.default_rng(0)
    docs = _random_docs(rng, 50)
    stream = pack_documents(docs, EOS)
    kept = [d for d in docs if d]
    assert len(stream) == sum(len(d) + 1 for d in kept)
    # Splitting the stream at EOS gives back exactly the non-empty documents, in order.
    cuts = np.flatnonzero(stream == EOS)
    assert cuts[-1] == len(stream) - 1
    pieces = np.split(stream, cuts + 1)[:-1]
    assert [p[:-1].tolist() for p in pieces] == kept


@pytest.mark.parametrize("seq_len", [1, 7, 16, 1000])
def test_windows_cover_the_stream_once_as_labels(seq_len):
    rng = np.random.default_rng(seq_len)
    stream = pack_documents(_random_docs(rng, 30), EOS)
    n = num_sequences(len(stream), seq_len)
    seqs = gather_sequences(stream, np.arange(n), seq_len)
    assert seqs.shape == (n, seq_len + 1) and seqs.dtype == np.int64
    # Inputs of consecutive windows, then the last label, rebuild the stream (plus the wrap).
    rebuilt = np.concatenate([seqs[:, :-1].reshape(-1), seqs[-1:, -1]])
    assert rebuilt[:len(stream)].tolist() == stream.tolist()
    # The last window wraps to the stream's start, which follows an EOS: a document boundary.
    tail = rebuilt[len(stream):]
    assert tail.tolist() == np.resize(stream, len(tail)).tolist()
    assert stream[-1] == EOS
    # Every token but the first is a label exactly once.
    labels = seqs[:, 1:].reshape(-1)[:len(stream) - 1]
    assert labels.tolist() == stream[1:].tolist()


def test_window_counts():
    assert num_sequences(0, 8) == 0
    assert num_sequences(1, 8) == 0
    assert num_sequences(2, 8) == 1
    assert num_sequences(9, 8) == 1
    assert num_sequences(10, 8) == 2


def test_writer_and_memory_map_round_trip(tmp_path):
    path = tmp_path / "s.u32"
    with open(path, "wb") as f:
        w = StreamWriter(f)
        w.write(np.array([1, 2, 3], dtype=np.uint32))
        w.write(np.array([100279], dtype="<u4").tobytes())
    assert w.num_tokens == 4
    assert open_stream(str(path), 4).tolist() == [1, 2, 3, 100279]
    assert open_stream(str(path), 0).size == 0
    with pytest.raises(ValueError):
        StreamWriter(io.BytesIO()).write(b"\x00\x01\x02")
