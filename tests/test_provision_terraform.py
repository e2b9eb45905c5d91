"""The Terraform driver against real Terraform runs (no Ray): errors, retries, locks, timeouts.

Each test writes a tiny module of built-in resources, so everything runs
offline in a second or two; the AWS module appears only where the point is
that its provider cannot be installed here.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from platform.provision import (
    CapacityError, LockError, ProvisionError, Provisioner, RetryPolicy, Terraform, classify,
)
from platform.provision import procs
from platform.provision.errors import CAPACITY, LOCKED, PERMANENT, TIMEOUT, TRANSIENT

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("terraform") is None,
                                reason="terraform is not on the PATH")
FAST = RetryPolicy(transient_attempts=3, capacity_attempts=1, backoff_s=0.1, max_backoff_s=0.2)


def _module(path: Path, body: str) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "main.tf").write_text(textwrap.dedent(body))
    return path


def test_classify_sorts_real_terraform_error_texts():
    assert classify("Error: creating EC2 Instance: InsufficientInstanceCapacity: We currently do "
                    "not have sufficient p5.48xlarge capacity in the Availability Zone") == CAPACITY
    assert classify("api error VcpuLimitExceeded: You have requested more vCPU capacity") == CAPACITY
    assert classify("operation error EC2: RunInstances, https response error StatusCode: 503, "
                    "api error RequestLimitExceeded: Request limit exceeded.") == TRANSIENT
    assert classify("read tcp 10.0.0.2:443: read: connection reset by peer") == TRANSIENT
    assert classify('Error: Error acquiring the state lock\n\nLock Info: ID: 1') == LOCKED
    assert classify("Error: Reference to undeclared input variable") == PERMANENT


def test_broken_module_raises_terraforms_own_error_text(tmp_path):
    module = _module(tmp_path / "broken", """
        resource "terraform_data" "x" {
          input = var.missing
        }
    """)
    tf = Terraform(module, tmp_path / "work", retry=FAST)
    with pytest.raises(ProvisionError) as info:
        tf.apply({})
    message = str(info.value)
    assert "terraform" in message and "failed" in message
    assert "Error: Reference to undeclared input variable" in message
    assert 'An input variable with the name "missing" has not been declared' in message
    assert "Traceback" not in message and info.value.kind == PERMANENT
    assert Path(info.value.log_path).is_file()


def test_transient_failure_is_retried_until_it_succeeds(tmp_path, caplog):
    # Fails once with a dropped connection, then works: the driver must try again.
    marker = tmp_path / "tried-once"
    fail_once = f"test -e {marker} || {{ touch {marker}; echo 'read: connection reset by peer' >&2; exit 1; }}"
    module = _module(tmp_path / "flaky", f"""
        resource "terraform_data" "x" {{
          provisioner "local-exec" {{
            command = "{fail_once}"
          }}
        }}
        output "ok" {{
          value = terraform_data.x.id
        }}
    """)
    tf = Terraform(module, tmp_path / "work", retry=FAST)
    with caplog.at_level(logging.WARNING, logger="platform.provision.terraform"):
        outputs = tf.apply({})
    assert outputs["ok"]
    assert marker.exists()
    assert any("transient, attempt 1 of 3" in r.getMessage() for r in caplog.records)


def test_capacity_failure_raises_capacity_error_after_bounded_attempts(tmp_path):
    count = tmp_path / "attempts"
    no_capacity = (f"echo x >> {count}; "
                   "echo 'InsufficientInstanceCapacity: no p5.48xlarge in us-east-1a' >&2; exit 1")
    module = _module(tmp_path / "full", f"""
        resource "terraform_data" "x" {{
          provisioner "local-exec" {{
            command = "{no_capacity}"
          }}
        }}
    """)
    policy = RetryPolicy(transient_attempts=5, capacity_attempts=2, backoff_s=0.1, max_backoff_s=0.1)
    with pytest.raises(CapacityError) as info:
        Terraform(module, tmp_path / "work", retry=policy).apply({})
    assert len(count.read_text().split()) == 2   # tried twice, not forever
    assert "after 2 attempts" in str(info.value)
    assert "InsufficientInstanceCapacity: no p5.48xlarge in us-east-1a" in str(info.value)


def test_operation_timeout_interrupts_terraform(tmp_path):
    module = _module(tmp_path / "slow", """
        resource "terraform_data" "x" {
          provisioner "local-exec" {
            command = "sleep 61.5"
          }
        }
    """)
    tf = Terraform(module, tmp_path / "work", retry=FAST, timeout_s=4)
    tf.init()
    started = time.monotonic()
    with pytest.raises(ProvisionError) as info:
        tf.apply({})
    assert info.value.kind == TIMEOUT and "timed out after 4s" in str(info.value)
    assert time.monotonic() - started < 40
    assert _running(f"-chdir={tf.workdir}") == [], "terraform still running after the timeout"
    assert _running("sleep 61.5") == [], "the provisioner's command still running"


def _running(fragment: str) -> list[int]:
    """Live processes whose command line contains `fragment`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and procs.alive(int(entry.name)):
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if fragment in cmdline:
                found.append(int(entry.name))
    return found


_HOLD_LOCK = """
import sys, time
from platform.provision import Terraform
tf = Terraform(sys.argv[1], sys.argv[2])
with tf.locked("apply"):
    print("locked", flush=True)
    time.sleep(float(sys.argv[3]))
"""


def test_second_controller_cannot_apply_a_locked_state(tmp_path):
    module = _module(tmp_path / "m", 'resource "terraform_data" "x" {}\n')
    work = tmp_path / "work"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(module), str(work), "30"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        tf = Terraform(module, work, lock_wait_s=1.0, retry=FAST)
        started = time.monotonic()
        with pytest.raises(LockError) as info:
            tf.apply({})
        waited = time.monotonic() - started
        message = str(info.value)
        assert f"pid {holder.pid}" in message and "running 'apply'" in message
        assert "locked by another controller" in message and 1.0 <= waited < 10
        assert not tf.has_state()   # nothing was applied
    finally:
        holder.kill()
        holder.wait()
    Terraform(module, work, lock_wait_s=1.0, retry=FAST).apply({})   # free again


def test_threads_sharing_a_driver_take_turns(tmp_path):
    module = _module(tmp_path / "m", 'resource "terraform_data" "x" {}\n')
    tf = Terraform(module, tmp_path / "work")
    holding, release = threading.Event(), threading.Event()

    def hold():
        with tf.locked("apply"):
            holding.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert holding.wait(10)
        with pytest.raises(LockError, match="another thread of this controller"):
            with tf.locked("plan", wait_s=0.3):
                pass
        threading.Timer(0.5, release.set).start()
        with tf.locked("plan", wait_s=10):   # waits for the holder, then gets the file lock
            assert not holder.is_alive() or release.is_set()
    finally:
        release.set()
        holder.join()


def test_plan_summary_counts_changes(tmp_path):
    module = _module(tmp_path / "m", """
        variable "n" {
          type = number
        }
        resource "terraform_data" "x" {
          count = var.n
        }
    """)
    tf = Terraform(module, tmp_path / "work")
    summary = tf.plan_summary({"n": 3}, timeout_s=60)
    assert "Plan: 3 to add, 0 to change, 0 to destroy." in summary
    assert 'create   terraform_data.x[2]' in summary


def test_plan_summary_says_why_when_providers_are_missing(tmp_path):
    # hashicorp/aws cannot be downloaded here: the dry run must say so, quickly.
    tf = Terraform(ROOT / "infra" / "aws", tmp_path / "work")
    started = time.monotonic()
    summary = tf.plan_summary({"job_name": "j", "node_count": 1, "head_address": "10.0.0.1:6379",
                               "region": "us-east-1", "bucket": "ckpt-bucket",
                               "package_ref": "dbrx-platform==0.1.0"}, timeout_s=30)
    assert time.monotonic() - started < 35
    assert summary.startswith("Terraform plan (infra/aws): unavailable: the module's providers")
    assert "hashicorp/aws" in summary


def test_local_capacity_shortage_from_a_job_config(tmp_path):
    """cluster.terraform_vars reaches the module: fail_apply fails like EC2 capacity does."""
    from platform.config import load_job

    job = load_job(ROOT / "conf" / "local_tiny.yaml",
                   [f"name=capacity-{tmp_path.name[-8:]}", "cluster.terraform_vars={fail_apply: 'true'}"])
    prov = Provisioner.for_job(job, "127.0.0.1:1")
    prov.terraform.retry = FAST
    try:
        with pytest.raises(CapacityError) as info:
            prov.up(2)
        message = str(info.value)
        assert "Error: local-exec provisioner error" in message
        assert "InsufficientInstanceCapacity: no capacity for node" in message
        assert "Traceback" not in message
        assert [p for p in (prov.terraform.workdir / "run").glob("*/ray.pid")] == []
    finally:
        prov.destroy()
    assert prov.nodes() == []
    state = json.loads((prov.terraform.workdir / "terraform.tfstate").read_text())
    assert state["resources"] == []


def test_plan_summary_raises_when_the_module_rejects_the_plan(tmp_path):
    """A dry run must fail on the job's own module errors; only a missing provider is informational."""
    module = _module(tmp_path / "m", """
        variable "n" {
          type = number
          validation {
            condition     = var.n <= 4
            error_message = "n must be at most 4 on this module."
          }
        }
        resource "terraform_data" "x" {
          count = var.n
        }
    """)
    tf = Terraform(module, tmp_path / "work")
    with pytest.raises(ProvisionError) as info:
        tf.plan_summary({"n": 5}, timeout_s=60)
    assert info.value.kind == PERMANENT
    assert "n must be at most 4 on this module." in str(info.value)
