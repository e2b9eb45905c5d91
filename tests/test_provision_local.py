"""End to end on this host: a Ray head, infra/local worker nodes, loss, replacement, teardown.

Real Ray, real Terraform, real processes. The fixture tears everything down
(Terraform destroy, then any session it saw, then the head) even when the
test fails, so no Ray process outlives the test.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid

import pytest

from _e2e import wait_for
from platform.provision import (
    INSTANCE_LABEL, NODE_LABEL, LocalHead, NodesNotReady, Provisioner, procs, ray_auth_env,
)
from platform.provision.head import free_local_ports
from platform.provision.nodes import fetch_ray_nodes

pytestmark = pytest.mark.slow


def _pid_file(node) -> list[str]:
    """node.sh's record of a node: leader pid, its start time, its Ray temp dir."""
    return open(os.path.join(node.node_dir, "ray.pid")).read().split()


def _start_time(node) -> int:
    return int(_pid_file(node)[1])


def _temp_dir(node) -> str:
    return _pid_file(node)[2]


def _worker_logs_naming(temp_dir: str, pid: int) -> list[str]:
    """This node's Ray worker log files of process `pid`."""
    logs = os.path.join(temp_dir, "session_latest", "logs")
    return [f for f in os.listdir(logs) if f.startswith("worker-") and f.endswith(f"-{pid}.out")]


@pytest.fixture
def local_cluster(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "token")   # restored after the test
    tag = uuid.uuid4().hex[:8]
    gcs, dashboard, client = free_local_ports(3)
    head = LocalHead(port=gcs, dashboard_port=dashboard, client_port=client,
                     object_store_mb=100, state_dir=str(tmp_path / "head"),
                     temp_dir=f"/tmp/dbrx-t-{tag}")
    sessions: list[tuple[int, int]] = []   # every node session the test saw: (pid, start time)
    head.start(timeout_s=120)
    prov = Provisioner(f"e2e-{tag}", "local", head.address, join_timeout_s=120,
                       variables={"node_cpus": 1, "node_memory_mb": 1024, "object_store_mb": 100})
    try:
        yield head, prov, sessions
    finally:
        try:
            prov.destroy()
        finally:
            for pid, started in sessions:
                procs.stop_session(pid, started, timeout_s=5)
            head.stop()
            shutil.rmtree(head.temp_dir, ignore_errors=True)


_PROBE = """
import json, os, sys, time
import ray
from platform.provision import preemption

ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)

@ray.remote(num_cpus=1)
class Worker:
    def __init__(self):
        self.got = []

    def register(self):
        path = preemption.register_worker(lambda notice: self.got.append(notice.action))
        return {"name": os.environ.get("DBRX_NODE_NAME"), "dir": os.environ.get("DBRX_NODE_DIR"),
                "node_id": ray.get_runtime_context().get_node_id(), "registration": str(path),
                "pid": os.getpid()}

    def notice(self):
        pending = preemption.pending_notice()
        return {"signalled": self.got, "pending": pending.action if pending else None}

out, workers = {}, {}
for name in sys.argv[2:]:
    workers[name] = Worker.options(resources={f"node_{name}": 1}).remote()
    out[name] = ray.get(workers[name].register.remote(), timeout=90)
first = sys.argv[2]
out["signalled_pids"] = preemption.deliver_notice(out[first]["dir"], source="controller")
time.sleep(0.5)
out["first_notice"] = ray.get(workers[first].notice.remote(), timeout=30)
out["second_notice"] = ray.get(workers[sys.argv[3]].notice.remote(), timeout=30)
print("PROBE " + json.dumps(out))
"""


def _probe(address: str, names: list[str]) -> dict:
    """Place one actor per node by its identity resource; check env and the notice contract."""
    result = subprocess.run([sys.executable, "-c", _PROBE, address, *names], capture_output=True,
                            text=True, timeout=240, env={**os.environ, **ray_auth_env()})
    lines = [line for line in result.stdout.splitlines() if line.startswith("PROBE ")]
    assert result.returncode == 0 and lines, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(lines[-1][len("PROBE "):])


def test_nodes_join_get_lost_are_replaced_and_leave_nothing_behind(local_cluster):
    head, prov, sessions = local_cluster
    t0 = time.monotonic()

    nodes = prov.up(2)
    sessions += [(n.pid, _start_time(n)) for n in nodes]
    names = [n.name for n in nodes]
    assert names == [f"{prov.job_name}-node-0", f"{prov.job_name}-node-1"]
    assert all(n.pid and procs.alive(n.pid) and n.private_ip == "127.0.0.1" for n in nodes)
    live = prov.wait_for_nodes(2, timeout_s=120)
    assert sorted(live) == names
    for node in nodes:
        ray_node = live[node.name]
        assert ray_node.instance_id == node.instance_id
        assert ray_node.resources["node_slot"] == 1.0
        assert ray_node.resources[f"node_{node.name}"] == 1.0
    t_up = time.monotonic() - t0

    # Ray's view maps back to Terraform's: env, identity resource, spot-notice contract.
    probe = _probe(head.address, names)
    for node in nodes:
        assert probe[node.name]["name"] == node.name
        assert probe[node.name]["dir"] == node.node_dir
        assert probe[node.name]["node_id"] == live[node.name].node_id
    first, second = probe[names[0]], probe[names[1]]
    assert probe["first_notice"]["pending"] == "terminate"
    assert probe["second_notice"] == {"signalled": [], "pending": None}   # other node untouched
    # Ray runs a sync actor's methods on its main thread, so the actor installed the handler.
    assert probe["signalled_pids"] == [first["pid"]] and second["pid"] != first["pid"]
    assert probe["first_notice"]["signalled"] == ["terminate"]
    # Each node logs to its own Ray temp dir (a shared one would have every node's log
    # monitor stream every worker's output: each line printed once per node).
    temps = [_temp_dir(n) for n in nodes]
    assert len(set(temps)) == 2
    assert _worker_logs_naming(temps[0], first["pid"]) and not _worker_logs_naming(temps[1], first["pid"])
    assert _worker_logs_naming(temps[1], second["pid"]) and not _worker_logs_naming(temps[0], second["pid"])

    # A hardware fault: every process of node 1 dies at once.
    survivor, victim = nodes
    for pid in procs.session_members(victim.pid, _start_time(victim)):
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: prov.lost_nodes() == [victim.name], 90, f"Ray to drop {victim.name}")
    with pytest.raises(NodesNotReady, match=f"only 1 of 2 nodes joined.*not joined: {victim.name}"):
        prov.wait_for_nodes(2, timeout_s=1)
    t_lost = time.monotonic() - t0

    replaced = {n.name: n for n in prov.replace(victim.name)}
    sessions.append((replaced[victim.name].pid, _start_time(replaced[victim.name])))
    assert replaced[victim.name].instance_id != victim.instance_id
    temps.append(_temp_dir(replaced[victim.name]))
    assert temps[2] not in temps[:2]                             # a new incarnation, a new dir
    assert replaced[survivor.name] == survivor   # same incarnation, same process
    assert procs.alive(survivor.pid)
    live = prov.wait_for_nodes(2, timeout_s=120)
    assert live[victim.name].instance_id == replaced[victim.name].instance_id
    assert live[survivor.name].node_id == probe[survivor.name]["node_id"]
    t_replaced = time.monotonic() - t0

    # The head can be found again; a head this platform did not start is never stopped.
    again = LocalHead(port=head.port, dashboard_port=head.dashboard_port,
                      state_dir=head.state_dir).start(timeout_s=30)
    assert again.owned
    foreign = LocalHead(port=head.port, dashboard_port=head.dashboard_port,
                        state_dir=head.state_dir + "-other").start(timeout_s=30)
    assert not foreign.owned
    foreign.stop()
    assert again.owned_pid() is not None

    prov.destroy()
    assert prov.nodes() == []
    assert not any(os.path.exists(t) for t in temps)        # each node's temp dir went with it
    for pid, started in sessions:
        assert procs.session_members(pid, started) == [], f"node session {pid} left processes"
    ours = lambda: [r for r in fetch_ray_nodes(head.address)   # noqa: E731
                    if r["alive"] and r["labels"].get(NODE_LABEL, "").startswith(prov.job_name)]
    wait_for(lambda: not ours(), 60, "Ray to see every node gone")
    assert all(r["labels"].get(INSTANCE_LABEL) is None
               for r in fetch_ray_nodes(head.address) if r["alive"])   # only the head is left
    print(f"\nup+join {t_up:.1f}s, lost detected at {t_lost:.1f}s, replaced+joined at "
          f"{t_replaced:.1f}s, destroyed at {time.monotonic() - t0:.1f}s")
