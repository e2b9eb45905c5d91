"""Packing documents into fixed-length training sequences.

Each source is stored as one flat token stream: every document followed by EOS
(<|endoftext|>), so two documents are never joined without an EOS between them and
no token is dropped. Sequence k of a stream is the window of seq_len + 1 tokens
starting at k * seq_len: inputs are window[:-1], labels window[1:], and consecutive
windows share one token, so every token of the stream is a label exactly once
(Megatron's GPT dataset does the same).

The last window of a stream wraps around to the stream's start instead of being padded.
The stream ends with EOS, so the wrap lands on a document boundary; the training loss
needs no padding mask, and at most seq_len tokens per source are seen twice an epoch.

Windows are cut at read time, not stored: the cache does not depend on seq_len, so
changing the context length reuses the tokenized corpus.
"""

from __future__ import annotations

from typing import BinaryIO, Iterable, Sequence

import numpy as np

TOKEN_DTYPE = np.dtype("<u4")  # cl100k ids (< 2**17) fit; fixed little-endian on disk


def pack_documents(docs: Iterable[Sequence[int]], eos_id: int) -> np.ndarray:
    """One stream of `docs`, each followed by `eos_id`. Empty documents are skipped."""
    parts = []
    eos = np.array([eos_id], dtype=TOKEN_DTYPE)
    for doc in docs:
        if len(doc):
            parts.append(np.asarray(doc, dtype=TOKEN_DTYPE))
            parts.append(eos)
    return np.concatenate(parts) if parts else np.empty(0, dtype=TOKEN_DTYPE)


def num_sequences(num_tokens: int, seq_len: int) -> int:
    """Windows needed so every token of a `num_tokens` stream is in one: ceil((n-1)/seq_len)."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    return 0 if num_tokens < 2 else -(-(num_tokens - 1) // seq_len)


def gather_sequences(stream: np.ndarray, seq_ids: np.ndarray, seq_len: int) -> np.ndarray:
    """Windows `seq_ids` of `stream` as int64 [len(seq_ids), seq_len + 1] (the last wraps)."""
    n = len(stream)
    if n < 2:
        raise ValueError("cannot cut sequences from a stream of fewer than 2 tokens")
    seq_ids = np.asarray(seq_ids, dtype=np.int64)
    idx = seq_ids[:, None] * seq_len + np.arange(seq_len + 1, dtype=np.int64)[None, :]
    if seq_ids.size and int(idx.max()) >= n:
        idx %= n
    return np.asarray(stream[idx], dtype=np.int64)


class StreamWriter:
    """Appends token chunks to a raw little-endian uint32 file and counts them."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.num_tokens = 0

    def write(self, tokens: bytes | np.ndarray) -> None:
        data = tokens if isinstance(tokens, (bytes, bytearray, memoryview)) else \
            np.ascontiguousarray(tokens, dtype=TOKEN_DTYPE).tobytes()
        if len(data) % TOKEN_DTYPE.itemsize:
            raise ValueError("token chunk is not a whole number of uint32 tokens")
        self._f.write(data)
        self.num_tokens += len(data) // TOKEN_DTYPE.itemsize


def open_stream(path: str, num_tokens: int) -> np.ndarray:
    """A read-only memory map of a stream written by `StreamWriter` (empty: an empty array)."""
    if num_tokens == 0:
        return np.empty(0, dtype=TOKEN_DTYPE)
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r", shape=(num_tokens,))
