"""Provisioning failures, classified so callers know whether to retry.

Terraform reports every failure as text. The driver sorts that text into
kinds: a capacity shortage (the cloud has no instances to give: retrying soon
rarely helps, so the controller decides whether to run smaller), a transient
fault (throttling, timeouts, dropped connections: retry with backoff), a lock
held by another controller, and everything else (a mistake to fix).
"""

from __future__ import annotations

import re
from typing import Sequence

from platform.errors import UserError

CAPACITY = "capacity"
TRANSIENT = "transient"
LOCKED = "locked"
TIMEOUT = "timeout"
PERMANENT = "permanent"

# EC2 error codes and messages meaning "no instances for you right now".
_CAPACITY_PATTERNS = (
    r"InsufficientInstanceCapacity", r"InsufficientHostCapacity", r"InsufficientCapacity",
    r"InstanceLimitExceeded", r"VcpuLimitExceeded", r"MaxSpotInstanceCountExceeded",
    r"SpotMaxPriceTooLow", r"InsufficientFreeAddressesInSubnet", r"ReservationCapacityExceeded",
    r"capacity-not-available", r"There is no Spot capacity available",
    r"We currently do not have sufficient .* capacity",
)
# API throttling, service hiccups and network faults: the same request later works.
_TRANSIENT_PATTERNS = (
    r"RequestLimitExceeded", r"Throttling", r"ThrottlingException", r"TooManyRequests",
    r"SlowDown", r"[Rr]ate exceeded", r"ServiceUnavailable", r"InternalError",
    r"InternalFailure", r"status code: 5\d\d", r"StatusCode: 5\d\d",
    r"i/o timeout", r"[Tt]imed? ?out", r"context deadline exceeded", r"TLS handshake timeout",
    r"connection reset by peer", r"[Cc]onnection refused", r"broken pipe", r"unexpected EOF",
    r"temporary failure in name resolution", r"[Tt]emporarily unavailable",
)
_LOCK_PATTERNS = (r"Error acquiring the state lock", r"state lock")

_CAPACITY_RE = re.compile("|".join(_CAPACITY_PATTERNS))
_TRANSIENT_RE = re.compile("|".join(_TRANSIENT_PATTERNS))
_LOCK_RE = re.compile("|".join(_LOCK_PATTERNS))


def classify(text: str) -> str:
    """The kind of failure Terraform's error `text` describes."""
    if _CAPACITY_RE.search(text):
        return CAPACITY
    if _LOCK_RE.search(text):
        return LOCKED
    if _TRANSIENT_RE.search(text):
        return TRANSIENT
    return PERMANENT


class ProvisionError(UserError):
    """A Terraform operation failed; the message carries Terraform's own errors."""

    def __init__(self, message: str, *, kind: str = PERMANENT, errors: Sequence[str] = (),
                 log_path: str | None = None) -> None:
        self.kind = kind
        self.errors = list(errors)
        self.log_path = log_path
        super().__init__(message)


class CapacityError(ProvisionError):
    """The cloud had no capacity for the nodes (EC2 InsufficientInstanceCapacity and kin)."""

    def __init__(self, message: str, **kw) -> None:
        kw.setdefault("kind", CAPACITY)
        super().__init__(message, **kw)


class LockError(ProvisionError):
    """Another controller holds this job's Terraform state."""

    def __init__(self, message: str, **kw) -> None:
        kw.setdefault("kind", LOCKED)
        super().__init__(message, **kw)


class NodesNotReady(ProvisionError):
    """Provisioned nodes did not join the Ray cluster in time."""
