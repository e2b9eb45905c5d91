"""World-size-independent trainer state: the platform's own checkpoint format.

DeepSpeed's checkpoints are tied to the data-parallel size they were written
at, and its universal converter fails on MoE models, so elastic resume saves
each parameter and its Adam moments *in full*, keyed by global names:

    model-rNNNNN-*.safetensors   fp32 master weights
    optim-rNNNNN-*.safetensors   Adam exp_avg / exp_avg_sq, same keys + "::exp_avg" ...
    trainer.json                 step, data position, Adam step, RNG per rank, layout

Dense parameters are written once (global rank 0). Expert weights are stacked
[experts*ffn, d_model] per layer; each expert is stored as its own tensor
(`<name>.expert0007`), written by the first replica of its shard (ranks
0..ep-1 with DeepSpeed's group ordering). Loading picks the experts a rank
holds at the *new* expert-parallel degree, so 2 workers with experts split in
two resume on 1 worker holding all 16, and the other way round.

Reading a full parameter out of ZeRO 1/2 partitions is a collective
(`safe_get_full_*` all-reduce over the parameter's data-parallel group), so
every rank walks every parameter in the same order; only owners keep them.
Cost: one all-reduce of every parameter and moment per save, and rank 0 holds
the dense parameters' fp32 state on CPU while writing (experts are spread
over the first `ep` ranks).

The engine is duck-typed (`basic_optimizer`, `engine.optimizer`, as
`platform.train.engine.Engine` has them) so the format depends on DeepSpeed
and torch only, never on the training package.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from platform.checkpoint.rng import rng_state, set_rng_state
from platform.checkpoint.tensors import load_tensors, read_tensor_index, save_tensors
from platform.collectives import gather

MOMENTS = ("exp_avg", "exp_avg_sq")
TRAINER_FILE = "trainer.json"
FORMAT_VERSION = 1


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
        if data.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"unknown trainer state format {data.get('format_version')!r}")
        data = {k: v for k, v in data.items() if k != "format_version"}
        return cls(**data)


def expert_key(name: str, expert: int) -> str:
    """The key of expert `expert`'s rows of the stacked expert parameter `name`."""
    return f"{name}.expert{expert:04d}"


def _params(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Parameter, bool]]:
    """(global name, parameter, is_expert) in a fixed order; the same on every rank."""
    experts = {id(p) for p in model.expert_parameters()}
    for name, p in model.named_parameters():
        yield name, p, id(p) in experts


def _full_param(p: torch.nn.Parameter) -> torch.Tensor:
    from deepspeed.utils import safe_get_full_fp32_param

    value = safe_get_full_fp32_param(p) if hasattr(p, "_hp_mapping") else None
    return (p.detach() if value is None else value).float()


def _full_moment(p: torch.nn.Parameter, key: str, optimizer: torch.optim.Optimizer) -> torch.Tensor:
    from deepspeed.utils import safe_get_full_optimizer_state

    if hasattr(p, "_hp_mapping"):
        return safe_get_full_optimizer_state(p, key).float()
    return optimizer.state[p][key].detach().float()


def _split_experts(name: str, value: torch.Tensor, local_experts: range) -> dict[str, torch.Tensor]:
    chunks = value.chunk(len(local_experts), dim=0)
    return {expert_key(name, e): c.contiguous() for e, c in zip(local_experts, chunks)}


def _adam_step(optimizer: torch.optim.Optimizer) -> int:
    for state in optimizer.state.values():
        if "step" in state:
            return int(state["step"])
    return 0


def save_state(directory: Path, engine, model, *, rank: int, world_size: int, ep: int,
               step: int, consumed_sequences: int, extra: dict[str, Any]) -> list[str]:
    """Write this rank's share of the state into `directory` (collective).

    Every rank calls this; rank 0 also writes trainer.json. Returns the files
    this rank wrote, relative to `directory`.
    """
    optimizer = engine.basic_optimizer
    _link_optimizer_state(engine)
    owns_dense = rank == 0
    owns_experts = rank < ep if ep > 1 else rank == 0
    local_experts = model.local_experts
    weights: dict[str, torch.Tensor] = {}
    moments: dict[str, torch.Tensor] = {}
    for name, p, is_expert in _params(model):
        value = _full_param(p)
        moms = {k: _full_moment(p, k, optimizer) for k in MOMENTS}
        if is_expert and owns_experts:
            weights.update(_split_experts(name, value, local_experts))
            for k, m in moms.items():
                moments.update(_split_experts(f"{name}::{k}", m, local_experts))
        elif not is_expert and owns_dense:
            weights[name] = value
            moments.update({f"{name}::{k}": m for k, m in moms.items()})
    sets: list[str] = []
    files: list[str] = []
    if weights:
        files += save_tensors(directory, f"model-r{rank:05d}", weights)
        files += save_tensors(directory, f"optim-r{rank:05d}", moments)
        sets = [f"model-r{rank:05d}", f"optim-r{rank:05d}"]
    gathered = gather({"sets": sets, "rng": rng_state(), "rank": rank})
    if rank != 0:
        return files
    state = TrainerState(
        step=step, consumed_sequences=consumed_sequences, adam_step=_adam_step(optimizer),
        world_size=world_size, expert_parallel=ep,
        tensor_sets=sorted(s for g in gathered for s in g["sets"]),
        rng={str(g["rank"]): g["rng"] for g in gathered}, extra=extra,
    )
    (directory / TRAINER_FILE).write_text(json.dumps(state.to_json()) + "\n")
    return files + [TRAINER_FILE]


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
    _link_optimizer_state(engine)


def _link_optimizer_state(engine) -> None:
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


def _key_index(directory: Path, sets: list[str]) -> dict[str, str]:
    index: dict[str, str] = {}
    for name in sets:
        index.update({key: name for key in read_tensor_index(directory, name)})
    return index


def _load(directory: Path, index: dict[str, str], keys: list[str]) -> list[torch.Tensor]:
    by_set: dict[str, list[str]] = {}
    for key in keys:
        if key not in index:
            raise KeyError(f"checkpoint at {directory} has no tensor {key!r}; was it saved "
                           "from a different model config?")
        by_set.setdefault(index[key], []).append(key)
    loaded: dict[str, torch.Tensor] = {}
    for name, wanted in by_set.items():
        loaded.update(load_tensors(directory, name, names=wanted))
    return [loaded[k] for k in keys]


def load_state(directory: Path, engine, model, *, rank: int, world_size: int) -> TrainerState:
    """Load a checkpoint written at any allowed world size into this rank's engine."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    state = read_trainer_state(directory)
    index = _key_index(Path(directory), state.tensor_sets)
    _ensure_optimizer_state(engine, state.adam_step)
    optimizer = engine.basic_optimizer
    local_experts = model.local_experts
    with torch.no_grad():
        for name, p, is_expert in _params(model):
            names = [name, *(f"{name}::{k}" for k in MOMENTS)]
            if is_expert:
                parts = [_load(directory, index, [expert_key(n, e) for e in local_experts])
                         for n in names]
                value, *moms = [torch.cat(chunks, dim=0) for chunks in parts]
            else:
                value, *moms = _load(directory, index, names)
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


def consolidated_weights(directory: Path, num_experts: int) -> dict[str, torch.Tensor]:
    """The model's full state dict (all experts stacked) from a checkpoint of any layout.

    This is what promotion exports and serving loads: a single-process DBRX
    with expert-parallel degree 1 takes it with `load_state_dict`.
    """
    directory = Path(directory)
    state = read_trainer_state(directory)
    index = _key_index(directory, [s for s in state.tensor_sets if s.startswith("model-")])
    names = sorted(index)
    weights = dict(zip(names, _load(directory, index, names)))
    out: dict[str, torch.Tensor] = {}
    stacked: dict[str, list] = {}
    for key, value in weights.items():
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
