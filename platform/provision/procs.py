"""Process liveness and session shutdown from /proc.

Local Ray nodes (and the embedded head) run as sessions of their own
(setsid); a session's id is its leader's pid. Killed processes can stay
zombies until their parent reaps them, so `kill -0` says "alive" for a dead
process: liveness is read from the state field of /proc/PID/stat instead.

A session is named by (leader pid, leader start time). Linux keeps a pid
number allocated while any process still uses it as a session id, so while
members live the id cannot be reused; a live leader with another start time
means the id now belongs to someone else, and processes older than our leader
are never ours. Ray's agents do not inherit the node's environment, so an
environment marker would miss them; the session does not.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Iterator


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the "(comm)" part: [state, ppid, pgrp, session, ...]."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode("ascii", "replace")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return raw[raw.rindex(")") + 2:].split()


def alive(pid: int) -> bool:
    """Whether `pid` is a running process (zombies and dead entries are not)."""
    fields = _stat_fields(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def start_time(pid: int) -> int | None:
    """The process start time in clock ticks since boot (field 22 of /proc/PID/stat).

    Together with the pid it names one process for good: a recycled pid
    gets a later start time."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields is not None else None


def _all_pids() -> Iterator[int]:
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            yield int(entry.name)


def session_members(sid: int, leader_start: int | None = None) -> list[int]:
    """Live processes of session `sid`. With `leader_start` (the leader's start
    time when it was launched): none if the id now names another session, and
    only processes started no earlier than that leader."""
    found = []
    for pid in _all_pids():
        fields = _stat_fields(pid)
        if fields is None or fields[0] in ("Z", "X") or int(fields[3]) != sid:
            continue
        started = int(fields[19])
        if leader_start is not None:
            if pid == sid and started != leader_start:
                return []
            if started < leader_start:
                continue
        found.append(pid)
    return found


def stop_session(sid: int, leader_start: int | None, timeout_s: float = 15.0) -> list[int]:
    """SIGTERM every process of the session, SIGKILL what is left after
    `timeout_s`. Returns the pids that needed SIGKILL."""
    for pid in session_members(sid, leader_start):
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not session_members(sid, leader_start):
            return []
        time.sleep(0.1)
    left = session_members(sid, leader_start)
    for pid in left:
        _signal(pid, signal.SIGKILL)
    return left


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
