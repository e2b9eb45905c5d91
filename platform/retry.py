"""Exponential backoff with jitter: the one waiting rule for every retry in the platform.

Terraform operations, MLflow deliveries and the reconciler's requests for
capacity all retry something that failed for a reason that may pass
(throttling, an outage, no free instances). Each wait doubles the one before,
up to a cap, so a long outage costs few attempts; each is cut at random by up
to `jitter` of itself, so that clients that failed together (many jobs against
one cloud API or one tracking server) do not retry in lockstep.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass
class Backoff:
    """Waits for consecutive failures: `first_s`, then doubling, never above `max_s`."""

    first_s: float
    max_s: float
    jitter: float = 0.5      # each wait is cut by up to this fraction of itself, at random
    failures: int = 0        # consecutive failures so far

    def delay(self, failure: int) -> float:
        """The wait after the `failure`-th consecutive failure (1 for the first)."""
        base = min(self.max_s, self.first_s * 2 ** (max(failure, 1) - 1))
        return base * (1.0 - self.jitter * random.random())

    def failed(self) -> float:
        """Count a failure; the wait before trying again."""
        self.failures += 1
        return self.delay(self.failures)

    def peek(self) -> float:
        """The wait the next failure would get, without counting one."""
        return self.delay(self.failures + 1)

    def reset(self) -> None:
        """A success: the next failure waits `first_s` again."""
        self.failures = 0
