"""End to end: the README's main job, `python -m platform.submit conf/local_tiny.yaml`, as a user runs it.

A Ray head, two Ray worker nodes from Terraform's infra/local, Ray Train +
DeepSpeed workers, MLflow on SQLite, checkpoints on disk, the promotion at the
end; the job learns and leaves nothing running. Its own file, so that the
README's test command runs it on one pytest worker while the fault jobs
(tests/test_e2e_train.py) run on the other (both first: tests/conftest.py).
"""

from __future__ import annotations

import os

import psutil
import pytest

from _e2e import Job, unigram_entropy, wait_for

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
    # The product's bound is 15 minutes alone on 2 cores (6.4-8.5 measured); the test allows 30,
    # as the fault jobs run beside it on the other pytest worker and a 2-core machine's speed
    # varies (18 minutes of training beside them on a slow day, 11-13 on a usual one).
    rc = job.run(timeout=1800)
    out = job.output()
    assert rc == 0, out[-5000:]
    assert "dashboard: http://127.0.0.1:" in out and "MLflow" in out
    eval_loss = job.metric("eval_loss")
    final = eval_loss[max(eval_loss)]
    entropy = unigram_entropy(job.home)
    # Well below: at least 0.4 nats under the unigram entropy (a third lower perplexity
    # than the best model that ignores context). Measured here: 6.27 vs 6.88.
    assert final < entropy - 0.4, (final, entropy)
    assert f"finished at step 157 on 2 worker(s), eval loss {final:.4f}" in out   # said at the end
    # every step logged its loss, throughput, MFU, world size, where its time went, and two
    # expert-load summaries per layer; the run page stays readable at DBRX's 40 layers
    for key in ("loss", "lm_loss", "lb_loss", "lr", "grad_norm", "tokens_per_s", "mfu",
                "world_size", "time/data_wait_s", "time/fwd_bwd_s", "time/optimizer_s",
                "expert_load/layer00/max_over_uniform", "expert_load/layer03/cv"):
        assert len(job.metric(key)) >= 150, key
    assert set(job.metric("world_size").values()) == {2.0}
    run = job.run_info()
    keys = set(run.data.metrics)
    assert len(keys) <= 2 * 4 + 30, sorted(keys)                  # 4 layers in dbrx_tiny
    assert not [k for k in keys if k.startswith("expert_load/") and "/e0" in k]
    experiment = job.mlflow().get_experiment(run.info.experiment_id)
    assert experiment.tags.get("mlflow.experimentKind") == "custom_model_development"
    artifacts = {a.path for a in job.mlflow().list_artifacts(run.info.run_id)}
    assert {"config.yaml", "plan.json", "expert_load"} <= artifacts
    per_expert = {a.path for a in job.mlflow().list_artifacts(run.info.run_id, "expert_load")}
    assert any(p.endswith(".parquet") for p in per_expert) and any(p.endswith(".png") for p in per_expert)
    # both Terraform nodes and the head are gone
    assert wait_for(lambda: not _cluster_processes(job), 60, "the cluster to stop")
    assert job.run_info().info.status == "FINISHED"
    assert "registered dbrx-tiny version 1 from step 157" in out   # promote.auto on the tiny job
