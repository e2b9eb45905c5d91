"""A replica over several devices: its experts split N ways, every rank decoding in lock step.

serve.devices_per_replica = N > 1. The replica process is rank 0 of a
torch.distributed group of N processes (gloo on CPU, NCCL with one GPU each);
ranks 1..N-1 are `ShardWorker` Ray actors it starts (in its placement group
when Serve gave it one, one bundle per rank) and owns: they die with it.

Each rank loads the same weights keeping only its experts (`ModelLoader` with
the group) and holds a DecodeEngine of the same slots. Rank 0 decides
everything (the Scheduler runs there) and sends every engine call, in order,
to the other ranks as Ray actor calls, then makes the same call itself; so
each forward runs on every rank at once, as the MoE all-to-all needs. Every
rank holds the whole batch (attention and sampling replicated): routing sends
each rank's copy of a token to the owner of its experts and the outputs come
back to that copy, so every rank computes the same tokens and rank 0's are
the ones served. Seeds of sampled requests are drawn on rank 0 and sent.

Loading (the first model, and each new version when the replica follows an
alias) runs on the shards in a thread of its own ("load" concurrency group),
so a rolling update does not stall the decoding of the version in use.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import weakref
from dataclasses import replace
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import ray
import torch
import torch.distributed as dist

from model.decode import DecodeEngine, Sampling, draw_seed
from platform.serving.loader import LoadedModel, ModelLoader, ServerSettings

if TYPE_CHECKING:
    from platform.registry.models import VersionRef

log = logging.getLogger("platform.serving")

# A collective waits this long for the other ranks (one whose shard died fails after it).
COLLECTIVE_TIMEOUT = timedelta(minutes=10)


def _init_group(settings: ServerSettings, rank: int, world: int, address: str, port: int) -> None:
    """Join the replica's process group; on a GPU this process's one visible device is its rank's."""
    gpu = settings.use_gpu and torch.cuda.is_available()
    if gpu:
        torch.cuda.set_device(0)
    else:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("nccl" if gpu else "gloo", init_method=f"tcp://{address}:{port}", rank=rank,
                            world_size=world, timeout=COLLECTIVE_TIMEOUT)


def _join(settings: ServerSettings, world: int, port: int, errors: list) -> None:
    try:
        _init_group(settings, 0, world, "127.0.0.1", port)
    except BaseException as exc:
        errors.append(exc)


def _target(loader: ModelLoader, path: Optional[str], ref: Optional["VersionRef"]) -> LoadedModel:
    from pathlib import Path

    return loader.load_path(Path(path)) if path is not None else loader.load_ref(ref)


@ray.remote(concurrency_groups={"load": 1, "run": 1})
class ShardWorker:
    """Rank 1..N-1 of a replica: its experts of each loaded version and their decode engines."""

    def __init__(self, settings: ServerSettings, rank: int, world: int, address: str, port: int):
        torch.set_num_threads(max(1, int(settings.replica_cpus) or 1))
        _init_group(settings, rank, world, address, port)
        self.loader = ModelLoader(settings, ep_group=dist.group.WORLD)
        self.models: dict[int, LoadedModel] = {}       # written by the "load" thread
        self.engines: dict[int, DecodeEngine] = {}      # used by the "run" thread only

    def ready(self) -> int:
        """This rank's process id, once it joined the group."""
        return os.getpid()

    @ray.method(concurrency_group="load")
    def load(self, key: int, path: Optional[str], ref: Optional["VersionRef"]) -> None:
        self.models[key] = _target(self.loader, path, ref)

    @ray.method(concurrency_group="load")
    def forget(self, key: int) -> None:
        self.models.pop(key, None)

    @ray.method(concurrency_group="run")
    def open(self, key: int, slots: int, max_len: int) -> None:
        """Rank 0 opens an engine only on a version every shard finished loading."""
        self.engines[key] = DecodeEngine(self.models[key].model, slots, max_len, cuda_graphs=False)

    @ray.method(concurrency_group="run")
    def close(self, key: int) -> None:
        self.engines.pop(key, None)

    @ray.method(concurrency_group="run")
    def call(self, key: int, method: str, args: tuple) -> None:
        """The engine call rank 0 makes at the same point (the result is rank 0's to use)."""
        with torch.no_grad():
            getattr(self.engines[key], method)(*args)


class ShardGroup:
    """Rank 0's side: the shard actors, the process group, and the lock that orders their calls."""

    def __init__(self, settings: ServerSettings, shards: list, loader: ModelLoader):
        self.settings, self.shards, self.loader = settings, shards, loader
        self._lock = threading.Lock()          # one engine call at a time, in the same order everywhere
        self._keys = itertools.count()
        self.failed: Optional[BaseException] = None

    @classmethod
    def start(cls, settings: ServerSettings) -> "ShardGroup":
        """Start ranks 1..N-1 and join them (this process is rank 0); nothing is left on failure."""
        from ray.util import get_current_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from platform.provision.head import free_local_port

        world, port = settings.devices_per_replica, free_local_port()
        group = get_current_placement_group()
        shards = []
        try:
            for rank in range(1, world):
                options: dict[str, Any] = {"num_cpus": settings.replica_cpus, "num_gpus": settings.replica_gpus}
                if group is not None:
                    options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                        group, placement_group_bundle_index=rank)
                shards.append(ShardWorker.options(**options).remote(settings, rank, world, "127.0.0.1", port))
            # Joining waits for every rank: in a thread, so that a shard failing to start (its
            # `ready` raises) or this rank failing to join ends this at once, not at the timeout.
            joined: list[BaseException] = []
            joining = threading.Thread(target=_join, args=(settings, world, port, joined), daemon=True)
            joining.start()
            pending = [s.ready.remote() for s in shards]
            while pending and not joined:
                done, pending = ray.wait(pending, num_returns=1, timeout=1.0)
                ray.get(done)
            joining.join()
            if joined:
                raise joined[0]
        except BaseException:
            for shard in shards:
                ray.kill(shard)
            if dist.is_initialized():
                dist.destroy_process_group()
            raise
        return cls(settings, shards, ModelLoader(settings, ep_group=dist.group.WORLD))

    # ------------------------------------------------------------------ loading

    def load(self, path: Optional[str] = None, ref: Optional["VersionRef"] = None) -> LoadedModel:
        """Load on every rank at once; the LoadedModel names its shards' copies (`shard_key`), which
        the shards drop when rank 0 lets go of it."""
        key = next(self._keys)
        pending = [s.load.remote(key, path, ref) for s in self.shards]
        try:
            loaded = _target(self.loader, path, ref)
            ray.get(pending)
        except BaseException:
            self._forget(key)
            raise
        loaded = replace(loaded, shard_key=key)
        weakref.finalize(loaded, self._forget, key)
        return loaded

    def _forget(self, key: int) -> None:
        for shard in self.shards:
            shard.forget.remote(key)

    # ------------------------------------------------------------------ engines

    def engine(self, loaded: LoadedModel, slots: int, max_len: int) -> "ShardedEngine":
        return ShardedEngine(self, loaded, slots, max_len)

    def run(self, key: int, method: str, args: tuple, local: Callable[[], Any]) -> Any:
        """`method(*args)` on every shard's engine `key` and `local()` here, together.

        A call that fails here fails the same way on every rank (e.g. a prompt too long): the
        group stays usable. A shard failing otherwise breaks the lock step: `alive` turns False
        and the replica's health check has Serve replace it."""
        with self._lock:
            pending = [s.call.remote(key, method, args) for s in self.shards]
            try:
                result = local()
            except BaseException as exc:
                errors = self._errors(pending)
                if any(not isinstance(getattr(e, "cause", e), type(exc)) for e in errors) \
                        or len(errors) < len(pending):
                    self.failed = errors[0] if errors else exc
                raise
            errors = self._errors(pending)
            if errors:
                self.failed = errors[0]
                raise RuntimeError(f"a shard of this replica failed: {errors[0]}") from errors[0]
            return result

    @staticmethod
    def _errors(pending: list) -> list[BaseException]:
        errors = []
        for ref in pending:
            try:
                ray.get(ref)
            except Exception as exc:
                errors.append(exc)
        return errors

    @property
    def alive(self) -> bool:
        return self.failed is None

    def shutdown(self) -> None:
        """Kill the shard actors and leave the group (idempotent)."""
        shards, self.shards = self.shards, []
        for shard in shards:
            try:
                ray.kill(shard)
            except Exception:           # already gone
                pass
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception as exc:
                log.warning("leaving the replica's process group: %s", exc)


class ShardedEngine:
    """A DecodeEngine whose every call runs on every rank of the replica (see the module docstring)."""

    def __init__(self, group: ShardGroup, loaded: LoadedModel, slots: int, max_len: int):
        if loaded.shard_key is None:
            raise ValueError("a sharded engine needs a model loaded by ShardGroup.load")
        self.group, self.key = group, loaded.shard_key
        with group._lock:
            ray.get([s.open.remote(self.key, slots, max_len) for s in group.shards])
        self.local = DecodeEngine(loaded.model, slots, max_len, cuda_graphs=False)

    @property
    def slots(self) -> int:
        return self.local.slots

    @property
    def free_slots(self) -> int:
        return self.local.free_slots

    @property
    def active(self) -> int:
        return self.local.active

    def admit_many(self, prompts: Sequence[Sequence[int]], samplings: Sequence[Sampling]) -> list[int]:
        prompts = [list(p) for p in prompts]
        samplings = [sp if sp.greedy or sp.seed is not None else replace(sp, seed=draw_seed())
                     for sp in samplings]
        return self.group.run(self.key, "admit_many", (prompts, samplings),
                              lambda: self.local.admit_many(prompts, samplings))

    def admit(self, prompt_ids: Sequence[int], sampling: Sampling = Sampling()) -> int:
        return self.admit_many([prompt_ids], [sampling])[0]

    def step(self) -> dict[int, int]:
        return self.group.run(self.key, "step", (), self.local.step)

    def release(self, slot: int) -> None:
        self.group.run(self.key, "release", (slot,), lambda: self.local.release(slot))

    def close(self) -> None:
        """Free this engine's caches on the shards too (the scheduler dropped it)."""
        with self.group._lock:
            for shard in self.group.shards:
                shard.close.remote(self.key)


class ShardedLoader(ModelLoader):
    """The replica's loader (its alias watcher's too): every load happens on all ranks."""

    def __init__(self, settings: ServerSettings, group: ShardGroup):
        super().__init__(settings)
        self.group = group

    def load_path(self, path) -> LoadedModel:
        return self.group.load(path=str(path))

    def load_ref(self, ref: "VersionRef") -> LoadedModel:
        return self.group.load(ref=ref)
