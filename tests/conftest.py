"""Shared fixtures. Everything runs for real on this machine, capped for 2 cores."""

from __future__ import annotations

import os

import pytest

# Keep torch and BLAS from oversubscribing the 2 cores when tests run Ray workers.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _isolated_state_dir(tmp_path_factory, monkeypatch):
    """Embedded defaults (MLflow DB, checkpoints, data cache) go to a temp dir, not ~."""
    monkeypatch.setenv("DBRX_PLATFORM_HOME", str(tmp_path_factory.getbasetemp() / "state"))


@pytest.fixture(scope="session")
def ray_local():
    """One small local Ray instance shared by the tests that need Ray."""
    import ray

    ray.init(num_cpus=2, object_store_memory=200 * 1024 ** 2, include_dashboard=False,
             log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()
