"""`python -m platform.serve` as a user runs it: prints the URL, serves, stops on Ctrl-C."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import torch

from model import DBRX
from platform.config import load_job
from platform.registry.artifacts import write_version
from platform.provision.head import free_local_port as _free_port

REPO = Path(__file__).resolve().parents[1]


def _env(tmp_path: Path) -> dict[str, str]:
    env = {**os.environ, "DBRX_PLATFORM_HOME": str(tmp_path / "home"), "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.mark.slow
def test_cli_serves_a_checkpoint_folder_until_interrupted(tmp_path):
    cfg = load_job(REPO / "conf" / "local_tiny.yaml")
    torch.manual_seed(0)
    write_version(tmp_path / "export", DBRX(cfg.model).eval(), {"step": 42})
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "platform.serve", str(REPO / "conf" / "local_tiny.yaml"), f"serve.port={port}",
         "serve.replica_cpus=0", "serve.max_replicas=1", "promote.registered_model=cli-model",
         "--checkpoint", str(tmp_path / "export")],
        cwd=REPO, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
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
        assert lines and lines[-1].strip() == f"OpenAI base URL: http://127.0.0.1:{port}/v1", "".join(lines)
        r = requests.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                          json={"model": "cli-model", "prompt": "Hello", "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200 and r.headers["x-model-version"] == "step-42"
        assert r.json()["usage"]["completion_tokens"] <= 4
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=90)
        assert proc.returncode == 0, out
        assert "Traceback" not in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
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
