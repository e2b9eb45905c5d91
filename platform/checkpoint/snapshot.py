"""Copy this rank's share of the training state out of the engine into host memory.

This is the only part of a save that training waits for: once the copy is
taken, serializing, hashing, uploading and committing can run while the
next steps change the engine's state (platform.train.checkpointing).

Which rank keeps which piece is `platform.checkpoint.placement`'s: dense
parameters in row ranges spread over all ranks, each expert written by one
rank of one replica. Reading a full parameter out of ZeRO 1/2 partitions is
a collective (`safe_get_full_*` all-reduce over the parameter's data-parallel
group), so every rank walks every parameter in the same order and keeps only
its own units: host memory holds a rank's share, never the whole state.
Host buffers are kept from one save to the next (pinned on CUDA, so the
device-to-host copies run at full speed without a staging copy).

The engine is duck-typed (`basic_optimizer`, `engine.optimizer`, as
`platform.train.engine.Engine` has them) so the format depends on DeepSpeed
and torch only, never on the training package.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch

from platform.checkpoint.keys import expert_key, rows_key
from platform.checkpoint.placement import (
    STATE_BYTES_PER_ELEMENT, ParamShape, Unit, assign_writers, chunk_bytes_for, units_of,
)
from platform.checkpoint.rng import rng_state

MOMENTS = ("exp_avg", "exp_avg_sq")


def params(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Parameter, bool]]:
    """(global name, parameter, is_expert) in a fixed order; the same on every rank."""
    experts = {id(p) for p in model.expert_parameters()}
    for name, p in model.named_parameters():
        yield name, p, id(p) in experts


def param_shapes(model: torch.nn.Module) -> list[ParamShape]:
    """The model's parameters as placement sees them (an expert parameter: rows of one expert)."""
    local = len(model.local_experts)
    shapes = []
    for name, p, is_expert in params(model):
        rows, cols = p.shape[0], p.numel() // p.shape[0]
        if is_expert:
            shapes.append(ParamShape(name, rows // local, cols, model.cfg.moe_num_experts))
        else:
            shapes.append(ParamShape(name, rows, cols))
    return shapes


def my_units(model: torch.nn.Module, *, rank: int, world_size: int, ep: int,
             chunk_bytes: Optional[int] = None) -> dict[str, list[Unit]]:
    """Parameter name -> the units this rank writes (the same assignment on every rank)."""
    shapes = param_shapes(model)
    total = sum(s.rows * s.cols * max(1, s.experts) * STATE_BYTES_PER_ELEMENT for s in shapes)
    units = units_of(shapes, chunk_bytes or chunk_bytes_for(total, world_size))
    mine: dict[str, list[Unit]] = {}
    for unit, writer in assign_writers(units, world_size, ep, model.cfg.moe_num_experts).items():
        if writer == rank:
            mine.setdefault(unit.name, []).append(unit)
    for name in mine:
        mine[name].sort(key=lambda u: (u.expert or 0, u.rows))
    return mine


def _held_whole(p: torch.nn.Parameter) -> bool:
    """Whether ZeRO keeps all of `p` on this rank: its data-parallel group is this rank alone
    (one worker, or experts as many shards as ranks). The same answer on every rank of the
    group, so skipping the collective there is safe."""
    import torch.distributed as dist

    return dist.get_world_size(p._dp_group) == 1


def full_param(p: torch.nn.Parameter) -> torch.Tensor:
    """The fp32 master value of `p` (a collective under ZeRO unless held whole: then a view)."""
    from deepspeed.utils import safe_get_full_fp32_param

    if not hasattr(p, "_hp_mapping"):
        return p.detach().float()
    if _held_whole(p):
        return p._hp_mapping.get_hp_fragment().view(p.shape).float()
    return safe_get_full_fp32_param(p).float()


def full_moment(p: torch.nn.Parameter, key: str, optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """Adam's `key` state of `p`, like `full_param`."""
    from deepspeed.utils import safe_get_full_optimizer_state

    if not hasattr(p, "_hp_mapping"):
        return optimizer.state[p][key].detach().float()
    if _held_whole(p):
        return p._hp_mapping.get_hp_fragment(key).view(p.shape).float()
    return safe_get_full_optimizer_state(p, key).float()


def link_optimizer_state(engine) -> None:
    """Point ZeRO's per-parameter views at Adam's state.

    DeepSpeed links them once, right after stepping the first parameter group,
    so with several groups (decay, no-decay, expert groups) the later groups'
    views stay empty; relinking every time is cheap (views, no copies).
    """
    opt = engine.engine.optimizer
    link = getattr(opt, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:
        opt._hp_optimizer_states_linked = False
        link()


def adam_step(optimizer: torch.optim.Optimizer) -> int:
    for state in optimizer.state.values():
        if "step" in state:
            return int(state["step"])
    return 0


@dataclass(frozen=True)
class Snapshot:
    """This rank's share of the state at one step, in host memory."""

    weights: dict[str, torch.Tensor]     # key -> fp32 weight piece
    moments: dict[str, torch.Tensor]     # "<name>::exp_avg..." key -> fp32 moment piece
    rng: dict[str, Any]                  # this rank's generators (rng_state())
    adam_step: int


class HostBuffers:
    """Host tensors kept from one save to the next, one per key.

    Pinned when the state is on a GPU, so the device-to-host copies are
    asynchronous DMA; a save must be done with a buffer before the next one
    refills it (one save in flight at a time).
    """

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def copy(self, key: str, source: torch.Tensor) -> torch.Tensor:
        buf = self._buffers.get(key)
        if buf is None or buf.shape != source.shape:
            buf = torch.empty(source.shape, dtype=torch.float32, pin_memory=source.is_cuda)
            self._buffers[key] = buf
        buf.copy_(source, non_blocking=source.is_cuda)
        return buf


def _piece(full: torch.Tensor, unit: Unit, local_experts: range) -> torch.Tensor:
    if unit.expert is None:
        return full[unit.rows[0]:unit.rows[1]]
    per = full.shape[0] // len(local_experts)
    i = unit.expert - local_experts.start
    return full[i * per:(i + 1) * per]


def _key(name: str, unit: Unit, full_rows: int) -> str:
    if unit.expert is not None:
        return expert_key(name, unit.expert)
    if unit.rows == (0, full_rows):
        return name
    return rows_key(name, *unit.rows)


def take_snapshot(engine, model: torch.nn.Module, units: dict[str, list[Unit]],
                  buffers: HostBuffers) -> Snapshot:
    """Copy `units` of the engine's weights and Adam moments into `buffers` (collective).

    Every rank calls this with its own units; the copies are its own from the
    moment this returns, whatever training does next.
    """
    optimizer = engine.basic_optimizer
    link_optimizer_state(engine)
    local_experts = model.local_experts
    weights: dict[str, torch.Tensor] = {}
    moments: dict[str, torch.Tensor] = {}
    on_gpu = False
    for name, p, _ in params(model):
        value = full_param(p)
        moms = {k: full_moment(p, k, optimizer) for k in MOMENTS}
        on_gpu = on_gpu or value.is_cuda
        rows = value.shape[0]
        for unit in units.get(name, ()):
            key = _key(name, unit, rows)
            weights[key] = buffers.copy(key, _piece(value, unit, local_experts))
            for k, m in moms.items():
                mkey = _key(f"{name}::{k}", unit, rows)
                moments[mkey] = buffers.copy(mkey, _piece(m, unit, local_experts))
    if on_gpu:
        torch.cuda.synchronize()
    return Snapshot(weights, moments, rng_state(), adam_step(optimizer))
