"""Continuous batching for a replica: requests join and leave the running batch at every step.

The decoding itself is model.decode.DecodeEngine, the engine `model.generate`
runs on, so a request decoded alone gives exactly what `generate` gives for
its prompt, sampling parameters and seed (and in a batch, the same tokens).

`Scheduler` owns one engine per served model version and a thread that loops:
admit the requests submitted since the last iteration (prefilled together into
free slots), drop the cancelled ones (stop sequence matched, client gone),
decode one token for every running sequence, hand each its `TokenEvent`. A
short request sent while a long one decodes starts at the next iteration and
leaves as soon as it is done, instead of waiting for the long one's batch.

Capacity: the engine's slots are min(max_concurrent_sequences, what
max_kv_cache_mb holds at the engine's context length); `reserve` admits a
request only while a slot is free for it, so a full replica refuses at once
(the app answers 429) rather than queueing without bound. During a rolling
update the old version's engine lives until its last request finishes, while
the reservations, shared by both, keep the running sequences within the cap.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

from model.attention import StaticKVCache
from model.decode import DecodeEngine, Sampling

if TYPE_CHECKING:
    from model import DBRX

log = logging.getLogger("platform.serving")


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 0.0            # 0: greedy
    top_p: float = 1.0
    seed: Optional[int] = None
    stop_token_ids: frozenset[int] = frozenset()

    def sampling(self) -> Sampling:
        return Sampling(temperature=self.temperature, top_p=self.top_p, seed=self.seed)


@dataclass(eq=False)
class GenerationRequest:
    """One prompt to decode, pinned to the model version that admitted it."""

    prompt_ids: list[int]
    params: SamplingParams
    model: Any                          # platform.serving.loader.LoadedModel
    _cancelled: threading.Event = field(default_factory=threading.Event, repr=False)

    def cancel(self) -> None:
        """Stop decoding this request at the next step (thread-safe)."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


@dataclass(frozen=True)
class TokenEvent:
    """A request's output of one step: a new token and/or why it finished."""

    token: Optional[int]                # None when the request stopped on a stop token
    finish_reason: Optional[str] = None  # "stop" | "length" | None (more to come)


class _Tracker:
    """A request's progress in an engine: tokens produced, and whether its last event was sent."""

    def __init__(self, request: GenerationRequest):
        self.request, self.produced = request, 0

    def event(self, token: int) -> TokenEvent:
        """The event for `token`, counting it; a finish_reason means the request is done."""
        params = self.request.params
        if token in params.stop_token_ids:
            return TokenEvent(None, "stop")
        self.produced += 1
        return TokenEvent(token, "length" if self.produced >= params.max_tokens else None)


def engine_slots(model: "DBRX", context: int, max_sequences: int, max_kv_bytes: Optional[int]) -> int:
    """Sequences one engine holds: the concurrency cap, lowered to what the KV memory cap holds."""
    dtype = model.wte.weight.dtype
    per_slot = StaticKVCache.bytes_per_slot(model.cfg, context, dtype)
    slots = max_sequences if max_kv_bytes is None else min(max_sequences, max_kv_bytes // per_slot)
    if slots < 1:
        raise ValueError(f"serve.max_kv_cache_mb={max_kv_bytes / 2**20:.0f} does not hold one sequence of "
                         f"{context} positions ({per_slot / 2**20:.1f} MB): raise it or lower the context")
    return slots


Emit = Callable[[Union[TokenEvent, BaseException]], None]


class Scheduler:
    """Iteration-level scheduling of one replica's requests (see the module docstring).

    context(loaded) -> the positions a slot holds for that model version.
    """

    def __init__(self, slots: int, context: Callable[[Any], int],
                 make_engine: Optional[Callable[[Any, int, int], Any]] = None):
        """`make_engine(loaded, slots, context)`: the engine of a model version (default: a
        DecodeEngine; a replica over several devices gives platform.serving.shards' engine)."""
        self.slots, self._context = slots, context
        self._make_engine = make_engine or (lambda loaded, n, context: DecodeEngine(loaded.model, n, context))
        self._lock = threading.Lock()
        self._reserved = 0
        self._pending: deque[tuple[GenerationRequest, Emit]] = deque()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._engines: dict[int, tuple[Any, DecodeEngine, dict[int, tuple[_Tracker, Emit]]]] = {}
        self._current: Optional[Any] = None
        self.steps = 0                               # decode iterations run (tests, metrics)
        self._thread = threading.Thread(target=self._run, name="dbrx-scheduler", daemon=True)

    def start(self, current: Any) -> "Scheduler":
        """Allocate the current model's engine (its KV cache) now and start the loop."""
        self.set_current(current)
        self._engine_for(current)
        self._thread.start()
        return self

    def stop(self, timeout: Optional[float] = None) -> None:
        """Stop the loop; with `timeout`, wait that long for the step in progress to end."""
        self._stop.set()
        self._wake.set()
        if timeout is not None and self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def set_current(self, loaded: Any) -> None:
        """The version new requests use; an older one's engine goes once its requests are done."""
        self._current = loaded

    # ---------------------------------------------------------- admission (any thread)

    def reserve(self, n: int) -> bool:
        """Take `n` sequence slots for one HTTP request, all or none; False when the replica is full."""
        with self._lock:
            if self._reserved + n > self.slots:
                return False
            self._reserved += n
            return True

    def unreserve(self, n: int) -> None:
        with self._lock:
            self._reserved -= n

    @property
    def reserved(self) -> int:
        return self._reserved

    def submit(self, request: GenerationRequest, emit: Emit) -> None:
        """Queue a reserved request; `emit` receives its events from the scheduler thread, the last
        one with a finish_reason (or an exception). A cancelled request gets no more events."""
        self._pending.append((request, emit))
        self._wake.set()

    # ---------------------------------------------------------- the loop (its own thread)

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self._pending and not any(tracked for _, _, tracked in self._engines.values()):
                self._wake.wait(1.0)
                self._wake.clear()
                continue
            try:
                self.iterate()
            except Exception as exc:            # fail the requests in flight, keep serving new ones
                log.exception("decode step failed")
                self._fail_all(exc)

    def iterate(self) -> None:
        """One scheduling iteration: admit, drop cancelled, step every engine with work."""
        arrivals: dict[int, list[tuple[GenerationRequest, Emit]]] = {}
        while self._pending:
            request, emit = self._pending.popleft()
            if request.cancelled:
                self.unreserve(1)
            elif len(request.prompt_ids) >= self._context(request.model):
                self.unreserve(1)
                emit(ValueError(f"a prompt of {len(request.prompt_ids)} tokens leaves no room in a "
                                f"context of {self._context(request.model)} positions"))
            else:
                arrivals.setdefault(id(request.model), []).append((request, emit))
        for batch in arrivals.values():                  # one prefill per model version
            _, engine, tracked = self._engine_for(batch[0][0].model)
            try:
                slots = engine.admit_many([r.prompt_ids for r, _ in batch], [r.params.sampling() for r, _ in batch])
            except Exception as exc:
                for _, emit in batch:
                    self.unreserve(1)
                    emit(exc)
                continue
            for slot, (request, emit) in zip(slots, batch):
                tracked[slot] = (_Tracker(request), emit)
        for key, (loaded, engine, tracked) in list(self._engines.items()):
            for slot in [s for s, (t, _) in tracked.items() if t.request.cancelled]:
                self._finish(engine, tracked, slot)
            if tracked:
                for slot, token in engine.step().items():
                    tracker, emit = tracked[slot]
                    event = tracker.event(token)
                    if event.finish_reason is not None:
                        # free the slot first: the client may send its next request the moment
                        # it has this answer, and must not find the replica full
                        self._finish(engine, tracked, slot)
                    emit(event)
            if not tracked and loaded is not self._current:
                del self._engines[key]          # an old version with nothing left: free its cache
                if hasattr(engine, "close"):
                    engine.close()
        self.steps += 1

    def _finish(self, engine: DecodeEngine, tracked: dict, slot: int) -> None:
        engine.release(slot)
        del tracked[slot]
        self.unreserve(1)

    def _fail_all(self, exc: BaseException) -> None:
        for _, engine, tracked in self._engines.values():
            for slot, (_, emit) in list(tracked.items()):
                self._finish(engine, tracked, slot)
                emit(exc)

    def _engine_for(self, loaded: Any) -> tuple[Any, DecodeEngine, dict]:
        key = id(loaded)
        if key not in self._engines:
            loaded.model.eval()
            self._engines[key] = (loaded, self._make_engine(loaded, self.slots, self._context(loaded)), {})
        return self._engines[key]
