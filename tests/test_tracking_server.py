"""Training keeps logging through an MLflow server outage, and nothing is lost.

A real `mlflow server` on 127.0.0.1 (SQLite backend and proxied artifacts in
a temp dir) is stopped in the middle of a run and started again on the same
port. Slow: each server start takes several seconds.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from platform.config import JobConfig, TrackingConfig
from platform.config.schema import ServeConfig
from platform.tracking import MetricsLogger, finish_run, run_url, start_or_resume_run

pytestmark = pytest.mark.slow

SECRET = "sk-live-server-test-secret"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """One `mlflow server` process group on 127.0.0.1:port, started and stopped by the test."""

    def __init__(self, root: Path, port: int) -> None:
        self.root, self.port = root, port
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None
        self.log = root / "server.log"

    def start(self, timeout: float = 120.0) -> None:
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--workers", "1", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
               "--artifacts-destination", str(self.root / "artifacts"),
               "--default-artifact-root", "mlflow-artifacts:/"]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         cwd=self.root, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"mlflow server did not answer in {timeout} s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.proc = None


@pytest.fixture
def server(tmp_path):
    srv = MlflowServer(tmp_path, free_port())
    srv.start()
    yield srv
    srv.stop()


def test_logging_survives_a_server_outage_and_the_buffer_arrives(server, tmp_path, caplog):
    cfg = JobConfig(name="outage-job", serve=ServeConfig(api_key=SECRET),
                    tracking=TrackingConfig(tracking_uri=server.url, artifact_location=""))
    run_id = start_or_resume_run(cfg, plan={"tokens_per_step": 4096})
    assert run_url(cfg, run_id).url.startswith(f"{server.url}/#/experiments/")
    tracker = MetricsLogger(cfg, run_id, interval_s=0.2, max_backoff_s=1.0)

    def log_step(step: int) -> float:
        started = time.perf_counter()
        tracker.log_metrics({"loss": 100.0 - step * 0.1, "tokens": float(step * 4096)}, step)
        return time.perf_counter() - started

    assert max(log_step(s) for s in range(100)) < 0.05
    assert tracker.flush(30)

    server.stop()
    ckpt = tmp_path / "ckpt_note.txt"
    ckpt.write_text("checkpoint 150 committed")
    durations = []
    for step in range(100, 300):
        durations.append(log_step(step))
        if step == 150:
            tracker.event("checkpoint_fallback", step=step, reason="server down", key=SECRET)
            tracker.log_artifact(str(ckpt), "checkpoints")
        time.sleep(0.01)
    deadline = time.monotonic() + 30
    while tracker.stats()["reachable"] and time.monotonic() < deadline:
        durations.append(log_step(299))
        time.sleep(0.05)
    assert not tracker.stats()["reachable"]
    assert max(durations) < 0.05, f"slowest logging call while MLflow was down: {max(durations):.3f} s"
    assert tracker.flush(timeout=2) is False                  # nothing can arrive yet

    server.start()
    assert tracker.flush(timeout=60)
    messages = [r.getMessage() for r in caplog.records if r.name == "platform.tracking"]
    assert sum("unreachable" in m for m in messages) == 1, messages
    assert sum("reachable again" in m for m in messages) == 1, messages

    from mlflow import MlflowClient

    client = MlflowClient(server.url)
    history = client.get_metric_history(run_id, "loss")
    assert sorted({m.step for m in history}) == list(range(300))
    assert {m.step: m.value for m in history}[250] == pytest.approx(75.0)
    run = client.get_run(run_id)
    event = json.loads(run.data.tags["event.0001.checkpoint_fallback"])
    assert event["step"] == 150 and event["key"] == "***"
    assert run.data.metrics["events.checkpoint_fallback"] == 1.0
    assert [f.path for f in client.list_artifacts(run_id, "checkpoints")] == ["checkpoints/ckpt_note.txt"]
    assert SECRET not in json.dumps([run.data.params, run.data.tags])
    assert tracker.stats()["dropped_metrics"] == 0
    assert tracker.close(30)
    assert finish_run(cfg, run_id)
    assert client.get_run(run_id).info.status == "FINISHED"
