"""End to end, faults: `python -m platform.submit conf/local_tiny.yaml` on this machine, for real.

Each test runs the real controller in a subprocess: a Ray head, two Ray
worker nodes from Terraform's infra/local, Ray Train + DeepSpeed workers,
MLflow on SQLite, checkpoints on disk or on a local S3 server.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time

import psutil
import pytest

from _e2e import TINY, Job, wait_for
from _mlflow_server import Gate, MlflowServer, free_port
from platform.checkpoint.manifest import step_dir

# The README's test command runs two pytest workers and hands out whole files (--dist
# loadfile), the end-to-end files first (tests/conftest.py): these fault jobs, which spend much
# of their time waiting (restarts, node boots), run one after the other on one worker while
# the other runs the CPU-bound local_tiny job (tests/test_e2e_local_tiny.py), then the rest.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]


# A quarter of local_tiny's tokens per step (8 sequences of 64: one micro batch per worker at
# world size 2): these jobs test what happens around the steps, not what the steps learn, and
# the suite is bound by compute.
SMALL = ["train.global_batch_size=8", "train.seq_len=64", "train.eval_every_steps=1000",
         "promote.auto=false"]
# The fault tour also halves the model's width (half the compute and checkpoint bytes per step;
# its faults do not depend on what is learnt). Its windows are set by checkpoints, not by speed.
FAULTS = ["cluster.min_nodes=2", "train.total_tokens=24576", "checkpoint.every_steps=3",
          "model.d_model=64", *SMALL]                            # 48 steps of 512 tokens
# The detached job resumes near the middle and must still be training when it is stopped, about
# ten seconds later: steps of this model take under half a second on an idle machine.
LAST = 48


def events(job: Job, name: str) -> list[dict]:
    tags = job.run_info().data.tags
    return [json.loads(v) for k, v in sorted(tags.items())
            if k.startswith("event.") and k.endswith(f".{name}")]


def _train_controller_pid(job: Job) -> int:
    """The job's Ray Train controller actor process (on the head, found by the job's state dir)."""
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if ("TrainController" in " ".join(proc.info["cmdline"] or [])
                    and proc.environ().get("DBRX_PLATFORM_HOME") == str(job.home)):
                return proc.pid
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return 0


def _trained(job: Job) -> int:
    """The last step the job's progress bar shows (live; MLflow may still be catching up)."""
    return max(map(int, re.findall(rf"(\d+)/{LAST} \[", job.output())), default=0)


def test_one_job_survives_every_fault_on_s3_and_every_replayed_step_has_the_same_loss(
        tmp_path, s3_endpoint, s3_bucket, monkeypatch):
    """Independent faults, one after another, in one job (checkpoints on S3, MLflow on a
    server): an MLflow outage, a spot notice, every worker killed mid-save, the Ray Train
    controller killed and the checkpoint its restart would resume from corrupted meanwhile (the
    restart must skip it), the submitting process killed, a detached resubmission stopped, a
    final resubmission. Each resume re-trains the steps after its checkpoint; resume is exact
    when every re-trained step logs the loss it logged the first time (fp32 on CPU), so the run
    is its own reference."""
    from platform.checkpoint import CheckpointStore
    from platform.provision.head import LocalHead
    from platform.provision.preemption import deliver_notice

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint)
    (tmp_path / "mlflow").mkdir()
    server = MlflowServer(tmp_path / "mlflow", free_port())
    server.start()
    mlflow = Gate(server.port).open()         # the job's way to MLflow, cut for the outage
    ckpt = [f"checkpoint.uri=s3://{s3_bucket}/ckpt", f"checkpoint.s3_endpoint_url={s3_endpoint}"]
    # Retries at most 2 s apart: the tour waits for what was buffered during the outage before
    # it kills workers, and the job trains on meanwhile (at the default 30 s cap, up to 15 steps).
    job = Job(tmp_path / "home", *FAULTS, *ckpt, "tracking.max_retry_s=2", tracking_uri=mlflow.url)
    store = CheckpointStore(f"s3://{s3_bucket}/ckpt/{job.name}", endpoint_url=s3_endpoint)
    committed = store.list_committed
    try:
        # 1. MLflow stops answering after the first logged step and is back once the job has
        #    noticed and saved a checkpoint meanwhile (steps logged before the cut may already
        #    be past a checkpoint: the outage is timed by what the job sees, not by a step).
        job.start()
        wait_for(lambda: job.proc.poll() is None and job.metric("loss"), 600, "the first logged step")
        mlflow.close()
        wait_for(lambda: job.proc.poll() is not None or "is unreachable" in job.output(), 300,
                 "the job to notice MLflow is down")
        down = max(committed(), default=0)
        wait_for(lambda: job.proc.poll() is not None or max(committed(), default=0) > down, 300,
                 "a checkpoint while MLflow is down")
        mlflow.open()

        # 2. A spot notice: a checkpoint within a step of it (checked at the end, against the
        #    steps MLflow has logged before the notice's time).
        node = _provisioner(job, monkeypatch).nodes()[0]
        noticed_ms = time.time() * 1000
        deliver_notice(node.node_dir)
        saved = max(committed())
        wait_for(lambda: [s for s in committed() if s > saved], 120, "the preemption checkpoint")
        preempt_saved = min(s for s in committed() if s > saved)
        wait_for(lambda: job.metric("events.preemption_checkpoint"), 120, "the outage's metrics")

        # 3. Every worker dies while a checkpoint (step k) is being written: it never becomes
        #    visible. k: a scheduled one at least four steps past the progress bar (which may
        #    lag the workers by a second).
        k = (_trained(job) // 3 + 3) * 3
        pids = job.worker_pids()
        assert len(pids) == 2, pids
        wait_for(lambda: list(store.staging_root.glob(f"{step_dir(k)}-*")), 300,
                 f"the checkpoint of step {k} to be staged", poll=0.01)
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        assert k not in committed()

        # 4. After the restart, the Ray Train controller dies as soon as step k is committed,
        #    and step k is corrupted while the job restarts its run by itself (seconds: new
        #    worker processes): that resume skips step k.
        controller = wait_for(lambda: _train_controller_pid(job), 600, "the TrainController")
        wait_for(lambda: job.proc.poll() is None and k in committed(), 600, f"step {k} after the restart",
                 poll=0.1)
        os.kill(controller, signal.SIGKILL)
        assert k + 3 not in committed()
        before_k = max(s for s in committed() if s < k)
        shard = min((key for key in store.root.list(f"{step_dir(k)}/") if key.endswith(".safetensors")),
                    key=store.root.size)
        data = bytearray(store.root.read_bytes(shard))
        data[len(data) // 2] ^= 0xFF                                 # one flipped byte mid-file
        store.root.write_bytes(shard, bytes(data))

        # 5. The submitting process dies; the job is resubmitted detached, then stopped.
        wait_for(lambda: job.proc.poll() is None and k + 3 in committed(), 600,
                 f"step {k + 3} after the job's restart")
        os.killpg(job.proc.pid, signal.SIGKILL)
        job.proc.wait()
        latest = committed()[-1]
        assert LAST - latest >= 24, f"step {latest} leaves the detached job too few steps to be stopped in"
        detached = _cli(job, "submit", str(TINY), *job.overrides, "--detach", timeout=300)
        job_id = re.search(r"submitted job (\S+)", detached).group(1)
        wait_for(lambda: _cli(job, "status", job_id).strip() in ("RUNNING", "FAILED", "SUCCEEDED"),
                 120, "the detached job to start", poll=2)    # each look is a CLI process
        assert _cli(job, "status", job_id).strip() == "RUNNING"
        wait_for(lambda: job.metric("resumed_step").get(latest), 600,
                 f"the detached job to resume at step {latest}", poll=1)
        assert _cli(job, "stop", job_id).strip() == "stop requested"    # at once: it trains on
        wait_for(lambda: _cli(job, "status", job_id).strip() == "STOPPED", 180, "the job to stop", poll=2)
        logs = _cli(job, "logs", job_id)
        assert "Plan for job 'e2e'" in logs and "node(s) joined the Ray cluster" in logs
        assert "stop requested (SIGTERM): tearing the job down" in logs
        assert wait_for(lambda: not _node_processes(job), 60, "the stopped job's nodes to go")
        assert job.run_info().info.status == "KILLED"

        # 6. Submitted once more, it finishes in the same MLflow run.
        run_id = job.run_info().info.run_id
        final = Job(job.home, name=job.name, tracking_uri=mlflow.url)
        final.ports, final.overrides = job.ports, job.overrides
        assert final.run(timeout=1200) == 0, final.output()[-4000:]

        losses = final.losses()
        assert sorted(losses) == list(range(1, LAST + 1))
        replayed = {s: v for s, v in losses.items() if len(v) > 1}
        assert set(range(before_k + 1, k + 1)) <= set(replayed), losses    # re-trained after k's faults
        for step, values in losses.items():
            assert max(values) - min(values) <= 1e-5 * abs(values[0]), (step, values)
        for key in ("lm_loss", "grad_norm", "tokens_per_s", "world_size", "expert_load/layer03/cv"):
            assert set(range(1, LAST + 1)) <= set(final.metric(key)), key    # none lost to the outage
        assert final.run_info().info.run_id == run_id and final.run_info().info.status == "FINISHED"
        assert committed()[-1] == LAST

        out = job.output()
        assert "is unreachable" in out and "is reachable again" in out
        assert "skipped (" in out
        fallback = events(final, "checkpoint_fallback")
        assert [(e["skipped_step"], e["used_step"]) for e in fallback] == [(k, before_k)], fallback
        assert "sha256" in fallback[0]["reason"], fallback
        assert max(final.metric("events.restart").values()) >= 1     # Ray Train restarted workers
        assert "rank" in events(final, "restart")[0]["cause"]
        restart = events(final, "job_restart")
        assert len(restart) == 1 and "actor died" in restart[0]["cause"], restart
        assert "job restart 1 of 3" in out
        assert float(latest) in final.metric("resumed_step").values()
        before_notice = max((m.step for m in final.points("loss") if m.timestamp <= noticed_ms), default=0)
        assert preempt_saved <= before_notice + 2, (preempt_saved, before_notice)   # within a step
        assert not [p for p in store.staging_root.glob("*")]         # crashed writes cleaned up

        # 7. Submitted again once finished: nothing is provisioned, the same last line.
        last = re.search(rf"^job e2e: finished at step {LAST} on 2 worker\(s\), eval loss \S+$",
                         final.output(), re.M).group(0)
        again = Job(job.home, name=job.name, tracking_uri=mlflow.url)
        again.ports, again.overrides = job.ports, job.overrides
        assert again.run(timeout=300) == 0, again.output()[-4000:]
        out = again.output()
        assert f"has already trained all {LAST} steps" in out and "nothing to train" in out
        assert "provisioning" not in out and "Ray cluster" not in out
        assert out.rstrip().endswith(last)
    finally:
        if job.proc is not None and job.proc.poll() is None:
            os.killpg(job.proc.pid, signal.SIGKILL)
        port = int(job.ports[0].split("=")[1])
        LocalHead(port=port, state_dir=str(job.home / f"ray-head-{port}")).stop()
        mlflow.close()
        server.stop()


def _provisioner(job: Job, monkeypatch):
    from platform.config import load_job
    from platform.provision.nodes import Provisioner

    monkeypatch.setenv("DBRX_PLATFORM_HOME", str(job.home))
    cfg = load_job(TINY, job.overrides)
    return Provisioner.for_job(cfg, f"127.0.0.1:{cfg.cluster.head_port}")


def _kill_node(prov, suffix: str = "-node-1"):
    """Every process of one local node dies at once (a hardware fault); returns the node."""
    from platform.provision import procs

    node = next(n for n in prov.nodes() if n.name.endswith(suffix))
    leader_start = procs.start_time(node.pid)
    for pid in procs.session_members(node.pid, leader_start):
        os.kill(pid, signal.SIGKILL)
    return node


def _runs(values: list[float]) -> list[float]:
    """Consecutive distinct values: [2, 2, 1, 1, 2] -> [2, 1, 2]."""
    return [v for i, v in enumerate(values) if i == 0 or v != values[i - 1]]


LONGER = ["train.total_tokens=15360", "checkpoint.every_steps=4",
          *SMALL]                                                # 30 steps: room to grow back and shrink again


def test_lost_nodes_are_replaced_the_run_shrinks_meanwhile_and_finishes_when_capacity_runs_out(
        tmp_path, monkeypatch):
    hold, exhausted = tmp_path / "boot-hold", tmp_path / "no-capacity"
    job = Job(tmp_path / "home", *LONGER, "cluster.terraform_vars={boot_hold_file: '%s', "
              "capacity_exhausted_file: '%s', start_timeout_s: '900'}" % (hold, exhausted)).start()
    # A node lost while a save is in flight loses that save (by design); the test wants a
    # resume point, so it waits for the first commit.
    wait_for(lambda: job.proc.poll() is None and job.committed_steps(), 600, "the step-4 checkpoint")
    prov = _provisioner(job, monkeypatch)
    hold.touch()                                               # the replacement's boot waits
    first = _kill_node(prov)
    # The run goes on with the survivor while Terraform replaces the node: two steps on one
    # worker, then the replacement finishes booting and the run grows back.
    wait_for(lambda: job.proc.poll() is None and job.history("world_size").count(1.0) >= 2, 600,
             "two steps on the surviving worker")
    hold.unlink()
    wait_for(lambda: _runs(job.history("world_size"))[-3:] == [2.0, 1.0, 2.0], 600,
             "the run to grow back to 2 workers")
    replaced = next(n for n in prov.nodes() if n.name == first.name)
    assert replaced.instance_id != first.instance_id
    grown_at = max(job.metric("loss"))
    assert grown_at < 30, "the run finished before it grew back"

    exhausted.touch()                                          # capacity dries up
    _kill_node(prov)
    assert job.wait(1200) == 0, job.output()[-4000:]
    assert sorted(job.metric("loss")) == list(range(1, 31))     # no step lost
    assert _runs(job.history("world_size"))[-4:] == [2.0, 1.0, 2.0, 1.0]
    for event in ("restart", "node_lost", "node_replaced", "world_size_change", "capacity_short"):
        assert job.metric(f"events.{event}"), event
    assert max(job.metric("events.node_lost").values()) == 2
    out = job.output()
    assert "capacity was short" in out and "InsufficientInstanceCapacity" in out
    assert "finished at step 30 on 1 worker" in out


def _cli(job: Job, command: str, *args: str, timeout: float = 120) -> str:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", f"platform.{command}", *args], env=job.env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout


def _node_processes(job: Job) -> list[str]:
    """Processes of the job's Terraform-started Ray nodes still running (by their node dir)."""
    found = []
    for proc in psutil.process_iter(["pid", "status"]):
        try:
            if (proc.info["status"] != psutil.STATUS_ZOMBIE
                    and proc.environ().get("DBRX_NODE_DIR", "").startswith(str(job.home))):
                found.append(f"{proc.pid} {' '.join(proc.cmdline())[:100]}")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found
