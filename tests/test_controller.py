"""The controller's decisions taken before it starts anything (no Ray, no nodes)."""

from __future__ import annotations

import pytest

from _e2e import TINY
from platform.checkpoint.store import CheckpointStore
from platform.config import load_job
from platform.controller.job import Controller
from platform.errors import UserError
from platform.plan import make_plan
from platform.train.checkpointing import job_checkpoint_uri


def _job(tmp_path, monkeypatch, *overrides):
    monkeypatch.setenv("DBRX_PLATFORM_HOME", str(tmp_path / "home"))
    cfg = load_job(TINY, [f"checkpoint.uri={tmp_path / 'ckpt'}", "promote.auto=false", *overrides])
    return cfg, make_plan(cfg)


def _commit(cfg, step: int, **metadata) -> None:
    store = CheckpointStore(job_checkpoint_uri(cfg))
    staging = store.begin(step)
    staging.file("weights.bin").write_bytes(b"w" * 64)
    store.commit(staging, metadata, world_size=2)


def test_a_finished_job_submitted_again_reports_its_end_without_starting_a_cluster(
        tmp_path, monkeypatch, capsys):
    import ray

    cfg, plan = _job(tmp_path, monkeypatch)
    _commit(cfg, plan.total_steps // 2)
    _commit(cfg, plan.total_steps, eval_loss=6.25)
    assert Controller(cfg, plan).run() == 0
    err = capsys.readouterr().err
    assert f"already trained all {plan.total_steps} steps" in err and "nothing to train" in err
    assert err.rstrip().endswith(
        f"job local-tiny: finished at step {plan.total_steps} on 2 worker(s), eval loss 6.2500")
    assert not ray.is_initialized()


def test_a_damaged_final_checkpoint_does_not_count_as_finished(tmp_path, monkeypatch):
    cfg, plan = _job(tmp_path, monkeypatch)
    _commit(cfg, plan.total_steps // 2)
    _commit(cfg, plan.total_steps)
    final = CheckpointStore(job_checkpoint_uri(cfg)).get(plan.total_steps)
    (final.local_path / "weights.bin").write_bytes(b"w")     # truncated after the commit
    assert Controller(cfg, plan)._final_checkpoint() is None  # so the job trains from the one before


def test_resume_false_refuses_a_job_that_has_checkpoints(tmp_path, monkeypatch):
    cfg, plan = _job(tmp_path, monkeypatch, "checkpoint.resume=false")
    _commit(cfg, 3)
    _commit(cfg, 6)
    with pytest.raises(UserError, match=r"already has checkpoints \(steps 3\.\.6\).*new name"):
        Controller(cfg, plan).run()
