"""End to end: `python -m platform.submit conf/local_tiny.yaml` on this machine, for real.

Each test runs the real controller in a subprocess: a Ray head, two Ray
worker nodes from Terraform's infra/local, Ray Train + DeepSpeed workers,
MLflow on SQLite, checkpoints on disk or on a local S3 server.
"""

from __future__ import annotations

import os
import signal

import psutil
import pytest

from _e2e import TINY, Job, unigram_entropy, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]


def _cluster_processes(job: Job) -> list[str]:
    port = job.ports[0].split("=")[1]
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            cmd = " ".join(proc.info["cmdline"] or [])
            if f"127.0.0.1:{port}" in cmd or f"dbrx-ray-{os.getuid()}-{port}" in cmd:
                found.append(f"{proc.pid} {cmd[:120]}")
        except psutil.NoSuchProcess:
            continue
    return found


def test_local_tiny_learns_and_leaves_nothing_running(tmp_path):
    job = Job(tmp_path / "home", name="local-tiny")
    rc = job.run(timeout=2000)
    out = job.output()
    assert rc == 0, out[-5000:]
    assert "dashboard: http://127.0.0.1:" in out and "MLflow" in out
    eval_loss = job.metric("eval_loss")
    final = eval_loss[max(eval_loss)]
    entropy = unigram_entropy(job.home)
    # Well below: at least 0.4 nats under the unigram entropy (a third lower perplexity
    # than the best model that ignores context). Measured here: 6.27 vs 6.88.
    assert final < entropy - 0.4, (final, entropy)
    # every step logged its loss, throughput, MFU and world size; expert load per layer
    for key in ("loss", "lm_loss", "lb_loss", "lr", "grad_norm", "tokens_per_s", "mfu",
                "world_size", "expert_load/layer00/e00"):
        assert len(job.metric(key)) >= 150, key
    assert set(job.metric("world_size").values()) == {2.0}
    artifacts = {a.path for a in job.mlflow().list_artifacts(job.run_info().info.run_id)}
    assert {"config.yaml", "plan.json", "expert_load"} <= artifacts
    # both Terraform nodes and the head are gone
    assert wait_for(lambda: not _cluster_processes(job), 60, "the cluster to stop")
    assert job.run_info().info.status == "FINISHED"
    assert "registered dbrx-tiny version 1 from step 157" in out   # promote.auto on the tiny job


SHORT = ["cluster.min_nodes=2", "train.total_tokens=24576", "checkpoint.every_steps=4",
         "train.eval_every_steps=1000", "promote.auto=false"]     # 12 steps on 2 workers


def _s3_env(monkeypatch, endpoint: str) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)


def test_kill9_worker_resumes_with_identical_losses_on_s3(tmp_path, s3_endpoint, s3_bucket, monkeypatch):
    reference = Job(tmp_path / "ref", *SHORT)
    assert reference.run(timeout=900) == 0, reference.output()[-4000:]
    expected = reference.metric("loss")
    assert sorted(expected) == list(range(1, 13))

    _s3_env(monkeypatch, s3_endpoint)
    job = Job(tmp_path / "s3", *SHORT, f"checkpoint.uri=s3://{s3_bucket}/ckpt",
              f"checkpoint.s3_endpoint_url={s3_endpoint}").start()
    wait_for(lambda: job.proc.poll() is None and max(job.metric("loss") or {0: 0}) >= 6, 600,
             "step 6 (after the checkpoint at step 4)")
    pids = job.worker_pids()
    assert len(pids) == 2, pids
    os.kill(pids[1], signal.SIGKILL)
    assert job.wait(900) == 0, job.output()[-4000:]

    got = job.metric("loss")
    assert sorted(got) == list(range(1, 13))
    for step in range(1, 13):
        assert abs(got[step] - expected[step]) / abs(expected[step]) < 1e-5, (step, got, expected)
    # Ray Train restarted the workers once and the run records why
    assert job.metric("events.restart") and max(job.metric("events.restart").values()) == 1
    tags = job.run_info().data.tags
    restart = [v for k, v in tags.items() if k.startswith("event.") and k.endswith(".restart")]
    assert restart and "rank" in restart[0]
    assert min(job.metric("resumed_step").values()) == 4
    from platform.checkpoint import CheckpointStore

    store = CheckpointStore(f"s3://{s3_bucket}/ckpt/e2e", endpoint_url=s3_endpoint)
    assert store.list_committed()[-1] == 12


def _provisioner(job: Job, monkeypatch):
    from platform.config import load_job
    from platform.provision.nodes import Provisioner

    monkeypatch.setenv("DBRX_PLATFORM_HOME", str(job.home))
    cfg = load_job(TINY, job.overrides)
    return Provisioner.for_job(cfg, f"127.0.0.1:{cfg.cluster.head_port}")


def _kill_node(node) -> None:
    from platform.provision import procs

    leader_start = procs.start_time(node.pid)
    for pid in procs.session_members(node.pid, leader_start):
        os.kill(pid, signal.SIGKILL)


LONGER = ["train.total_tokens=61440", "checkpoint.every_steps=5", "train.eval_every_steps=1000",
          "promote.auto=false"]                                  # 30 steps


def test_lost_node_is_replaced_and_the_run_grows_back(tmp_path, monkeypatch):
    boot = tmp_path / "boot-delay"
    job = Job(tmp_path / "home", *LONGER,
              f"cluster.terraform_vars={{boot_delay_file: '{boot}'}}").start()
    wait_for(lambda: max(job.metric("loss") or {0: 0}) >= 7, 600, "step 7")
    boot.write_text("45")                                      # a replacement takes a while to boot
    prov = _provisioner(job, monkeypatch)
    victim = next(n for n in prov.nodes() if n.name.endswith("-node-1"))
    _kill_node(victim)
    assert job.wait(1200) == 0, job.output()[-4000:]

    losses = job.metric("loss")
    assert sorted(losses) == list(range(1, 31))               # no step lost
    assert job.history("world_size")[-1] == 2.0                # back to 2 workers at the end
    for event in ("restart", "node_lost", "node_replaced"):
        assert job.metric(f"events.{event}"), event
    assert "capacity was short" not in job.output()


def test_no_capacity_for_a_replacement_finishes_on_one_worker(tmp_path, monkeypatch):
    exhausted = tmp_path / "no-capacity"
    job = Job(tmp_path / "home", *LONGER,
              f"cluster.terraform_vars={{capacity_exhausted_file: '{exhausted}'}}").start()
    wait_for(lambda: max(job.metric("loss") or {0: 0}) >= 7, 600, "step 7")
    exhausted.touch()                                          # capacity dries up
    prov = _provisioner(job, monkeypatch)
    _kill_node(next(n for n in prov.nodes() if n.name.endswith("-node-1")))
    assert job.wait(1200) == 0, job.output()[-4000:]
    out = job.output()
    assert "capacity was short" in out and "InsufficientInstanceCapacity" in out
    sizes = job.metric("world_size")
    assert sizes[max(sizes)] == 1.0
    assert sorted(job.metric("loss")) == list(range(1, 31))
    assert job.metric("events.capacity_short")


def test_killed_controller_resubmits_and_spot_notice_checkpoints_within_a_step(tmp_path, monkeypatch):
    from platform.provision.preemption import deliver_notice

    job = Job(tmp_path / "home", *LONGER, "checkpoint.every_steps=100").start()
    wait_for(lambda: max(job.metric("loss") or {0: 0}) >= 4, 600, "step 4")
    prov = _provisioner(job, monkeypatch)
    node = prov.nodes()[0]
    noticed_at = max(job.metric("loss"))
    deliver_notice(node.node_dir)                               # a simulated spot notice
    wait_for(job.committed_steps, 120, "the preemption checkpoint")
    assert job.committed_steps()[0] <= noticed_at + 2           # within one step of the notice
    wait_for(lambda: job.metric("events.preemption_checkpoint"), 120, "the preemption event in MLflow")

    os.killpg(job.proc.pid, signal.SIGKILL)                     # the controller dies
    job.proc.wait()
    latest = job.committed_steps()[-1]
    resumed = Job(job.home, name=job.name)
    resumed.ports, resumed.overrides = job.ports, job.overrides   # the same job, resubmitted
    assert resumed.run(timeout=1200) == 0, resumed.output()[-4000:]
    assert latest in resumed.metric("resumed_step").values()
    assert sorted(resumed.metric("loss")) == list(range(1, 31))
    assert resumed.run_info().info.run_id == job.run_info().info.run_id
