"""serve.start_after_training, for real: the model is served with the MLflow run FINISHED
and the training cluster gone, and a stop (SIGTERM) ends the job cleanly.

The controller holds what PROVISIONING acquires (a CPU-less Ray head, one
Terraform node of infra/local, the job's MLflow run) and runs from PROMOTING
with a committed checkpoint of the final step, so no training is needed.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading

import pytest
import requests

from _e2e import TINY, wait_for
from platform.config import load_job
from platform.controller.capacity import CapacityPolicy
from platform.controller.job import Controller
from platform.controller.state import FINISHED, Outcome, Promoting, Resources
from platform.plan import make_plan
from platform.provision import procs
from platform.provision.head import free_local_ports, port_open
from platform.provision.nodes import Provisioner
from platform.train.checkpointing import open_checkpoints

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture
def job(tmp_path, monkeypatch, empty_mlflow_db, ray_not_connected):
    monkeypatch.setenv("DBRX_PLATFORM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("RAY_AUTH_MODE", "token")           # the controller sets both; restored after
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    shutil.copy(empty_mlflow_db, tmp_path / "mlflow.db")
    head, dashboard, endpoint = free_local_ports(3)
    cfg = load_job(TINY, [
        "name=serve-after", f"checkpoint.uri={tmp_path}/ckpt", "cluster.max_nodes=1",
        f"cluster.head_port={head}", f"cluster.dashboard_port={dashboard}",
        f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
        f"tracking.artifact_location={tmp_path}/mlartifacts", "promote.gate=false",
        "serve.start_after_training=true", f"serve.port={endpoint}"])
    handler = signal.getsignal(signal.SIGTERM)
    ray = ray_not_connected           # the controller inits its own
    held = Resources()
    yield cfg, held
    signal.signal(signal.SIGTERM, handler)
    if ray.is_initialized():
        ray.shutdown()
    if held.provisioner is not None:
        held.provisioner.destroy()
    if held.head is not None:
        held.head.stop()


def test_the_model_is_served_once_the_run_is_finished_and_the_training_nodes_are_gone(
        job, commit_checkpoint, capsys, caplog):
    import ray
    from mlflow import MlflowClient

    from model import DBRX

    cfg, held = job
    plan = make_plan(cfg)
    controller = Controller(cfg, plan)
    # What PROVISIONING holds when training starts: the head, the run, the nodes.
    controller._connect(held)
    controller._start_tracking(held)
    held.provisioner = Provisioner.for_job(cfg, held.head.address)
    CapacityPolicy(held.provisioner, 1, 1, event=held.events.event).acquire()
    nodes = [(n.pid, procs.start_time(n.pid)) for n in held.provisioner.nodes()]
    held.provisioner.wait_for_nodes(1)
    commit_checkpoint(open_checkpoints(cfg), DBRX(cfg.model), plan.total_steps, run_id=held.run_id)

    base = f"http://127.0.0.1:{cfg.serve.port}"
    seen, ended = {}, threading.Event()

    def look_while_served_then_stop():
        try:
            wait_for(lambda: ended.is_set() or _served(caplog), 600, "the endpoint")
            if ended.is_set():
                return
            seen["run"] = MlflowClient(cfg.tracking.tracking_uri).get_run(held.run_id).info.status
            seen["terraform_nodes"] = held.provisioner.nodes()
            seen["node_processes"] = [p for pid, start in nodes for p in procs.session_members(pid, start)]
            seen["head"] = port_open("127.0.0.1", cfg.cluster.head_port)
            seen["models"] = [m["id"] for m in requests.get(f"{base}/v1/models", timeout=30).json()["data"]]
            seen["completion"] = requests.post(f"{base}/v1/completions", timeout=120, json={
                "model": cfg.promote.registered_model, "prompt": "def f(x):", "max_tokens": 4}).status_code
        finally:
            if not ended.is_set():
                os.kill(os.getpid(), signal.SIGTERM)           # `platform.stop`

    caplog.set_level("INFO", logger="platform.controller")
    caplog.set_level("INFO", logger="platform.serving")
    watcher = threading.Thread(target=look_while_served_then_stop, daemon=True)
    watcher.start()
    try:
        rc = controller.run(Promoting(held, Outcome(FINISHED, final_step=plan.total_steps, world_size=1)))
    finally:
        ended.set()
        watcher.join(timeout=60)

    assert rc == 0
    assert seen == {"run": "FINISHED", "terraform_nodes": [], "node_processes": [], "head": False,
                    "models": [cfg.promote.registered_model], "completion": 200}
    moves = [r.getMessage().split(": ", 1)[1] for r in caplog.records
             if r.name == "platform.controller" and " -> " in r.getMessage()]
    assert moves == ["PROMOTING -> RELEASING", "RELEASING -> SERVING", "SERVING -> FINISHED"]
    err = capsys.readouterr().err
    assert f"OpenAI-compatible endpoint: {base}/v1" in err
    assert "stop requested (SIGTERM)" in err and "stopping the endpoint" in err
    assert err.rstrip().endswith(f"job serve-after: finished at step {plan.total_steps} on 1 worker(s)")
    assert not ray.is_initialized() and not port_open("127.0.0.1", cfg.serve.port)


def _served(caplog) -> bool:
    """start_serving has returned: its last act is to log where it serves."""
    return any(r.name == "platform.serving" and r.getMessage().startswith("serving ")
               for r in caplog.records)
