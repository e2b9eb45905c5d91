"""Start the OpenAI endpoint for a job's model: `start_serving(cfg, ...)`.

What to serve is checked on the driver first (does the alias exist? the
version? the folder?), so a mistake ends with one message here rather than
as a replica that fails to start deep inside Serve. Then Serve starts (HTTP
on serve.host:serve.port, 127.0.0.1 unless configured) and the application
deploys; `start_serving` returns once it answers.

Replicas: serve.num_replicas, autoscaling up to serve.max_replicas on ongoing
requests (target: one full batch per replica), each reserving
serve.replica_cpus / serve.replica_gpus.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from platform.config import state_dir
from platform.config.schema import JobConfig, ServeConfig
from platform.errors import UserError
from platform.serving.auth import key_digest
from platform.serving.loader import ModelSource, ServerSettings
from platform.tracking.store import resolve

log = logging.getLogger("platform.serving")

APP_NAME = "dbrx"
READY_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Serving:
    """A running endpoint. `base_url` is what OpenAI clients take (…/v1)."""

    base_url: str
    app_name: str
    model: str
    source: ModelSource

    @property
    def root_url(self) -> str:
        return self.base_url.removesuffix("/v1")

    def stop(self) -> None:
        """Delete the application (Serve itself keeps running for other apps)."""
        from ray import serve

        serve.delete(self.app_name)


def model_source(cfg: JobConfig, *, alias: Optional[str] = None, version: Optional[str | int] = None,
                 checkpoint: Optional[str] = None) -> ModelSource:
    """What to serve: the given alias/version/checkpoint, else serve.model_alias."""
    name = cfg.promote.registered_model
    if checkpoint:
        path = Path(checkpoint).expanduser().resolve()
        if not path.is_dir():
            raise UserError(f"--checkpoint {checkpoint}: no such folder")
        return ModelSource(name, checkpoint=str(path))
    if version is not None and str(version) != "":
        return ModelSource(name, version=str(version))
    return ModelSource(name, alias=alias or cfg.serve.model_alias)


def server_settings(cfg: JobConfig, source: ModelSource) -> ServerSettings:
    s = cfg.serve
    _check(s)
    return ServerSettings(
        source=source, tracking=resolve(cfg.tracking), model_config=cfg.model,
        cache_dir=os.path.join(state_dir(), "registry-cache"), max_batch_size=s.max_batch_size,
        batch_wait_timeout_s=s.batch_wait_timeout_s, max_tokens_limit=s.max_tokens_limit,
        alias_poll_s=s.alias_poll_s, api_key_digest=key_digest(s.api_key), use_gpu=s.replica_gpus > 0)


def deployment_options(s: ServeConfig) -> dict[str, Any]:
    options: dict[str, Any] = {
        # Room for the next batch to queue while one decodes.
        "max_ongoing_requests": max(2 * s.max_batch_size, 16),
        "ray_actor_options": {"num_cpus": s.replica_cpus, "num_gpus": s.replica_gpus},
        "graceful_shutdown_timeout_s": 30,
    }
    if s.max_replicas > s.num_replicas:
        options["autoscaling_config"] = {"min_replicas": s.num_replicas, "initial_replicas": s.num_replicas,
                                         "max_replicas": s.max_replicas,
                                         "target_ongoing_requests": s.max_batch_size}
    else:
        options["num_replicas"] = s.num_replicas
    return options


def start_serving(cfg: JobConfig, *, alias: Optional[str] = None, version: Optional[str | int] = None,
                  checkpoint: Optional[str] = None, app_name: str = APP_NAME) -> Serving:
    """Deploy the OpenAI endpoint for the job's model and return once it answers.

    Serves `checkpoint` (a local folder), else registry `version`, else the
    `alias` (default serve.model_alias), which replicas then follow. Uses the
    Ray the caller is connected to, else cluster.ray_address, else a new local
    instance.
    """
    import ray
    from ray import serve

    from platform.serving.app import OpenAIServer

    source = model_source(cfg, alias=alias, version=version, checkpoint=checkpoint)
    settings = server_settings(cfg, source)
    _check_source(settings)
    s = cfg.serve
    if not ray.is_initialized():
        _connect_ray(cfg)
    if not _serve_running():
        _check_port_free(s.host, s.port)
    serve.start(http_options={"host": s.host, "port": s.port}, proxy_location="HeadOnly")
    app = OpenAIServer.options(**deployment_options(s)).bind(settings)
    serve.run(app, name=app_name, route_prefix="/", blocking=False)
    url_host = "127.0.0.1" if s.host in ("0.0.0.0", "::", "") else s.host
    url_host = f"[{url_host}]" if ":" in url_host else url_host
    serving = Serving(f"http://{url_host}:{s.port}/v1", app_name, source.name, source)
    _wait_ready(serving)
    log.info("serving %s at %s", source.describe(), serving.base_url)
    return serving


def stop_serving() -> None:
    """Shut Serve down (every application) if it runs in the connected Ray cluster."""
    from ray import serve

    if _serve_running():
        serve.shutdown()


def _connect_ray(cfg: JobConfig) -> None:
    """The job's cluster when cluster.ray_address names one, else a small local instance for Serve only."""
    import ray

    if cfg.cluster.ray_address:
        from platform.provision.head import enable_token_auth_in_process

        enable_token_auth_in_process()
        ray.init(address=cfg.cluster.ray_address, configure_logging=False, log_to_driver=False)
    else:
        # Nothing but HTTP bodies moves through the object store: keep it (and Ray) small.
        ray.init(address="local", object_store_memory=cfg.cluster.node_object_store_mb * 1024 ** 2,
                 include_dashboard=False, configure_logging=False, log_to_driver=False)


# ----------------------------------------------------------------------------- checks

def _check(s: ServeConfig) -> None:
    problems = []
    if s.alias_poll_s <= 0:
        problems.append(f"serve.alias_poll_s must be > 0, got {s.alias_poll_s}")
    if s.replica_cpus < 0 or s.replica_gpus < 0:
        problems.append("serve.replica_cpus and serve.replica_gpus must be >= 0")
    if s.batch_wait_timeout_s < 0:
        problems.append(f"serve.batch_wait_timeout_s must be >= 0, got {s.batch_wait_timeout_s}")
    if problems:
        raise UserError("; ".join(problems))


def _check_source(settings: ServerSettings) -> None:
    """Fail here, with the registry's message, rather than in a replica."""
    from platform.registry.models import ModelRegistry

    source = settings.source
    if source.checkpoint:
        from platform.registry.artifacts import check_safetensors_only
        from platform.train.state import TRAINER_FILE

        if not (Path(source.checkpoint) / TRAINER_FILE).is_file():
            check_safetensors_only(Path(source.checkpoint))
        return
    registry = ModelRegistry(settings.tracking)
    if source.alias:
        registry.require_alias(source.name, source.alias)
    else:
        registry.get_version(source.name, source.version)


def _serve_running() -> bool:
    from ray import serve

    try:
        serve.status()
        return True
    except Exception:   # RayServeException: no controller in this cluster
        return False


def _check_port_free(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise UserError(f"cannot serve on {host}:{port}: {exc.strerror}; set serve.port to a free "
                            "port (or serve.host)") from None


def _wait_ready(serving: Serving) -> None:
    """Until /health answers at the configured address (Serve may already run elsewhere)."""
    import requests

    deadline = time.monotonic() + READY_TIMEOUT_S
    last = ""
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{serving.root_url}/health", timeout=5).status_code == 200:
                return
        except requests.RequestException as exc:
            last = type(exc).__name__
        time.sleep(0.5)
    raise UserError(f"the endpoint deployed but {serving.root_url}/health does not answer ({last}); is Serve "
                    "already running in this Ray cluster with other HTTP options? Stop it (serve shutdown) "
                    "or use its host and port")
