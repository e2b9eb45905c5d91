"""Who writes what of a checkpoint: every byte once, every rank a fair share (132B shapes)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from platform.checkpoint.placement import (
    STATE_BYTES_PER_ELEMENT, assign_writers, bytes_per_rank, chunk_bytes_for, expert_shard, units_of,
)
from platform.checkpoint.snapshot import my_units, param_shapes

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dbrx_132b():
    """The 132B job and its model on the meta device (shapes, no memory)."""
    from model import DBRX
    from platform.config import load_job

    cfg = load_job(ROOT / "conf" / "pretrain_132b.yaml")
    with torch.device("meta"):
        return cfg, DBRX(cfg.model)


def _units(model, world: int):
    shapes = param_shapes(model)
    total = sum(p.numel() for p in model.parameters()) * STATE_BYTES_PER_ELEMENT
    return shapes, units_of(shapes, chunk_bytes_for(total, world))


def test_units_cover_every_parameter_exactly_once(dbrx_132b):
    cfg, model = dbrx_132b
    shapes, units = _units(model, 512)
    experts = cfg.model.moe_num_experts
    for shape in shapes:
        mine = [u for u in units if u.name == shape.name]
        if shape.experts:
            assert sorted(u.expert for u in mine) == list(range(experts))
            assert {u.rows for u in mine} == {(0, shape.rows)}
        else:
            bounds = sorted(u.rows for u in mine)
            assert bounds[0][0] == 0 and bounds[-1][1] == shape.rows
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))   # no gap, no overlap
    numel = sum(p.numel() for p in model.parameters())
    assert sum(u.nbytes for u in units) == numel * STATE_BYTES_PER_ELEMENT


@pytest.mark.parametrize("world", [8, 64, 512])
def test_every_rank_writes_a_fair_share_and_only_what_it_holds(dbrx_132b, world):
    from platform.layout import layout_for

    cfg, model = dbrx_132b
    ep, experts = layout_for(cfg, world).expert_parallel, cfg.model.moe_num_experts
    _, units = _units(model, world)
    owner = assign_writers(units, world, ep, experts)
    loads = bytes_per_rank(owner, world)
    assert max(loads) <= 1.25 * sum(loads) / world
    assert all(rank % ep == expert_shard(u.expert, experts, ep)          # DeepSpeed: rank r holds
               for u, rank in owner.items() if u.expert is not None)    # expert shard r % ep


def test_each_rank_takes_its_own_units_and_together_all(dbrx_132b):
    _, model = dbrx_132b
    world, ep = 16, 8
    _, units = _units(model, world)
    taken = [u for rank in range(world)
             for us in my_units(model, rank=rank, world_size=world, ep=ep).values() for u in us]
    assert sorted(taken, key=repr) == sorted(units, key=repr)
