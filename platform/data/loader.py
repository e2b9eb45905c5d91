"""What a training worker reads: its share of every global batch, resumable at any world size.

    data = TrainingData(job_cfg, ensure_prepared(job_cfg))      # or a cache path
    for step, micro_batches in data.batches(rank, world_size, start_sequences=consumed):
        for mb in micro_batches:          # LongTensor [micro_batch_size, seq_len + 1]
            loss = model(mb[:, :-1], shift_labels=mb[:, 1:]).loss
        consumed += data.global_batch_size   # store in the checkpoint

Global batch s is the same sequences in the same order whatever the number of workers:
platform.data.order decides it from (seed, step) alone. Worker r of W takes the
contiguous slice [r * B/W, (r+1) * B/W) of it, so the position in the data is just the
number of sequences consumed globally, and a resume from it at another world size
neither repeats nor skips a sequence. Sequences are read from memory-mapped token
streams (platform.data.packing), so workers share the page cache and start instantly.
"""

from __future__ import annotations

import logging
import os
from typing import Iterator

import numpy as np

from platform.data.cache import PreparedData
from platform.data.errors import DataError
from platform.data.order import GlobalOrder, MixtureSchedule, eval_order
from platform.data.packing import gather_sequences, num_sequences, open_stream

log = logging.getLogger(__name__)


class TrainingData:
    """Batches of a prepared corpus for one job's data mixture, curriculum and batch shape."""

    def __init__(self, job_cfg, prepared: PreparedData | str | os.PathLike) -> None:
        data, train = job_cfg.data, job_cfg.train
        if not isinstance(prepared, PreparedData):
            prepared = PreparedData.load(prepared)
        self.prepared = prepared
        self._job_cfg = job_cfg
        self.names = [s.name for s in data.sources]
        missing = [n for n in self.names if n not in prepared.manifest["sources"]]
        if missing:
            raise DataError(f"prepared data at {prepared.path} has no source {', '.join(map(repr, missing))}; "
                            f"prepare the job's data again")
        if train.seq_len < 1 or train.micro_batch_size < 1:
            raise DataError(f"train.seq_len ({train.seq_len}) and train.micro_batch_size "
                            f"({train.micro_batch_size}) must be positive")
        self.seq_len = train.seq_len
        self.global_batch_size = train.global_batch_size
        self.micro_batch_size = train.micro_batch_size
        self.seed = train.seed
        self.default_eval_batches = train.eval_batches
        vocab = prepared.manifest["tokenizer"]["vocab_size"]
        if vocab != job_cfg.model.vocab_size:
            raise DataError(f"prepared data at {prepared.path} was tokenized for vocab_size {vocab}, the model "
                            f"has {job_cfg.model.vocab_size}; prepare the job's data again")
        self.eos_id = int(prepared.manifest["tokenizer"]["eos_id"])
        self._streams = {split: [open_stream(prepared.stream_path(n, split), prepared.num_tokens(n, split))
                                 for n in self.names] for split in ("train", "eval")}
        self.num_sequences = {split: {n: num_sequences(len(s), self.seq_len)
                                      for n, s in zip(self.names, streams)}
                              for split, streams in self._streams.items()}
        self.schedule = MixtureSchedule(self.names, [s.weight for s in data.sources], data.curriculum,
                                        self.global_batch_size, self.seed)
        for stage in self.schedule.stages:
            for name, quota in zip(self.names, stage.quota):
                if quota and not self.num_sequences["train"][name]:
                    raise DataError(f"data source {name!r} has no training sequences but has weight "
                                    f"{stage.weights[self.names.index(name)]:.3g} from step {stage.start_step}")
        self.order = GlobalOrder(self.schedule, self.num_sequences["train"], self.seed)

    def __reduce__(self):
        # Ship the config and the cache path, never the memory-mapped streams: a worker that
        # unpickles this maps the files itself (they must be on a filesystem it can see).
        return (TrainingData, (self._job_cfg, self.prepared.path))

    @property
    def cache_key(self) -> str:
        """Identifies the token streams; store it with checkpoints to detect a changed corpus."""
        return self.prepared.key

    # ------------------------------------------------------------------ order and logging

    def mixture_at(self, step: int) -> dict[str, int]:
        """Sequences each source contributes to global batch `step` (the realised mixture)."""
        counts = np.bincount(self.schedule.sources_for_step(step), minlength=len(self.names))
        return dict(zip(self.names, counts.tolist()))

    def weights_at(self, step: int) -> dict[str, float]:
        """The curriculum's declared (normalised) weights at `step`."""
        return self.schedule.weights_at(step)

    def epochs_at(self, step: int) -> dict[str, float]:
        """Passes made over each source's training sequences before `step`."""
        counts = self.schedule.counts_before(step)
        return {n: c / self.num_sequences["train"][n] if self.num_sequences["train"][n] else 0.0
                for n, c in zip(self.names, counts.tolist())}

    def global_batch(self, step: int) -> np.ndarray:
        """All of global batch `step` as int64 [global_batch_size, seq_len + 1] (for checks)."""
        src, seq = self.order.step(step)
        return self._read("train", src, seq)

    # ------------------------------------------------------------------ iteration

    def worker_slice(self, rank: int, world_size: int) -> slice:
        """Rows of each global batch that worker `rank` of `world_size` trains on."""
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"worker rank {rank} is not in a world of {world_size}")
        if self.global_batch_size % world_size:
            raise DataError(f"train.global_batch_size {self.global_batch_size} cannot be split evenly "
                            f"across {world_size} workers")
        per = self.global_batch_size // world_size
        if per % self.micro_batch_size:
            raise DataError(f"{per} sequences per worker ({self.global_batch_size} over {world_size}) is not a "
                            f"multiple of train.micro_batch_size {self.micro_batch_size}")
        return slice(rank * per, (rank + 1) * per)

    def batches(self, rank: int, world_size: int, start_sequences: int = 0,
                stop_step: int | None = None) -> Iterator[tuple[int, list]]:
        """(step, micro batches) for worker `rank`, from the global position `start_sequences`.

        `start_sequences` is the number of sequences consumed globally (a multiple of the
        global batch size: steps are whole). Each micro batch is a LongTensor
        [micro_batch_size, seq_len + 1]: inputs are [:, :-1], labels [:, 1:]. Runs
        forever (sources are reshuffled each epoch) unless `stop_step` is given.
        """
        rows = self.worker_slice(rank, world_size)
        if start_sequences < 0 or start_sequences % self.global_batch_size:
            raise DataError(f"cannot resume at {start_sequences} sequences: not a whole number of global "
                            f"batches of {self.global_batch_size}")
        return self._train_batches(rows, start_sequences // self.global_batch_size, stop_step)

    def _train_batches(self, rows: slice, step: int, stop_step: int | None) -> Iterator[tuple[int, list]]:
        import torch

        counts = self.schedule.counts_before(step)
        while stop_step is None or step < stop_step:
            src, seq = self.order.step(step, counts)
            counts = counts + np.bincount(src, minlength=len(self.names))
            mine = self._read("train", src[rows], seq[rows])
            yield step, [torch.from_numpy(mb) for mb in self._micro(mine)]
            step += 1

    def eval_batches(self, rank: int, world_size: int, num_batches: int | None = None,
                     source: str | None = None) -> Iterator[list]:
        """Micro batches of `num_batches` (default train.eval_batches) held-out global batches.

        The held-out set is fixed for the corpus and seed, shuffled across sources (or one
        `source`); it is cycled when smaller than the batches asked for, so every worker
        always gets the same number of batches. Yields nothing if nothing was held out.
        """
        rows = self.worker_slice(rank, world_size)
        if source is not None and source not in self.names:
            raise DataError(f"no data source named {source!r} (sources: {', '.join(self.names)})")
        names = self.names if source is None else [source]
        src, seq = eval_order({n: self.num_sequences["eval"][n] for n in names}, names, self.seed)
        if source is not None:
            src = np.full_like(src, self.names.index(source))
        if not len(src):
            log.warning("no held-out data%s: raise data.eval_fraction to evaluate",
                        f" for source {source!r}" if source else "")
        n = self.default_eval_batches if num_batches is None else num_batches
        return self._eval_batches(rows, src, seq, n if len(src) else 0)

    def _eval_batches(self, rows: slice, src: np.ndarray, seq: np.ndarray, n: int) -> Iterator[list]:
        import torch

        for b in range(n):
            pos = (b * self.global_batch_size + np.arange(self.global_batch_size)) % len(src)
            mine = self._read("eval", src[pos][rows], seq[pos][rows])
            yield [torch.from_numpy(mb) for mb in self._micro(mine)]

    # ------------------------------------------------------------------ reading

    def _read(self, split: str, src: np.ndarray, seq: np.ndarray) -> np.ndarray:
        out = np.empty((len(src), self.seq_len + 1), dtype=np.int64)
        for i in np.unique(src):
            mask = src == i
            out[mask] = gather_sequences(self._streams[split][int(i)], seq[mask], self.seq_len)
        return out

    def _micro(self, rows: np.ndarray) -> list[np.ndarray]:
        return [np.ascontiguousarray(rows[i:i + self.micro_batch_size])
                for i in range(0, len(rows), self.micro_batch_size)]
