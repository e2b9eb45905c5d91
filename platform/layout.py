"""Parallel layout per world size: the one place that derives it.

Elastic training changes the number of workers, never the math: the global
batch is fixed in the config, so a world size is allowed only when it splits
that batch evenly into micro batches, and the expert-parallel degree is
chosen per world size so that it divides both the experts and the workers.
Validation, the plan and the training workers all call `layout_for`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Union

from platform.config.schema import ClusterConfig, JobConfig


@dataclass(frozen=True)
class Layout:
    nodes: int
    world_size: int              # training workers (one per GPU, or one per CPU node)
    expert_parallel: int         # ranks that split one copy of the experts
    expert_data_parallel: int    # replicas of each expert shard = world_size / expert_parallel
    micro_batch_size: int        # sequences per worker per forward/backward
    grad_accum: int              # micro batches per worker per optimizer step

    @property
    def data_parallel(self) -> int:
        """Dense parameters are replicated on every worker."""
        return self.world_size


def workers_per_node(cluster: ClusterConfig) -> int:
    return cluster.gpus_per_node if cluster.gpus_per_node > 0 else 1


def world_size_range(cluster: ClusterConfig) -> range:
    """Every world size min_nodes..max_nodes can hold (a range: no list of max_nodes entries)."""
    per = workers_per_node(cluster)
    return range(max(cluster.min_nodes, 1) * per, cluster.max_nodes * per + 1, per)


def expert_parallel_for(cfg: JobConfig, world_size: int) -> Union[int, str]:
    """The expert-parallel degree at `world_size`, or why none works."""
    experts = cfg.model.moe_num_experts
    fixed = cfg.train.expert_parallel_size
    if fixed > 0:
        if world_size % fixed:
            return f"train.expert_parallel_size {fixed} does not divide {world_size} workers"
        return fixed
    cap = cfg.train.max_expert_parallel_size or experts
    common = math.gcd(experts, world_size)
    return max(d for d in range(1, min(common, cap) + 1) if common % d == 0)


def layout_for(cfg: JobConfig, world_size: int) -> Union[Layout, str]:
    """The layout at `world_size` workers, or a sentence saying why it is not allowed."""
    ep = expert_parallel_for(cfg, world_size)
    if isinstance(ep, str):
        return ep
    t = cfg.train
    per_step = t.micro_batch_size * world_size
    if t.global_batch_size % per_step:
        return (f"global batch {t.global_batch_size} is not a multiple of "
                f"micro batch {t.micro_batch_size} x {world_size} workers")
    return Layout(
        nodes=world_size // workers_per_node(cfg.cluster),
        world_size=world_size,
        expert_parallel=ep,
        expert_data_parallel=world_size // ep,
        micro_batch_size=t.micro_batch_size,
        grad_accum=t.global_batch_size // per_step,
    )


@dataclass(frozen=True)
class Skipped:
    """The world sizes in range that no layout fits: how many, and the smallest few with why."""

    count: int
    examples: tuple[tuple[int, str], ...]

    def __len__(self) -> int:
        return self.count


_EXAMPLES = 6


def _candidate_sizes(cfg: JobConfig) -> list[int]:
    """The world sizes in range that split the global batch into whole micro batches: the
    divisors of global/micro, found in O(sqrt(global batch)) whatever max_nodes is."""
    t, sizes = cfg.train, world_size_range(cfg.cluster)
    if t.micro_batch_size <= 0 or t.global_batch_size % t.micro_batch_size:
        return []
    steps = t.global_batch_size // t.micro_batch_size
    divisors = set()
    for d in range(1, math.isqrt(steps) + 1):
        if steps % d == 0:
            divisors.update((d, steps // d))
    return sorted(w for w in divisors if w in sizes)


def allowed_layouts(cfg: JobConfig) -> tuple[list[Layout], Skipped]:
    """(allowed layouts, smallest first; the skipped world sizes). The work grows with the
    global batch's divisors and the allowed sizes, never with the width of min..max nodes."""
    allowed: list[Layout] = []
    for w in _candidate_sizes(cfg):
        result = layout_for(cfg, w)
        if isinstance(result, Layout):
            allowed.append(result)
    sizes = world_size_range(cfg.cluster)
    ok = {l.world_size for l in allowed}
    examples = []
    for w in sizes:    # stops after a few examples: at most len(ok) + _EXAMPLES steps
        if len(examples) == _EXAMPLES:
            break
        if w not in ok:
            examples.append((w, layout_for(cfg, w)))
    return allowed, Skipped(len(sizes) - len(allowed), tuple(examples))


def best_layout(cfg: JobConfig, available_workers: int) -> Union[Layout, None]:
    """The largest allowed layout that fits in `available_workers`."""
    fitting = [l for l in allowed_layouts(cfg)[0] if l.world_size <= available_workers]
    return fitting[-1] if fitting else None
