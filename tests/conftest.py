"""Shared fixtures. Everything runs for real on this machine, capped for 2 cores."""

from __future__ import annotations

import json
import os
import uuid
from typing import Iterator

import pytest

# Keep torch and BLAS from oversubscribing the 2 cores when tests run Ray workers.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# The README's test command hands out whole files in collection order (--dist loadfile
# --no-loadscope-reorder), and a worker takes its next file while it still runs one. The
# end-to-end files go first, one per pytest worker: they are most of the suite's time. Then the
# longest of the rest (tens of seconds each, measured on 2 cores), so that the files handed out
# last are short and neither worker is left alone at the end with a long one.
E2E_FIRST = ("test_e2e_train.py", "test_e2e_local_tiny.py")
LONGEST_NEXT = ("test_train_state.py", "test_serve_cli.py", "test_serve_after_training.py",
                "test_provision_local.py", "test_serve.py", "test_gpu_check.py",
                "test_checkpoint_async.py", "test_tracking_server.py", "test_serve_devices.py",
                "test_promote.py", "test_data_pipeline.py", "test_platform_name.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(E2E_FIRST + LONGEST_NEXT)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))    # stable: the rest keep their order


@pytest.fixture(autouse=True)
def _isolated_state_dir(tmp_path_factory, monkeypatch):
    """Embedded defaults (MLflow DB, checkpoints, data cache) go to a temp dir, not ~."""
    monkeypatch.setenv("DBRX_PLATFORM_HOME", str(tmp_path_factory.getbasetemp() / "state"))


@pytest.fixture(scope="module")
def ray_local(_ray_shutdown_at_end):
    """One small local Ray instance shared by the tests that need Ray: started on first use, and
    again after a test that had to drive its own Ray in this process shut it down
    (ray_not_connected: e.g. tests/test_serve_after_training.py runs the job controller, which
    calls ray.init itself)."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, object_store_memory=200 * 1024 ** 2,
                 include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray


@pytest.fixture
def ray_not_connected():
    """No Ray connection in this process, so that a test can tell whether the code under test
    made one, or let the job controller make its own (an earlier file on this pytest worker may
    have left ray_local's)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    return ray


@pytest.fixture(scope="session")
def _ray_shutdown_at_end():
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()


# ----------------------------------------------------------------------------- storage (S3 via moto)


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """URL of an in-memory S3-compatible server (moto) shared by the whole session."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def aws_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """Dummy AWS credentials, and none of the user's AWS config, so tests never reach real AWS."""
    for var in (
        "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
        "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "absent-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "absent-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture(scope="session")
def _s3_admin(s3_endpoint: str):
    """A boto3 client for fixtures, with explicit dummy credentials (no environment)."""
    import boto3

    return boto3.client(
        "s3", endpoint_url=s3_endpoint, region_name="us-east-1",
        aws_access_key_id="testing", aws_secret_access_key="testing",
    )


@pytest.fixture
def s3_bucket(_s3_admin, aws_credentials: None) -> str:
    """A fresh, empty bucket on the moto server; returns its name."""
    name = f"test-{uuid.uuid4().hex[:16]}"
    _s3_admin.create_bucket(Bucket=name)
    return name


@pytest.fixture(params=["local", "s3"])
def any_store(request: pytest.FixtureRequest, tmp_path):
    """An empty `platform.storage` Store: once a local folder, once an S3 prefix."""
    from platform.storage import open_store

    if request.param == "local":
        return open_store(str(tmp_path / "store"))
    bucket = request.getfixturevalue("s3_bucket")
    return open_store(f"s3://{bucket}/root", endpoint_url=request.getfixturevalue("s3_endpoint"))


# ----------------------------------------------------------------------------- models


@pytest.fixture(scope="session")
def random_model():
    """`random_model(cfg, seed=0, std=0.2, cls=DBRX)`: see `make_random_model`."""
    return make_random_model


@pytest.fixture(scope="session")
def random_moe():
    """`random_moe(cfg, seed=0)`: one DroplessMoE layer, weights from Normal(0, 0.3)."""
    from model.moe import DroplessMoE

    return lambda cfg, seed=0: make_random_model(cfg, seed, std=0.3, cls=DroplessMoE)


def make_random_model(cfg, seed: int = 0, std: float | None = 0.2, cls=None):
    """`cls(cfg)` (default DBRX; or e.g. DroplessMoE) built under `seed`, every weight but the
    norms redrawn from Normal(0, std); std=None keeps the module's own init.

    The own init (std 0.02) leaves logits near uniform and routing near ties; weights this
    large make clipping, routing and greedy decoding matter, so tests can tell results apart.
    """
    import torch

    from model import DBRX

    torch.manual_seed(seed)
    module = (cls or DBRX)(cfg)
    if std is not None:
        with torch.no_grad():
            for name, p in module.named_parameters():
                if "norm" not in name:
                    p.normal_(0.0, std)
    return module


# ----------------------------------------------------------------------------- promotion and serving


@pytest.fixture(scope="session")
def empty_mlflow_db(tmp_path_factory):
    """A migrated, empty MLflow SQLite database to copy: creating one takes seconds, copying it not."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-empty") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture(scope="session")
def commit_checkpoint():
    """`commit(store, model, step, ...)`: see `commit_model_checkpoint`."""
    return commit_model_checkpoint


def commit_model_checkpoint(store, model, step: int, *, global_batch_size: int = 8, run_id: str = "",
                            loss: float = 0.0):
    """Commit `model`'s weights as a training checkpoint of `step` (platform.checkpoint.trainer_state's
    layout: experts stored one tensor each, trainer.json), without DeepSpeed or optimizer state.

    What promotion reads from a real run (consolidated_weights, read_trainer_state), made
    in milliseconds, so promotion and serving tests need no training job.
    """
    from platform.checkpoint import save_tensors
    from platform.checkpoint.trainer_state import TRAINER_FILE, TrainerState, expert_key

    experts = {id(p) for p in model.expert_parameters()}
    weights = {}
    for name, p in model.named_parameters():
        if id(p) in experts:
            for e, chunk in enumerate(p.detach().chunk(model.cfg.moe_num_experts, dim=0)):
                weights[expert_key(name, e)] = chunk.contiguous()
        else:
            weights[name] = p.detach()
    staging = store.begin(step)
    save_tensors(staging.path, "model-r00000", weights)
    state = TrainerState(step=step, consumed_sequences=step * global_batch_size, adam_step=step, world_size=1,
                         expert_parallel=1, tensor_sets=["model-r00000"], rng={},
                         extra={"run_id": run_id, "loss": loss, "data_cache_key": "test"})
    (staging.path / TRAINER_FILE).write_text(json.dumps(state.to_json()))
    return store.commit(staging, {"step": step})
