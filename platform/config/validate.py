"""Checks on a typed config: ranges first, then combinations that cannot run.

Each check names the key to change and how, so a user can fix a job file
from the message alone. All problems are collected, never just the first.
Every number is checked against its range (`limits.RANGES`) before any other
check runs, and a group with a number out of range skips the checks that
would compute with it: nothing here does work proportional to an unchecked
size.
"""

from __future__ import annotations

import dataclasses
import glob
import ipaddress
import os
import re
from typing import Callable, Iterator

from platform.config.build import Problem
from platform.config.limits import MAX_LAYER_EXPERTS, PROVIDER_MAX_NODES, RANGES
from platform.config.rules import JOB_NAME, describe, name_problem, uri_problem
from platform.config.schema import JobConfig

_PROVIDERS = ("local", "aws")
_PRECISIONS = ("auto", "fp32", "bf16")
_SERVE_WEIGHTS = ("auto", "fp32", "bf16", "int8", "fp8")   # model.quant.FORMATS and auto
_FORMATS = ("auto", "text", "jsonl", "parquet")
# Formats infra/aws checks (variables.tf) and cannot report offline: checked here first.
_AWS_FORMATS = {
    "region": (re.compile(r"[a-z]{2}(-gov|-iso[a-z]*)?-[a-z]+-[0-9]"), "an AWS region such as us-east-1"),
    "instance_type": (re.compile(r"[a-z][a-z0-9-]*\.[a-z0-9]+"), "family.size, e.g. p5.48xlarge"),
    "ami": (re.compile(r"(ami-[0-9a-f]{8}([0-9a-f]{9})?)?"), "empty or an AMI id like ami-0123456789abcdef0"),
}

# The keys the parallel layout is computed from: a problem with any of them skips that check.
_LAYOUT_INPUTS = ("cluster.", "model.moe_num_experts", "train.global_batch_size",
                  "train.micro_batch_size", "train.expert_parallel_size",
                  "train.max_expert_parallel_size")

Bad = Callable[[str, str], None]


def validate(cfg: JobConfig) -> list[Problem]:
    problems = range_problems(cfg)
    broken = {_group(p.path) for p in problems}

    def bad(path: str, message: str) -> None:
        problems.append(Problem(path, message))

    problem = name_problem(cfg.name, JOB_NAME)
    if problem:
        bad("name", f"{problem} (it names the job's checkpoints, MLflow run and Terraform state)")
    if "model" not in broken:
        for field, message in cfg.model.problems():
            bad(f"model.{field}", message)
        _check_layer_experts(cfg, bad)
    checks = {"cluster": _check_cluster, "train": _check_train, "data": _check_data,
              "checkpoint": _check_checkpoint, "tracking": _check_tracking,
              "promote": _check_promote, "serve": _check_serve}
    for group, check in checks.items():
        if group not in broken:
            check(cfg, bad)
    if not any(p.path.startswith(_LAYOUT_INPUTS) for p in problems):
        _check_layout(cfg, bad)
    return problems


def _check_layer_experts(cfg: JobConfig, bad: Bad) -> None:
    """Each expert of each layer is its own checkpoint tensor, placed one by one by the plan:
    their number is bounded, though layers and experts are each in range."""
    m = cfg.model
    if m.n_layers * m.moe_num_experts > MAX_LAYER_EXPERTS:
        bad("model.moe_num_experts", f"{m.n_layers} layers x {m.moe_num_experts} experts = "
                                     f"{m.n_layers * m.moe_num_experts:,} expert tensors; at most "
                                     f"{MAX_LAYER_EXPERTS:,} (a checkpoint stores each one): "
                                     "use fewer experts or layers")


def _group(path: str) -> str:
    return path.split(".")[0].split("[")[0]


def range_problems(cfg: JobConfig) -> list[Problem]:
    """Every number outside its range in `limits.RANGES`."""
    problems = []
    for pattern, path, value in numbers(cfg):
        bounds = RANGES.get(pattern)
        message = bounds.problem(value) if bounds else None
        if message:
            problems.append(Problem(path, message))
    return problems


def numbers(obj: object, path: str = "", pattern: str = "") -> Iterator[tuple[str, str, float]]:
    """(pattern, path, value) for every int and float in a built config: the pattern
    writes list indexes as [] and mapping keys as *, as limits.RANGES does."""
    if dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            sep = "." if path else ""
            yield from numbers(getattr(obj, f.name), f"{path}{sep}{f.name}", f"{pattern}{sep}{f.name}")
    elif isinstance(obj, list):
        for i, item in enumerate(obj):
            yield from numbers(item, f"{path}[{i}]", f"{pattern}[]")
    elif isinstance(obj, dict):
        for key, item in obj.items():
            yield from numbers(item, f"{path}.{key}", f"{pattern}.*")
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield pattern, path, obj


def _check_cluster(cfg: JobConfig, bad: Bad) -> None:
    c = cfg.cluster
    if c.provider not in _PROVIDERS:
        bad("cluster.provider", f"{describe(c.provider)} is not one of {', '.join(_PROVIDERS)}")
        return
    if c.min_nodes > c.max_nodes:
        bad("cluster.min_nodes", f"min_nodes {c.min_nodes} exceeds max_nodes {c.max_nodes}: "
                                 "lower min_nodes or raise max_nodes")
    limit = PROVIDER_MAX_NODES[c.provider]
    if c.max_nodes > limit:
        bad("cluster.max_nodes", f"{c.max_nodes} nodes exceed the {limit} that infra/{c.provider} "
                                 f"runs: lower max_nodes to {limit} or less")
    if c.provider == "aws":
        _check_aws(cfg, bad)
    if c.gpus_per_node > 0 and c.gpu_memory_gb <= 0:
        bad("cluster.gpu_memory_gb", "set the accelerator memory so the plan can check that the model fits")
    if not c.ray_address:
        _check_local_ports(cfg, bad)


def _check_local_ports(cfg: JobConfig, bad: Bad) -> None:
    """The local head's ports and the endpoint's share 127.0.0.1: one port each."""
    seen: dict[int, str] = {}
    for path, port in (("cluster.head_port", cfg.cluster.head_port),
                       ("cluster.dashboard_port", cfg.cluster.dashboard_port),
                       ("serve.port", cfg.serve.port)):
        if port in seen:
            bad(path, f"port {port} is already {seen[port]}: give each its own port")
        seen.setdefault(port, path)


def _check_aws(cfg: JobConfig, bad: Bad) -> None:
    c = cfg.cluster
    if c.gpus_per_node < 1:
        bad("cluster.gpus_per_node", "aws nodes are GPU instances: set gpus_per_node (8 on p5.48xlarge)")
    if not c.region:
        bad("cluster.region", "aws needs a region, e.g. cluster.region=us-east-1")
        return
    for key, (rule, what) in _AWS_FORMATS.items():
        value = getattr(c, key)
        if not rule.fullmatch(value):
            bad(f"cluster.{key}", f"{describe(value)} must be {what}")


def _check_train(cfg: JobConfig, bad: Bad) -> None:
    t, m = cfg.train, cfg.model
    if t.seq_len > m.max_seq_len:
        bad("train.seq_len", f"{t.seq_len} exceeds the model context model.max_seq_len "
                             f"{m.max_seq_len}")
    if t.min_lr > t.lr:
        bad("train.min_lr", f"must be between 0 and train.lr ({t.lr}), got {t.min_lr}")
    if t.precision not in _PRECISIONS:
        bad("train.precision", f"{describe(t.precision)} is not one of {', '.join(_PRECISIONS)}")
    if t.precision == "bf16" and cfg.cluster.gpus_per_node == 0:
        bad("train.precision", "bf16 training needs GPUs; use fp32 (or auto) on CPU nodes")
    experts = m.moe_num_experts
    for key in ("expert_parallel_size", "max_expert_parallel_size"):
        value = getattr(t, key)
        if value > 0 and experts % value:
            bad(f"train.{key}", f"{value} must divide model.moe_num_experts ({experts}), "
                                "or be 0 for automatic")


def _check_layout(cfg: JobConfig, bad: Bad) -> None:
    """Some world size in min..max nodes must split the global batch."""
    from platform.layout import allowed_layouts, world_size_range

    t = cfg.train
    allowed, skipped = allowed_layouts(cfg)
    if not allowed:
        sizes = world_size_range(cfg.cluster)
        reasons = "; ".join(reason for _, reason in skipped.examples[:3])
        bad("train.global_batch_size",
            f"no allowed world size ({sizes[0]}..{sizes[-1]} workers) can split it: {reasons}. "
            f"Make it a multiple of micro_batch_size x workers, e.g. "
            f"{t.micro_batch_size * sizes[-1]}")
    elif t.total_tokens < t.global_batch_size * t.seq_len:
        bad("train.total_tokens", f"{t.total_tokens} is less than one step "
                                  f"({t.global_batch_size * t.seq_len} tokens)")


def _local_path_exists(path: str) -> bool:
    expanded = os.path.expanduser(path)
    return os.path.exists(expanded) or bool(glob.glob(expanded, recursive=True))


def _check_data(cfg: JobConfig, bad: Bad) -> None:
    d = cfg.data
    if not d.sources:
        bad("data.sources", "no data sources: add at least one {name, path}")
    names = [s.name for s in d.sources]
    for i, s in enumerate(d.sources):
        _check_source(i, s, names.count(s.name) > 1, bad)
    if d.sources and sum(s.weight for s in d.sources) <= 0:
        bad("data.sources", "the source weights sum to 0: give at least one source a positive weight")
    _check_curriculum(cfg, names, bad)
    _check_uri(bad, "data.cache_dir", d.cache_dir, schemes=())
    _check_uri(bad, "data.s3_endpoint_url", d.s3_endpoint_url, schemes=("http", "https"))


def _check_source(i: int, s, duplicate: bool, bad: Bad) -> None:
    where = f"data.sources[{i}]"
    problem = name_problem(s.name)
    if problem:
        bad(f"{where}.name", problem)
    elif duplicate:
        bad(f"{where}.name", f"source name {s.name!r} is used more than once")
    if s.format not in _FORMATS:
        bad(f"{where}.format", f"{describe(s.format)} is not one of {', '.join(_FORMATS)}")
    if not s.path:
        bad(f"{where}.path", f"source {describe(s.name)} has no path")
    elif "://" in s.path:
        _check_uri(bad, f"{where}.path", s.path, schemes=("s3",))
    elif not _local_path_exists(s.path):
        bad(f"{where}.path", f"source {describe(s.name)}: {describe(s.path)} does not exist on "
                             "this machine")


def _check_curriculum(cfg: JobConfig, names: list[str], bad: Bad) -> None:
    last = -1
    for i, stage in enumerate(cfg.data.curriculum):
        where = f"data.curriculum[{i}]"
        if stage.start_step <= last:
            bad(f"{where}.start_step", f"stages must have increasing start_step; "
                                       f"{stage.start_step} follows {last}")
        last = stage.start_step
        for name in stage.weights:
            if name not in names:
                bad(f"{where}.weights.{name}", f"no data source named {describe(name)} "
                                               f"(known: {', '.join(names)})")
        if stage.weights and sum(stage.weights.values()) <= 0:
            bad(f"{where}.weights", "the weights sum to 0: give a source a positive weight")


def _check_uri(bad: Bad, path: str, value: str | None, schemes: tuple[str, ...] | None) -> None:
    """`value` (None or '' are fine: unset) against `rules.uri_problem`."""
    problem = uri_problem(value, schemes) if value else None
    if problem:
        bad(path, problem)


def _check_checkpoint(cfg: JobConfig, bad: Bad) -> None:
    c = cfg.checkpoint
    if not c.uri:
        bad("checkpoint.uri", "set a local directory or an s3://bucket/prefix")
    _check_uri(bad, "checkpoint.uri", c.uri, schemes=("s3", "file"))
    _check_uri(bad, "checkpoint.s3_endpoint_url", c.s3_endpoint_url, schemes=("http", "https"))
    _check_every_steps(cfg, bad)


def _check_every_steps(cfg: JobConfig, bad: Bad) -> None:
    """A number of steps (its range is in limits) or "auto", which needs the plan's step time."""
    from platform.plan import AUTO, has_step_time

    every = cfg.checkpoint.every_steps
    if isinstance(every, str) and every != AUTO:
        bad("checkpoint.every_steps", f"{describe(every)} must be a number of steps or {AUTO} "
                                      "(the plan's Young-Daly interval)")
    elif every == AUTO and not has_step_time(cfg):
        bad("checkpoint.every_steps", f"{AUTO} needs the plan's step time, which CPU nodes do "
                                      "not have (their speed is measured, not rated): give a "
                                      "number of steps, e.g. checkpoint.every_steps=25")


def _check_tracking(cfg: JobConfig, bad: Bad) -> None:
    t = cfg.tracking
    _check_uri(bad, "tracking.tracking_uri", t.tracking_uri, schemes=None)
    _check_uri(bad, "tracking.artifact_location", t.artifact_location, schemes=None)


def _check_promote(cfg: JobConfig, bad: Bad) -> None:
    for key in ("registered_model", "alias"):
        problem = name_problem(getattr(cfg.promote, key))
        if problem:
            bad(f"promote.{key}", problem)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_serve(cfg: JobConfig, bad: Bad) -> None:
    s = cfg.serve
    if not _is_loopback(s.host) and not s.api_key:
        bad("serve.api_key", f"serve.host {describe(s.host)} is reachable from other machines: set "
                             "an API key (e.g. serve.api_key=${oc.env:DBRX_SERVE_API_KEY}) or bind "
                             "to 127.0.0.1")
    if s.max_replicas < s.num_replicas:
        bad("serve.max_replicas", f"{s.max_replicas} is below serve.num_replicas {s.num_replicas}")
    problem = name_problem(s.model_alias)
    if problem:
        bad("serve.model_alias", problem)
    if cfg.promote.gate_weights not in ("serve", *_SERVE_WEIGHTS[1:]):
        bad("promote.gate_weights", f"{describe(cfg.promote.gate_weights)} is not one of serve, "
                                    f"{', '.join(_SERVE_WEIGHTS[1:])}")
    if s.weights not in _SERVE_WEIGHTS:
        bad("serve.weights", f"{describe(s.weights)} is not one of {', '.join(_SERVE_WEIGHTS)}")
    elif s.weights == "fp8" and s.replica_gpus == 0:
        bad("serve.weights", "fp8 weights need a GPU replica (serve.replica_gpus > 0, compute "
                             "capability 9.0+); use int8 on CPU")
    n, experts = s.devices_per_replica, cfg.model.moe_num_experts
    if n >= 1 and experts % n:
        bad("serve.devices_per_replica", f"{n} does not divide model.moe_num_experts={experts}: each "
                                         "device of a replica holds an equal share of the experts")
    elif n > 1 and s.replica_gpus > 0 and cfg.cluster.gpus_per_node and n > cfg.cluster.gpus_per_node:
        bad("serve.devices_per_replica", f"{n} GPUs per replica but a node has cluster.gpus_per_node="
                                         f"{cfg.cluster.gpus_per_node}: a replica's devices share one node")
    from platform.serving.origin import OriginPolicy   # the rule the server applies, checked here

    try:
        OriginPolicy.build(s.host, s.port, s.allowed_hosts, s.allowed_origins)
    except ValueError as exc:
        bad("serve.allowed_hosts" if "allowed_hosts" in str(exc) else "serve.allowed_origins", str(exc))
