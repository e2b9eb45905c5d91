"""Cross-field checks: combinations that type-check but cannot run.

Each check names the key to change and how, so a user can fix a job file
from the message alone. All problems are collected, never just the first.
"""

from __future__ import annotations

import glob
import ipaddress
import os
import re

from platform.config.build import Problem
from platform.config.schema import JobConfig

_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
_PROVIDERS = ("local", "aws")
_PRECISIONS = ("auto", "fp32", "bf16")
_FORMATS = ("auto", "text", "jsonl", "parquet")


def validate(cfg: JobConfig) -> list[Problem]:
    problems: list[Problem] = []

    def bad(path: str, message: str) -> None:
        problems.append(Problem(path, message))

    if not _NAME.match(cfg.name):
        bad("name", f"{cfg.name!r} must be 1-63 lowercase letters, digits, '.', '_' or '-' "
                    "(it names the job's checkpoints, MLflow run and Terraform state)")

    for field, message in cfg.model.problems():
        bad(f"model.{field}", message)

    _check_cluster(cfg, bad)
    _check_train(cfg, bad)
    _check_data(cfg, bad)
    _check_checkpoint(cfg, bad)
    _check_serve(cfg, bad)
    _check_port(bad, "tracking.ui_port", cfg.tracking.ui_port)
    return problems


def _check_port(bad, path: str, value: int) -> None:
    if not 1 <= value <= 65535:
        bad(path, f"{value} is not a TCP port (1-65535)")


def _check_cluster(cfg: JobConfig, bad) -> None:
    c = cfg.cluster
    if c.provider not in _PROVIDERS:
        bad("cluster.provider", f"{c.provider!r} is not one of {', '.join(_PROVIDERS)}")
    if c.min_nodes < 1:
        bad("cluster.min_nodes", f"must be at least 1, got {c.min_nodes}")
    if c.min_nodes > c.max_nodes:
        bad("cluster.min_nodes", f"min_nodes {c.min_nodes} exceeds max_nodes {c.max_nodes}: "
                                 "lower min_nodes or raise max_nodes")
    if c.gpus_per_node < 0:
        bad("cluster.gpus_per_node", f"must be >= 0 (0 means CPU nodes), got {c.gpus_per_node}")
    if c.cpus_per_worker < 1:
        bad("cluster.cpus_per_worker", f"must be at least 1, got {c.cpus_per_worker}")
    if c.provider == "aws":
        if c.gpus_per_node < 1:
            bad("cluster.gpus_per_node", "aws nodes are GPU instances: set gpus_per_node (8 on p5.48xlarge)")
        if not c.region:
            bad("cluster.region", "aws needs a region, e.g. cluster.region=us-east-1")
    if c.gpus_per_node > 0 and c.gpu_memory_gb <= 0:
        bad("cluster.gpu_memory_gb", "set the accelerator memory so the plan can check that the model fits")
    for key in ("head_port", "dashboard_port"):
        _check_port(bad, f"cluster.{key}", getattr(c, key))
    if c.node_join_timeout_s <= 0:
        bad("cluster.node_join_timeout_s", f"must be positive, got {c.node_join_timeout_s}")
    if c.worker_start_timeout_s <= 0:
        bad("cluster.worker_start_timeout_s", f"must be positive, got {c.worker_start_timeout_s}")


def _check_train(cfg: JobConfig, bad) -> None:
    from platform.layout import allowed_layouts, world_sizes

    t, m = cfg.train, cfg.model
    positive = ("global_batch_size", "micro_batch_size", "seq_len", "total_tokens",
                "log_every_steps", "eval_every_steps", "eval_batches")
    for key in positive:
        if getattr(t, key) <= 0:
            bad(f"train.{key}", f"must be positive, got {getattr(t, key)}")
    if t.seq_len > m.max_seq_len > 0:
        bad("train.seq_len", f"{t.seq_len} exceeds the model context model.max_seq_len "
                             f"{m.max_seq_len}")
    if t.lr <= 0:
        bad("train.lr", f"must be positive, got {t.lr}")
    if not 0 <= t.min_lr <= t.lr:
        bad("train.min_lr", f"must be between 0 and train.lr ({t.lr}), got {t.min_lr}")
    if t.warmup_steps < 0:
        bad("train.warmup_steps", f"must be >= 0, got {t.warmup_steps}")
    for key in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(t, key) < 1:
            bad(f"train.{key}", f"must be in [0, 1), got {getattr(t, key)}")
    if t.grad_clip < 0:
        bad("train.grad_clip", f"must be >= 0 (0 disables clipping), got {t.grad_clip}")
    if t.zero_stage not in (0, 1, 2):
        bad("train.zero_stage", f"{t.zero_stage} is not supported: DeepSpeed partitions "
                                "expert-parallel MoE parameters with ZeRO 0, 1 or 2 only")
    if t.precision not in _PRECISIONS:
        bad("train.precision", f"{t.precision!r} is not one of {', '.join(_PRECISIONS)}")
    if t.precision == "bf16" and cfg.cluster.gpus_per_node == 0:
        bad("train.precision", "bf16 training needs GPUs; use fp32 (or auto) on CPU nodes")
    if t.max_failures < 0:
        bad("train.max_failures", f"must be >= 0, got {t.max_failures}")
    if not 0 < t.assumed_mfu <= 1:
        bad("train.assumed_mfu", f"must be in (0, 1], got {t.assumed_mfu}")
    experts = m.moe_num_experts
    for key in ("expert_parallel_size", "max_expert_parallel_size"):
        value = getattr(t, key)
        if value < 0 or (value > 0 and experts > 0 and experts % value):
            bad(f"train.{key}", f"{value} must divide model.moe_num_experts ({experts}), "
                                "or be 0 for automatic")
            return
    if any(getattr(t, k) <= 0 for k in ("global_batch_size", "micro_batch_size")) \
            or cfg.cluster.min_nodes > cfg.cluster.max_nodes or experts <= 0:
        return
    allowed, skipped = allowed_layouts(cfg)
    if not allowed:
        sizes = world_sizes(cfg.cluster)
        reasons = "; ".join(reason for _, reason in skipped[:3])
        bad("train.global_batch_size",
            f"no allowed world size ({sizes[0]}..{sizes[-1]} workers) can split it: {reasons}. "
            f"Make it a multiple of micro_batch_size x workers, e.g. "
            f"{t.micro_batch_size * sizes[-1]}")
    elif t.total_tokens > 0 and t.total_tokens < t.global_batch_size * t.seq_len:
        bad("train.total_tokens", f"{t.total_tokens} is less than one step "
                                  f"({t.global_batch_size * t.seq_len} tokens)")


def _local_path_exists(path: str) -> bool:
    expanded = os.path.expanduser(path)
    return os.path.exists(expanded) or bool(glob.glob(expanded, recursive=True))


def _check_data(cfg: JobConfig, bad) -> None:
    d = cfg.data
    if not d.sources:
        bad("data.sources", "no data sources: add at least one {name, path}")
    names = [s.name for s in d.sources]
    for i, s in enumerate(d.sources):
        where = f"data.sources[{i}]"
        if names.count(s.name) > 1:
            bad(f"{where}.name", f"source name {s.name!r} is used more than once")
        if s.format not in _FORMATS:
            bad(f"{where}.format", f"{s.format!r} is not one of {', '.join(_FORMATS)}")
        if s.weight < 0:
            bad(f"{where}.weight", f"must be >= 0, got {s.weight}")
        if not s.path:
            bad(f"{where}.path", f"source {s.name!r} has no path")
        elif "://" not in s.path and not _local_path_exists(s.path):
            bad(f"{where}.path", f"source {s.name!r}: {s.path} does not exist on this machine")
    if d.sources and sum(s.weight for s in d.sources) <= 0:
        bad("data.sources", "the source weights sum to 0: give at least one source a positive weight")
    last = -1
    for i, stage in enumerate(d.curriculum):
        where = f"data.curriculum[{i}]"
        if stage.start_step <= last:
            bad(f"{where}.start_step", f"stages must have increasing start_step; "
                                       f"{stage.start_step} follows {last}")
        last = stage.start_step
        for name, w in stage.weights.items():
            if name not in names:
                bad(f"{where}.weights.{name}", f"no data source named {name!r} "
                                               f"(known: {', '.join(names)})")
            elif w < 0:
                bad(f"{where}.weights.{name}", f"must be >= 0, got {w}")
        if stage.weights and sum(stage.weights.values()) <= 0:
            bad(f"{where}.weights", "the weights sum to 0: give a source a positive weight")
    if not 0 <= d.eval_fraction < 1:
        bad("data.eval_fraction", f"must be in [0, 1), got {d.eval_fraction}")
    if d.num_tokenize_workers < 1:
        bad("data.num_tokenize_workers", f"must be at least 1, got {d.num_tokenize_workers}")


def _check_checkpoint(cfg: JobConfig, bad) -> None:
    c = cfg.checkpoint
    if not c.uri:
        bad("checkpoint.uri", "set a local directory or an s3://bucket/prefix")
    elif "://" in c.uri and not c.uri.startswith(("s3://", "file://")):
        bad("checkpoint.uri", f"{c.uri!r}: only local paths, file:// and s3:// are supported")
    if c.every_steps < 1:
        bad("checkpoint.every_steps", f"must be at least 1, got {c.every_steps}")
    if c.keep_last < 1:
        bad("checkpoint.keep_last", f"must be at least 1, got {c.keep_last}")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_serve(cfg: JobConfig, bad) -> None:
    s = cfg.serve
    _check_port(bad, "serve.port", s.port)
    if not _is_loopback(s.host) and not s.api_key:
        bad("serve.api_key", f"serve.host {s.host} is reachable from other machines: set an API "
                             "key (e.g. serve.api_key=${oc.env:DBRX_SERVE_API_KEY}) or bind to 127.0.0.1")
    if s.num_replicas < 1:
        bad("serve.num_replicas", f"must be at least 1, got {s.num_replicas}")
    if s.max_replicas < s.num_replicas:
        bad("serve.max_replicas", f"{s.max_replicas} is below serve.num_replicas {s.num_replicas}")
    if s.max_batch_size < 1:
        bad("serve.max_batch_size", f"must be at least 1, got {s.max_batch_size}")
    if s.alias_poll_s <= 0:
        bad("serve.alias_poll_s", f"must be positive, got {s.alias_poll_s}")
    for key in ("replica_cpus", "replica_gpus"):
        if getattr(s, key) < 0:
            bad(f"serve.{key}", f"must be >= 0, got {getattr(s, key)}")
    if cfg.promote.gate_tolerance < 0:
        bad("promote.gate_tolerance", f"must be >= 0, got {cfg.promote.gate_tolerance}")
    if s.max_tokens_limit < 1:
        bad("serve.max_tokens_limit", f"must be at least 1, got {s.max_tokens_limit}")
