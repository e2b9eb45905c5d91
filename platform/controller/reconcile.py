"""Keep the provisioned nodes equal to the desired ones while training runs.

Desired state: `max_nodes` worker nodes alive in Ray. Every `interval_s` the
reconciler compares Terraform's nodes with Ray's live nodes. A node that was
alive and is gone is recorded (MLflow event) and replaced through Terraform;
if Terraform cannot (no capacity, a failing apply), the node is removed so
the run continues on the survivors, and the missing capacity is requested
again later with backoff. Ray Train's elastic scaling does the rest: it
restarts the worker group on fewer nodes, and grows back when nodes join.
Whenever the set of live nodes changes, `on_change` is called, so the
training side can look at the cluster again at once instead of on its own
slower schedule (platform.train.reservations.refresh_cluster_view).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from platform.provision.errors import ProvisionError

log = logging.getLogger("platform.controller")


@dataclass
class CapacityReport:
    """What the run could not get, for the final message."""

    failures: list[str] = field(default_factory=list)   # one line per failed provisioning
    fewest_nodes: Optional[int] = None

    @property
    def short(self) -> bool:
        return bool(self.failures)


class Reconciler(threading.Thread):
    def __init__(self, provisioner, desired: int, minimum: int, *,
                 event: Callable[..., None], interval_s: float = 5.0,
                 retry_s: float = 30.0, max_retry_s: float = 600.0,
                 on_change: Optional[Callable[[], None]] = None) -> None:
        super().__init__(name="reconciler", daemon=True)
        self.provisioner, self.desired, self.minimum = provisioner, desired, minimum
        self.event, self.interval_s = event, interval_s
        self.retry_s, self.max_retry_s = retry_s, max_retry_s
        self.capacity = CapacityReport()
        self._halt = threading.Event()
        self._seen_alive: set[str] = set()
        self._last_live: Optional[set[str]] = None
        self.on_change = on_change
        self._next_grow = 0.0
        self._backoff = retry_s
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
        if self.capacity.fewest_nodes is None or alive < self.capacity.fewest_nodes:
            self.capacity.fewest_nodes = alive
        for name in lost:
            self._seen_alive.discard(name)
            log.warning("node %s left the Ray cluster; replacing it through Terraform", name)
            self.event("node_lost", node=name, alive=alive)
            try:
                self.provisioner.replace(name)
                self.event("node_replaced", node=name)
            except ProvisionError as exc:
                self._capacity_failure(f"replacing {name}: {exc}")
                self._remove(name)
        if alive < self.minimum:
            log.warning("only %d of the %d nodes the run needs are alive; training waits "
                        "until nodes return", alive, self.minimum)
        if len(self.provisioner.nodes()) < self.desired and time.monotonic() >= self._next_grow:
            self._grow()

    def _grow(self) -> None:
        try:
            self.provisioner.scale_to(self.desired)
            self.event("nodes_added", count=self.desired)
            self._backoff = self.retry_s
        except ProvisionError as exc:
            self._capacity_failure(f"growing to {self.desired} nodes: {exc}")
            self._next_grow = time.monotonic() + self._backoff
            self._backoff = min(self._backoff * 2, self.max_retry_s)

    def _remove(self, name: str) -> None:
        try:
            self.provisioner.remove(name)
        except ProvisionError as exc:
            log.warning("could not remove %s after a failed replacement: %s", name, exc)
        self._next_grow = time.monotonic() + self._backoff

    def _capacity_failure(self, message: str) -> None:
        first_line = message.splitlines()[0][:300]
        self.capacity.failures.append(first_line)
        log.warning("capacity short: %s", first_line)
        self.event("capacity_short", detail=first_line)
