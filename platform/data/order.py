"""The global data order: which sequence fills each slot of each global batch.

Everything here is a pure function of (seed, schedule, source sizes, step), never of
the number of workers or of what ran before, which is what makes elastic resume exact:
the position in the data is just the number of sequences consumed globally.

Mixture. Within a curriculum stage, sources are drawn in *periods* of P slots (P a
multiple of the global batch size, at least MIN_PERIOD): each period holds exactly
round(weight * P) slots of each source (largest remainder), shuffled by a generator
seeded with (seed, stage start, period). So the realised mixture tracks the weights to
1/P per period, with random interleaving inside a period, and the number of draws from
each source before any step is computed in O(stages), not by replaying every step.
A stage starts exactly at its `start_step`.

Within a source, draw number c reads sequence perm_e[c mod N] where e = c div N and
perm_e is a permutation of the source's N sequences seeded with (seed, source, e):
no sequence repeats within an epoch, and each epoch is reshuffled.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import hashlib
import math
from typing import Mapping, Sequence

import numpy as np

from platform.data.errors import DataError

MIN_PERIOD = 4096
_TAG_MIX = 0x6D6978         # "mix": keeps the generators of the mixture, sources and eval apart
_TAG_SOURCE = 0x737263      # "src"
_TAG_EVAL = 0x6576616C      # "eval"


def _seed_words(seed: int) -> int:
    return int(seed) % (1 << 64)   # SeedSequence takes non-negative entropy


def _name_word(name: str) -> int:
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")


def rng(seed: int, *words: int) -> np.random.Generator:
    """A generator for one purpose: reproducible from its words alone, independent of the others."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([_seed_words(seed), *words])))


def _check_weights(weights: Sequence[float], where: str, names: Sequence[str]) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    for name, value in zip(names, w):
        if not math.isfinite(value) or value < 0:
            raise DataError(f"{where}: weight of source {name!r} must be a finite number >= 0, got {value}")
    if w.sum() <= 0:
        raise DataError(f"{where}: the weights sum to {w.sum():g}; give at least one source a positive weight")
    return w / w.sum()


def largest_remainder(weights: np.ndarray, total: int) -> np.ndarray:
    """Integer counts summing to `total`, proportional to `weights` (ties go to the lower index)."""
    exact = weights * total
    counts = np.floor(exact).astype(np.int64)
    short = total - int(counts.sum())
    if short:
        order = np.lexsort((np.arange(len(weights)), -(exact - counts)))
        counts[order[:short]] += 1
    return counts


@dataclasses.dataclass(frozen=True)
class Stage:
    start_step: int
    weights: np.ndarray   # normalised, aligned with the schedule's sources
    quota: np.ndarray     # slots of each source per period (sums to the period)


class MixtureSchedule:
    """Which source each slot of each global batch draws from (the curriculum made concrete).

    `curriculum` is a list of `CurriculumStage` (start_step, weights by source name). Steps
    before the first stage use the sources' own weights; a stage with no weights also does;
    a source a stage leaves out gets weight 0 there.
    """

    def __init__(self, names: Sequence[str], base_weights: Sequence[float], curriculum: Sequence,
                 global_batch_size: int, seed: int) -> None:
        if global_batch_size < 1:
            raise DataError(f"global_batch_size must be positive, got {global_batch_size}")
        self.names = list(names)
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.period = global_batch_size * -(-MIN_PERIOD // global_batch_size)
        index = {name: i for i, name in enumerate(self.names)}
        stages: list[tuple[int, list[float] | None, str]] = []
        for i, stage in enumerate(sorted(curriculum, key=lambda s: s.start_step)):
            where = f"data.curriculum stage {i} (start_step {stage.start_step})"
            if stage.start_step < 0:
                raise DataError(f"{where}: start_step must be >= 0")
            if stages and stage.start_step == stages[-1][0]:
                raise DataError(f"{where}: two stages start at step {stage.start_step}")
            weights = None
            if stage.weights:
                unknown = sorted(set(stage.weights) - set(index))
                if unknown:
                    raise DataError(f"{where}: no data source named {', '.join(map(repr, unknown))} "
                                    f"(sources: {', '.join(self.names)})")
                weights = [float(stage.weights.get(name, 0.0)) for name in self.names]
            stages.append((stage.start_step, weights, where))
        if not stages or stages[0][0] > 0:
            stages.insert(0, (0, None, "data.sources"))
        self.stages: list[Stage] = []
        for start, weights, where in stages:
            w = _check_weights(base_weights if weights is None else weights,
                               "data.sources" if weights is None else where, self.names)
            self.stages.append(Stage(start, w, largest_remainder(w, self.period)))
        self._starts = [s.start_step for s in self.stages]
        # Per instance: a step reads one period, a resume at most one per stage.
        self._period_slots = functools.lru_cache(maxsize=8)(self._make_period_slots)

    def stage_index(self, step: int) -> int:
        return bisect.bisect_right(self._starts, step) - 1

    def weights_at(self, step: int) -> dict[str, float]:
        """The declared (normalised) weights in force at `step`."""
        return dict(zip(self.names, self.stages[self.stage_index(step)].weights.tolist()))

    def _make_period_slots(self, stage: int, period: int) -> np.ndarray:
        slots = np.repeat(np.arange(len(self.names), dtype=np.int32), self.stages[stage].quota)
        return rng(self.seed, _TAG_MIX, self.stages[stage].start_step, period).permutation(slots)

    def sources_for_step(self, step: int) -> np.ndarray:
        """Source index of each of the global batch's slots at `step`."""
        if step < 0:
            raise DataError(f"step must be >= 0, got {step}")
        k = self.stage_index(step)
        offset = (step - self.stages[k].start_step) * self.global_batch_size
        period, at = divmod(offset, self.period)
        return self._period_slots(k, period)[at:at + self.global_batch_size]

    def counts_before(self, step: int) -> np.ndarray:
        """Sequences drawn from each source in steps [0, step)."""
        counts = np.zeros(len(self.names), dtype=np.int64)
        for k, stage in enumerate(self.stages):
            if stage.start_step >= step:
                break
            end = self.stages[k + 1].start_step if k + 1 < len(self.stages) else step
            drawn = (min(step, end) - stage.start_step) * self.global_batch_size
            full, rest = divmod(drawn, self.period)
            counts += full * stage.quota
            if rest:
                counts += np.bincount(self._period_slots(k, full)[:rest], minlength=len(self.names))
        return counts


class SourceOrder:
    """Draw number -> sequence index within one source: epoch-wise shuffles without replacement."""

    def __init__(self, name: str, num_sequences: int, seed: int) -> None:
        self.name = name
        self.num_sequences = num_sequences
        self.seed = seed
        # Per instance, two epochs: a batch may straddle an epoch boundary.
        self._permutation = functools.lru_cache(maxsize=2)(self._make_permutation)

    def _make_permutation(self, epoch: int) -> np.ndarray:
        dtype = np.uint32 if self.num_sequences < 2**32 else np.int64
        perm = np.arange(self.num_sequences, dtype=dtype)
        rng(self.seed, _TAG_SOURCE, _name_word(self.name), epoch).shuffle(perm)
        return perm

    def __call__(self, draws: np.ndarray) -> np.ndarray:
        if self.num_sequences == 0:
            raise DataError(f"data source {self.name!r} has no training sequences but the mixture draws from it; "
                            "give it weight 0 or add data")
        epochs, pos = np.divmod(np.asarray(draws, dtype=np.int64), self.num_sequences)
        out = np.empty(len(pos), dtype=np.int64)
        for e in np.unique(epochs):
            mask = epochs == e
            out[mask] = self._permutation(int(e))[pos[mask]]
        return out


def occurrence_index(sources: np.ndarray) -> np.ndarray:
    """For each slot, how many earlier slots of the same batch drew from the same source."""
    order = np.argsort(sources, kind="stable")
    ranked = sources[order]
    first = np.searchsorted(ranked, ranked, side="left")
    out = np.empty(len(sources), dtype=np.int64)
    out[order] = np.arange(len(sources)) - first
    return out


class GlobalOrder:
    """(source, sequence) of every slot of every global batch, from the schedule and source sizes."""

    def __init__(self, schedule: MixtureSchedule, num_sequences: Mapping[str, int], seed: int) -> None:
        self.schedule = schedule
        self.sources = [SourceOrder(name, int(num_sequences[name]), seed) for name in schedule.names]

    def step(self, step: int, counts_before: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(source index, sequence index) per slot of global batch `step`.

        Pass `counts_before` (from `schedule.counts_before(step)`, kept up to date by the
        caller) to walk steps in order without recomputing it.
        """
        if counts_before is None:
            counts_before = self.schedule.counts_before(step)
        src = self.schedule.sources_for_step(step)
        draws = counts_before[src] + occurrence_index(src)
        seq = np.empty(len(src), dtype=np.int64)
        for i in np.unique(src):
            mask = src == i
            seq[mask] = self.sources[i](draws[mask])
        return src, seq


def eval_order(num_sequences: Mapping[str, int], names: Sequence[str], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """All held-out sequences (source index, sequence index) in one fixed shuffled order."""
    src = np.concatenate([np.full(int(num_sequences[n]), i, dtype=np.int64) for i, n in enumerate(names)]
                         or [np.empty(0, dtype=np.int64)])
    seq = np.concatenate([np.arange(int(num_sequences[n]), dtype=np.int64) for n in names]
                         or [np.empty(0, dtype=np.int64)])
    perm = rng(seed, _TAG_EVAL).permutation(len(src))
    return src[perm], seq[perm]
