"""World-size-independent trainer state: the platform's own checkpoint format.

DeepSpeed's checkpoints are tied to the data-parallel size they were written
at, and its universal converter fails on MoE models, so elastic resume saves
each parameter and its Adam moments *in full*, keyed by global names
(platform.checkpoint.keys):

    model-rNNNNN-*.safetensors   fp32 master weights written by rank NNNNN
    optim-rNNNNN-*.safetensors   Adam exp_avg / exp_avg_sq, same keys + "::exp_avg" ...
    trainer.json                 step, data position, Adam step, RNG per rank, layout

Every rank writes a fair share (platform.checkpoint.placement): dense
parameters in row ranges (`<name>.rowsA-B`, or the plain name when a range is
the whole tensor), each expert as its own tensor (`<name>.expert0007`) by one
rank holding it. Loading joins row ranges and picks the experts a rank holds
at the *new* expert-parallel degree, so 2 workers with experts split in two
resume on 1 worker holding all 16, and the other way round; checkpoints of
format 1 (dense state whole, written by rank 0) load the same way.

Taking the state out of the engine is `platform.checkpoint.snapshot`; this
module writes a snapshot into files and reads checkpoints back. Saving
(rank records, commit, in the background) is platform.train.checkpointing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from platform.checkpoint.keys import expert_key, logical_keys
from platform.checkpoint.rng import set_rng_state
from platform.checkpoint.snapshot import MOMENTS, Snapshot, link_optimizer_state, params
from platform.checkpoint.tensors import load_tensors, read_tensor_index, save_tensors

TRAINER_FILE = "trainer.json"
FORMAT_VERSION = 2        # 2: dense state in row ranges over all ranks; 1: dense state whole (rank 0)
READABLE_VERSIONS = (1, 2)


@dataclass(frozen=True)
class TrainerState:
    step: int                    # optimizer steps completed
    consumed_sequences: int      # global data position
    adam_step: int
    world_size: int
    expert_parallel: int
    tensor_sets: list[str]       # names of the safetensors sets in the checkpoint
    rng: dict[str, Any]          # rank -> rng_state(), restored at the same world size
    extra: dict[str, Any]        # run id, losses, ... (plain JSON)

    def to_json(self) -> dict:
        return {"format_version": FORMAT_VERSION, **self.__dict__}

    @classmethod
    def from_json(cls, data: dict) -> "TrainerState":
        if data.get("format_version") not in READABLE_VERSIONS:
            raise ValueError(f"unknown trainer state format {data.get('format_version')!r}")
        data = {k: v for k, v in data.items() if k != "format_version"}
        return cls(**data)


def write_snapshot(directory: Path, snapshot: Snapshot, rank: int) -> tuple[list[str], list[str]]:
    """Write a rank's snapshot as its tensor sets; returns (set names, files written)."""
    if not snapshot.weights:
        return [], []
    sets = [f"model-r{rank:05d}", f"optim-r{rank:05d}"]
    files = save_tensors(directory, sets[0], snapshot.weights)
    files += save_tensors(directory, sets[1], snapshot.moments)
    return sets, files


@dataclass(frozen=True)
class RankPart:
    """What rank 0 needs from every rank to write trainer.json."""

    rank: int
    sets: list[str]
    rng: dict[str, Any]


def write_trainer_state(directory: Path, parts: Sequence[RankPart], *, step: int,
                        consumed_sequences: int, adam_step: int, world_size: int, ep: int,
                        extra: Mapping[str, Any]) -> str:
    """Write trainer.json from every rank's part (rank 0); returns its file name."""
    state = TrainerState(
        step=step, consumed_sequences=consumed_sequences, adam_step=adam_step,
        world_size=world_size, expert_parallel=ep,
        tensor_sets=sorted(s for part in parts for s in part.sets),
        rng={str(part.rank): part.rng for part in sorted(parts, key=lambda p: p.rank)},
        extra=dict(extra),
    )
    (Path(directory) / TRAINER_FILE).write_text(json.dumps(state.to_json()) + "\n")
    return TRAINER_FILE


def read_trainer_state(directory: Path) -> TrainerState:
    return TrainerState.from_json(json.loads((Path(directory) / TRAINER_FILE).read_text()))


def _ensure_optimizer_state(engine, adam_step: int) -> None:
    """Create Adam's state (lazily made at the first step) so it can be overwritten."""
    optimizer = engine.basic_optimizer
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state[p]
            if not state:
                for k in MOMENTS:
                    state[k] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] = torch.tensor(float(adam_step))
    link_optimizer_state(engine)


class _Reader:
    """Logical tensors (row ranges joined) of some tensor sets of a checkpoint folder."""

    def __init__(self, directory: Path, sets: Sequence[str]) -> None:
        self.directory = Path(directory)
        self.set_of: dict[str, str] = {}
        for name in sets:
            self.set_of.update({key: name for key in read_tensor_index(self.directory, name)})
        self.pieces = logical_keys(self.set_of)

    def keys(self) -> list[str]:
        return sorted(self.pieces)

    def load(self, keys: Sequence[str]) -> list[torch.Tensor]:
        missing = [k for k in keys if k not in self.pieces]
        if missing:
            raise KeyError(f"checkpoint at {self.directory} has no tensor {missing[0]!r}; was it "
                           "saved from a different model config?")
        by_set: dict[str, list[str]] = {}
        for key in keys:
            for piece in self.pieces[key]:
                by_set.setdefault(self.set_of[piece], []).append(piece)
        loaded: dict[str, torch.Tensor] = {}
        for name, wanted in by_set.items():
            loaded.update(load_tensors(self.directory, name, names=wanted))
        return [_join([loaded[p] for p in self.pieces[k]]) for k in keys]


def _join(pieces: list[torch.Tensor]) -> torch.Tensor:
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0)


def load_state(directory: Path, engine, model, *, rank: int, world_size: int) -> TrainerState:
    """Load a checkpoint written at any allowed world size into this rank's engine."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    state = read_trainer_state(directory)
    reader = _Reader(Path(directory), state.tensor_sets)
    _ensure_optimizer_state(engine, state.adam_step)
    optimizer = engine.basic_optimizer
    local_experts = model.local_experts
    with torch.no_grad():
        for name, p, is_expert in params(model):
            names = [name, *(f"{name}::{k}" for k in MOMENTS)]
            if is_expert:
                parts = [reader.load([expert_key(n, e) for e in local_experts]) for n in names]
                value, *moms = [torch.cat(chunks, dim=0) for chunks in parts]
            else:
                value, *moms = reader.load(names)
            if tuple(value.shape) != tuple(p.shape):
                raise ValueError(f"{name}: checkpoint shape {tuple(value.shape)} != model "
                                 f"{tuple(p.shape)}; the model config changed")
            p.data.copy_(value.to(p.dtype))
            if hasattr(p, "_hp_mapping"):
                safe_set_full_fp32_param(p, value.to(p.device))
                for k, m in zip(MOMENTS, moms):
                    safe_set_full_optimizer_state(p, m.to(p.device), k)
            else:
                for k, m in zip(MOMENTS, moms):
                    optimizer.state[p][k].copy_(m)
    if state.world_size == world_size and str(rank) in state.rng:
        set_rng_state(state.rng[str(rank)])
    return state


def state_tensors(directory: Path, kind: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint under its logical key, row ranges joined (experts stay
    one key each); `kind` "model" or "optim" limits it to weights or moments."""
    sets = [s for s in read_trainer_state(directory).tensor_sets if s.startswith(kind)]
    reader = _Reader(Path(directory), sets)
    keys = reader.keys()
    return dict(zip(keys, reader.load(keys)))


def consolidated_weights(directory: Path, num_experts: int) -> dict[str, torch.Tensor]:
    """The model's full state dict (all experts stacked) from a checkpoint of any layout.

    This is what promotion exports and serving loads: a single-process DBRX
    with expert-parallel degree 1 takes it with `load_state_dict`.
    """
    out: dict[str, torch.Tensor] = {}
    stacked: dict[str, list] = {}
    for key, value in state_tensors(directory, "model").items():
        base, sep, expert = key.rpartition(".expert")
        if sep and expert.isdigit():
            stacked.setdefault(base, [None] * num_experts)[int(expert)] = value
        else:
            out[key] = value
    for base, parts in stacked.items():
        if any(p is None for p in parts):
            raise ValueError(f"checkpoint at {directory} lacks experts of {base}")
        out[base] = torch.cat(parts, dim=0)
    return out
