"""Hugging Face interop: the names, config and files of transformers' DbrxForCausalLM.

Our parameters have the same shapes and layouts as Hugging Face's (experts
stacked [experts * ffn, d_model], w2 untransposed), so conversion is a rename:

    ours                              Hugging Face
    wte.weight                        transformer.wte.weight
    blocks.N.norm_1 / attn / norm_2   transformer.blocks.N.norm_attn_norm.norm_1 / attn / norm_2
    blocks.N.ffn.router.layer.weight  transformer.blocks.N.ffn.router.layer.weight
    blocks.N.ffn.experts.{w1,v1,w2}   transformer.blocks.N.ffn.experts.mlp.{w1,v1,w2}
    norm_f.weight                     transformer.norm_f.weight
    lm_head.weight                    lm_head.weight

This module maps names and configs and moves tensors; it never builds a
model, so it does not import DBRX: `DBRX.from_hf` and `DBRX.to_hf` build and
export one with it. Nothing here imports transformers: config.json is read
and written as JSON and weights as safetensors, so serving and training need
only torch and safetensors. A transformers model object is accepted when one
is passed in.

Semantics checked against transformers 5.x modeling_dbrx.py:
- rope theta: HF uses `rope_parameters.rope_theta`; the original DBRX
  config.json has only `attn_config.rope_theta`, used when the former is absent.
- router jitter: HF 5.x multiplies the FFN input in place, so the jitter also
  reaches the experts; we jitter the router input only, as the original DBRX
  router did. Identical in eval mode (HF applies it only while training).
- softmax: HF takes it in the logits' dtype; we take it in float32 (identical in fp32).
- HF refuses tie_word_embeddings, so a tied model is exported with an untied
  copy of the embedding as lm_head.
"""

from __future__ import annotations

import json
import os
import re
import string
from collections.abc import Iterable, Mapping
from typing import Any, Callable, Optional, Union

import torch

from model.config import DBRXConfig

CONFIG_FILE = "config.json"
SAFE_FILE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_FILE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
MAX_SHARD_BYTES = 5 * 2**30
# Fields of DBRXConfig that HF's DbrxConfig cannot hold; kept under this key in config.json.
EXTRA_KEY = "dbrx_platform"

# ------------------------------------------------------------------ names

# (ours, Hugging Face): one table read both ways. A {field} matches _FIELDS[field]
# on one side and is carried over to the other.
_EXPERTS = ("blocks.{layer}.ffn.experts.{matrix}", "transformer.blocks.{layer}.ffn.experts.mlp.{matrix}")
_NAMES = [
    ("wte.weight", "transformer.wte.weight"),
    ("norm_f.weight", "transformer.norm_f.weight"),
    ("lm_head.weight", "lm_head.weight"),
    ("blocks.{layer}.{sub}.{param}", "transformer.blocks.{layer}.norm_attn_norm.{sub}.{param}"),
    ("blocks.{layer}.ffn.router.layer.weight", "transformer.blocks.{layer}.ffn.router.layer.weight"),
    _EXPERTS,
]
_FIELDS = {"layer": r"\d+", "sub": "norm_1|norm_2|attn", "param": ".+", "matrix": "w1|v1|w2"}


def _pattern(template: str) -> re.Pattern:
    """`template` as a regex: its text literal, each {field} a named group."""
    parts = []
    for literal, field, _spec, _conversion in string.Formatter().parse(template):
        parts.append(re.escape(literal))
        if field is not None:
            parts.append(f"(?P<{field}>{_FIELDS[field]})")
    return re.compile("".join(parts))


_TO_HF = [(_pattern(ours), hf) for ours, hf in _NAMES]
_FROM_HF = [(_pattern(hf), ours) for ours, hf in _NAMES]
_EXPERT_KEY = _pattern(_EXPERTS[0])


def _rename(key: str, rules: list[tuple[re.Pattern, str]]) -> str:
    for pattern, template in rules:
        match = pattern.fullmatch(key)
        if match:
            return template.format(**match.groupdict())
    raise KeyError(f"unexpected DBRX parameter name {key!r}")


def to_hf_key(key: str) -> str:
    return _rename(key, _TO_HF)


def from_hf_key(key: str) -> str:
    return _rename(key, _FROM_HF)


# ------------------------------------------------------------------ config

def config_from_hf(hf_config: Union[Mapping, Any]) -> DBRXConfig:
    """DBRXConfig from a transformers DbrxConfig or a config.json dict."""
    d = dict(hf_config) if isinstance(hf_config, Mapping) else hf_config.to_dict()
    attn, ffn = _as_dict(d.get("attn_config")), _as_dict(d.get("ffn_config"))
    act = (ffn.get("ffn_act_fn") or {"name": "silu"}).get("name", "silu")
    if act != "silu":
        raise ValueError(f"ffn_act_fn {act!r} is not supported: DBRX experts use silu")
    rope = _as_dict(d.get("rope_parameters"))
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"rope_type {rope['rope_type']!r} is not supported: only default RoPE")
    theta = rope.get("rope_theta") or attn.get("rope_theta") or d.get("rope_theta") or 10000.0
    extra = _as_dict(d.get(EXTRA_KEY))
    defaults = DBRXConfig()
    return DBRXConfig(
        d_model=d["d_model"], n_layers=d["n_layers"], n_heads=d["n_heads"],
        n_kv_heads=attn.get("kv_n_heads", 1),
        ffn_hidden_size=ffn.get("ffn_hidden_size", 3584),
        moe_num_experts=ffn.get("moe_num_experts", 4), moe_top_k=ffn.get("moe_top_k", 1),
        vocab_size=d["vocab_size"], max_seq_len=d.get("max_seq_len", 2048),
        rope_theta=float(theta), clip_qkv=attn.get("clip_qkv"),
        moe_normalize_expert_weights=ffn.get("moe_normalize_expert_weights", 1.0),
        moe_loss_weight=ffn.get("moe_loss_weight", 0.01),
        moe_z_loss_weight=extra.get("moe_z_loss_weight", 0.0),
        moe_jitter_eps=ffn.get("moe_jitter_eps"),
        tie_word_embeddings=extra.get("tie_word_embeddings", bool(d.get("tie_word_embeddings", False))),
        layer_norm_eps=extra.get("layer_norm_eps", defaults.layer_norm_eps),
        initializer_range=d.get("initializer_range", defaults.initializer_range),
        activation_checkpointing=extra.get("activation_checkpointing", False),
    )


def config_to_hf(cfg: DBRXConfig, dtype: torch.dtype = torch.float32) -> dict:
    """config.json contents that transformers' DbrxConfig loads."""
    return {
        "architectures": ["DbrxForCausalLM"],
        "model_type": "dbrx",
        "d_model": cfg.d_model,
        "n_heads": cfg.n_heads,
        "n_layers": cfg.n_layers,
        "max_seq_len": cfg.max_seq_len,
        "vocab_size": cfg.vocab_size,
        "resid_pdrop": 0.0,
        "emb_pdrop": 0.0,
        "attn_config": {"attn_pdrop": 0.0, "clip_qkv": cfg.clip_qkv, "kv_n_heads": cfg.n_kv_heads,
                        "rope_theta": cfg.rope_theta},
        "ffn_config": {"ffn_act_fn": {"name": "silu"}, "ffn_hidden_size": cfg.ffn_hidden_size,
                       "moe_num_experts": cfg.moe_num_experts, "moe_top_k": cfg.moe_top_k,
                       "moe_jitter_eps": cfg.moe_jitter_eps, "moe_loss_weight": cfg.moe_loss_weight,
                       "moe_normalize_expert_weights": cfg.moe_normalize_expert_weights},
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "initializer_range": cfg.initializer_range,
        "tie_word_embeddings": False,
        "use_cache": True,
        "output_router_logits": False,
        "dtype": str(dtype).removeprefix("torch."),
        EXTRA_KEY: {"moe_z_loss_weight": cfg.moe_z_loss_weight, "layer_norm_eps": cfg.layer_norm_eps,
                    "tie_word_embeddings": cfg.tie_word_embeddings,
                    "activation_checkpointing": cfg.activation_checkpointing},
    }


def _as_dict(x: Any) -> dict:
    if x is None:
        return {}
    return dict(x) if isinstance(x, Mapping) else x.to_dict()


# ------------------------------------------------------------------ loading

# Weights by HF name: function(rows) giving that tensor, rows=None for all rows.
Weights = dict[str, Callable[[Optional[slice]], torch.Tensor]]


def _weights_from_tensors(sd: Mapping[str, torch.Tensor]) -> Weights:
    # Copies: the loaded model must not share storage with the source model.
    return {k: (lambda rows, t=t: (t if rows is None else t[rows]).detach().clone())
            for k, t in sd.items()}


def _weights_from_dir(path: str) -> Weights:
    from safetensors import safe_open

    def safetensors_files(files: list[str]) -> Weights:
        weights: Weights = {}
        for name in files:
            handle = safe_open(os.path.join(path, name), framework="pt", device="cpu")
            for key in handle.keys():
                weights[key] = (lambda rows, h=handle, k=key:
                                h.get_tensor(k) if rows is None else h.get_slice(k)[rows])
        return weights

    def bin_files(files: list[str]) -> Weights:
        sd: dict[str, torch.Tensor] = {}
        for name in files:
            sd.update(torch.load(os.path.join(path, name), map_location="cpu", weights_only=True,
                                 mmap=True))
        return _weights_from_tensors(sd)

    for index, single, read in ((SAFE_INDEX, SAFE_FILE, safetensors_files),
                                (BIN_INDEX, BIN_FILE, bin_files)):
        if os.path.exists(os.path.join(path, index)):
            with open(os.path.join(path, index)) as f:
                return read(sorted(set(json.load(f)["weight_map"].values())))
        if os.path.exists(os.path.join(path, single)):
            return read([single])
    raise FileNotFoundError(f"no {SAFE_FILE}, {SAFE_INDEX}, {BIN_FILE} or {BIN_INDEX} in {path}")


def open_weights(source: Any, config: Optional[Union[DBRXConfig, Mapping, Any]] = None
                 ) -> tuple[DBRXConfig, Weights]:
    """The config and (lazily read) weights of a Hugging Face DbrxForCausalLM.

    source: a directory saved by `save_pretrained`/`DBRX.to_hf` (config.json +
        safetensors, sharded or not, or pytorch_model.bin), a transformers
        DbrxForCausalLM object, or an HF-named state dict (then `config` is
        required: a DBRXConfig, an HF DbrxConfig or a config.json dict).
    """
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if config is None:
            with open(os.path.join(path, CONFIG_FILE)) as f:
                config = json.load(f)
        weights = _weights_from_dir(path)
    elif isinstance(source, Mapping):
        if config is None:
            raise ValueError("loading from a state dict needs config= (DBRXConfig or HF config)")
        weights = _weights_from_tensors(source)
    elif hasattr(source, "state_dict") and hasattr(source, "config"):
        config = config if config is not None else source.config
        weights = _weights_from_tensors(source.state_dict())
    else:
        raise TypeError(f"cannot load DBRX weights from {type(source).__name__}: pass a directory, "
                        "a DbrxForCausalLM or a state dict")
    return (config if isinstance(config, DBRXConfig) else config_from_hf(config)), weights


def state_from_hf(weights: Weights, names: Iterable[str], cfg: DBRXConfig, experts: range,
                  dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
    """Our state dict for the parameters `names`, read from HF-named `weights`.

    Expert tensors hold only the rows of `experts` (one expert-parallel rank's
    share), read without loading the others. A tied model's lm_head is left
    out: it is the embedding. `dtype` casts (default: the checkpoint's dtype).
    """
    names = list(names)
    rows = slice(experts.start * cfg.ffn_hidden_size, experts.stop * cfg.ffn_hidden_size)
    state: dict[str, torch.Tensor] = {}
    for name in names:
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        hf_name = to_hf_key(name)
        if hf_name not in weights:
            raise KeyError(f"checkpoint has no {hf_name!r} (needed for {name})")
        tensor = weights[hf_name](rows if _EXPERT_KEY.fullmatch(name) else None)
        state[name] = tensor.to(dtype) if dtype is not None else tensor
    unused = set(weights) - {to_hf_key(n) for n in names}
    if unused:
        raise KeyError(f"checkpoint has parameters DBRX does not: {sorted(unused)[:5]}")
    return state


# ------------------------------------------------------------------ saving

def write_hf(path: str, state: Mapping[str, torch.Tensor], cfg: DBRXConfig, *,
             dtype: Optional[torch.dtype] = None, max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """Write our full state dict (every expert) as config.json + safetensors,
    sharded above `max_shard_bytes`, that transformers' DbrxForCausalLM.from_pretrained loads."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        t = t.detach().to("cpu", dtype=dtype) if dtype is not None else t.detach().cpu()
        tensors[to_hf_key(name)] = t.clone().contiguous()   # clone: tied weights must not share storage
    out_dtype = dtype or next(iter(tensors.values())).dtype

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes

    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
        json.dump(config_to_hf(cfg, out_dtype), f, indent=2)
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], os.path.join(path, SAFE_FILE), metadata=meta)
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(path, fname), metadata=meta)
        weight_map.update({k: fname for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(path, SAFE_INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
