"""Keep the provisioned nodes equal to the desired ones while training runs.

Desired state: `max_nodes` worker nodes alive in Ray. Every `interval_s` the
reconciler compares Terraform's nodes with Ray's live nodes. A node that was
alive and is gone is recorded (MLflow event) and replaced; when the provider
cannot (no capacity, a failing apply), the job's CapacityPolicy decides
(platform.controller.capacity): the node is removed so the run continues on
the survivors, and the missing capacity is requested again later with
backoff. Ray Train's elastic scaling does the rest: it restarts the worker
group on fewer nodes, and grows back when nodes join.
Whenever the set of live nodes changes, `on_change` is called, so the
training side can look at the cluster again at once instead of on its own
slower schedule (platform.train.reservations.refresh_cluster_view).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Optional

from platform.controller.capacity import CapacityPolicy
from platform.retry import Backoff

log = logging.getLogger("platform.controller")


class Reconciler(threading.Thread):
    def __init__(self, capacity: CapacityPolicy, *, event: Callable[..., None],
                 interval_s: float = 5.0, retry_s: float = 30.0, max_retry_s: float = 600.0,
                 on_change: Optional[Callable[[], None]] = None) -> None:
        super().__init__(name="reconciler", daemon=True)
        self.capacity, self.provisioner = capacity, capacity.provisioner
        self.event, self.interval_s = event, interval_s
        self._halt = threading.Event()
        self._seen_alive: set[str] = set()
        self._last_live: Optional[set[str]] = None
        self.on_change = on_change
        self._next_grow = 0.0
        self._backoff = Backoff(retry_s, max_retry_s)
        self.errors = 0

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=60)

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                self.reconcile_once()
            except Exception as exc:  # never let the loop die: the run goes on without it
                self.errors += 1
                log.warning("reconcile failed (%s); retrying in %.0fs", exc, self.interval_s)
            self._halt.wait(self.interval_s)

    def reconcile_once(self) -> None:
        live = self.provisioner.live_ray_nodes()
        if self._last_live is not None and set(live) != self._last_live and self.on_change:
            self.on_change()
        self._last_live = set(live)
        provisioned = [n.name for n in self.provisioner.nodes()]
        self._seen_alive |= set(live)
        lost = [name for name in provisioned if name not in live and name in self._seen_alive]
        alive = len(live)
        for name in lost:
            self._seen_alive.discard(name)
            log.warning("node %s left the Ray cluster; replacing it through Terraform", name)
            self.event("node_lost", node=name, alive=alive)
            if self.capacity.replace(name):
                self.event("node_replaced", node=name)
            else:
                self._next_grow = time.monotonic() + self._backoff.peek()
        if alive < self.capacity.minimum:
            log.warning("only %d of the %d nodes the run needs are alive; training waits "
                        "until nodes return", alive, self.capacity.minimum)
        if (self.capacity.wants_more(len(self.provisioner.nodes()))
                and time.monotonic() >= self._next_grow):
            self._grow()

    def _grow(self) -> None:
        grown_to = self.capacity.grow()
        if grown_to is None:
            self._next_grow = time.monotonic() + self._backoff.failed()
        else:
            self.event("nodes_added", count=grown_to)
            self._backoff.reset()
