"""Which rank writes which piece of a checkpoint, so that every rank writes a fair share.

A checkpoint holds every parameter with its Adam moments in fp32 (12 bytes per
parameter). Written by rank 0 (dense) and the first expert-parallel replica
(experts) alone, 16 of 512 ranks wrote ~95 GB each for the 132B model while the
other 496 waited. Here the state is cut into units and each unit is given to
one rank that can read it:

- a dense parameter is cut into row ranges of at most `chunk_bytes` (every rank
  sees the full value of a dense parameter after ZeRO's all-reduce, so any rank
  may write any range);
- an expert parameter is one unit per expert (only the ranks holding that
  expert's shard, one per expert-parallel replica, can read it).

Units go largest first to the least-loaded rank that may write them (LPT). With
no unit above a quarter of the mean share, no rank ends above 1.25x the mean.
The assignment is a pure function of shapes and layout: every rank computes
the same one without talking, and the plan computes it for a cluster that does
not exist yet.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

STATE_BYTES_PER_ELEMENT = 12      # fp32 weight + two fp32 Adam moments
MIN_CHUNK_BYTES = 64 << 20        # rows of a dense parameter are not cut finer than this


@dataclass(frozen=True)
class Unit:
    """One piece of the state that one rank writes."""

    name: str                      # global parameter name
    rows: tuple[int, int]          # row range [start, end) of a dense parameter (all rows: experts)
    expert: Optional[int]          # global expert id, None for dense
    nbytes: int                    # weight + moments


@dataclass(frozen=True)
class ParamShape:
    name: str
    rows: int                      # dense: rows; expert: rows of ONE expert
    cols: int
    experts: int = 0               # total experts of a stacked expert parameter, 0 for dense


def expert_shard(expert: int, num_experts: int, ep: int) -> int:
    """The expert-parallel shard (group rank) that holds `expert`."""
    return expert // (num_experts // ep)


def eligible_ranks(unit: Unit, world_size: int, ep: int, num_experts: int) -> range:
    """Ranks that can read `unit`: any rank for dense state; for an expert, the ranks of its
    shard in every replica (DeepSpeed's order: ranks [0, ep) are one copy of the experts)."""
    if unit.expert is None:
        return range(world_size)
    return range(expert_shard(unit.expert, num_experts, ep), world_size, ep)


def chunk_bytes_for(total_bytes: int, world_size: int) -> int:
    """The largest dense piece: a quarter of a rank's mean share (the LPT bound then keeps
    every rank within 1.25x the mean), never below MIN_CHUNK_BYTES."""
    return max(MIN_CHUNK_BYTES, total_bytes // (4 * max(1, world_size)))


def units_of(params: Iterable[ParamShape], chunk_bytes: int) -> list[Unit]:
    """Cut every parameter into units: dense ones into row ranges of at most `chunk_bytes`,
    expert ones into one unit per expert."""
    units = []
    for p in params:
        row_bytes = p.cols * STATE_BYTES_PER_ELEMENT
        if p.experts:
            units += [Unit(p.name, (0, p.rows), e, p.rows * row_bytes) for e in range(p.experts)]
            continue
        per = max(1, chunk_bytes // row_bytes)
        n = math.ceil(p.rows / per)
        bounds = [round(i * p.rows / n) for i in range(n + 1)]
        units += [Unit(p.name, (a, b), None, (b - a) * row_bytes) for a, b in zip(bounds, bounds[1:])]
    return units


def assign_writers(units: Sequence[Unit], world_size: int, ep: int, num_experts: int) -> dict[Unit, int]:
    """unit -> the rank that writes it: largest units first, each to the least-loaded rank
    that can read it (ties: the lowest rank). Deterministic on every rank."""
    load = [0] * world_size
    owner: dict[Unit, int] = {}
    heaps: dict[tuple[int, int], list[tuple[int, int]]] = {}   # eligible set -> (load, rank)
    for unit in sorted(units, key=lambda u: (-u.nbytes, u.name, u.rows, u.expert or 0)):
        ranks = eligible_ranks(unit, world_size, ep, num_experts)
        key = (ranks.start, ranks.step)
        heap = heaps.setdefault(key, [(0, r) for r in ranks])
        while True:   # entries go stale when another eligible set gave that rank more load
            used, rank = heapq.heappop(heap)
            if used == load[rank]:
                break
            heapq.heappush(heap, (load[rank], rank))
        owner[unit] = rank
        load[rank] += unit.nbytes
        heapq.heappush(heap, (load[rank], rank))
    return owner


def bytes_per_rank(owner: dict[Unit, int], world_size: int) -> list[int]:
    load = [0] * world_size
    for unit, rank in owner.items():
        load[rank] += unit.nbytes
    return load
