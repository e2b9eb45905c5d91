"""The delivery core of the tracking logger: bounded queues and the thread that empties them.

A training step must never wait on, or die because of, the tracking server.
Callers `put` parcels and return at once; one background thread sends them.
The outbox knows nothing of what a parcel holds or where it goes: it sees
the `Parcel` interface below and a `Destination` that says which failures
may pass and whether it still exists.

- Two lanes, each bounded; when one is full its oldest parcels are dropped
  and counted, so memory stays bounded through any outage. Batched parcels
  (metric points) wait up to `interval_s` to be merged into one request, or
  go at once when a full batch is queued; other records go promptly.
- A send that fails for a reason that may pass is retried with exponential
  backoff (platform.retry) while the lanes buffer. One warning says the
  destination went away, one that it is back; flush() and close() cut a
  wait short.
- A send the destination refuses goes back to the parcel (`refuse`), which
  returns the parts worth another try, e.g. halves until the bad record is
  alone; what it leaves out is counted as rejected. If the destination itself
  is gone, delivery stops for good and training goes on.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any, Deque, Dict, Optional, Protocol, Sequence

from platform.retry import Backoff

log = logging.getLogger("platform.tracking")


class Parcel:
    """One send. `send` may be called again after a transient failure."""

    batched = False   # small measurements: merged, and sent at most every interval_s
    size = 1          # records it carries, for bounds and counts

    def send(self) -> None:
        raise NotImplementedError

    def absorb(self, other: "Parcel") -> bool:
        """Take `other` into this send if they fit in one request; False leaves it queued."""
        return False

    def refuse(self) -> Sequence["Parcel"]:
        """The destination refused this send: the parts worth trying again (none: drop it)."""
        return ()

    def discard(self) -> None:
        """Release local resources (staged files) once delivered or dropped."""


class Destination(Protocol):
    """Where parcels go, as far as the outbox needs to know."""

    where: str   # names it in warnings

    def is_transient(self, exc: BaseException) -> bool:
        """Whether the same send may succeed later."""

    def exists(self) -> bool:
        """False once the destination is gone for good: nothing will ever be accepted."""

    def explain(self, exc: BaseException) -> str:
        """One line for a warning, without credentials."""


class Outbox:
    """Bounded, non-blocking delivery of parcels to one destination on one thread.

    `capacity` bounds the queued size of batched parcels, `max_records` the
    number of other parcels; `full_batch` is the batched size worth sending
    without waiting for `interval_s`.
    """

    def __init__(self, destination: Destination, *, name: str, capacity: int, max_records: int,
                 full_batch: int, interval_s: float, min_backoff_s: float, max_backoff_s: float) -> None:
        self._dest = destination
        self._capacity, self._max_records, self._full_batch = capacity, max_records, full_batch
        self._interval = interval_s
        self._backoff = (min_backoff_s, max_backoff_s)

        self._cond = threading.Condition()
        self._batched: Deque[Parcel] = collections.deque()
        self._batched_size = 0
        self._records: Deque[Parcel] = collections.deque()
        self._redo: Deque[Parcel] = collections.deque()   # parts of refused parcels
        self._inflight: Optional[Parcel] = None
        self._last_send = 0.0
        self._flushing = 0
        self._kick = self._closed = self._abandoned = False
        self._reachable, self._gone = True, False
        self._counts = {"dropped_metrics": 0, "dropped_records": 0, "rejected": 0, "sent_metrics": 0}
        self._warned: set = set()

        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    # -- the caller's side: queue and return ----------------------------------------

    @property
    def open(self) -> bool:
        """Whether parcels are accepted: not closed, and the destination not gone."""
        return not (self._closed or self._gone)

    @property
    def reachable(self) -> bool:
        return self._reachable

    @property
    def dropped_metrics(self) -> int:
        return self._counts["dropped_metrics"]

    def put(self, parcel: Parcel) -> None:
        """Queue `parcel`; when its lane is full, drop the oldest there."""
        if not self.open:
            parcel.discard()
            return
        dropped: list[Parcel] = []
        with self._cond:
            if parcel.batched:
                while self._batched and self._batched_size + parcel.size > self._capacity:
                    old = self._batched.popleft()
                    self._batched_size -= old.size
                    self._counts["dropped_metrics"] += old.size
                    dropped.append(old)
                self._batched.append(parcel)
                self._batched_size += parcel.size
                if len(self._batched) == 1 or self._batched_size >= self._full_batch:
                    self._cond.notify_all()
            else:
                if len(self._records) >= self._max_records:
                    dropped.append(self._records.popleft())
                    self._counts["dropped_records"] += 1
                self._records.append(parcel)
                self._cond.notify_all()
        for old in dropped:
            old.discard()
        if dropped:
            lane = (f"{self._capacity} metric points" if parcel.batched
                    else f"{self._max_records} records")
            self._warn_once(("full", parcel.batched), "tracking buffer is full (%s); dropping the "
                            "oldest until %s is reachable", lane, self._dest.where)

    def flush(self, timeout: float) -> bool:
        """Wait up to `timeout` s for everything queued to be delivered; True if it was."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._flushing += 1
            self._kick = True
            self._cond.notify_all()
            try:
                while not self._drained():
                    left = deadline - time.monotonic()
                    if left <= 0 or not self._thread.is_alive():
                        return False
                    self._cond.wait(left)
                return True
            finally:
                self._flushing -= 1

    def close(self, timeout: float) -> bool:
        """Deliver what is queued (waiting at most `timeout` s), stop the thread, and say
        what was lost. True if everything arrived."""
        if self._closed:
            return self._drained()
        with self._cond:
            self._closed = self._kick = True
            self._cond.notify_all()
        self._thread.join(timeout)
        if self._thread.is_alive():
            with self._cond:
                self._abandoned = True
                self._cond.notify_all()
            self._thread.join(1.0)
        with self._cond:
            left = [p for p in (self._inflight, *self._redo, *self._batched, *self._records) if p]
            drained = self._drained()
        if not drained:
            points = sum(p.size for p in left if p.batched)
            log.warning("%s did not receive %d metric points and %d other records before the "
                        "logger closed", self._dest.where, points, sum(p.size for p in left) - points)
        if not self._thread.is_alive():
            for parcel in left:
                parcel.discard()
        return drained

    def stats(self) -> Dict[str, Any]:
        """Counters for health checks and tests."""
        with self._cond:
            inflight = self._inflight
            return {"queued_metrics": self._batched_size, "queued_records": len(self._records),
                    "inflight_metrics": inflight.size if inflight and inflight.batched else 0,
                    **self._counts, "reachable": self._reachable, "disabled": self._gone}

    # -- the background thread --------------------------------------------------------

    def _drained(self) -> bool:
        return not (self._batched or self._records or self._redo or self._inflight)

    def _work(self) -> None:
        while True:
            parcel = self._next()
            if parcel is None:
                return
            try:
                self._deliver(parcel)
            except Exception:   # a bug here must not kill the thread and silently stop delivery
                log.exception("failed to deliver %s to %s; dropped", parcel, self._dest.where)
                parcel.discard()
            with self._cond:
                self._inflight = None
                self._cond.notify_all()

    def _next(self) -> Optional[Parcel]:
        with self._cond:
            while True:
                if self._abandoned or (self._gone and self._closed):
                    return None
                wait: Optional[float] = None
                if self._redo:
                    self._inflight = self._redo.popleft()
                elif self._records:
                    self._inflight = self._merge(self._records)
                elif self._batched:
                    wait = self._last_send + self._interval - time.monotonic()
                    if (wait <= 0 or self._flushing or self._closed
                            or self._batched_size >= self._full_batch):
                        self._inflight = self._merge(self._batched)
                        self._batched_size -= self._inflight.size
                elif self._closed:
                    return None
                if self._inflight is not None:
                    return self._inflight
                self._cond.notify_all()   # drained, or waiting to fill a batch: wake flush()
                self._cond.wait(wait)

    @staticmethod
    def _merge(lane: Deque[Parcel]) -> Parcel:
        first = lane.popleft()
        while lane and first.absorb(lane[0]):
            lane.popleft()
        return first

    def _deliver(self, parcel: Parcel) -> None:
        backoff = Backoff(*self._backoff)
        while True:
            try:
                parcel.send()
            except Exception as exc:
                if self._abandoned:   # close() gave up: leave it queued, to be counted as lost
                    with self._cond:
                        self._redo.appendleft(parcel)
                    return
                if self._dest.is_transient(exc):
                    self._set_reachable(False, exc)
                    with self._cond:   # flush()/close() cut the wait short once
                        self._cond.wait_for(lambda: self._kick or self._abandoned, timeout=backoff.failed())
                        self._kick = False
                    continue
                self._refused(parcel, exc)
                return
            self._set_reachable(True)
            with self._cond:
                self._last_send = time.monotonic()
                if parcel.batched:
                    self._counts["sent_metrics"] += parcel.size
            parcel.discard()
            return

    def _set_reachable(self, reachable: bool, exc: Optional[BaseException] = None) -> None:
        if reachable == self._reachable:
            return
        with self._cond:
            self._reachable = reachable
            queued, dropped = self._batched_size, self._counts["dropped_metrics"]
            if reachable:
                self._warned.discard(("full", True))
        if reachable:
            log.warning("%s is reachable again; sending %d buffered metric points (%d dropped "
                        "while it was down)", self._dest.where, queued, dropped)
        else:
            log.warning("%s is unreachable (%s); training goes on, records are buffered (up to "
                        "%d metric points) and retried", self._dest.where, self._dest.explain(exc),
                        self._capacity)

    def _refused(self, parcel: Parcel, exc: BaseException) -> None:
        if not self._dest.exists():
            self._give_up(exc)
            parcel.discard()
            return
        retry = list(parcel.refuse())
        with self._cond:
            self._redo.extendleft(reversed(retry))
            self._counts["rejected"] += parcel.size - sum(p.size for p in retry)
        if not retry:
            self._warn_once(("refused", str(parcel)), "%s refused %s (%s); dropped", self._dest.where,
                            parcel, self._dest.explain(exc))
            parcel.discard()

    def _give_up(self, exc: BaseException) -> None:
        log.warning("%s is deleted or missing (%s); tracking stops, training goes on",
                    self._dest.where, self._dest.explain(exc))
        with self._cond:
            self._gone = True
            left = [*self._batched, *self._records, *self._redo]
            self._counts["rejected"] += sum(p.size for p in left)
            self._batched.clear()
            self._records.clear()
            self._redo.clear()
            self._batched_size = 0
        for parcel in left:
            parcel.discard()

    def _warn_once(self, key: Any, message: str, *args: Any) -> None:
        with self._cond:
            first = key not in self._warned
            self._warned.add(key)
        if first:
            log.warning(message, *args)
