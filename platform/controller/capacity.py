"""How many nodes a job asks for, and what it settles for when the provider is short.

One rule, for the start of the job and for the reconciler while it trains: ask
for all `desired` nodes (cluster.max_nodes); when the provider cannot give them
(EC2's InsufficientInstanceCapacity, a failing apply), take the largest count it
can give, one node fewer at a time, down to a floor. At the start the floor is
cluster.min_nodes, and a job that cannot get that many does not run. While
training, the floor is one node more than the job has: a shortfall leaves the
run on what it has, and the reconciler asks again later. A lost node that cannot
be recreated is removed, so that Ray Train goes on without it.

Every shortfall is recorded once per request: a log line, an MLflow event
`capacity_short`, and `failures`, which the job's final message reports.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

from platform.errors import UserError
from platform.provision.errors import ProvisionError

log = logging.getLogger("platform.controller")


class CapacityPolicy:
    """Asks one job's Provisioner for nodes, by the rule above."""

    def __init__(self, provisioner, desired: int, minimum: int, *,
                 event: Callable[..., None]) -> None:
        self.provisioner, self.desired, self.minimum = provisioner, desired, minimum
        self.event = event
        self.failures: list[str] = []   # one line per request the provider could not meet

    def acquire(self) -> int:
        """The job's nodes at its start: how many it got (raises UserError below `minimum`)."""
        got, error = self._fill(self.minimum, f"provisioning {self.desired} node(s)")
        if got is None:
            raise UserError(f"could not provision even cluster.min_nodes={self.minimum} node(s): "
                            f"{error}") from None
        return got

    def wants_more(self, provisioned: int) -> bool:
        return provisioned < self.desired

    def grow(self) -> Optional[int]:
        """More nodes, up to `desired`, while training: the new count, or None if the
        provider has not even one more to give (the caller backs off and asks again)."""
        have = len(self.provisioner.nodes())
        got, _ = self._fill(have + 1, f"growing to {self.desired} nodes")
        return got

    def replace(self, name: str) -> bool:
        """Recreate lost node `name` in place. When the provider is short, remove it
        instead (the run goes on with the others; `grow` asks for it again) and say False."""
        try:
            self.provisioner.replace(name)
            return True
        except ProvisionError as exc:
            self._short(f"replacing {name}: {exc}")
        try:
            self.provisioner.remove(name)
        except ProvisionError as exc:
            log.warning("could not remove %s after a failed replacement: %s", name, exc)
        return False

    def _fill(self, floor: int, request: str) -> tuple[Optional[int], Optional[ProvisionError]]:
        """The largest count in floor..desired the provider gives, tried from the top
        (None if none), and the last refusal."""
        error = None
        for n in range(self.desired, floor - 1, -1):
            try:
                self.provisioner.scale_to(n)
                return n, None
            except ProvisionError as exc:
                if error is None:
                    self._short(f"{request}: {exc}")
                error = exc
        return None, error

    def _short(self, message: str) -> None:
        first_line = message.splitlines()[0][:300]
        self.failures.append(first_line)
        log.warning("capacity short: %s", first_line)
        self.event("capacity_short", detail=first_line)
