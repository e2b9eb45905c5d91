"""The serving memory plan (`python -m platform.serve JOB --dry-run`) and serve.devices_per_replica checks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from platform.config import ConfigError, load_job
from platform.serving.launch import deployment_options
from platform.serving.memory import GB, fit_problem, serve_memory

REPO = Path(__file__).resolve().parents[1]
BIG = REPO / "conf" / "pretrain_132b.yaml"       # 8 x H100 80GB nodes
# The whole batch's KV cache is on every device: 16 sequences of the full 32k context alone take
# 80 GB, so the accepted layout (the job file's own serving settings) serves 8k positions per request.
EIGHT_INT8 = ["serve.weights=int8", "serve.devices_per_replica=8", "serve.max_context_tokens=8192"]
ONE_INT8 = ["serve.weights=int8", "serve.devices_per_replica=1", "serve.max_context_tokens=8192"]


def dry_run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "platform.serve", str(BIG), *args, "--dry-run"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def test_the_132b_model_is_refused_on_one_device_and_fits_on_eight_with_int8():
    one = dry_run(*ONE_INT8)
    assert one.returncode == 2, one.stderr
    assert "per GPU" in one.stdout and "1/1 of the experts" in one.stdout and "DOES NOT FIT" in one.stdout
    assert "serve.devices_per_replica" in one.stderr and "cluster.gpu_memory_gb allows 80.0 GB" in one.stderr
    eight = dry_run()                                           # the job file's serving settings
    assert eight.returncode == 0, eight.stderr
    assert "1/8 of the experts" in eight.stdout and "int8 weights" in eight.stdout and "fits" in eight.stdout


def test_the_plan_splits_only_the_experts_and_counts_8bit_weights_as_bytes():
    one = serve_memory(load_job(BIG, ONE_INT8))
    eight = serve_memory(load_job(BIG, EIGHT_INT8))
    bf16 = serve_memory(load_job(BIG, ["serve.weights=bf16", "serve.devices_per_replica=8",
                                       "serve.max_context_tokens=8192"]))
    assert one.dense_bytes == eight.dense_bytes and one.kv_bytes == eight.kv_bytes
    assert abs(one.expert_bytes / eight.expert_bytes - 8) < 1e-6
    # 132B parameters, ~126B of them experts: ~1 byte each in int8 (+ scales), 2 in bf16.
    assert 117 < one.expert_bytes / GB < 119 and 1.9 < bf16.expert_bytes / eight.expert_bytes < 2.0
    # KV: 16 slots x 8192 positions x 40 layers x 8 KV heads x 128 x (K and V) x bf16.
    assert eight.kv_bytes == 16 * 8192 * 40 * 8 * 128 * 2 * 2
    assert not one.fits and eight.fits and fit_problem(eight, load_job(BIG, EIGHT_INT8)) is None


def test_a_kv_cache_too_large_names_the_serving_keys_to_lower():
    cfg = load_job(BIG, ["serve.weights=int8", "serve.devices_per_replica=8",
                         "serve.max_context_tokens=0"])                      # 32k context x 16
    problem = fit_problem(serve_memory(cfg), cfg)
    assert problem and "serve.max_concurrent_sequences" in problem and "serve.max_context_tokens" in problem


def test_cpu_replicas_share_their_node_memory():
    cfg = load_job(REPO / "conf" / "local_tiny.yaml", ["serve.devices_per_replica=4", "cluster.node_memory_mb=256"])
    mem = serve_memory(cfg)
    assert not mem.gpu and mem.limit_key == "cluster.node_memory_mb"
    assert mem.per_device_bytes / GB < mem.limit_gb < mem.need_gb       # one process fits, four do not
    assert mem.need_gb == pytest.approx(4 * mem.per_device_bytes / GB)
    assert "cluster.node_memory_mb" in fit_problem(mem, cfg)


@pytest.mark.parametrize("value,fragment", [("0", "serve.devices_per_replica"), ("3", "does not divide"),
                                            ("32", "does not divide")])
def test_a_bad_devices_per_replica_is_refused_naming_the_key(value, fragment):
    with pytest.raises(ConfigError) as info:
        load_job(REPO / "conf" / "local_tiny.yaml", [f"serve.devices_per_replica={value}"])
    problems = [p for p in info.value.problems if p.path == "serve.devices_per_replica"]
    assert problems and any(fragment in f"{p.path} {p.message}" for p in problems), str(info.value)


def test_a_replica_over_several_gpus_gets_one_bundle_per_device_on_one_node():
    cfg = load_job(BIG, ["serve.devices_per_replica=8", "serve.replica_gpus=1", "serve.replica_cpus=2"])
    options = deployment_options(cfg.serve)
    assert options["placement_group_bundles"] == [{"CPU": 2, "GPU": 1}] * 8
    assert options["placement_group_strategy"] == "STRICT_PACK"
    assert options["ray_actor_options"] == {"num_cpus": 2, "num_gpus": 1}
    with pytest.raises(ConfigError, match="gpus_per_node"):
        load_job(BIG, ["serve.devices_per_replica=16", "serve.replica_gpus=1"])
    assert "placement_group_bundles" not in deployment_options(load_job(BIG, ONE_INT8).serve)
