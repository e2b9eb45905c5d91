"""Where a job's MLflow data lives, and how talking to it fails.

A job config names the tracking store (`tracking.tracking_uri`) and where new
experiments keep their artifacts (`tracking.artifact_location`). Both may use
`~` and relative paths; Ray workers run in the Ray session folder, so every
local path is made absolute here, once, before MLflow sees it.

MLflow's HTTP client retries a failed request 7 times with exponential backoff
and waits 120 s per attempt by default: an unreachable server would block the
caller for minutes. This platform owns its retry policy (the background
logger backs off and buffers, the run lifecycle retries to a deadline), so the
client is told to fail fast. MLflow reads these settings only from the
environment, on every request, so they are process-wide defaults; a value the
user already exported wins.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Optional
from urllib.parse import urlsplit, urlunsplit

from platform.config.schema import TrackingConfig

# One attempt per MLflow call: our callers retry with their own backoff.
HTTP_MAX_RETRIES = "0"
# Connect/read timeout per HTTP request, in seconds: long enough for an artifact
# upload to be acknowledged, short enough that a black-holed server is noticed.
HTTP_TIMEOUT_S = "15"


def fail_fast_http() -> None:
    """Make MLflow's HTTP client give up after one attempt (unless the user said otherwise)."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", HTTP_MAX_RETRIES)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", HTTP_TIMEOUT_S)


@dataclass(frozen=True)
class Store:
    """A resolved tracking location: what MLflow is given."""

    tracking_uri: str
    artifact_location: Optional[str]   # None: the tracking server's default root

    @property
    def is_http(self) -> bool:
        return self.tracking_uri.startswith(("http://", "https://"))


def _abs_path(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


def _resolve_uri(uri: str) -> str:
    uri = uri.strip()
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):]
        if path and path != ":memory:":
            path = _abs_path(path)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            return "sqlite:///" + path
        return uri
    if uri.startswith("file:"):
        path = _abs_path(urlsplit(uri).path)
        os.makedirs(path, exist_ok=True)
        return "file://" + path
    if "://" not in uri and uri not in ("databricks", "databricks-uc"):
        # A bare path is MLflow's file store; make it absolute so workers agree.
        path = _abs_path(uri)
        os.makedirs(path, exist_ok=True)
        return path
    return uri


def _resolve_artifacts(location: str) -> Optional[str]:
    location = location.strip()
    if not location:
        return None
    if "://" in location or location.startswith("mlflow-artifacts:"):
        return location
    if location.startswith("file:"):
        return "file://" + _abs_path(urlsplit(location).path)
    return _abs_path(location)


def resolve(tracking: TrackingConfig) -> Store:
    """The tracking URI and artifact root of a config, with local paths made absolute."""
    return Store(_resolve_uri(tracking.tracking_uri), _resolve_artifacts(tracking.artifact_location))


def client(store: Store):
    """An MlflowClient for `store`, with HTTP calls set to fail fast.

    Creating a client for a SQLite store opens (and on first use migrates) the
    database: seconds, not milliseconds. Do it off the training thread.
    """
    fail_fast_http()
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=store.tracking_uri)


_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^/@:\s]*):[^/@\s]*@")


def strip_credentials(text: str) -> str:
    """`text` with the password of every `scheme://user:password@host` replaced by ***."""
    return _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)


def display_uri(uri: str) -> str:
    """A tracking URI fit for messages and links: no user or password."""
    parts = urlsplit(uri)
    if parts.scheme in ("http", "https") and parts.hostname:
        netloc = parts.hostname if parts.port is None else f"{parts.hostname}:{parts.port}"
        return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))
    return strip_credentials(uri)


# --- classifying failures -----------------------------------------------------------

def is_transient(exc: BaseException) -> bool:
    """Whether retrying the same call later can succeed.

    Server-side errors (HTTP 5xx, 429), unreachable hosts, timeouts (MLflow wraps
    them as INTERNAL_ERROR, i.e. 500) and database/OS errors are transient; a
    request MLflow rejected (4xx: bad key, changed param, missing run) is not.
    """
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        status = exc.get_http_status_code()
        return status >= 500 or status in (408, 429)
    if isinstance(exc, (PermissionError, FileNotFoundError, NotADirectoryError, IsADirectoryError)):
        return False
    if isinstance(exc, OSError):   # connection refused/reset, timeouts, disk full
        return True
    module = type(exc).__module__ or ""
    return module.startswith(("sqlalchemy", "requests", "urllib3"))


def error_code(exc: BaseException) -> str:
    return str(getattr(exc, "error_code", "") or type(exc).__name__)


def short_error(exc: BaseException, limit: int = 300) -> str:
    """One line describing `exc`, without credentials, for a warning."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    text = strip_credentials(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."
