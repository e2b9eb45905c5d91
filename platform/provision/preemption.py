"""The spot-notice contract between a node and the training workers on it.

The same on AWS nodes and on local nodes (infra/*/ set it up):

* Every Ray process of a node has ``DBRX_NODE_DIR`` in its environment.
* A training worker registers with :func:`register_worker`, which creates
  ``$DBRX_NODE_DIR/workers/<pid>`` holding its start time and whether it
  handles SIGUSR1 (only a main thread can install a handler; Ray Train runs
  the training function in a thread, so it usually polls instead).
* On a spot interruption notice (or a controller's drain) the notifier writes
  ``$DBRX_NODE_DIR/preemption.json`` atomically, then sends SIGUSR1 to each
  registered worker that is alive, is the same process (start time) and said
  it handles the signal. A worker that did not install a handler never gets
  the signal, whose default action would kill it.
* The worker checks :func:`unhandled_notice` at each step boundary (a stat of
  one file) and, when there is one, checkpoints before the deadline: AWS gives
  two minutes between the notice and the stop. It then calls
  :func:`mark_handled`, which records the notice in ``preemption.handled``, so
  workers restarted on the same node (a resubmitted job, a restarted worker
  group) do not checkpoint again for a notice that was already answered.

On AWS `python -m platform.provision.preemption watch` polls IMDSv2
(spot/instance-action) as a systemd service. Locally, `... notify --node-dir
DIR` delivers the same notice, e.g. to rehearse a spot reclaim.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

from platform.provision import procs

log = logging.getLogger(__name__)

NODE_DIR_ENV = "DBRX_NODE_DIR"
NOTICE_FILE = "preemption.json"
HANDLED_FILE = "preemption.handled"
WORKERS_DIR = "workers"
NOTICE_SIGNAL = signal.SIGUSR1
IMDS_URL = "http://169.254.169.254"


@dataclasses.dataclass(frozen=True)
class Notice:
    """A coming interruption: what happens (terminate/stop/hibernate) and when (UTC, ISO 8601)."""

    action: str
    time: str
    source: str              # "imds" (a spot notice) or "controller" (a drain)
    noticed_at: float        # epoch seconds when the notifier saw it


def node_dir(directory: str | os.PathLike | None = None) -> Path | None:
    """The node's contract directory: `directory`, else $DBRX_NODE_DIR, else None."""
    value = directory if directory is not None else os.environ.get(NODE_DIR_ENV)
    return Path(value) if value else None


def register_worker(on_notice: Callable[[Notice | None], None] | None = None, *,
                    directory: str | os.PathLike | None = None) -> Path | None:
    """Register this process as a training worker of its node.

    With `on_notice`, and when called from the main thread, SIGUSR1 runs
    `on_notice(pending_notice())`; keep it short (set a flag). Returns the
    registration file, or None off a platform node (no DBRX_NODE_DIR)."""
    base = node_dir(directory)
    if base is None:
        return None
    handles = False
    if on_notice is not None and threading.current_thread() is threading.main_thread():
        signal.signal(NOTICE_SIGNAL, lambda _sig, _frame: on_notice(pending_notice(base)))
        handles = True
    pid = os.getpid()
    path = base / WORKERS_DIR / str(pid)
    _atomic_write(path, {"pid": pid, "start_time": procs.start_time(pid), "signal": handles})
    return path


def unregister_worker(directory: str | os.PathLike | None = None) -> None:
    base = node_dir(directory)
    if base is not None:
        (base / WORKERS_DIR / str(os.getpid())).unlink(missing_ok=True)


def pending_notice(directory: str | os.PathLike | None = None) -> Notice | None:
    """The node's interruption notice, if one was delivered."""
    base = node_dir(directory)
    if base is None:
        return None
    try:
        data = json.loads((base / NOTICE_FILE).read_text())
        return Notice(**{f.name: data[f.name] for f in dataclasses.fields(Notice)})
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None


def unhandled_notice(directory: str | os.PathLike | None = None) -> Notice | None:
    """The node's interruption notice unless a checkpoint already answered it (mark_handled)."""
    notice = pending_notice(directory)
    if notice is None:
        return None
    try:
        handled = json.loads((node_dir(directory) / HANDLED_FILE).read_text()).get("noticed_at")
    except (FileNotFoundError, ValueError, AttributeError):
        handled = None
    return None if handled == notice.noticed_at else notice


def mark_handled(notice: Notice, directory: str | os.PathLike | None = None) -> None:
    """Record that `notice` was answered with a checkpoint (idempotent; shared by the
    node's workers)."""
    base = node_dir(directory)
    if base is not None:
        _atomic_write(base / HANDLED_FILE, {"noticed_at": notice.noticed_at, "pid": os.getpid()})


def registered_workers(directory: str | os.PathLike) -> list[tuple[int, bool]]:
    """(pid, handles SIGUSR1) of live registered workers; stale entries are removed."""
    found = []
    for entry in sorted((Path(directory) / WORKERS_DIR).glob("*")):
        try:
            rec = json.loads(entry.read_text())
            pid = int(rec["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if procs.alive(pid) and procs.start_time(pid) == rec.get("start_time"):
            found.append((pid, bool(rec.get("signal"))))
        else:
            entry.unlink(missing_ok=True)
    return found


def deliver_notice(directory: str | os.PathLike, action: str = "terminate", when: str = "",
                   source: str = "controller") -> list[int]:
    """Write the notice, then signal the registered workers that handle SIGUSR1.
    Returns the pids signalled."""
    notice = Notice(action=action, time=when or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    source=source, noticed_at=time.time())
    _atomic_write(Path(directory) / NOTICE_FILE, dataclasses.asdict(notice))
    signalled = []
    for pid, handles in registered_workers(directory):
        if not handles:
            continue
        try:
            os.kill(pid, NOTICE_SIGNAL)
            signalled.append(pid)
        except ProcessLookupError:
            pass
    log.warning("interruption notice (%s at %s, from %s) delivered in %s; signalled %s",
                notice.action, notice.time, source, directory, signalled or "no worker")
    return signalled


class ImdsSpotSource:
    """Reads spot/instance-action from the EC2 instance metadata service (IMDSv2)."""

    def __init__(self, base_url: str = IMDS_URL, timeout_s: float = 2.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self._token: str | None = None
        self._token_expiry = 0.0

    def _session_token(self) -> str:
        if self._token is None or time.monotonic() > self._token_expiry:
            request = urllib.request.Request(
                f"{self.base_url}/latest/api/token", method="PUT",
                headers={"X-aws-ec2-metadata-token-ttl-seconds": "21600"})
            with urllib.request.urlopen(request, timeout=self.timeout_s) as resp:
                self._token = resp.read().decode()
            self._token_expiry = time.monotonic() + 21600 - 60
        return self._token

    def poll(self) -> dict | None:
        """The instance-action document ({"action", "time"}), or None while there is none."""
        for _ in range(2):   # a second try with a fresh token after a 401
            request = urllib.request.Request(
                f"{self.base_url}/latest/meta-data/spot/instance-action",
                headers={"X-aws-ec2-metadata-token": self._session_token()})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as resp:
                    return json.loads(resp.read().decode())
            except urllib.error.HTTPError as exc:
                if exc.code == 404:
                    return None
                if exc.code != 401:
                    raise
                self._token = None
        raise RuntimeError("IMDS rejected a fresh session token")


def watch(directory: str | os.PathLike, source: ImdsSpotSource | None = None,
          interval_s: float = 5.0, stop: threading.Event | None = None) -> Notice | None:
    """Poll until a spot notice arrives, deliver it once, and return it (None if stopped).

    Metadata errors are logged and retried: a flaky poll must not end the watch."""
    source = source or ImdsSpotSource()
    stop = stop or threading.Event()
    Path(directory, WORKERS_DIR).mkdir(parents=True, exist_ok=True)
    while not stop.is_set():
        try:
            doc = source.poll()
        except (OSError, ValueError, RuntimeError) as exc:
            log.warning("instance metadata poll failed: %s", exc)
            doc = None
        if doc:
            deliver_notice(directory, action=str(doc.get("action", "terminate")),
                           when=str(doc.get("time", "")), source="imds")
            return pending_notice(directory)
        stop.wait(interval_s)
    return None


def _atomic_write(path: Path, data: dict) -> None:
    """Readers see the old file or the whole new one, never a partial write."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m platform.provision.preemption",
                                     description="Spot-interruption watcher and notifier.")
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("watch", help="poll IMDSv2 and deliver a spot notice to this node's workers")
    w.add_argument("--node-dir", default=os.environ.get(NODE_DIR_ENV),
                   required=NODE_DIR_ENV not in os.environ)
    w.add_argument("--imds-url", default=IMDS_URL)
    w.add_argument("--interval", type=float, default=5.0)
    n = sub.add_parser("notify", help="deliver a notice now (drain a node, rehearse a spot reclaim)")
    n.add_argument("--node-dir", required=True)
    n.add_argument("--action", default="terminate", choices=["terminate", "stop", "hibernate"])
    n.add_argument("--time", default="", help="when the node goes away (ISO 8601 UTC)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.command == "watch":
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        watch(args.node_dir, ImdsSpotSource(args.imds_url), args.interval, stop)
    else:
        print(json.dumps({"signalled": deliver_notice(args.node_dir, args.action, args.time)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
