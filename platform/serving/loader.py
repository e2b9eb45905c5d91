"""What a replica serves: a model found by registry alias, version or checkpoint path.

`ModelLoader` turns a `ModelSource` into a `LoadedModel` (weights, tokenizer,
the id clients name and the version reported in `x-model-version`).
`AliasWatcher` is the rolling update: a replica thread that re-resolves the
alias every `alias_poll_s` and, when it moved, loads the new version next to
the old one and swaps one reference. Requests hold the `LoadedModel` that
admitted them, so those in flight finish on the old weights while new ones
start on the new; nothing is interrupted and no request fails. A version
that fails to load is logged and retried; the old one keeps serving.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

from platform.errors import UserError
from platform.registry.models import ModelRegistry, VersionRef
from platform.serving.origin import OriginPolicy
from platform.tracking.store import Store

if TYPE_CHECKING:
    from model import DBRX
    from model.config import DBRXConfig
    from platform.data.tokenizer import Tokenizer

log = logging.getLogger("platform.serving")


@dataclass(frozen=True)
class ModelSource:
    """Exactly one of alias, version, checkpoint, for the model `name`."""

    name: str                           # registered model name; the id clients send as `model`
    alias: Optional[str] = None
    version: Optional[str] = None
    checkpoint: Optional[str] = None    # local folder: a version/HF export, or a training checkpoint

    def __post_init__(self) -> None:
        given = [k for k in ("alias", "version", "checkpoint") if getattr(self, k)]
        if len(given) != 1:
            raise UserError(f"serve one of alias, version or checkpoint, not {given or 'none'}")

    @property
    def follows_alias(self) -> bool:
        return bool(self.alias)

    def describe(self) -> str:
        if self.alias:
            return f"{self.name}@{self.alias}"
        if self.version:
            return f"{self.name} version {self.version}"
        return f"checkpoint {self.checkpoint}"


@dataclass(frozen=True)
class ServerSettings:
    """Everything a replica needs; plain data, no secrets (the API key travels as a digest)."""

    source: ModelSource
    tracking: Store                         # where the registry is (alias and version sources)
    model_config: Optional["DBRXConfig"]    # architecture of a training checkpoint given by path
    cache_dir: str                          # downloads of versions stored remotely
    max_tokens_limit: int = 512
    alias_poll_s: float = 5.0
    api_key_digest: Optional[str] = None
    use_gpu: bool = False
    # Continuous batching (platform.serving.engine): sequences decoding at once per replica, the KV
    # cache memory they may take (0: whatever max_concurrent_sequences needs), and the positions a
    # request may use (0: the model's max_seq_len).
    max_concurrent_sequences: int = 16
    max_kv_cache_mb: int = 0
    max_context_tokens: int = 0
    # Weights as served: auto (bf16 on a GPU, the checkpoint's dtype on CPU), fp32, bf16, int8, fp8.
    weights: str = "auto"
    # Devices one replica spans (platform.serving.shards): its experts split this many ways, one
    # process per device, each reserving replica_cpus / replica_gpus.
    devices_per_replica: int = 1
    replica_cpus: float = 0.0
    replica_gpus: float = 0.0
    origins: OriginPolicy = OriginPolicy.build("127.0.0.1", 8000)   # Host/Origin checks (serve.host/port)


@dataclass(frozen=True)
class LoadedModel:
    model: "DBRX"
    tokenizer: "Tokenizer"
    model_id: str       # what /v1/models lists and requests must name
    version: str        # the x-model-version header: registry version, or "step-<N>" for a path
    created: int        # unix time the weights were loaded
    shard_key: Optional[int] = None   # the same weights' name on the replica's other devices (shards)

    @property
    def max_seq_len(self) -> int:
        return self.model.cfg.max_seq_len


class ModelLoader:
    """Loads what `settings` serve. `ep_group`: an expert-parallel group this process is a rank
    of; the model then holds only this rank's experts (read alone from the files where they allow)."""

    def __init__(self, settings: ServerSettings, ep_group=None):
        self.settings = settings
        self.ep_group = ep_group
        self.source = settings.source
        self.registry = None if self.source.checkpoint else ModelRegistry(settings.tracking)

    def load(self) -> LoadedModel:
        """The model to start with."""
        if self.source.checkpoint:
            return self.load_path(Path(self.source.checkpoint))
        return self.load_ref(self.resolve())

    def resolve(self) -> VersionRef:
        assert self.registry is not None
        if self.source.alias:
            return self.registry.require_alias(self.source.name, self.source.alias)
        return self.registry.get_version(self.source.name, self.source.version)

    def load_ref(self, ref: VersionRef) -> LoadedModel:
        assert self.registry is not None
        folder = self.registry.local_files(ref, self.settings.cache_dir)
        model, tok = self._load_folder(folder)
        return LoadedModel(self._finish(model), tok, self.source.name, ref.version, int(time.time()))

    def load_path(self, path: Path) -> LoadedModel:
        """A version folder / HF export (config.json + safetensors) or a committed training checkpoint."""
        from platform.registry.artifacts import PICKLE_SUFFIXES, read_lineage
        from platform.checkpoint.trainer_state import TRAINER_FILE

        if not path.is_dir():
            raise UserError(f"checkpoint {path} is not a folder")
        if not (path / TRAINER_FILE).is_file():
            model, tok = self._load_folder(path)
            step = read_lineage(path).get("step")
            version = f"step-{step}" if step is not None else path.name
            return LoadedModel(self._finish(model), tok, self.source.name, version, int(time.time()))
        pickled = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickled:
            raise UserError(f"{path} holds pickle-based files ({', '.join(pickled)}); only safetensors are loaded")
        model, tok = self._training_checkpoint(path)
        from platform.checkpoint.trainer_state import read_trainer_state

        version = f"step-{read_trainer_state(path).step}"
        return LoadedModel(self._finish(model), tok, self.source.name, version, int(time.time()))

    def _training_checkpoint(self, path: Path) -> tuple["DBRX", "Tokenizer"]:
        from platform.data import get_tokenizer
        from platform.registry.artifacts import model_from_state_dict
        from platform.checkpoint.trainer_state import consolidated_weights

        cfg = self.settings.model_config
        if cfg is None:
            raise UserError(f"{path} is a training checkpoint: its model config must be given")
        try:
            state = consolidated_weights(path, cfg.moe_num_experts)
            model = (model_from_state_dict(cfg, state) if self.ep_group is None
                     else self._sharded_model(cfg, state))
        except (KeyError, RuntimeError, ValueError) as exc:
            raise UserError(f"checkpoint {path} does not fit the job's model config: "
                            f"{str(exc).splitlines()[0][:300]}") from exc
        placement = self._placement()
        if placement["device"] != "cpu" or placement["dtype"] is not None:
            model = model.to(device=placement["device"], dtype=placement["dtype"])
        return model.eval(), get_tokenizer(cfg.vocab_size)

    def _load_folder(self, folder: Path) -> tuple["DBRX", "Tokenizer"]:
        """A version folder / HF export: whole, or this rank's experts only (safetensors rows)."""
        from platform.registry.artifacts import load_version

        if self.ep_group is None:
            return load_version(folder, **self._placement())
        import json

        from model import DBRX
        from platform.data import get_tokenizer
        from platform.registry.artifacts import (
            CONFIG_FILE, TOKENIZER_FILE, VersionFormatError, check_safetensors_only, tokenizer_from_spec,
        )

        folder = Path(folder)
        check_safetensors_only(folder)
        spec = folder / TOKENIZER_FILE
        try:
            tok = (tokenizer_from_spec(json.loads(spec.read_text()), str(spec)) if spec.is_file() else
                   get_tokenizer(int(json.loads((folder / CONFIG_FILE).read_text())["vocab_size"])))
            model = DBRX.from_hf(str(folder), ep_group=self.ep_group, **self._placement())
        except VersionFormatError:
            raise
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise VersionFormatError(f"cannot load the model in {folder}: {exc}") from exc
        return model.eval(), tok

    def _sharded_model(self, cfg: "DBRXConfig", state: dict) -> "DBRX":
        """A DBRX of this rank's experts from a full state dict (every expert stacked)."""
        import torch

        from model import DBRX

        with torch.device("meta"):
            model = DBRX(cfg, ep_group=self.ep_group)
        rows = {name: slice(model.local_experts.start * cfg.ffn_hidden_size,
                            model.local_experts.stop * cfg.ffn_hidden_size)
                for name, p in model.named_parameters() if any(p is q for q in model.expert_parameters())}
        local = {k: (v[rows[k]].contiguous() if k in rows else v) for k, v in state.items()}
        model.assign_state_dict(local)
        return model.eval()

    def _placement(self) -> dict:
        """Where the checkpoint is loaded and in which dtype (8-bit formats quantize from it after)."""
        import torch

        from model.quant import FORMATS, fp8_supported

        weights = self.settings.weights
        if weights != "auto" and weights not in FORMATS:
            raise UserError(f"serve.weights must be auto or one of {', '.join(FORMATS)}, got {weights!r}")
        gpu = self.settings.use_gpu and torch.cuda.is_available()
        device = "cuda" if gpu else "cpu"
        if weights == "fp8":
            problem = fp8_supported(torch.device(device))
            if problem:
                raise UserError(f"serve.weights=fp8: {problem}; use int8 or bf16")
        if weights == "fp32":
            return {"device": device, "dtype": torch.float32}
        if weights in ("int8", "fp8"):
            # Loaded on the host and quantized block by block on its way to the device, so the
            # device never holds more than one block in 16 bits.
            return {"device": "cpu", "dtype": torch.bfloat16 if gpu or weights == "fp8" else None}
        if weights == "bf16" or gpu:
            return {"device": device, "dtype": torch.bfloat16}
        return {"device": device, "dtype": None}

    def _finish(self, model: "DBRX") -> "DBRX":
        """Quantize the loaded weights when serve.weights asks for 8 bits; eval mode either way."""
        if self.settings.weights in ("int8", "fp8"):
            import torch

            from model.quant import quantize_model

            gpu = self.settings.use_gpu and torch.cuda.is_available()
            quantize_model(model, self.settings.weights, device="cuda" if gpu else "cpu")
        return model.eval()


class AliasWatcher:
    """Follows the alias of a `ModelLoader`: loads each new target and hands it to `install`."""

    def __init__(self, loader: ModelLoader, current: Callable[[], LoadedModel],
                 install: Callable[[LoadedModel], None], poll_s: float):
        self.loader, self._current, self._install, self.poll_s = loader, current, install, poll_s
        self._stop = threading.Event()
        self._last_error = ""
        self._thread = threading.Thread(target=self._run, name="dbrx-alias-watcher", daemon=True)

    def start(self) -> "AliasWatcher":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.check_once()

    def check_once(self) -> bool:
        """Switch if the alias moved; True when a new version was installed."""
        try:
            ref = self.loader.resolve()
            old = self._current()
            if ref.version == old.version:
                return False
            log.info("alias %s moved: loading %s (serving %s)", self.loader.source.describe(), ref.label,
                     old.version)
            new = self.loader.load_ref(ref)
            self._install(new)
            log.info("now serving %s (was version %s)", ref.label, old.version)
            self._last_error = ""
            return True
        except Exception as exc:   # the current version keeps serving; retry next poll
            message = f"{type(exc).__name__}: {exc}"
            if message != self._last_error:
                log.warning("cannot follow alias %s (still serving version %s): %s",
                            self.loader.source.describe(), self._current().version, message)
                self._last_error = message
            return False
