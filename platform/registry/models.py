"""The MLflow Model Registry as this platform uses it: versions, aliases, files.

A version's `source` is `runs:/<run id>/checkpoints/step_<N>`: the files stay
in the job's run (lineage for free), the registry only points at them. Readers
(serving replicas) get a local folder: the artifact folder itself when the
run's artifacts are on a local filesystem, else a download cached by
(model, version), since a version's files never change.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional
from urllib.parse import unquote, urlsplit

from platform.config.schema import TrackingConfig
from platform.errors import UserError
from platform.tracking.run import CODE_VERSION_TAG, JOB_TAG
from platform.tracking.store import Store, client as make_client, display_uri, resolve, short_error

log = logging.getLogger("platform.registry")

# Model version tags: lineage, searchable in the MLflow UI.
TAG_RUN_ID = "dbrx.run_id"
TAG_JOB = JOB_TAG                    # the same keys as the training run's own tags
TAG_STEP = "dbrx.step"
TAG_TOKENS = "dbrx.tokens_seen"
TAG_MIXTURE = "dbrx.data_mixture"
TAG_DATA_KEY = "dbrx.data_cache_key"
TAG_CODE = CODE_VERSION_TAG
TAG_CHECKPOINT = "dbrx.checkpoint_uri"
TAG_FORMAT = "dbrx.format"
TAG_HELDOUT = "dbrx.heldout_loss"


class RegistryError(UserError):
    """The registry cannot give what was asked for; the message says what to do."""


@dataclass(frozen=True)
class VersionRef:
    """One registered model version (what MLflow knows about it)."""

    name: str
    version: str
    source: str
    run_id: Optional[str]
    tags: Mapping[str, str] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return f"{self.name} version {self.version}"

    @classmethod
    def of(cls, mv: Any) -> "VersionRef":
        return cls(mv.name, str(mv.version), mv.source, mv.run_id or None, dict(mv.tags or {}),
                   tuple(getattr(mv, "aliases", ()) or ()))


def quote(value: str) -> str:
    """A string literal for an MLflow search filter."""
    if "'" in value:
        raise RegistryError(f"{value!r}: quotes are not allowed in model names and tags")
    return f"'{value}'"


class ModelRegistry:
    """Registry calls for one tracking store (the job's `tracking` config)."""

    def __init__(self, tracking: TrackingConfig | Store):
        self.store = tracking if isinstance(tracking, Store) else resolve(tracking)
        self._client = None
        self._lock = threading.Lock()

    @property
    def client(self):
        # Opening a SQLite store takes seconds (schema check): once per registry object.
        with self._lock:
            if self._client is None:
                os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
                self._client = make_client(self.store)
            return self._client

    def _fail(self, what: str, exc: Exception) -> RegistryError:
        return RegistryError(f"MLflow at {display_uri(self.store.tracking_uri)} could not {what}: "
                             f"{short_error(exc)}")

    # ------------------------------------------------------------------ reading

    def get_version(self, name: str, version: str | int) -> VersionRef:
        from mlflow.exceptions import MlflowException

        try:
            return VersionRef.of(self.client.get_model_version(name, str(version)))
        except MlflowException as exc:
            if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise RegistryError(f"registered model {name!r} has no version {version}: "
                                    f"{self._versions_hint(name)}") from None
            raise self._fail(f"read {name} version {version}", exc) from exc

    def alias_target(self, name: str, alias: str) -> Optional[VersionRef]:
        """The version `alias` points at, or None when the alias (or the model) does not exist."""
        from mlflow.exceptions import MlflowException

        try:
            return VersionRef.of(self.client.get_model_version_by_alias(name, alias))
        except MlflowException as exc:
            if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
                return None
            raise self._fail(f"resolve alias {alias!r} of {name!r}", exc) from exc

    def require_alias(self, name: str, alias: str) -> VersionRef:
        ref = self.alias_target(name, alias)
        if ref is None:
            raise RegistryError(f"registered model {name!r} has no alias {alias!r}: promote a checkpoint "
                                f"first (python -m platform.promote CONFIG --alias {alias}), or serve a "
                                f"--version or --checkpoint ({self._versions_hint(name)})")
        return ref

    def find_checkpoint_version(self, name: str, job: str, step: int) -> Optional[VersionRef]:
        """The version already registered from (job, step), if any: promotion is idempotent."""
        from mlflow.exceptions import MlflowException

        query = (f"name={quote(name)} and tags.`{TAG_JOB}`={quote(job)} "
                 f"and tags.`{TAG_STEP}`={quote(str(step))}")
        try:
            found = self.client.search_model_versions(query, order_by=["version_number DESC"])
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise self._fail(f"search versions of {name!r}", exc) from exc
        return VersionRef.of(found[0]) if found else None

    def _versions_hint(self, name: str) -> str:
        try:
            versions = self.client.search_model_versions(f"name={quote(name)}")
        except Exception:   # only a hint for an error message
            return "its versions could not be listed"
        if not versions:
            return f"{name!r} has no versions yet"
        listed = ", ".join(sorted((str(v.version) for v in versions), key=int))
        return f"{name!r} has versions {listed}"

    # ------------------------------------------------------------------ writing

    def ensure_model(self, name: str, description: str = "") -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_registered_model(name)
            return
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise self._fail(f"read registered model {name!r}", exc) from exc
        try:
            self.client.create_registered_model(name, description=description or None)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":   # created concurrently: fine
                raise self._fail(f"create registered model {name!r}", exc) from exc

    def create_version(self, name: str, run_id: str, artifact_path: str, tags: Mapping[str, str],
                       description: str = "") -> VersionRef:
        from mlflow.exceptions import MlflowException

        try:
            mv = self.client.create_model_version(
                name, f"runs:/{run_id}/{artifact_path}", run_id=run_id, tags=dict(tags),
                description=description or None)
        except MlflowException as exc:
            raise self._fail(f"register a version of {name!r}", exc) from exc
        return VersionRef.of(mv)

    def set_alias(self, name: str, alias: str, version: str) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.set_registered_model_alias(name, alias, str(version))
        except MlflowException as exc:
            raise self._fail(f"point alias {alias!r} of {name!r} at version {version}", exc) from exc

    def set_version_tag(self, ref: VersionRef, key: str, value: str) -> None:
        self.client.set_model_version_tag(ref.name, ref.version, key, value)

    # ------------------------------------------------------------------ files

    def local_files(self, ref: VersionRef, cache_dir: str | os.PathLike) -> Path:
        """A local folder holding the version's files (in place, or downloaded once)."""
        from mlflow.exceptions import MlflowException

        in_place = self._local_artifact_dir(ref)
        if in_place is not None:
            return in_place
        target = Path(cache_dir).expanduser() / ref.name / ref.version
        if target.is_dir():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{ref.version}-", dir=target.parent))
        try:
            import mlflow.artifacts

            got = mlflow.artifacts.download_artifacts(artifact_uri=ref.source, dst_path=str(staging),
                                                      tracking_uri=self.store.tracking_uri)
            os.replace(got, target)
        except OSError:
            if not target.is_dir():   # another replica won the race: theirs is as good
                raise
        except MlflowException as exc:
            raise self._fail(f"download the files of {ref.label} ({ref.source})", exc) from exc
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return target

    def _local_artifact_dir(self, ref: VersionRef) -> Optional[Path]:
        if not ref.source.startswith("runs:/"):
            return None
        run_id, _, path = ref.source[len("runs:/"):].partition("/")
        try:
            root = self.client.get_run(run_id).info.artifact_uri
        except Exception as exc:
            raise self._fail(f"find run {run_id} of {ref.label}", exc) from exc
        parts = urlsplit(root)
        if parts.scheme not in ("", "file"):
            return None
        folder = Path(unquote(parts.path)) / path
        return folder if folder.is_dir() else None
