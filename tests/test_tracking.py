"""MLflow tracking against a real SQLite store: run lifecycle, secrets, the logger, plots."""

from __future__ import annotations

import dataclasses
import json
import shutil
import socket
import struct
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from _e2e import wait_for
from platform.config import JobConfig, TrackingConfig
from platform.config.schema import CheckpointConfig, ClusterConfig, DataConfig, DataSource, ServeConfig
from platform.tracking import (
    ExpertLoadHistory, MetricsLogger, TrackingError, expert_load_heatmap, expert_load_summary, figure_png,
    finish_run, max_load_ratio, resolve, run_url, start_or_resume_run,
)
from platform.tracking.run import JOB_TAG, SUPERSEDED_TAG

SECRET = "sk-live-0123456789abcdef"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def make_cfg(tmp_path: Path, empty_mlflow_db: Path, name: str = "tiny-job", **groups) -> JobConfig:
    db = tmp_path / "mlflow.db"
    if not db.exists():
        shutil.copy(empty_mlflow_db, db)
    tracking = TrackingConfig(tracking_uri=f"sqlite:///{db}", artifact_location=str(tmp_path / "artifacts"))
    return JobConfig(name=name, tracking=tracking, serve=ServeConfig(api_key=SECRET), **groups)


@pytest.fixture
def cfg(tmp_path, empty_mlflow_db):
    return make_cfg(tmp_path, empty_mlflow_db)


def mlflow_client(cfg):
    from mlflow import MlflowClient

    return MlflowClient(resolve(cfg.tracking).tracking_uri)


def all_artifact_text(client, run_id: str, dest: Path) -> str:
    local = Path(client.download_artifacts(run_id, "", str(dest)))
    return "\n".join(p.read_text(errors="replace") for p in local.rglob("*") if p.is_file())


def dead_port() -> int:
    """A localhost port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- run lifecycle --------------------------------------------------------------------

def test_restart_resumes_the_same_run_until_it_is_finished(cfg):
    run_id = start_or_resume_run(cfg)
    assert start_or_resume_run(cfg) == run_id          # restart: same run
    client = mlflow_client(cfg)
    run = client.get_run(run_id)
    assert run.info.status == "RUNNING" and run.data.tags[JOB_TAG] == "tiny-job"
    assert run.data.tags["mlflow.runName"] == "tiny-job"
    assert run.data.tags["dbrx.code_version"]

    # A failed driver leaves a FAILED run: resubmitting carries on in it.
    assert finish_run(cfg, run_id, "FAILED")
    assert start_or_resume_run(cfg) == run_id
    assert client.get_run(run_id).info.status == "RUNNING"

    # Another job in the same experiment has its own run.
    other = start_or_resume_run(cfg, "other-job")
    assert other != run_id

    # A finished job starts over in a new run.
    assert finish_run(cfg, run_id, "FINISHED")
    assert client.get_run(run_id).info.status == "FINISHED"
    fresh = start_or_resume_run(cfg)
    assert fresh not in (run_id, other)


def test_training_from_scratch_gets_a_new_run_and_retires_the_old(tmp_path, empty_mlflow_db):
    resuming = make_cfg(tmp_path, empty_mlflow_db)
    old = start_or_resume_run(resuming)
    scratch = make_cfg(tmp_path, empty_mlflow_db, checkpoint=CheckpointConfig(resume=False))
    new = start_or_resume_run(scratch)
    assert new != old
    old_run = mlflow_client(scratch).get_run(old)
    assert old_run.info.status == "KILLED" and old_run.data.tags[SUPERSEDED_TAG] == new
    assert start_or_resume_run(resuming) == new       # resuming now continues the new one

    # A failed run superseded by a fresh start is never resumed again.
    assert finish_run(resuming, new, "FAILED")
    newest = start_or_resume_run(scratch)
    assert finish_run(resuming, newest, "FINISHED")
    assert start_or_resume_run(resuming) not in (old, new, newest)


def test_params_and_artifacts_hold_the_config_but_never_a_secret(cfg, tmp_path):
    plan = {"tokens_per_step": 4096, "total_steps": 245, "note": f"served with key {SECRET}",
            "layouts": [{"nodes": 1, "world_size": 1}]}
    run_id = start_or_resume_run(cfg, plan=plan)
    client = mlflow_client(cfg)
    run = client.get_run(run_id)
    params = run.data.params
    assert len(params) > 90                             # the whole config, past one 100-param batch
    assert params["train.lr"] == "0.0003" and params["tracking.experiment"] == "dbrx"
    assert params["serve.api_key"] == "***"
    assert params["plan.tokens_per_step"] == "4096"
    assert all(len(v) <= 6000 for v in params.values())

    text = all_artifact_text(client, run_id, tmp_path / "download")
    assert "tokens_per_step" in text and "train:" in text     # plan.json and config.yaml
    everything = json.dumps([params, run.data.tags]) + text
    assert SECRET not in everything


def test_list_params_are_indexed_and_long_values_cut_to_mlflow_limit(tmp_path, empty_mlflow_db):
    sources = [DataSource(name="code", path="/data/code", exclude=[f"dir{i}/**" for i in range(900)]),
               DataSource(name="prose", path=f"/data/prose?token={SECRET}")]
    cfg = make_cfg(tmp_path, empty_mlflow_db, data=DataConfig(sources=sources),
                   cluster=ClusterConfig(tags={"cost center!": "ml"}))
    run_id = start_or_resume_run(cfg)
    params = mlflow_client(cfg).get_run(run_id).data.params
    assert params["cluster.tags.cost center_"] == "ml"                # a name MLflow accepts
    assert params["data.sources.0.name"] == "code" and params["data.sources.1.name"] == "prose"
    assert params["data.sources.1.weight"] == "1.0"
    assert len(params["data.sources.0.exclude"]) == 6000 and params["data.sources.0.exclude"].endswith("...")
    assert params["data.sources.1.path"] == "/data/prose?token=***"   # a secret value anywhere
    assert SECRET not in json.dumps(params)


def test_unreachable_server_fails_fast_with_a_clear_message(tmp_path):
    port = dead_port()
    cfg = JobConfig(name="j", tracking=TrackingConfig(tracking_uri=f"http://bob:pw@127.0.0.1:{port}",
                                                      artifact_location=""))
    started = time.monotonic()
    with pytest.raises(TrackingError) as err:
        start_or_resume_run(cfg, timeout_s=2)
    assert time.monotonic() - started < 15
    message = str(err.value)
    assert f"127.0.0.1:{port}" in message and "unreachable" in message and "pw" not in message
    assert finish_run(cfg, "0" * 32, timeout_s=1) is False     # a warning, not an exception


def test_mlflow_http_client_is_set_to_fail_fast_unless_the_user_chose(monkeypatch):
    from mlflow.environment_variables import MLFLOW_HTTP_REQUEST_MAX_RETRIES, MLFLOW_HTTP_REQUEST_TIMEOUT

    from platform.tracking.store import fail_fast_http

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "7")     # recorded, so undone after
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "42")
    fail_fast_http()
    assert MLFLOW_HTTP_REQUEST_MAX_RETRIES.get() == 0      # MLflow's default: 7, with backoff
    assert MLFLOW_HTTP_REQUEST_TIMEOUT.get() == 42


def test_run_url_for_a_server_and_for_a_local_store(cfg):
    http = JobConfig(name="j", tracking=TrackingConfig(tracking_uri="https://bob:pw@mlflow.example:8443/",
                                                       artifact_location=""))
    link = run_url(http, "abc123", experiment_id="7")
    assert link.url == "https://mlflow.example:8443/#/experiments/7/runs/abc123"
    assert link.ui_command is None and str(link) == f"MLflow run: {link.url}"

    run_id = start_or_resume_run(cfg)
    exp_id = mlflow_client(cfg).get_run(run_id).info.experiment_id
    local = run_url(cfg, run_id)
    assert local.url == f"http://127.0.0.1:5000/#/experiments/{exp_id}/runs/{run_id}"
    store = resolve(cfg.tracking)
    assert local.ui_command.startswith(f"mlflow ui --backend-store-uri {store.tracking_uri} ")
    assert local.ui_command.endswith("--host 127.0.0.1 --port 5000")
    assert local.ui_command in str(local) and local.url in str(local)


def test_embedded_default_paths_are_made_absolute(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    store = resolve(TrackingConfig())
    assert store.tracking_uri == f"sqlite:///{tmp_path}/.dbrx-platform/mlflow.db"
    assert store.artifact_location == f"{tmp_path}/.dbrx-platform/mlartifacts"
    assert resolve(TrackingConfig(tracking_uri="http://127.0.0.1:5000", artifact_location="")) \
        .artifact_location is None


# --- the logger -----------------------------------------------------------------------

def timed(fn, *args, **kwargs) -> float:
    start = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - start


def test_logged_metrics_params_tags_and_artifacts_arrive(cfg, tmp_path):
    run_id = start_or_resume_run(cfg)
    note = tmp_path / "note.txt"
    note.write_text("hello")
    tracker = MetricsLogger(cfg, run_id, interval_s=0.2)
    slowest = 0.0
    for step in range(300):
        slowest = max(slowest, timed(tracker.log_metrics, {"loss": 10.0 / (step + 1), "lr": 1e-3,
                                                           "mfu": np.float32(0.25)}, step))
    tracker.log_param("attempt_started_at", 0)
    tracker.set_tag("note", f"uses {SECRET}")
    tracker.log_artifact(str(note), "notes")
    note.unlink()                                        # snapshotted: deleting it is fine
    assert tracker.flush(30)
    assert slowest < 0.05
    client = mlflow_client(cfg)
    history = client.get_metric_history(run_id, "loss")
    assert sorted(m.step for m in history) == list(range(300))
    assert {m.step: m.value for m in history}[9] == pytest.approx(1.0)
    run = client.get_run(run_id)
    assert run.data.metrics["mfu"] == pytest.approx(0.25)
    assert run.data.params["attempt_started_at"] == "0"
    assert run.data.tags["note"] == "uses ***"
    assert [f.path for f in client.list_artifacts(run_id, "notes")] == ["notes/note.txt"]
    assert tracker.stats()["sent_metrics"] == 900
    assert tracker.close()


def test_events_are_numbered_counted_and_continue_after_a_restart(cfg, tmp_path):
    run_id = start_or_resume_run(cfg)
    first = MetricsLogger(cfg, run_id, interval_s=0.1)
    first.event("restart", step=10, attempt=1)
    first.event("node_lost", step=12, node="worker-3", api_key=SECRET)
    assert first.close(30)

    # The job restarts: a new rank 0, a new logger, the same run.
    assert start_or_resume_run(cfg) == run_id
    second = MetricsLogger(cfg, run_id, interval_s=0.1)
    second.event("restart", step=20, attempt=2)
    assert second.close(30)

    client = mlflow_client(cfg)
    run = client.get_run(run_id)
    events = {k: json.loads(v) for k, v in run.data.tags.items() if k.startswith("event.")}
    assert sorted(events) == ["event.0001.restart", "event.0002.node_lost", "event.0003.restart"]
    assert events["event.0003.restart"]["attempt"] == 2 and events["event.0003.restart"]["step"] == 20
    assert events["event.0002.node_lost"]["api_key"] == "***"
    restarts = client.get_metric_history(run_id, "events.restart")
    assert sorted((m.step, m.value) for m in restarts) == [(10, 1.0), (20, 2.0)]
    lines = Path(client.download_artifacts(run_id, "events.jsonl", str(tmp_path))).read_text().splitlines()
    assert [json.loads(line)["n"] for line in lines] == [1, 2, 3]
    assert SECRET not in "".join(lines)


def test_records_mlflow_rejects_are_dropped_alone(cfg, caplog):
    run_id = start_or_resume_run(cfg)
    tracker = MetricsLogger(cfg, run_id, interval_s=0.1)
    tracker.log_param("optimizer", "adamw")
    assert tracker.flush(30)
    tracker.log_param("optimizer", "sgd")                 # MLflow never changes a param
    for step in range(5):
        tracker.log_metrics({"loss": 1.0 + step, "bad key!": 1.0, "words": "not a number"}, step)
    assert tracker.flush(30)
    client = mlflow_client(cfg)
    assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == [0, 1, 2, 3, 4]
    assert client.get_run(run_id).data.params["optimizer"] == "adamw"
    stats = tracker.stats()
    assert stats["rejected"] == 6 and not stats["disabled"]     # 5 points of the bad key, the param
    refused = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(refused) == 2 and any("bad key!" in m for m in refused)
    assert any("not a number" in r.getMessage() for r in caplog.records)
    tracker.close()


def test_logger_calls_never_raise(cfg, tmp_path, caplog):
    tracker = MetricsLogger(cfg, start_or_resume_run(cfg), interval_s=0.1)
    tracker.log_artifact(str(tmp_path / "missing.bin"))
    tracker.log_metrics(None)                             # a bug in the caller: reported, not raised
    assert tracker.flush(30)
    assert tracker.close()
    tracker.log_metrics({"loss": 1.0}, 1)                 # after close: ignored
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "missing.bin" in messages and "log_metrics failed" in messages and "closed" in messages


def test_a_deleted_run_stops_tracking_but_never_training(cfg, caplog):
    run_id = start_or_resume_run(cfg)
    mlflow_client(cfg).delete_run(run_id)
    tracker = MetricsLogger(cfg, run_id, interval_s=0.1)
    tracker.event("restart", step=1)
    tracker.log_metrics({"loss": 1.0}, 1)
    assert tracker.flush(30)
    stats = tracker.stats()
    assert stats["disabled"] and stats["rejected"] >= 1 and stats["sent_metrics"] == 0
    tracker.log_metrics({"loss": 2.0}, 2)                 # ignored, not raised
    assert tracker.close()
    messages = [r.getMessage() for r in caplog.records]
    assert sum("is deleted or missing" in m and run_id in m for m in messages) == 1


def _wait_until_unreachable(tracker) -> None:
    """Until the logger's first send to a dead server has failed (its first send also imports
    MLflow's client: seconds on a loaded 2-core machine)."""
    wait_for(lambda: not tracker.stats()["reachable"], 60, "the first send to fail", poll=0.05)


def test_buffer_stays_bounded_while_mlflow_is_down(caplog):
    port = dead_port()
    cfg = JobConfig(name="j", tracking=TrackingConfig(tracking_uri=f"http://127.0.0.1:{port}",
                                                      artifact_location=""))
    tracker = MetricsLogger(cfg, "0" * 32, capacity=1000, interval_s=0.05, max_backoff_s=0.2)
    slowest = timed(tracker.log_metrics, {"loss": 0.0}, 0)
    _wait_until_unreachable(tracker)                      # the first send has failed
    for step in range(1, 2500):
        slowest = max(slowest, timed(tracker.log_metrics, {"loss": float(step)}, step))
        if step % 500 == 0:
            time.sleep(0.2)                               # let the sender retry meanwhile
    stats = tracker.stats()
    assert slowest < 0.05
    assert not stats["reachable"]
    assert stats["queued_metrics"] == 1000                # full, and no fuller
    assert stats["dropped_metrics"] + stats["queued_metrics"] + stats["inflight_metrics"] == 2500
    assert stats["dropped_metrics"] >= 500
    started = time.monotonic()
    assert tracker.close(timeout=1) is False
    assert time.monotonic() - started < 5
    messages = [r.getMessage() for r in caplog.records]
    assert sum("unreachable" in m for m in messages) == 1
    assert sum("buffer is full" in m for m in messages) == 1
    assert any("did not receive" in m for m in messages)


def _step_stats(loss: float):
    import torch

    from platform.train.step import StepStats

    return StepStats(loss=loss, lm_loss=loss, lb_loss=0.0, z_loss=0.0, grad_norm=1.0,
                     expert_counts=torch.ones(2, 4))


def test_a_checkpoint_is_taken_only_once_its_steps_metrics_are_in_mlflow(cfg):
    """The steps up to a committed checkpoint are never trained again: a metric still waiting
    for the logger's next batch when a worker dies would be missing from the run for good."""
    from platform.train.metrics import MetricsSink

    run_id = start_or_resume_run(cfg)
    tracker = MetricsLogger(cfg, run_id, interval_s=60)   # a batch goes at most once a minute
    sink = MetricsSink(cfg, total_steps=10, logger=tracker)
    rates = dict(lr=1e-3, tokens_per_s=1.0, mfu=0.1, data_wait_s=0.0, mixture={})
    sink.step(1, _step_stats(2.0), **rates)
    assert tracker.flush(30)
    sink.step(2, _step_stats(1.5), **rates)               # waits for the next batch ...
    sink.before_checkpoint(2)                             # ... unless a checkpoint is coming
    history = mlflow_client(cfg).get_metric_history(run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [(1, 2.0), (2, 1.5)]
    assert tracker.close()


def test_a_checkpoint_does_not_wait_on_an_mlflow_outage():
    from platform.train.metrics import MetricsSink

    cfg = JobConfig(name="j", tracking=TrackingConfig(tracking_uri=f"http://127.0.0.1:{dead_port()}",
                                                      artifact_location=""))
    tracker = MetricsLogger(cfg, "0" * 32, interval_s=0.05, max_backoff_s=0.2)
    sink = MetricsSink(cfg, total_steps=10, logger=tracker)
    tracker.log_metrics({"loss": 1.0}, 1)
    _wait_until_unreachable(tracker)
    assert timed(sink.before_checkpoint, 1) < 0.5
    assert tracker.stats()["queued_metrics"] + tracker.stats()["inflight_metrics"] == 1   # kept
    tracker.close(timeout=1)


# --- expert-load heatmaps -------------------------------------------------------------

def _loads(steps: int, layers: int, experts: int, collapse_layer: int | None = None):
    rng = np.random.default_rng(0)
    loads = rng.dirichlet(np.full(experts, 200.0), size=(steps, layers))
    if collapse_layer is not None:
        loads[steps // 2:, collapse_layer] = 0.002
        loads[steps // 2:, collapse_layer, 3] = 1.0
    return loads


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _pixels(data: bytes, tmp_path: Path, name: str) -> np.ndarray:
    import matplotlib.image

    path = tmp_path / name
    path.write_bytes(data)
    return matplotlib.image.imread(path)[..., :3]


def test_heatmap_is_a_png_of_the_documented_size_that_shows_collapse(tmp_path):
    balanced = figure_png(expert_load_heatmap(_loads(200, 6, 16)))
    collapsed = figure_png(expert_load_heatmap(_loads(200, 6, 16, collapse_layer=2)))
    # 6 layers: 4 panels a row at 400 px + a 100 px colorbar; 2 rows of (240 px for
    # 16 experts + 40 px title) + a 60 px header.
    assert _png_size(balanced) == _png_size(collapsed) == (1700, 620)
    assert _png_size(figure_png(expert_load_heatmap(_loads(10, 1, 4)))) == (500, 200)

    def count(rgb, colour):
        r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
        red = (r > g + 0.25) & (r > b + 0.15)              # the RdBu_r map's overloaded end
        blue = (b > r + 0.2) & (b > g + 0.1)               # and its starved end
        return int((red if colour == "red" else blue).sum())

    calm, hot = _pixels(balanced, tmp_path, "b.png"), _pixels(collapsed, tmp_path, "c.png")
    # The collapsed layer: one expert row deep red, fifteen starved rows deep blue.
    assert count(hot, "red") - count(calm, "red") > 1000
    assert count(hot, "blue") - count(calm, "blue") > 10 * 1000
    assert max_load_ratio(_loads(200, 6, 16, collapse_layer=2)) == pytest.approx(16 / 1.03, rel=0.01)


def test_expert_load_history_keeps_bounded_memory_and_the_shape_of_the_run():
    history = ExpertLoadHistory(capacity=64)
    loads = _loads(10_000, 2, 8, collapse_layer=1)
    for step in range(10_000):
        history.add(step, loads[step] * 1000)            # token counts are normalised too
    history.add(10_000, np.full((2, 8), np.nan))         # a diverged step: no data, no exception
    steps, shares = history.arrays()
    assert len(history) <= 64 and steps[0] == 0 and np.all(np.diff(steps) > 0)
    assert np.allclose(np.nansum(shares, axis=-1), 1.0)
    assert shares[0, 1].max() < 0.2 and shares[-2, 1, 3] > 0.9
    assert max_load_ratio(history) == pytest.approx(8 / (1 + 7 * 0.002), rel=0.01)

    restored = ExpertLoadHistory.from_state_dict(history.state_dict())   # saved with a checkpoint
    for step in range(10_001, 12_000):
        restored.add(step, loads[step % 10_000])
        history.add(step, loads[step % 10_000])
    assert all(np.array_equal(a, b, equal_nan=True) for a, b in zip(restored.arrays(), history.arrays()))


def test_expert_load_is_logged_as_a_heatmap_a_table_and_a_metric(cfg, tmp_path):
    import pandas as pd

    run_id = start_or_resume_run(cfg)
    tracker = MetricsLogger(cfg, run_id, interval_s=0.1)
    loads = _loads(50, 3, 8, collapse_layer=0)
    loads[7, 2] = 0.0                                     # a layer that routed no tokens at step 7
    history = ExpertLoadHistory()
    for step, row in enumerate(loads):
        history.add(step, row)
    started = time.perf_counter()
    tracker.log_expert_load(history, step=49)
    assert time.perf_counter() - started < 0.05           # drawn in the background
    assert tracker.close(60)
    client = mlflow_client(cfg)
    assert sorted(f.path for f in client.list_artifacts(run_id, "expert_load")) == [
        "expert_load/step_00000049.parquet", "expert_load/step_00000049.png"]
    png = Path(client.download_artifacts(run_id, "expert_load/step_00000049.png", str(tmp_path))).read_bytes()
    assert _png_size(png) == (1300, 220)
    assert client.get_run(run_id).data.metrics["expert_load.max_ratio"] == pytest.approx(8 / 1.014, rel=0.01)

    table = pd.read_parquet(client.download_artifacts(run_id, "expert_load/step_00000049.parquet",
                                                      str(tmp_path)))
    assert list(table.columns) == ["step", "layer", "expert", "fraction"] and len(table) == 50 * 3 * 8
    matrix = table.pivot_table(index="step", columns=["layer", "expert"], values="fraction", dropna=False)
    expected = loads / loads.sum(-1, keepdims=True).clip(min=1e-12)
    expected[7, 2] = np.nan
    assert np.allclose(matrix.to_numpy().reshape(50, 3, 8), expected, equal_nan=True)


def test_expert_load_summary_is_two_numbers_per_layer_that_show_collapse():
    experts = 16
    balanced = np.full(experts, 1 / experts)
    collapsed = np.eye(experts)[3] * 4096                 # token counts: all on expert 3
    summary = expert_load_summary([balanced, collapsed, np.zeros(experts)])
    assert summary == pytest.approx({
        "expert_load/layer00/max_over_uniform": 1.0, "expert_load/layer00/cv": 0.0,
        "expert_load/layer01/max_over_uniform": 16.0, "expert_load/layer01/cv": np.sqrt(15),
    })                                                    # layer 2 routed no tokens: left out


# --- monitoring at DBRX scale: what a local-tiny run puts in MLflow ------------------------

ROOT = Path(__file__).resolve().parents[1]


def test_experiment_is_tagged_for_mlflow_training_view_when_created_or_used(cfg):
    client = mlflow_client(cfg)
    run_id = start_or_resume_run(cfg)
    created = client.get_experiment(client.get_run(run_id).info.experiment_id)
    assert created.tags["mlflow.experimentKind"] == "custom_model_development"

    existing = client.create_experiment("made-elsewhere")          # untagged: MLflow's UI guesses GenAI
    start_or_resume_run(dataclasses.replace(
        cfg, tracking=dataclasses.replace(cfg.tracking, experiment="made-elsewhere")))
    assert client.get_experiment(existing).tags["mlflow.experimentKind"] == "custom_model_development"


def test_local_tiny_run_logs_a_bounded_set_of_metric_keys(tmp_path, empty_mlflow_db):
    """Acceptance of issue 17: at most 2 x layers + 30 metric keys, per-expert detail in artifacts.
    Driven through the training worker's own sink (platform.train.metrics), as rank 0 logs."""
    import pandas as pd
    import torch

    from platform.config import load_job
    from platform.layout import layout_for
    from platform.tracking import STEP_TIME_KEYS, TIME_FWD_BWD
    from platform.train.checkpointing import SaveReport
    from platform.train.metrics import MetricsSink
    from platform.train.step import StepStats

    db = tmp_path / "mlflow.db"
    shutil.copy(empty_mlflow_db, db)
    cfg = load_job(ROOT / "conf" / "local_tiny.yaml", [
        f"tracking.tracking_uri=sqlite:///{db}", f"tracking.artifact_location={tmp_path / 'artifacts'}",
        "train.log_every_steps=1", "checkpoint.every_steps=6"])
    layers, experts = cfg.model.n_layers, cfg.model.moe_num_experts
    run_id = start_or_resume_run(cfg)
    sink = MetricsSink(cfg, 12, MetricsLogger(cfg, run_id, interval_s=0.1))
    sink.started(None, layout_for(cfg, 2), 0)
    loads = _loads(12, layers, experts, collapse_layer=1)
    for step in range(1, 13):
        counts = torch.as_tensor(loads[step - 1] * 1000).round().long()
        stats = StepStats(loss=9.0, lm_loss=8.9, lb_loss=0.05, z_loss=0.01, grad_norm=1.0,
                          expert_counts=counts, fwd_bwd_s=0.8, optimizer_s=0.1)
        sink.step(step, stats, lr=3e-4, tokens_per_s=900.0, mfu=0.01, data_wait_s=0.01,
                  mixture={s.name: 8 for s in cfg.data.sources})
        if step % 6 == 0:                                 # eval and checkpoint
            sink.evaluated(step, 9.1)
            sink.checkpointed(step, 0.03, preempted=True)  # the stall; the save goes on
            sink.checkpoint_done(SaveReport(step, total_s=1.2, bytes=232_000_000, rank_mb_per_s=250.0,
                                            error="rank 1: OSError: disk full" if step == 12 else None))
    sink.close()

    client = mlflow_client(cfg)
    run = client.get_run(run_id)
    keys = set(run.data.metrics)
    assert len(keys) <= 2 * layers + 30, sorted(keys)
    assert not [k for k in keys if k.startswith("expert_load/") and k.split("/")[-1].startswith("e")]
    assert set(STEP_TIME_KEYS) <= keys                    # the step-time breakdown, keys unchanged
    assert [m.value for m in client.get_metric_history(run_id, TIME_FWD_BWD)] == [0.8] * 12
    saved = {"checkpoint/total_s", "checkpoint/bytes", "checkpoint/rank_mb_per_s"}
    assert saved | {"events.checkpoint_failed"} <= keys   # per save; a failed one is an event
    assert [m.step for m in client.get_metric_history(run_id, "checkpoint/total_s")] == [6]
    busiest = client.get_metric_history(run_id, "expert_load/layer01/max_over_uniform")
    assert [m.step for m in busiest] == list(range(1, 13)) and busiest[-1].value > 15

    exp = client.get_experiment(run.info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    tables = [f.path for f in client.list_artifacts(run_id, "expert_load") if f.path.endswith(".parquet")]
    assert tables == ["expert_load/step_00000006.parquet", "expert_load/step_00000012.parquet"]
    table = pd.read_parquet(client.download_artifacts(run_id, tables[-1], str(tmp_path / "dl")))
    assert len(table) == 12 * layers * experts
    assert table.query("step == 12 and layer == 1 and expert == 3").fraction.item() > 0.9


# --- MLflow system metrics ---------------------------------------------------------------

def test_system_metrics_start_only_on_gpu_and_go_on_without_pynvml(cfg, monkeypatch, caplog):
    from platform.tracking import start_system_metrics

    run_id = start_or_resume_run(cfg)
    assert start_system_metrics(cfg, run_id, on_gpu=False) is None

    monkeypatch.setitem(sys.modules, "pynvml", None)      # nvidia-ml-py not installed
    monitor = start_system_metrics(cfg, run_id, on_gpu=True, interval_s=0.2)
    assert monitor is not None
    time.sleep(1.0)
    monitor.finish()
    assert any("nvidia-ml-py" in r.getMessage() for r in caplog.records)
    keys = set(mlflow_client(cfg).get_run(run_id).data.metrics)
    assert "system/cpu_utilization_percentage" in keys
    assert not [k for k in keys if k.startswith("system/gpu")]


def test_system_metrics_without_psutil_are_a_warning_not_a_crash(cfg, monkeypatch, caplog):
    from platform.tracking import start_system_metrics

    run_id = start_or_resume_run(cfg)
    monkeypatch.setitem(sys.modules, "psutil", None)      # MLflow's CPU monitor needs it
    for name in [m for m in sys.modules if m.startswith("mlflow.system_metrics")]:
        monkeypatch.delitem(sys.modules, name)            # imported afresh, without psutil
    assert start_system_metrics(cfg, run_id, on_gpu=True) is None
    assert any("system metrics are off" in r.getMessage() for r in caplog.records)
