"""Background checkpoint saves: training goes on, commits are all-or-nothing, failures are reported.

The multi-rank tests run real DeepSpeed over gloo (tests/_dist_train.py); the
in-process ones drive the same Checkpointer over a plain torch Adam
(`PlainTrainer`), in milliseconds.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch.multiprocessing as mp

import _dist_train
from platform.checkpoint import CheckpointStore, rng_state, set_rng_state
from platform.checkpoint.trainer_state import state_tensors
from platform.provision.head import free_local_port

WORLD = 2


def _files(store: CheckpointStore, step: int) -> dict[str, tuple[int, str]]:
    return {e.path: (e.size, e.sha256) for e in store.get(step).manifest.files}


# ----------------------------------------------------------------------------- in process


@pytest.fixture
def trainer(random_model):
    trainer = _dist_train.PlainTrainer(random_model(_dist_train.tiny_job(0).model))
    trainer.step()
    return trainer


def test_a_save_in_flight_equals_a_synchronous_one_on_any_store(any_store, trainer, tmp_path):
    generators = rng_state()   # saved too; boto3 draws from Python's between the two saves
    sync = CheckpointStore(any_store.child("sync"), staging_root=tmp_path / "s1")
    trainer.checkpointer(sync, async_save=False).save(1, consumed_sequences=8, extra={"loss": 1.0})

    set_rng_state(generators)
    held = _dist_train.ScriptedStore(any_store.child("async"), staging_root=tmp_path / "s2")
    held.gate = threading.Event()
    saver = trainer.checkpointer(held, async_save=True)
    saver.save(1, consumed_sequences=8, extra={"loss": 1.0})
    trainer.step()
    trainer.step()                                    # the state moves on under the save
    assert held.list_committed() == [] and saver.finished() == []
    held.gate.set()
    assert saver.wait()
    [report] = saver.finished()
    files = _files(held, 1)
    assert report.error is None
    assert report.bytes == sum(size for path, (size, _) in files.items() if path != "trainer.json")
    assert files == _files(sync, 1)                   # bit for bit, trainer.json included


def test_a_rank_that_never_reports_makes_rank0_give_the_save_up(trainer, tmp_path):
    """Rank 0 of a 2-rank layout whose rank 1 is gone: the save is aborted after the timeout,
    nothing becomes visible, training goes on."""
    store = CheckpointStore(str(tmp_path / "ckpt"))
    saver = trainer.checkpointer(store, world_size=2, commit_timeout_s=0.3)
    saver.save(1, consumed_sequences=8, extra={})
    trainer.step()
    assert not saver.wait()
    [report] = saver.finished()
    assert "posted no record" in report.error and "rank-00001" in report.error
    assert store.list_committed() == [] and not any((tmp_path / "ckpt" / ".staging").iterdir())


# ----------------------------------------------------------------------------- DeepSpeed over gloo


@pytest.fixture(scope="module")
def in_flight_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("in-flight")
    out = root / "out.json"
    mp.spawn(_dist_train.run_in_flight, args=(WORLD, free_local_port(), str(root), str(out)),
             nprocs=WORLD, join=True)
    return root, json.loads(out.read_text())


def test_training_continues_while_a_save_is_in_flight_and_it_equals_a_synchronous_save(in_flight_run):
    root, seen = in_flight_run
    assert seen["in_flight"]["committed"] == []       # steps 2-3 trained, the save still held
    assert seen["committed"] and seen["reports"][0]["error"] is None
    sync, held = CheckpointStore(str(root / "sync")), CheckpointStore(str(root / "async"))
    files = _files(held, 2)
    assert sum(name.startswith("model-r00001") for name in files)   # both ranks wrote state
    assert files == _files(sync, 2)                   # bit for bit, trainer.json included
    assert seen["metrics"]["checkpoint/bytes"] > 0 and seen["metrics"]["checkpoint/rank_mb_per_s"] > 0


def test_a_failed_background_save_is_reported_and_training_goes_on(in_flight_run):
    root, seen = in_flight_run
    failed = seen["reports"][1]
    assert failed["step"] == 4 and "rank 1: OSError: disk full" in failed["error"]
    assert seen["failed_committed"] is False
    assert seen["events"] == [{"name": "checkpoint_failed", "step": 4, "error": failed["error"]}]
    assert seen["after_failure"] == [2] and seen["final"] == [2, 5]   # never visible, then on
    assert seen["staging_left"] == []                 # rank 0 aborted the attempt


def test_kill_9_during_a_background_save_leaves_the_previous_checkpoint_and_resume_is_exact(tmp_path):
    root, out = tmp_path / "ckpt", tmp_path / "killed.json"
    ctx = mp.get_context("spawn")
    port = free_local_port()
    procs = [ctx.Process(target=_dist_train.run_killed, args=(rank, WORLD, port, str(root), str(out)))
             for rank in range(WORLD)]
    for p in procs:
        p.start()
    try:
        deadline = time.monotonic() + 600
        while not all(Path(f"{out}.rank{r}").exists() for r in range(WORLD)):
            assert time.monotonic() < deadline and all(p.exitcode is None for p in procs)
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.exitcode is None:
                os.kill(p.pid, signal.SIGKILL)
            p.join()
    store = CheckpointStore(str(root))
    assert store.list_committed() == [2]              # step 4 was staged, never committed
    assert store.latest_valid(verify=True)[0].step == 2

    resumed = tmp_path / "resumed.json"
    mp.spawn(_dist_train.run_resumed, args=(WORLD, free_local_port(), str(root), str(resumed)),
             nprocs=WORLD, join=True)
    seen = json.loads(resumed.read_text())
    assert seen["step"] == 2
    assert seen["losses"] == json.loads(out.read_text())[2:]   # the same steps, bit for bit
    assert seen["committed"] == [2, 4]
    assert state_tensors(root / "step_000000004").keys() == state_tensors(root / "step_000000002").keys()
