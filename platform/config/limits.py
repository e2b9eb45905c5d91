"""The allowed range of every number in the schema, and caps on every length.

A size nobody bounded costs unbounded memory and time further down (a
billion nodes is a billion-entry plan and a billion Terraform resources), so
each number has a range here that `validate` checks before anything is built,
and every string, list and mapping a length cap that `build` checks while it
types the tree. `tests/test_config_hardening.py` fails when a numeric field has
no range, so a new field cannot slip through.

Keys are dotted schema paths; `[]` stands for any list index and `*` for any
mapping key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Nodes a provider module accepts (the `node_count` validation of infra/<provider>/variables.tf;
# the tests compare the two).
PROVIDER_MAX_NODES = {"local": 64, "aws": 512}
MAX_NODES = max(PROVIDER_MAX_NODES.values())

MAX_FILE_BYTES = 1 << 20  # a job file (Hydra reads it whole)
MAX_TEXT = 4096          # characters in any string (paths, URIs, names, keys)
MAX_ITEMS = 1024         # entries in any list or mapping, unless ITEMS says otherwise
ITEMS = {
    "data.sources": 256,
    "cluster.tags": 50,               # EC2 allows 50 tags per resource
    "cluster.terraform_vars": 64,
    "serve.allowed_hosts": 64,
    "serve.allowed_origins": 64,
}

DAY_S = 86400.0
# Experts over all layers (n_layers x moe_num_experts). A checkpoint stores each one as its own
# tensors and the plan places each on a writer, so their number is bounded like any size
# (DeepSeek-V3 has 61 x 256 = 15,616).
MAX_LAYER_EXPERTS = 1 << 16


@dataclass(frozen=True)
class Range:
    """lo..hi; an open end excludes the bound itself (a learning rate must be > 0)."""

    lo: float
    hi: float
    lo_open: bool = False
    hi_open: bool = False
    hint: str = ""          # what the bound means, appended to the message

    def problem(self, value: float) -> str | None:
        """Why `value` is out of range, naming the bound it crosses; None when inside."""
        if isinstance(value, float) and not math.isfinite(value):
            return f"must be a finite number, got {value}"
        if value <= self.lo if self.lo_open else value < self.lo:
            bound = f"greater than {_num(self.lo)}" if self.lo_open else f"at least {_num(self.lo)}"
        elif value >= self.hi if self.hi_open else value > self.hi:
            bound = f"less than {_num(self.hi)}" if self.hi_open else f"at most {_num(self.hi)}"
        else:
            return None
        return f"must be {bound}, got {value}" + (f" ({self.hint})" if self.hint else "")


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


def _positive(hi: float, hint: str = "") -> Range:
    return Range(0, hi, lo_open=True, hint=hint)


def _count(lo: int, hi: int, hint: str = "") -> Range:
    return Range(lo, hi, hint=hint)


_STEPS = 10 ** 12
_PORT = _count(1, 65535, "a TCP port")
_FRACTION = Range(0, 1, hi_open=True)
_WEIGHT = Range(0, 1e6)
_MB = 1 << 24            # 16 TiB in MiB

RANGES: dict[str, Range] = {
    # model (model/config.py): shapes up to well past any published model
    "model.d_model": _count(1, 65536),
    "model.n_layers": _count(1, 1024),
    "model.n_heads": _count(1, 1024),
    "model.n_kv_heads": _count(1, 1024),
    "model.ffn_hidden_size": _count(1, 1 << 20),
    "model.moe_num_experts": _count(1, 1024),
    "model.moe_top_k": _count(1, 1024),
    "model.vocab_size": _count(1, 1 << 22),
    "model.max_seq_len": _count(1, 1 << 21),
    "model.rope_theta": _positive(1e12),
    "model.clip_qkv": _positive(1e6),
    "model.moe_normalize_expert_weights": _positive(1e3),
    "model.moe_loss_weight": Range(0, 1e3),
    "model.moe_z_loss_weight": Range(0, 1e3),
    "model.moe_jitter_eps": _FRACTION,
    "model.layer_norm_eps": _positive(1.0),
    "model.initializer_range": _positive(10.0),
    # cluster
    "cluster.min_nodes": _count(1, MAX_NODES),
    "cluster.max_nodes": _count(1, MAX_NODES, ", ".join(
        f"infra/{p} runs up to {n}" for p, n in PROVIDER_MAX_NODES.items())),
    "cluster.gpus_per_node": _count(0, 64, "0 means CPU nodes"),
    "cluster.cpus_per_worker": _count(1, 1024),
    "cluster.gpu_memory_gb": Range(0, 4096),
    "cluster.peak_tflops_per_device": Range(0, 1e6),
    "cluster.price_per_node_hour": Range(0, 1e6),
    "cluster.head_port": _PORT,
    "cluster.dashboard_port": _PORT,
    "cluster.node_memory_mb": _count(256, _MB, "infra/local needs at least 256 MiB per node"),
    "cluster.node_object_store_mb": _count(80, _MB, "Ray's object store needs at least 80 MiB"),
    "cluster.node_join_timeout_s": _positive(DAY_S),
    "cluster.resize_check_interval_s": _positive(DAY_S),
    "cluster.worker_start_timeout_s": _positive(DAY_S),
    "cluster.node_mtbf_hours": _positive(1e7, "hours between unexpected failures of one node"),
    # data
    "data.sources[].weight": _WEIGHT,
    "data.curriculum[].start_step": _count(0, _STEPS),
    "data.curriculum[].weights.*": _WEIGHT,
    "data.eval_fraction": _FRACTION,
    "data.num_tokenize_workers": _count(1, 1024),
    # train
    "train.global_batch_size": _count(1, 1 << 24),
    "train.micro_batch_size": _count(1, 1 << 16),
    "train.seq_len": _count(1, 1 << 21),
    "train.total_tokens": _count(1, 10 ** 16),
    "train.lr": _positive(10.0),
    "train.min_lr": Range(0, 10.0),
    "train.warmup_steps": _count(0, _STEPS),
    "train.weight_decay": Range(0, 10.0),
    "train.adam_beta1": _FRACTION,
    "train.adam_beta2": _FRACTION,
    "train.adam_eps": _positive(1.0),
    "train.grad_clip": Range(0, 1e6, hint="0 disables clipping"),
    "train.zero_stage": _count(0, 2, "DeepSpeed partitions expert-parallel MoE parameters with "
                                     "ZeRO 0, 1 or 2 only"),
    "train.expert_parallel_size": _count(0, 1024, "0 means automatic"),
    "train.max_expert_parallel_size": _count(0, 1024, "0 means no cap"),
    "train.seed": _count(0, 2 ** 32 - 1),
    "train.max_failures": _count(0, 1000),
    "train.max_job_restarts": _count(0, 100),
    "train.log_every_steps": _count(1, _STEPS),
    "train.eval_every_steps": _count(1, _STEPS),
    "train.eval_batches": _count(1, 100_000),
    "train.assumed_mfu": Range(0, 1, lo_open=True),
    # checkpoint
    "checkpoint.every_steps": _count(1, _STEPS, "or auto for the plan's Young-Daly interval"),
    "checkpoint.assumed_copy_gb_per_s": _positive(1e4, "GB/s a rank copies from device to host"),
    "checkpoint.keep_last": _count(1, 10_000),
    # tracking, promotion, serving
    "tracking.ui_port": _PORT,
    "tracking.max_retry_s": _positive(DAY_S),
    "promote.gate_tolerance": Range(0, 1e3),
    "serve.port": _PORT,
    "serve.num_replicas": _count(1, 1024),
    "serve.max_replicas": _count(1, 1024),
    "serve.max_tokens_limit": _count(1, 1 << 21),
    "serve.max_concurrent_sequences": _count(1, 4096),
    "serve.max_kv_cache_mb": _count(0, 1 << 24, "0 means no cap beyond max_concurrent_sequences"),
    "serve.max_context_tokens": _count(0, 1 << 21, "0 means the model's max_seq_len"),
    "serve.alias_poll_s": _positive(DAY_S),
    "serve.replica_cpus": Range(0, 1024),
    "serve.replica_gpus": Range(0, 64),
    "serve.devices_per_replica": _count(1, 64, "devices one replica's experts are split over"),
}


# A checkpoint step given on a command line (promote --step).
STEP = _count(0, _STEPS)


def items_limit(pattern: str) -> int:
    """How many entries the list or mapping at `pattern` may hold."""
    return ITEMS.get(pattern, MAX_ITEMS)
