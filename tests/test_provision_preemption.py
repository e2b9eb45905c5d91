"""The spot-notice contract: a fake IMDSv2 (the one AWS API stand-in) and real worker processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from platform.provision import preemption, procs

TOKEN = "imds-session-token"


class _FakeImds(BaseHTTPRequestHandler):
    """IMDSv2: PUT /latest/api/token, then GETs with the token; 404 until a notice exists."""

    notice: dict | None = None
    gets = 0

    def do_PUT(self):
        if self.path != "/latest/api/token" or "X-aws-ec2-metadata-token-ttl-seconds" not in self.headers:
            return self._reply(400, b"")
        self._reply(200, TOKEN.encode())

    def do_GET(self):
        if self.headers.get("X-aws-ec2-metadata-token") != TOKEN:
            return self._reply(401, b"")
        if self.path != "/latest/meta-data/spot/instance-action":
            return self._reply(404, b"")
        type(self).gets += 1
        if type(self).notice is None:
            return self._reply(404, b"")
        self._reply(200, json.dumps(type(self).notice).encode())

    def _reply(self, code: int, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def imds():
    _FakeImds.notice, _FakeImds.gets = None, 0
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeImds)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield _FakeImds, f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


_WORKER = """
import sys, time
from pathlib import Path
from platform.provision import preemption
got = []
handles = sys.argv[2] == "handler"
preemption.register_worker(got.append if handles else None, directory=sys.argv[1])
print("registered", flush=True)
deadline = time.time() + 30
while time.time() < deadline:
    if got:
        Path(sys.argv[1], "signalled").write_text(got[0].action)
        break
    if not handles and preemption.pending_notice(sys.argv[1]):
        Path(sys.argv[1], "polled").write_text("yes")
        break
    time.sleep(0.05)
"""


def _worker(node_dir: Path, mode: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _WORKER, str(node_dir), mode],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "registered"
    return proc


def test_spot_notice_reaches_workers_by_signal_and_by_file(tmp_path, imds):
    server, url = imds
    node_dir = tmp_path / "node"
    signalled_worker = _worker(node_dir, "handler")
    polling_worker = _worker(node_dir, "poll")   # registered without a handler: never signalled
    try:
        stop = threading.Event()
        result = {}
        watcher = threading.Thread(target=lambda: result.setdefault("notice", preemption.watch(
            node_dir, preemption.ImdsSpotSource(url), interval_s=0.05, stop=stop)))
        watcher.start()
        time.sleep(0.3)
        assert watcher.is_alive() and server.gets >= 2   # polling, no notice yet
        assert preemption.pending_notice(node_dir) is None
        server.notice = {"action": "terminate", "time": "2026-11-24T12:00:00Z"}
        watcher.join(timeout=10)
        assert not watcher.is_alive()
        notice = result["notice"]
        assert (notice.action, notice.time, notice.source) == ("terminate", "2026-11-24T12:00:00Z", "imds")
        assert signalled_worker.wait(timeout=10) == 0 and polling_worker.wait(timeout=10) == 0
        assert (node_dir / "signalled").read_text() == "terminate"
        assert (node_dir / "polled").read_text() == "yes"   # alive: SIGUSR1 would have killed it
    finally:
        for proc in (signalled_worker, polling_worker):
            proc.kill()
            proc.wait()


def test_stale_registrations_are_dropped_not_signalled(tmp_path):
    node_dir = tmp_path / "node"
    (node_dir / "workers").mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (node_dir / "workers" / str(dead.pid)).write_text(json.dumps(
        {"pid": dead.pid, "start_time": 1, "signal": True}))
    # A live process whose start time does not match: a recycled pid, not our worker.
    me = os.getpid()
    (node_dir / "workers" / str(me)).write_text(json.dumps(
        {"pid": me, "start_time": procs.start_time(me) + 1, "signal": True}))
    previous = signal.signal(signal.SIGUSR1, lambda *_: pytest.fail("a stranger was signalled"))
    try:
        assert preemption.deliver_notice(node_dir, source="controller") == []
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert list((node_dir / "workers").iterdir()) == []
    assert preemption.pending_notice(node_dir).source == "controller"


def test_notify_cli_delivers_the_same_notice(tmp_path):
    node_dir = tmp_path / "node"
    worker = _worker(node_dir, "handler")
    try:
        out = subprocess.run([sys.executable, "-m", "platform.provision.preemption", "notify",
                              "--node-dir", str(node_dir), "--action", "stop"],
                             capture_output=True, text=True, timeout=60, check=True)
        assert json.loads(out.stdout.strip().splitlines()[-1]) == {"signalled": [worker.pid]}
        assert worker.wait(timeout=10) == 0
        assert (node_dir / "signalled").read_text() == "stop"
    finally:
        worker.kill()
        worker.wait()


def test_off_a_platform_node_registration_is_a_no_op(monkeypatch):
    monkeypatch.delenv(preemption.NODE_DIR_ENV, raising=False)
    assert preemption.register_worker() is None
    assert preemption.pending_notice() is None


def test_a_handled_notice_is_not_answered_again_by_restarted_workers(tmp_path):
    node_dir = tmp_path / "node"
    assert preemption.unhandled_notice(node_dir) is None
    preemption.deliver_notice(node_dir, source="controller")
    first = preemption.unhandled_notice(node_dir)
    assert first is not None and first == preemption.pending_notice(node_dir)
    preemption.mark_handled(first, node_dir)
    # A worker started later on the same node (new worker group, resubmitted job) sees it answered.
    assert preemption.unhandled_notice(node_dir) is None
    assert preemption.pending_notice(node_dir) == first           # the notice itself stays
    time.sleep(0.01)
    preemption.deliver_notice(node_dir, action="stop", source="controller")   # a new notice
    second = preemption.unhandled_notice(node_dir)
    assert second is not None and second.action == "stop" and second.noticed_at != first.noticed_at
