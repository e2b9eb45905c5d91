"""Start the OpenAI endpoint for a job's model: `start_serving(cfg, ...)`.

What to serve is checked on the driver first (does the alias exist? the
version? the folder?), so a mistake ends with one message here rather than
as a replica that fails to start deep inside Serve. Then Serve starts (HTTP
on serve.host:serve.port, 127.0.0.1 unless configured) and the application
deploys; `start_serving` returns once it answers.

Replicas: serve.num_replicas, autoscaling up to serve.max_replicas on ongoing
requests (target: one full batch per replica), each reserving
serve.replica_cpus / serve.replica_gpus per device. A replica of
serve.devices_per_replica > 1 devices gets a placement group of that many
bundles on one node (platform.serving.shards starts its other ranks there).

A Ray instance started here for serving is one machine's: its processes listen
on 127.0.0.1 only, none of them inherits the API key (replicas get its digest),
and the caller's SIGTERM handler survives `ray.init`. `Serving.shutdown()` then
stops what `start_serving` started and nothing else.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from platform.config import state_dir
from platform.config.schema import JobConfig, ServeConfig
from platform.errors import UserError
from platform.serving.auth import API_KEY_ENV, key_digest
from platform.serving.loader import ModelSource, ServerSettings
from platform.serving.origin import OriginPolicy
from platform.tracking.store import resolve

log = logging.getLogger("platform.serving")

APP_NAME = "dbrx"
READY_TIMEOUT_S = 60.0
PORT_RELEASE_TIMEOUT_S = 30.0
# Ray decides when it is imported whether a local instance may grow into a cluster (its processes
# listen on every interface) or stays on this machine (127.0.0.1); "0" says the latter.
SINGLE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
# What start_serving started, and so what Serving.shutdown stops.
LOCAL_RAY, CLUSTER_CONNECTION = "local", "cluster"


@dataclass(frozen=True)
class Serving:
    """A running endpoint. `base_url` is what OpenAI clients take (…/v1)."""

    base_url: str
    app_name: str
    model: str
    source: ModelSource
    host: str                        # where Serve's HTTP proxy listens (serve.host, serve.port)
    port: int
    started: Optional[str] = None    # LOCAL_RAY or CLUSTER_CONNECTION; None: the caller's Ray

    @property
    def root_url(self) -> str:
        return self.base_url.removesuffix("/v1")

    def stop(self) -> None:
        """Delete the application (Serve itself keeps running for other apps)."""
        from ray import serve

        serve.delete(self.app_name)

    def shutdown(self) -> None:
        """Stop serving and what start_serving started: the application first (its replicas finish
        the requests in flight), then a local Ray instance with everything in it, or Serve on the
        cluster it connected to. `serve.shutdown()` is skipped where Ray stops anyway: Ray reports
        its wait on the controller, which ends by killing itself, as a failed task. A local
        instance's endpoint port is free again when this returns."""
        import ray

        self.stop()
        if self.started == CLUSTER_CONNECTION:
            stop_serving()
        if self.started is not None:
            ray.shutdown()
        if self.started == LOCAL_RAY:   # the proxy ran on this machine
            _wait_port_free(self.host, self.port)


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
    try:
        origins = OriginPolicy.build(s.host, s.port, s.allowed_hosts, s.allowed_origins)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    return ServerSettings(
        source=source, tracking=resolve(cfg.tracking), model_config=cfg.model,
        cache_dir=os.path.join(state_dir(), "registry-cache"), max_tokens_limit=s.max_tokens_limit,
        alias_poll_s=s.alias_poll_s, api_key_digest=key_digest(s.api_key), use_gpu=s.replica_gpus > 0,
        max_concurrent_sequences=s.max_concurrent_sequences, max_kv_cache_mb=s.max_kv_cache_mb,
        max_context_tokens=s.max_context_tokens, weights=s.weights, devices_per_replica=s.devices_per_replica,
        replica_cpus=s.replica_cpus, replica_gpus=s.replica_gpus, origins=origins)


def deployment_options(s: ServeConfig) -> dict[str, Any]:
    options: dict[str, Any] = {
        # More than a replica decodes at once, so that the excess reaches the replica's scheduler
        # and is answered 429 at once instead of waiting in Serve's queue.
        "max_ongoing_requests": 2 * s.max_concurrent_sequences,
        "ray_actor_options": {"num_cpus": s.replica_cpus, "num_gpus": s.replica_gpus},
        "graceful_shutdown_timeout_s": 30,
    }
    bundle = {k: v for k, v in (("CPU", s.replica_cpus), ("GPU", s.replica_gpus)) if v > 0}
    if s.devices_per_replica > 1 and bundle:
        # One bundle per device, all on one node: the replica takes the first, its shards the rest.
        options["placement_group_bundles"] = [dict(bundle) for _ in range(s.devices_per_replica)]
        options["placement_group_strategy"] = "STRICT_PACK"
    if s.max_replicas > s.num_replicas:
        options["autoscaling_config"] = {"min_replicas": s.num_replicas, "initial_replicas": s.num_replicas,
                                         "max_replicas": s.max_replicas,
                                         "target_ongoing_requests": s.max_concurrent_sequences}
    else:
        options["num_replicas"] = s.num_replicas
    return options


def start_serving(cfg: JobConfig, *, alias: Optional[str] = None, version: Optional[str | int] = None,
                  checkpoint: Optional[str] = None, app_name: str = APP_NAME) -> Serving:
    """Deploy the OpenAI endpoint for the job's model and return once it answers.

    Serves `checkpoint` (a local folder), else registry `version`, else the
    `alias` (default serve.model_alias), which replicas then follow. Uses the
    Ray the caller is connected to, else cluster.ray_address, else a new local
    instance. Fails (an exception, Ctrl-C) leaving nothing it started behind.
    """
    source = model_source(cfg, alias=alias, version=version, checkpoint=checkpoint)
    settings = server_settings(cfg, source)
    _check_source(settings)
    s = cfg.serve
    started = _ensure_ray(cfg)
    try:
        from ray import serve

        from platform.serving.app import OpenAIServer

        if not _serve_running():
            _check_port_free(s.host, s.port)
        serve.start(http_options={"host": s.host, "port": s.port}, proxy_location="HeadOnly")
        app = OpenAIServer.options(**deployment_options(s)).bind(settings)
        serve.run(app, name=app_name, route_prefix="/", blocking=False)
        url_host = "127.0.0.1" if s.host in ("0.0.0.0", "::", "") else s.host
        url_host = f"[{url_host}]" if ":" in url_host else url_host
        serving = Serving(f"http://{url_host}:{s.port}/v1", app_name, source.name, source,
                          s.host, s.port, started)
        _wait_ready(serving)
    except BaseException:
        if started is not None:
            import ray

            ray.shutdown()
        raise
    log.info("serving %s at %s", source.describe(), serving.base_url)
    return serving


def stop_serving() -> None:
    """Shut Serve down (every application) if it runs in the connected Ray cluster."""
    from ray import serve

    if _serve_running():
        serve.shutdown()


def _ensure_ray(cfg: JobConfig) -> Optional[str]:
    """Connect to Ray unless the caller is: the job's cluster when cluster.ray_address names one,
    else a small local instance for Serve only. Returns what it started (None: nothing)."""
    local = not cfg.cluster.ray_address
    # Ray reads SINGLE_MACHINE_ENV once, when first imported (in this process, before ray.init).
    with _environ({API_KEY_ENV: None, **({SINGLE_MACHINE_ENV: "0"} if local else {})}):
        import ray

        if ray.is_initialized():
            return None
        with _keeping_sigterm_handler():
            if not local:
                from platform.provision.head import enable_token_auth_in_process

                enable_token_auth_in_process()
                ray.init(address=cfg.cluster.ray_address, configure_logging=False, log_to_driver=False)
                return CLUSTER_CONNECTION
            # Nothing but HTTP bodies moves through the object store: keep it (and Ray) small.
            ray.init(address="local", object_store_memory=cfg.cluster.node_object_store_mb * 1024 ** 2,
                     include_dashboard=False, configure_logging=False, log_to_driver=False)
            return LOCAL_RAY


@contextmanager
def _environ(changes: dict[str, Optional[str]]) -> Iterator[None]:
    """`os.environ` with `changes` (None: unset) while Ray starts its processes, which inherit it."""
    saved = {key: os.environ.get(key) for key in changes}
    _set_environ(changes)
    try:
        yield
    finally:
        _set_environ(saved)


def _set_environ(values: dict[str, Optional[str]]) -> None:
    for key, value in values.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@contextmanager
def _keeping_sigterm_handler() -> Iterator[None]:
    """ray.init replaces the SIGTERM handler with one that prints a crash dump and kills its
    processes abruptly; the caller's handler (the CLI's stops like Ctrl-C) is put back."""
    main = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGTERM) if main else None
    try:
        yield
    finally:
        if handler is not None:
            signal.signal(signal.SIGTERM, handler)


# ----------------------------------------------------------------------------- checks

def _check(s: ServeConfig) -> None:
    problems = []
    if s.alias_poll_s <= 0:
        problems.append(f"serve.alias_poll_s must be > 0, got {s.alias_poll_s}")
    if s.replica_cpus < 0 or s.replica_gpus < 0:
        problems.append("serve.replica_cpus and serve.replica_gpus must be >= 0")
    if problems:
        raise UserError("; ".join(problems))


def _check_source(settings: ServerSettings) -> None:
    """Fail here, with the registry's message, rather than in a replica."""
    from platform.registry.models import ModelRegistry

    source = settings.source
    if source.checkpoint:
        from platform.registry.artifacts import check_safetensors_only
        from platform.checkpoint.trainer_state import TRAINER_FILE

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


def _bind_error(host: str, port: int) -> Optional[OSError]:
    """Why serving on host:port would fail now (None: it is free)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            return exc
    return None


def _check_port_free(host: str, port: int) -> None:
    exc = _bind_error(host, port)
    if exc is not None:
        raise UserError(f"cannot serve on {host}:{port}: {exc.strerror}; set serve.port to a free "
                        "port (or serve.host)")


def _wait_port_free(host: str, port: int, timeout_s: float = PORT_RELEASE_TIMEOUT_S) -> None:
    """Until host:port can be bound again: Serve's HTTP proxy is a Ray worker that outlives
    `ray.shutdown()` by a moment, and an endpoint that says it stopped leaves its port free
    (the next `start_serving` on it would be refused)."""
    deadline = time.monotonic() + timeout_s
    while _bind_error(host, port) is not None:
        if time.monotonic() > deadline:
            log.warning("port %s:%s is still taken %.0f s after the endpoint stopped", host, port, timeout_s)
            return
        time.sleep(0.2)


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
