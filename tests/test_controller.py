"""The controller's state machine, driven through its real decisions: what it does before
it starts anything, where a failure or a stop in each state leads, how a failure or a stop
while provisioning ends, and its capacity policy against real Terraform (no Ray)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import threading

import pytest

from _e2e import TINY
from platform.checkpoint.store import CheckpointStore
from platform.config import load_job
from platform.controller.capacity import CapacityPolicy
from platform.controller.job import Controller
from platform.controller.state import (
    FAILED, FINISHED, KILLED, Failed, Finished, JobState, Outcome, Planned, Promoting,
    Provisioning, Releasing, Resources, Serving, Stopped, Training, after_error, after_release,
)
from platform.errors import UserError
from platform.plan import make_plan
from platform.train.checkpointing import job_checkpoint_uri


@pytest.fixture(autouse=True)
def _sigterm_restored():
    """Controller.run takes over SIGTERM (a stop); give it back after each test."""
    handler = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, handler)


def _job(tmp_path, monkeypatch, *overrides):
    monkeypatch.setenv("DBRX_PLATFORM_HOME", str(tmp_path / "home"))
    cfg = load_job(TINY, [f"checkpoint.uri={tmp_path / 'ckpt'}", "promote.auto=false", *overrides])
    return cfg, make_plan(cfg)


def _commit(cfg, step: int, **metadata) -> None:
    store = CheckpointStore(job_checkpoint_uri(cfg))
    staging = store.begin(step)
    staging.file("weights.bin").write_bytes(b"w" * 64)
    store.commit(staging, metadata, world_size=2)


def _path(caplog) -> list[str]:
    """The states the controller went through, from its transition log."""
    moves = [r.getMessage().split(": ", 1)[1].split(" -> ") for r in caplog.records
             if r.name == "platform.controller" and " -> " in r.getMessage()]
    return [moves[0][0]] + [after for _, after in moves] if moves else []


def test_a_finished_job_submitted_again_reports_its_end_without_starting_a_cluster(
        tmp_path, monkeypatch, capsys, caplog, ray_not_connected):
    ray = ray_not_connected
    caplog.set_level("INFO", logger="platform.controller")
    cfg, plan = _job(tmp_path, monkeypatch)
    _commit(cfg, plan.total_steps // 2)
    _commit(cfg, plan.total_steps, eval_loss=6.25)
    assert Controller(cfg, plan).run() == 0
    err = capsys.readouterr().err
    assert f"already trained all {plan.total_steps} steps" in err and "nothing to train" in err
    assert err.rstrip().endswith(
        f"job local-tiny: finished at step {plan.total_steps} on 2 worker(s), eval loss 6.2500")
    assert not ray.is_initialized()
    assert _path(caplog) == ["PLANNED", "PROMOTING", "RELEASING", "FINISHED"]


def test_a_damaged_final_checkpoint_does_not_count_as_finished(tmp_path, monkeypatch):
    cfg, plan = _job(tmp_path, monkeypatch)
    _commit(cfg, plan.total_steps // 2)
    _commit(cfg, plan.total_steps)
    final = CheckpointStore(job_checkpoint_uri(cfg)).get(plan.total_steps)
    (final.local_path / "weights.bin").write_bytes(b"w")     # truncated after the commit
    assert Controller(cfg, plan)._final_checkpoint() is None  # so the job trains from the one before


def test_resume_false_refuses_a_job_that_has_checkpoints(tmp_path, monkeypatch, capsys):
    cfg, plan = _job(tmp_path, monkeypatch, "checkpoint.resume=false")
    _commit(cfg, 3)
    _commit(cfg, 6)
    controller = Controller(cfg, plan)
    with pytest.raises(UserError, match=r"already has checkpoints \(steps 3\.\.6\).*new name"):
        controller.run()
    assert isinstance(controller.state, Planned)              # refused before anything started,
    assert "job local-tiny:" not in capsys.readouterr().err   # so there is no end to report


def test_serving_a_finished_job_without_a_promoted_model_fails_with_the_registry_s_answer(
        tmp_path, monkeypatch, capsys, caplog, empty_mlflow_db, ray_not_connected):
    ray = ray_not_connected
    caplog.set_level("INFO", logger="platform.controller")
    shutil.copy(empty_mlflow_db, tmp_path / "mlflow.db")
    cfg, plan = _job(tmp_path, monkeypatch, "serve.start_after_training=true",
                     f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db")
    _commit(cfg, plan.total_steps, eval_loss=6.25)
    controller = Controller(cfg, plan)
    with pytest.raises(UserError, match="has no alias 'staging': promote a checkpoint first"):
        controller.run()
    assert _path(caplog) == ["PLANNED", "PROMOTING", "RELEASING", "SERVING", "FAILED"]
    assert controller.state.kind is JobState.FAILED
    # Training did finish: the final line says so, and the error follows it.
    assert capsys.readouterr().err.rstrip().endswith(
        f"job local-tiny: finished at step {plan.total_steps} on 2 worker(s), eval loss 6.2500")
    assert not ray.is_initialized()


def _s3_corpus(endpoint: str) -> list[str]:
    return ["data.sources=[{name: code, path: 's3://corpus/code', format: text}]",
            f"data.s3_endpoint_url={endpoint}"]


def test_a_failure_while_provisioning_is_released_reported_and_raised(
        tmp_path, monkeypatch, capsys, caplog, s3_endpoint, aws_credentials):
    caplog.set_level("INFO", logger="platform.controller")
    cfg, plan = _job(tmp_path, monkeypatch, *_s3_corpus(s3_endpoint))   # the bucket does not exist
    controller = Controller(cfg, plan)
    with pytest.raises(UserError, match="data source 'code'"):
        controller.run()
    assert _path(caplog) == ["PLANNED", "PROVISIONING", "RELEASING", "FAILED"]
    assert capsys.readouterr().err.rstrip().endswith("job local-tiny: failed at step 0")


def test_a_stop_while_provisioning_is_released_and_ends_the_job_stopped(
        tmp_path, monkeypatch, capsys, caplog, aws_credentials):
    caplog.set_level("INFO", logger="platform.controller")
    held = []
    with socket.create_server(("127.0.0.1", 0)) as silent:     # an object store that never answers
        cfg, plan = _job(tmp_path, monkeypatch,
                         *_s3_corpus(f"http://127.0.0.1:{silent.getsockname()[1]}"))

        def stop_once_asked():
            held.append(silent.accept()[0])                     # the job is listing its data:
            os.kill(os.getpid(), signal.SIGTERM)                # `platform.stop` now

        threading.Thread(target=stop_once_asked, daemon=True).start()
        controller = Controller(cfg, plan)
        with pytest.raises(KeyboardInterrupt):
            controller.run()
    assert _path(caplog) == ["PLANNED", "PROVISIONING", "RELEASING", "STOPPED"]
    err = capsys.readouterr().err
    assert "stop requested (SIGTERM): tearing the job down; submit it again to resume" in err
    assert err.rstrip().endswith("job local-tiny: killed at step 0\nerror: interrupted")


TRAINED = Outcome(FINISHED, final_step=157, world_size=2, eval_loss=6.25)
HOLDING = [Provisioning(), Training(Resources(), "prepared-data", capacity=None),
           Promoting(Resources(), TRAINED)]


@pytest.mark.parametrize("state", HOLDING, ids=lambda s: s.kind.name)
def test_a_failure_or_a_stop_while_the_job_may_hold_resources_leads_to_releasing_them(state):
    failure, stop = RuntimeError("rank 1 died"), KeyboardInterrupt()
    failed, stopped = after_error(state, failure), after_error(state, stop)
    assert isinstance(failed, Releasing) and isinstance(stopped, Releasing)
    assert failed.resources is state.resources and stopped.resources is state.resources
    assert (failed.outcome.status, failed.error) == (FAILED, failure)
    assert (stopped.outcome.status, stopped.error) == (KILLED, stop)
    if isinstance(state, Promoting):                            # what training reached is kept
        assert failed.outcome.final_step == stopped.outcome.final_step == 157


def test_releasing_happens_once_and_the_job_ends_with_its_first_error():
    stop = KeyboardInterrupt()
    releasing = Releasing(Resources(), Outcome(KILLED, error="interrupted"), stop)
    assert after_release(releasing, serve=True) == Stopped(releasing.outcome, stop)
    assert after_error(releasing, RuntimeError("teardown")) == Stopped(releasing.outcome, stop)
    failure = RuntimeError("teardown")
    assert after_error(Releasing(Resources(), TRAINED), failure) == Failed(TRAINED, failure)


def test_serving_follows_only_a_finished_run_once_it_is_released():
    assert after_release(Releasing(Resources(), TRAINED), serve=True) == Serving(TRAINED)
    assert after_release(Releasing(Resources(), TRAINED), serve=False) == Finished(TRAINED)
    failed = Outcome(FAILED, final_step=9, error="rank 1 died")
    assert after_release(Releasing(Resources(), failed), serve=True) == Failed(failed)
    for state in HOLDING:                                       # nothing skips RELEASING
        for error in (RuntimeError(), KeyboardInterrupt()):
            assert isinstance(after_error(state, error), Releasing)
    # Serving ends when it is stopped; an endpoint that cannot start fails the job.
    assert after_error(Serving(TRAINED), KeyboardInterrupt()) == Finished(TRAINED)
    taken = UserError("cannot serve on 127.0.0.1:8000")
    assert after_error(Serving(TRAINED), taken) == Failed(TRAINED, taken)


def test_an_error_before_anything_started_is_the_job_s_answer():
    with pytest.raises(UserError, match="refused"):
        after_error(Planned(), UserError("refused"))


@pytest.mark.skipif(shutil.which("terraform") is None, reason="needs terraform")
def test_capacity_policy_steps_down_to_the_minimum_then_refuses_and_records_each_shortfall(
        tmp_path, monkeypatch):
    from platform.provision.nodes import Provisioner
    from platform.provision.terraform import RetryPolicy

    cfg, _ = _job(tmp_path, monkeypatch, "cluster.max_nodes=2", "cluster.min_nodes=1",
                  "cluster.terraform_vars={fail_apply: 'true'}")   # the module refuses every node
    prov = Provisioner.for_job(cfg, "127.0.0.1:1")
    prov.terraform.retry = RetryPolicy(capacity_attempts=1, backoff_s=0.1, max_backoff_s=0.2)
    events = []
    policy = CapacityPolicy(prov, desired=2, minimum=1,
                            event=lambda name, **details: events.append(name))
    try:
        with pytest.raises(UserError, match=r"even cluster.min_nodes=1 node\(s\)") as info:
            policy.acquire()
        # It asked for 2, then for 1: the last refusal is for node 0 alone.
        assert "no capacity for node local-tiny-node-0" in str(info.value)
        assert "local-tiny-node-1" not in str(info.value)
        assert policy.grow() is None                      # while training: still nothing to add
        assert events == ["capacity_short", "capacity_short"]   # one per request, not per size
        assert policy.failures[0].startswith("provisioning 2 node(s): terraform apply failed")
        assert policy.failures[1].startswith("growing to 2 nodes: terraform apply failed")
        assert not list((prov.terraform.workdir / "run").glob("*/ray.pid"))   # no node runs
    finally:
        prov.destroy()
