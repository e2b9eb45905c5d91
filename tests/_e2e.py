"""Helpers for end-to-end tests that run `python -m platform.submit` for real."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np

from platform.provision.head import free_local_ports

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "conf" / "local_tiny.yaml"
# The tokenized corpus, shared by every job of a test session: each job has a state dir of its
# own, and preparing the corpus again for each (~30 s on 2 cores) was a fifth of a short job.
# The cache is keyed by the data config and tokenizer, and a job verifies what it reads.
DATA_CACHE = Path(tempfile.gettempdir()) / f"dbrx-e2e-data-cache-{os.getuid()}"


class Job:
    """One submission of local_tiny in its own state dir, head port and dashboard port."""

    def __init__(self, home: Path, *overrides: str, name: str = "e2e",
                 tracking_uri: Optional[str] = None) -> None:
        self.home, self.name = Path(home), name
        head, dashboard = free_local_ports(2)
        self.ports = [f"cluster.head_port={head}", f"cluster.dashboard_port={dashboard}"]
        self.tracking_uri = tracking_uri or f"sqlite:///{self.home}/mlflow.db"
        tracking = ([f"tracking.tracking_uri={tracking_uri}", "tracking.artifact_location="]
                    if tracking_uri else [])
        self.overrides = [f"name={name}", *self.ports, *tracking, f"data.cache_dir={DATA_CACHE}",
                          *overrides]
        self.log = self.home / f"submit-{int(time.time() * 1000)}.log"
        self.proc: Optional[subprocess.Popen] = None
        self._run_id: Optional[str] = None   # found once: a resubmission resumes the same run

    @property
    def env(self) -> dict:
        return {**os.environ, "DBRX_PLATFORM_HOME": str(self.home), "OMP_NUM_THREADS": "1"}

    def start(self, *extra: str) -> "Job":
        self.home.mkdir(parents=True, exist_ok=True)
        out = open(self.log, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "platform.submit", str(TINY), *self.overrides, *extra],
            cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def wait(self, timeout: float = 1200) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.stop_cluster()
            raise AssertionError(f"submit did not finish in {timeout}s; log:\n{self.output()[-4000:]}")

    def stop_cluster(self) -> None:
        """Kill what the job started outside its process group (the Ray head, the Terraform
        nodes): processes whose environment names this job's state dir."""
        import psutil

        for proc in psutil.process_iter():
            if proc.pid == os.getpid():
                continue
            try:
                env = proc.environ()
                if (env.get("DBRX_PLATFORM_HOME") == str(self.home)
                        or env.get("DBRX_NODE_DIR", "").startswith(str(self.home))):
                    proc.kill()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue

    def run(self, *extra: str, timeout: float = 1200) -> int:
        return self.start(*extra).wait(timeout)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    # -- what the job left behind ----------------------------------------------

    def mlflow(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri)

    def find_run(self):
        """The job's MLflow run, or None before the job has created it."""
        if self._run_id is not None:
            return self.mlflow().get_run(self._run_id)
        # Open the store only once the job has created it (its "MLflow" line is
        # printed after that), or we race the job's own schema migration.
        if not self.log.exists() or not re.search(r"^MLflow (UI|run)", self.output(), re.M):
            return None
        client = self.mlflow()
        runs = client.search_runs(
            [e.experiment_id for e in client.search_experiments()],
            filter_string=f"tags.`dbrx.job_name` = '{self.name}'", order_by=["start_time DESC"])
        if not runs:
            return None
        self._run_id = runs[0].info.run_id
        return runs[0]

    def points(self, key: str) -> list:
        """Every point logged for `key` (step, value, timestamp), in logging order ([] before
        the run exists). The tests poll this every half second: one request once the run is known."""
        if self._run_id is None and self.find_run() is None:
            return []
        history = self.mlflow().get_metric_history(self._run_id, key)
        return sorted(history, key=lambda m: (m.timestamp, m.step))

    def run_info(self):
        run = self.find_run()
        assert run is not None, f"no MLflow run for job {self.name}"
        return run

    def metric(self, key: str) -> dict[int, float]:
        """step -> value (the last logged value of each step: a resumed run re-logs steps)."""
        return {m.step: m.value for m in self.points(key)}

    def losses(self) -> dict[int, list[float]]:
        """step -> every loss logged for it, in logging order (a resumed run re-trains the
        steps after its checkpoint and logs them again)."""
        out: dict[int, list[float]] = {}
        for m in self.points("loss"):
            out.setdefault(m.step, []).append(m.value)
        return out

    def history(self, key: str) -> list[float]:
        """Every logged value of `key`, in the order it was logged."""
        return [m.value for m in self.points(key)]

    def checkpoint_dir(self) -> Path:
        return self.home / "checkpoints" / self.name

    def committed_steps(self) -> list[int]:
        return sorted(int(p.name.split("_")[1]) for p in self.checkpoint_dir().glob("step_*")
                      if (p / "manifest.json").exists())

    def worker_pids(self) -> list[int]:
        """Ray Train worker processes of this job (found by its state dir in their environment)."""
        import psutil

        pids = []
        for proc in psutil.process_iter(["pid", "cmdline"]):
            try:
                cmd = " ".join(proc.info["cmdline"] or [])
                if "RayTrainWorker" in cmd and proc.environ().get("DBRX_PLATFORM_HOME") == str(self.home):
                    pids.append(proc.pid)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return pids


def wait_for(predicate, timeout: float, what: str, poll: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def unigram_entropy(home: Path, split: str = "eval") -> float:
    """Entropy (nats) of the token distribution of the prepared corpus's `split`."""
    from platform.config import load_job
    from platform.data.prepare import find_prepared

    os.environ["DBRX_PLATFORM_HOME"] = str(home)
    cfg = load_job(TINY, [f"data.cache_dir={DATA_CACHE}"])
    prepared = find_prepared(cfg.data, cfg.model.vocab_size)
    tokens = np.concatenate([np.fromfile(prepared.stream_path(n, split), dtype="<u4")
                             for n in prepared.source_names])
    counts = np.bincount(tokens)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())
