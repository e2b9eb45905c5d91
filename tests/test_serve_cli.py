"""`python -m platform.serve` as a user runs it: prints the URL, serves, stops on Ctrl-C or SIGTERM."""

from __future__ import annotations

import ipaddress
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import requests
import torch

from model import DBRX
from platform.config import load_job
from platform.registry.artifacts import write_version
from platform.serving.auth import API_KEY_ENV
from platform.provision.head import free_local_port as _free_port

REPO = Path(__file__).resolve().parents[1]


def _env(tmp_path: Path) -> dict[str, str]:
    env = {**os.environ, "DBRX_PLATFORM_HOME": str(tmp_path / "home"), "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    return env


def _exposed(proc: psutil.Process) -> list[str]:
    """The addresses `proc` listens on beyond loopback."""
    out = []
    for conn in proc.net_connections(kind="inet"):
        address = ipaddress.ip_address(conn.laddr.ip)
        address = getattr(address, "ipv4_mapped", None) or address
        if conn.status == psutil.CONN_LISTEN and not address.is_loopback:
            out.append(f"{conn.laddr.ip}:{conn.laddr.port}")
    return out


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_cli_serves_a_checkpoint_folder_until_stopped(tmp_path, stop):
    """Ctrl-C and SIGTERM stop it alike: exit 0, no crash dump, no process left behind. Ray's
    processes listen on loopback only and none of them holds the API key."""
    cfg = load_job(REPO / "conf" / "local_tiny.yaml")
    torch.manual_seed(0)
    write_version(tmp_path / "export", DBRX(cfg.model).eval(), {"step": 42})
    port, key = _free_port(), "cli-key-5be1d0"
    proc = subprocess.Popen(
        [sys.executable, "-m", "platform.serve", str(REPO / "conf" / "local_tiny.yaml"), f"serve.port={port}",
         "serve.replica_cpus=0", "serve.max_replicas=1", "promote.registered_model=cli-model",
         "--checkpoint", str(tmp_path / "export")],
        cwd=REPO, env={**_env(tmp_path), API_KEY_ENV: key}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)
    children: list[psutil.Process] = []
    try:
        lines = []
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("OpenAI base URL:"):
                break
        assert lines and lines[-1].startswith(f"OpenAI base URL: http://127.0.0.1:{port}/v1"), "".join(lines)
        r = requests.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                          headers={"Authorization": f"Bearer {key}"},
                          json={"model": "cli-model", "prompt": "Hello", "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200 and r.headers["x-model-version"] == "step-42"
        assert r.json()["usage"]["completion_tokens"] <= 4
        children = psutil.Process(proc.pid).children(recursive=True)
        names = " ".join(c.name() for c in children)
        assert "raylet" in names and "DashboardAgent" in names and "ServeReplica" in names, names
        for child in children:
            assert API_KEY_ENV not in child.environ() and key not in " ".join(child.cmdline()), child.name()
            # Serve's replicas also open an inter-replica gRPC port on [::], fixed in Ray (token-checked).
            if not child.name().startswith("ray::ServeReplica"):
                assert not _exposed(child), (child.name(), _exposed(child))
        proc.send_signal(stop)
        out, _ = proc.communicate(timeout=90)
        assert proc.returncode == 0, out
        for crash in ("Traceback", "SIGTERM received", "graceful_shutdown failed"):
            assert crash not in out, out
        _, alive = psutil.wait_procs(children, timeout=20)
        assert not alive, [(p.pid, p.name()) for p in alive]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for child in children:
            if child.is_running():
                child.kill()
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/health", timeout=5)


def test_cli_names_a_missing_alias_without_a_traceback(tmp_path, empty_mlflow_db):
    shutil.copy(empty_mlflow_db, tmp_path / "mlflow.db")
    proc = subprocess.run(
        [sys.executable, "-m", "platform.serve", str(REPO / "conf" / "local_tiny.yaml"),
         f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db", "--alias", "production"],
        cwd=REPO, env=_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "registered model 'dbrx-tiny' has no alias 'production'" in proc.stderr
    assert "python -m platform.promote" in proc.stderr and "Traceback" not in proc.stderr
