"""Training keeps logging through an MLflow server outage, and nothing is lost.

A real `mlflow server` on 127.0.0.1 (SQLite backend and proxied artifacts in
a temp dir) is stopped in the middle of a run and started again on the same
port. Slow: each server start takes several seconds.
"""

from __future__ import annotations

import json
import time

import pytest

from _mlflow_server import MlflowServer, free_port

from platform.config import JobConfig, TrackingConfig
from platform.config.schema import ServeConfig
from platform.tracking import MetricsLogger, finish_run, run_url, start_or_resume_run

pytestmark = pytest.mark.slow

SECRET = "sk-live-server-test-secret"


@pytest.fixture
def server(tmp_path):
    srv = MlflowServer(tmp_path, free_port())
    srv.start()
    yield srv
    srv.stop()


def test_logging_survives_a_server_outage_and_the_buffer_arrives(server, tmp_path, caplog):
    cfg = JobConfig(name="outage-job", serve=ServeConfig(api_key=SECRET),
                    tracking=TrackingConfig(tracking_uri=server.url, artifact_location="", max_retry_s=1.0))
    run_id = start_or_resume_run(cfg, plan={"tokens_per_step": 4096})
    assert run_url(cfg, run_id).url.startswith(f"{server.url}/#/experiments/")
    tracker = MetricsLogger(cfg, run_id, interval_s=0.2)

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
