"""Promotion: a committed checkpoint becomes a registered model version behind an alias.

    promote(cfg)                       # the job's latest valid checkpoint -> promote.alias
    promote(cfg, step=200, alias="production", gate=False)

Steps, each safe to repeat (a second call for the same checkpoint reuses its version):
1. pick the checkpoint (default: the newest that verifies by sha256) and read it;
2. gate (promote.gate): the candidate and the alias's current version are
   evaluated on the same held-out batches; a worse candidate is refused with
   `GateRefused` and nothing changes;
3. protect the checkpoint in the job's CheckpointStore (retention keeps it);
4. log the version folder (platform.registry.artifacts) to the job's MLflow
   run under `checkpoints/step_<N>/` and register it, with lineage tags;
5. move the alias to it (serving replicas watching the alias switch over).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from platform.config import state_dir
from platform.config.schema import JobConfig
from platform.errors import UserError
from platform.registry import models as reg
from platform.registry.models import ModelRegistry, RegistryError, VersionRef

if TYPE_CHECKING:
    from model import DBRX
    from platform.checkpoint import CommittedCheckpoint

log = logging.getLogger("platform.registry")

ARTIFACT_DIR = "checkpoints"


class GateRefused(UserError):
    """The candidate's held-out loss is worse than the version the alias serves."""


@dataclass(frozen=True)
class Promotion:
    """What `promote` did. `version` is the registered version the alias now points at."""

    name: str
    version: str
    alias: str
    step: int
    run_id: str
    previous_version: Optional[str]     # the alias's target before, None if it had none
    candidate_loss: Optional[float]     # held-out losses, when the gate compared them
    previous_loss: Optional[float]
    reused: bool                        # the checkpoint was already registered as `version`

    @property
    def changed(self) -> bool:
        return self.previous_version != self.version

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "changed": self.changed}

    def __str__(self) -> str:
        what = "reused" if self.reused else "registered"
        line = f"{what} {self.name} version {self.version} from step {self.step} (MLflow run {self.run_id})"
        if self.candidate_loss is not None:
            line += (f"; held-out loss {self.candidate_loss:.4f} vs {self.previous_loss:.4f} "
                     f"of version {self.previous_version}")
        if self.changed:
            before = f" (was {self.previous_version})" if self.previous_version else ""
            return f"{line}\nalias {self.alias!r} -> version {self.version}{before}"
        return f"{line}\nalias {self.alias!r} already points at version {self.version}"


def promote(cfg: JobConfig, step: Optional[int] = None, alias: Optional[str] = None,
            gate: Optional[bool] = None) -> Promotion:
    """Register a committed checkpoint of the job and point `alias` at it.

    step: the checkpoint (default: the newest one that verifies).
    alias / gate: default to `cfg.promote.alias` / `cfg.promote.gate`.
    Raises `GateRefused` (a UserError, exit code 1 in the CLI) when the gate
    finds the candidate worse; other UserErrors name what is missing.
    """
    from platform.train.checkpointing import open_checkpoints
    from platform.checkpoint.trainer_state import read_trainer_state

    name, alias = cfg.promote.registered_model, alias or cfg.promote.alias
    gate = cfg.promote.gate if gate is None else gate
    store = open_checkpoints(cfg)
    ckpt = _pick_checkpoint(store, step)
    registry = ModelRegistry(cfg.tracking)
    existing = registry.find_checkpoint_version(name, cfg.name, ckpt.step)
    current = registry.alias_target(name, alias)
    if existing is not None and current is not None and existing.version == current.version:
        log.info("%s already points at %s (step %d)", alias, existing.label, ckpt.step)
        return Promotion(name, existing.version, alias, ckpt.step, existing.run_id or "", current.version,
                         None, None, reused=True)

    reused = existing is not None
    gated = gate and current is not None
    losses: tuple[Optional[float], Optional[float]] = (None, None)
    with tempfile.TemporaryDirectory(prefix="dbrx-promote-") as tmp:
        if existing is None or gated:   # else: registered before, alias move only
            folder = ckpt.local_path or store.download(ckpt, Path(tmp) / "checkpoint", verify=True)
            candidate = _candidate_model(cfg, folder)
            if gated:
                losses = _gate(cfg, registry, candidate, current, ckpt.step, alias)
        store.protect(ckpt.step, reason=f"promoted to {name} ({alias})")
        if existing is None:
            trainer = read_trainer_state(folder)
            run_id = _job_run(registry, cfg, str(trainer.extra.get("run_id") or ""))
            lineage = _lineage(cfg, ckpt, trainer, run_id, losses[0])
            existing = _register(registry, cfg, candidate, lineage, Path(tmp) / "version")
        elif losses[0] is not None:
            registry.set_version_tag(existing, reg.TAG_HELDOUT, f"{losses[0]:.6f}")
    registry.set_alias(name, alias, existing.version)
    result = Promotion(name, existing.version, alias, ckpt.step, existing.run_id or "",
                       current.version if current else None, losses[0], losses[1], reused=reused)
    log.info("%s", result)
    return result


# ----------------------------------------------------------------------------- steps

def _pick_checkpoint(store, step: Optional[int]) -> "CommittedCheckpoint":
    from platform.checkpoint import CheckpointCorruptError, CheckpointNotFoundError

    if step is not None:
        try:
            return store.get(step, verify=True)
        except CheckpointNotFoundError:
            steps = store.list_committed()
            raise UserError(f"no committed checkpoint for step {step} at {store.root.uri} "
                            f"(committed steps: {', '.join(map(str, steps)) or 'none'})") from None
        except CheckpointCorruptError as exc:
            raise UserError(f"checkpoint step {step} at {store.root.uri} fails verification "
                            f"({exc.reason}); promote another step") from None
    ckpt, skipped = store.latest_valid(verify=True)
    if ckpt is None:
        why = "".join(f"; step {s}: {r}" for s, r in skipped)
        raise UserError(f"no valid checkpoint to promote at {store.root.uri}{why}: train the job "
                        "first (python -m platform.submit CONFIG)")
    for s, reason in skipped:
        log.warning("skipped checkpoint step %d: %s", s, reason)
    return ckpt


def _candidate_model(cfg: JobConfig, folder: Path) -> "DBRX":
    from platform.registry.artifacts import model_from_state_dict
    from platform.checkpoint.trainer_state import consolidated_weights

    try:
        weights = consolidated_weights(folder, cfg.model.moe_num_experts)
        return model_from_state_dict(cfg.model, weights)
    except (KeyError, RuntimeError, ValueError) as exc:
        raise UserError(f"the checkpoint at {folder} does not fit the job's model config "
                        f"({str(exc).splitlines()[0][:300]}); promote with the config it was trained "
                        "with") from exc


def _gate(cfg: JobConfig, registry: ModelRegistry, candidate: "DBRX", current: VersionRef,
          step: int, alias: str) -> tuple[float, float]:
    """(candidate loss, current loss) on the same held-out batches; raises GateRefused if worse."""
    import copy

    from platform.registry.artifacts import load_version
    from platform.registry.evaluate import as_served, gate_weights, heldout_batches, heldout_loss

    weights = gate_weights(cfg)
    batches = heldout_batches(cfg)
    served = candidate if weights == "fp32" else as_served(copy.deepcopy(candidate), weights)
    candidate_loss = heldout_loss(served, batches)
    del served
    current_model, _ = load_version(registry.local_files(current, Path(state_dir()) / "registry-cache"))
    current_loss = heldout_loss(as_served(current_model, weights), batches)
    del current_model
    tolerance = cfg.promote.gate_tolerance
    log.info("gate: candidate step %d held-out loss %.4f, %s %.4f (%s weights, as served)", step,
             candidate_loss, current.label, current_loss, weights)
    if candidate_loss > current_loss + tolerance:
        sequences = sum(len(b) for b in batches)
        slack = f" (tolerance {tolerance:g})" if tolerance else ""
        raise GateRefused(
            f"not promoting step {step} of job {cfg.name!r}: its held-out loss {candidate_loss:.4f} is "
            f"worse than {current_loss:.4f} of {current.label} (alias {alias!r}) on the same "
            f"{sequences} held-out sequences{slack}. Train longer, promote another --step, or skip "
            "the gate with --no-gate (promote.gate=false)")
    return candidate_loss, current_loss


def _job_run(registry: ModelRegistry, cfg: JobConfig, hinted: str) -> str:
    """The job's MLflow run: the checkpoint's own, else the newest tagged with the job, else a new one."""
    from platform.tracking.run import JOB_TAG, finish_run, start_or_resume_run

    client = registry.client
    if hinted:
        try:
            return client.get_run(hinted).info.run_id
        except Exception as exc:   # deleted or another store: fall back to the job tag
            log.warning("checkpoint names MLflow run %s, which %s cannot read (%s); using the job's run",
                        hinted, registry.store.tracking_uri, type(exc).__name__)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    if exp is not None:
        runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{JOB_TAG}` = {reg.quote(cfg.name)}",
                                  order_by=["attributes.start_time DESC"], max_results=1)
        if runs:
            return runs[0].info.run_id
    run_id = start_or_resume_run(cfg, resume=False)
    finish_run(cfg, run_id, "FINISHED")
    return run_id


def _lineage(cfg: JobConfig, ckpt, trainer, run_id: str, heldout: Optional[float]) -> dict[str, Any]:
    from platform.tracking.run import CODE_VERSION_TAG, code_version

    return {
        "run_id": run_id,
        "job_name": cfg.name,
        "step": ckpt.step,
        "consumed_sequences": trainer.consumed_sequences,
        "tokens_seen": trainer.consumed_sequences * cfg.train.seq_len,
        "data_mixture": _mixture(cfg, ckpt.step),
        "data_cache_key": trainer.extra.get("data_cache_key", ""),
        "train_loss": trainer.extra.get("loss"),
        "heldout_loss": heldout,
        "checkpoint_uri": ckpt.uri,
        "code_version": _run_tag(cfg, run_id, CODE_VERSION_TAG) or code_version(),
        "promoted_by_code_version": code_version(),
        "promoted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _mixture(cfg: JobConfig, step: int) -> dict[str, Any]:
    """The data sources' weights in effect for the checkpoint's last step (curriculum applied)."""
    from platform.data import DataError
    from platform.data.order import MixtureSchedule

    sources = cfg.data.sources
    try:
        schedule = MixtureSchedule([s.name for s in sources], [s.weight for s in sources],
                                   cfg.data.curriculum, cfg.train.global_batch_size, cfg.train.seed)
        return {k: round(v, 6) for k, v in schedule.weights_at(max(step - 1, 0)).items()}
    except DataError:
        return {s.name: s.weight for s in sources}


def _run_tag(cfg: JobConfig, run_id: str, key: str) -> str:
    try:
        return ModelRegistry(cfg.tracking).client.get_run(run_id).data.tags.get(key, "")
    except Exception:   # lineage detail only
        return ""


def _register(registry: ModelRegistry, cfg: JobConfig, model: "DBRX", lineage: dict[str, Any],
              folder: Path) -> VersionRef:
    from platform.registry.artifacts import FORMAT, write_version

    name, step = cfg.promote.registered_model, lineage["step"]
    write_version(folder, model, lineage)
    artifact_path = f"{ARTIFACT_DIR}/step_{step}"
    try:
        registry.client.log_artifacts(lineage["run_id"], str(folder), artifact_path)
    except Exception as exc:
        raise RegistryError(f"could not upload the weights of step {step} to MLflow run "
                            f"{lineage['run_id']}: {exc}") from exc
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    tags = {
        reg.TAG_RUN_ID: lineage["run_id"],
        reg.TAG_JOB: cfg.name,
        reg.TAG_STEP: str(step),
        reg.TAG_TOKENS: str(lineage["tokens_seen"]),
        reg.TAG_MIXTURE: json.dumps(lineage["data_mixture"], sort_keys=True),
        reg.TAG_DATA_KEY: str(lineage["data_cache_key"]),
        reg.TAG_CODE: lineage["code_version"],
        reg.TAG_CHECKPOINT: lineage["checkpoint_uri"],
        reg.TAG_FORMAT: FORMAT,
    }
    if lineage["heldout_loss"] is not None:
        tags[reg.TAG_HELDOUT] = f"{lineage['heldout_loss']:.6f}"
    registry.ensure_model(name, description=f"DBRX checkpoints promoted from job {cfg.name}")
    return registry.create_version(name, lineage["run_id"], artifact_path, tags,
                                   description=f"job {cfg.name} step {step}")
