"""World-size-independent tensor files: name -> full tensor, in safetensors shards.

Checkpoints hold full (unpartitioned) tensors so any world size can load
them, and safetensors so loading never runs pickled code. Tensors go into
`<name>-00001-of-00003.safetensors` shards of at most `max_shard_mb` each
(one tensor bigger than that gets a shard of its own), plus
`<name>.safetensors.index.json` mapping each tensor to its shard: the layout
Hugging Face tools read, and small enough pieces that a reader streams a big
model one shard at a time.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from platform.storage import LocalStore, Store, open_store

if TYPE_CHECKING:
    import torch

INDEX_SUFFIX = ".safetensors.index.json"
DEFAULT_MAX_SHARD_MB = 1024.0


def _check_name(name: str) -> None:
    if not name or "/" in name or name.startswith(".") or not name.isprintable():
        raise ValueError(f"invalid tensor file name {name!r}: use a plain name such as 'model'")


def _shard_groups(tensors: Mapping[str, "torch.Tensor"], limit: int) -> list[list[str]]:
    """Greedy, order-preserving packing of tensor names into shards of <= limit bytes."""
    import torch

    groups: list[list[str]] = []
    current: list[str] = []
    used = 0
    for key, tensor in tensors.items():
        if not isinstance(key, str) or not isinstance(tensor, torch.Tensor):
            raise TypeError(f"save_tensors needs str -> torch.Tensor, got {type(key).__name__} -> {type(tensor).__name__}")
        nbytes = tensor.numel() * tensor.element_size()
        if current and used + nbytes > limit:
            groups.append(current)
            current, used = [], 0
        current.append(key)
        used += nbytes
    if current:
        groups.append(current)
    return groups


def _cpu_shard(tensors: Mapping[str, "torch.Tensor"], keys: list[str]) -> dict[str, "torch.Tensor"]:
    """The shard's tensors on CPU, contiguous, and not sharing memory (safetensors refuses that)."""
    out = {}
    seen: set[int] = set()
    for key in keys:
        tensor = tensors[key].detach().cpu().contiguous()
        if tensor.numel():
            ptr = tensor.untyped_storage().data_ptr()
            if ptr in seen:
                tensor = tensor.clone()  # tied weights: store each name in full
            else:
                seen.add(ptr)
        out[key] = tensor
    return out


def save_tensors(
    directory: str | os.PathLike,
    name: str,
    tensors: Mapping[str, "torch.Tensor"],
    *,
    max_shard_mb: float = DEFAULT_MAX_SHARD_MB,
    metadata: Mapping[str, Any] | None = None,
) -> list[str]:
    """Write `tensors` as `name` shards plus index into `directory` (a fresh one,
    e.g. a checkpoint Staging). Returns the file names written, index last.

    Only one shard is copied to CPU at a time, so GPU state streams out.
    `metadata` (plain JSON) goes into the index.
    """
    from safetensors.torch import save_file

    _check_name(name)
    limit = int(max_shard_mb * 1024 * 1024)
    if limit <= 0:
        raise ValueError(f"max_shard_mb must be positive, got {max_shard_mb}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    groups = _shard_groups(tensors, limit)
    weight_map: dict[str, str] = {}
    files = []
    total = 0
    for i, keys in enumerate(groups, 1):
        shard_name = f"{name}-{i:05d}-of-{len(groups):05d}.safetensors"
        shard = _cpu_shard(tensors, keys)
        save_file(shard, directory / shard_name, metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in shard.values())
        weight_map.update((key, shard_name) for key in keys)
        files.append(shard_name)
        del shard
    index = {"metadata": {"total_size": total, **dict(metadata or {})}, "weight_map": weight_map}
    index_name = f"{name}{INDEX_SUFFIX}"
    (directory / index_name).write_text(json.dumps(index, indent=1, allow_nan=False) + "\n")
    return [*files, index_name]


def _as_source(source: str | os.PathLike | Store) -> Store:
    if isinstance(source, Store):
        return source
    return open_store(source) if isinstance(source, str) else LocalStore(source)


def read_tensor_index(source: str | os.PathLike | Store, name: str) -> dict[str, str]:
    """tensor name -> shard file, in saved order, from a folder, URI or Store."""
    _check_name(name)
    store = _as_source(source)
    key = f"{name}{INDEX_SUFFIX}"
    try:
        weight_map = json.loads(store.read_bytes(key))["weight_map"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{store.uri}/{key} is not a tensor index ({exc})") from None
    if not isinstance(weight_map, dict):
        raise ValueError(f"{store.uri}/{key} is not a tensor index (weight_map is not a mapping)")
    return weight_map


def load_tensors(
    source: str | os.PathLike | Store,
    name: str,
    *,
    names: Iterable[str] | None = None,
    device: str = "cpu",
) -> dict[str, "torch.Tensor"]:
    """Tensors saved by `save_tensors` (all, or just `names`), bit-exact.

    Local shards are memory-mapped; remote ones are read one shard at a time.
    """
    import torch
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load as load_bytes

    store = _as_source(source)
    index = read_tensor_index(store, name)
    wanted = list(index) if names is None else list(names)
    missing = [key for key in wanted if key not in index]
    if missing:
        raise KeyError(f"{store.uri}: no tensors {missing[:5]} in {name}{INDEX_SUFFIX}")
    by_shard: dict[str, list[str]] = {}
    for key in wanted:
        by_shard.setdefault(index[key], []).append(key)
    out: dict[str, torch.Tensor] = {}
    for shard, keys in by_shard.items():
        try:
            if isinstance(store, LocalStore):
                with safe_open(store.path(shard), framework="pt", device=device) as f:
                    out.update((key, f.get_tensor(key)) for key in keys)
            else:
                loaded = load_bytes(store.read_bytes(shard))
                out.update((key, loaded[key].to(device)) for key in keys)
        except (SafetensorError, KeyError) as exc:
            raise ValueError(f"{store.uri}/{shard} is damaged or incomplete ({exc})") from None
    return {key: out[key] for key in wanted}
