"""The tracking logger's delivery core against an in-memory destination that can go down.

The outbox knows its destination only through the narrow `Destination`
interface, so these tests drive outages and refusals directly and fast; the
MLflow side is covered in test_tracking.py (SQLite) and test_tracking_server.py.
"""

from __future__ import annotations

import threading
import time

from platform.tracking.outbox import Outbox, Parcel


class Inbox:
    """A destination that refuses ConnectionError-style sends while `down` is set."""

    where = "the test inbox"

    def __init__(self) -> None:
        self.down = threading.Event()
        self.bad = {"poison"}
        self.received: list[str] = []
        self.requests = 0

    def is_transient(self, exc: BaseException) -> bool:
        return isinstance(exc, ConnectionError)

    def exists(self) -> bool:
        return True

    def explain(self, exc: BaseException) -> str:
        return str(exc)


class Points(Parcel):
    batched = True
    limit = 10

    def __init__(self, inbox: Inbox, items: list[str]) -> None:
        self.inbox, self.items = inbox, items

    @property
    def size(self) -> int:
        return len(self.items)

    def __str__(self) -> str:
        return f"point {self.items[0]!r}"

    def send(self) -> None:
        self.inbox.requests += 1
        if self.inbox.down.is_set():
            raise ConnectionError("connection refused")
        if self.inbox.bad & set(self.items):
            raise ValueError("invalid key")
        self.inbox.received.extend(self.items)

    def absorb(self, other: Parcel) -> bool:
        if not isinstance(other, Points) or self.size + other.size > self.limit:
            return False
        self.items.extend(other.items)
        return True

    def refuse(self) -> list[Parcel]:
        half = len(self.items) // 2
        return [Points(self.inbox, self.items[:half]), Points(self.inbox, self.items[half:])] if half else []


def outbox(inbox: Inbox, **kwargs) -> Outbox:
    options = dict(name="test-outbox", capacity=100, max_records=10, full_batch=Points.limit,
                   interval_s=0.05, min_backoff_s=0.05, max_backoff_s=60.0)
    return Outbox(inbox, **{**options, **kwargs})


def test_an_outage_is_buffered_and_delivered_in_order_once_it_ends(caplog):
    inbox = Inbox()
    box = outbox(inbox)
    inbox.down.set()
    slowest = 0.0
    for i in range(50):
        started = time.perf_counter()
        box.put(Points(inbox, [f"p{i}"]))
        slowest = max(slowest, time.perf_counter() - started)
    assert box.flush(timeout=0.5) is False                  # nothing can arrive yet
    assert not box.stats()["reachable"] and inbox.received == []
    assert slowest < 0.05

    inbox.down.clear()
    started = time.monotonic()
    assert box.flush(timeout=10)                             # cuts the (up to 60 s) backoff short
    assert time.monotonic() - started < 5
    assert inbox.received == [f"p{i}" for i in range(50)]
    stats = box.stats()
    assert stats["reachable"] and stats["sent_metrics"] == 50 and stats["dropped_metrics"] == 0
    assert inbox.requests < 50 + 20                          # merged into batches of up to 10
    messages = [r.getMessage() for r in caplog.records]
    assert sum("the test inbox is unreachable (connection refused)" in m for m in messages) == 1
    assert sum("the test inbox is reachable again" in m for m in messages) == 1
    assert box.close(timeout=5)


def test_a_refused_batch_is_split_until_the_bad_record_is_dropped_alone(caplog):
    inbox = Inbox()
    box = outbox(inbox, interval_s=60.0)                     # batched until the flush
    for item in ["a", "b", "c", "poison", "d", "e", "f", "g", "h", "i"]:
        box.put(Points(inbox, [item]))
    assert box.flush(timeout=10)
    assert inbox.received == ["a", "b", "c", "d", "e", "f", "g", "h", "i"]
    assert box.stats()["rejected"] == 1
    refused = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert refused == ["the test inbox refused point 'poison' (invalid key); dropped"]
    assert box.close(timeout=5)


def test_a_full_outbox_drops_the_oldest_and_close_counts_what_never_arrived(caplog):
    inbox = Inbox()
    inbox.down.set()
    box = outbox(inbox, capacity=20)
    for i in range(100):
        box.put(Points(inbox, [f"p{i}"]))
    stats = box.stats()
    assert stats["queued_metrics"] <= 20 and stats["dropped_metrics"] >= 100 - 20 - Points.limit
    assert stats["dropped_metrics"] + stats["queued_metrics"] + stats["inflight_metrics"] == 100
    assert box.close(timeout=0.5) is False
    closed = box.stats()
    box.put(Points(inbox, ["late"]))                         # closed: ignored
    assert box.stats() == closed and inbox.received == []
    messages = [r.getMessage() for r in caplog.records]
    assert sum("buffer is full (20 metric points)" in m for m in messages) == 1
    assert any("the test inbox did not receive" in m for m in messages)
