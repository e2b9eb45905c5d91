"""Hostile but fair job configs: every bad value, YAML file and size ends in exit 2 with
one message that names the key or file and the fix, quickly and in bounded memory."""

from __future__ import annotations

import dataclasses
import re
import resource
import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest

from platform.config import ConfigError, JobConfig, load_job
from platform.config.limits import PROVIDER_MAX_NODES, RANGES

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "conf" / "local_tiny.yaml"
BIG = ROOT / "conf" / "pretrain_132b.yaml"
GROUPS = ("model", "cluster", "data", "train", "checkpoint", "tracking", "promote", "serve")
SECRET = "98765432"
MEMORY_CAP = 1 << 30   # address space for a dry run that must not grow with the input


def submit(*args: str, memory_cap: int | None = None, timeout: float = 60):
    """Run `python -m platform.submit ARGS` for real; (returncode, stdout, stderr, seconds)."""
    limit = (lambda: resource.setrlimit(resource.RLIMIT_AS, (memory_cap, memory_cap))) \
        if memory_cap else None
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "platform.submit", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=timeout, preexec_fn=limit)
    return proc.returncode, proc.stdout, proc.stderr, time.monotonic() - start


def problems_of(overrides, job=TINY) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        load_job(job, overrides)
    return {p.path: p.message for p in info.value.problems}


def job_dir(tmp_path: Path, text: str) -> Path:
    """A job file holding `text`, beside links to the real config groups."""
    for group in GROUPS:
        (tmp_path / group).symlink_to(ROOT / "conf" / group)
    job = tmp_path / "job.yaml"
    job.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    return job


# ----------------------------------------------------------------------------- bounds


def _numeric_patterns(tp, prefix: str = "") -> typing.Iterator[str]:
    """Every int/float field of the schema as limits.RANGES spells it."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if set(args) & {int, float}:      # a number, or a word such as checkpoint.every_steps=auto
            yield prefix
            return
        (tp,) = args
        origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        for name, hint in typing.get_type_hints(tp).items():
            yield from _numeric_patterns(hint, f"{prefix}.{name}" if prefix else name)
    elif origin is list:
        yield from _numeric_patterns(typing.get_args(tp)[0], f"{prefix}[]")
    elif origin is dict:
        yield from _numeric_patterns(typing.get_args(tp)[1], f"{prefix}.*")
    elif tp in (int, float):
        yield prefix


def test_every_number_in_the_schema_has_a_range():
    numeric = set(_numeric_patterns(JobConfig))
    assert numeric - set(RANGES) == set(), "fields without an upper bound in limits.RANGES"
    assert set(RANGES) - numeric == set(), "limits.RANGES names fields the schema does not have"


def test_provider_limits_match_the_terraform_modules():
    """The dry-run refuses what the modules would refuse: the same bounds on both sides."""
    for provider, limit in PROVIDER_MAX_NODES.items():
        text = (ROOT / "infra" / provider / "variables.tf").read_text()
        assert re.search(rf"var\.node_count <= {limit}\b", text), provider
    local = (ROOT / "infra" / "local" / "variables.tf").read_text()
    for variable, key in (("node_cpus", "cluster.cpus_per_worker"),
                          ("node_memory_mb", "cluster.node_memory_mb"),
                          ("object_store_mb", "cluster.node_object_store_mb")):
        bounds = RANGES[key]
        assert f"var.{variable} >= {bounds.lo:.0f} && var.{variable} <= {bounds.hi:.0f}" in local, key


BAD = [
    # sizes, counts and lengths: every one bounded, before anything is built
    (["cluster.max_nodes=1000000000"], "cluster.max_nodes", "at most 512"),
    (["cluster.max_nodes=65"], "cluster.max_nodes", "exceed the 64 that infra/local runs"),
    (["model.d_model=1000000000"], "model.d_model", "at most 65536"),
    (["model.moe_num_experts=100000"], "model.moe_num_experts", "at most 1024"),
    (["train.global_batch_size=1000000000000"], "train.global_batch_size", "at most"),
    (["data.num_tokenize_workers=1000000"], "data.num_tokenize_workers", "at most 1024"),
    (["serve.max_replicas=100000"], "serve.max_replicas", "at most 1024"),
    (["checkpoint.keep_last=1000000000"], "checkpoint.keep_last", "at most"),
    (["checkpoint.every_steps=0"], "checkpoint.every_steps", "at least 1, got 0 (or auto"),
    (["checkpoint.every_steps=often"], "checkpoint.every_steps", "a number of steps or auto"),
    (["checkpoint.assumed_copy_gb_per_s=0"], "checkpoint.assumed_copy_gb_per_s", "greater than 0"),
    (["cluster.node_mtbf_hours=-1"], "cluster.node_mtbf_hours", "greater than 0"),
    (["model.n_layers=1024", "model.moe_num_experts=1024"], "model.moe_num_experts",
     "1,048,576 expert tensors; at most 65,536"),
    (["train.seed=4294967296"], "train.seed", "at most 4294967295"),
    (["cluster.node_memory_mb=100"], "cluster.node_memory_mb", "at least 256"),
    ([f"tracking.experiment={'x' * 5000}"], "tracking.experiment", "the limit is 4096"),
    (["cluster.tags={" + ", ".join(f"k{i}: v" for i in range(51)) + "}"], "cluster.tags",
     "at most 50"),
    # inf and nan are never numbers a job can use
    (["train.lr=inf"], "train.lr", "finite"),
    (["train.grad_clip=nan"], "train.grad_clip", "finite"),
    (["model.rope_theta=-inf"], "model.rope_theta", "finite"),
    (["data.sources.0.weight=nan"], "data.sources[0].weight", "finite"),
    # URIs, wherever one is configured
    (["checkpoint.uri=s3://"], "checkpoint.uri", "names no bucket"),
    (["checkpoint.uri=s3:///x"], "checkpoint.uri", "names no bucket"),
    (["checkpoint.uri=s3://Bad_Bucket/x"], "checkpoint.uri", "not an S3 bucket name"),
    (["checkpoint.uri=s3://bucket/a/../b"], "checkpoint.uri", "plain a/b/c path"),
    (["data.sources.0.path=s3://"], "data.sources[0].path", "names no bucket"),
    (["tracking.artifact_location=s3:///runs"], "tracking.artifact_location", "names no bucket"),
    (["checkpoint.s3_endpoint_url=http://"], "checkpoint.s3_endpoint_url", "names no host"),
    (["data.cache_dir=s3://bucket/cache"], "data.cache_dir", "use a local path"),
    # names are matched whole
    (["data.sources.0.name='a/b'"], "data.sources[0].name", "must be 1-128 letters"),
    (["promote.alias='..'"], "promote.alias", "without '..'"),
    (["serve.model_alias='a b'"], "serve.model_alias", "must be 1-128 letters"),
    # the serving allow-lists are checked by the server's own rule before anything starts
    (["serve.allowed_origins=[notanorigin]"], "serve.allowed_origins", "is not an origin"),
    (["serve.allowed_hosts=['bad host']"], "serve.allowed_hosts", "is not a host name"),
]


@pytest.mark.parametrize("overrides,path,fragment", BAD, ids=[f"{b[1]}-{b[2][:20]}" for b in BAD])
def test_bad_value_names_the_key_and_the_fix(overrides, path, fragment):
    problems = problems_of(overrides)
    assert path in problems, problems
    assert fragment in problems[path], problems[path]
    assert len(problems) == 1, problems   # one clear message, not one per derived check


@pytest.mark.parametrize("overrides,path,fragment", [
    (["cluster.region=mars"], "cluster.region", "an AWS region"),
    (["cluster.ami=ami-123"], "cluster.ami", "AMI id"),
    (["cluster.instance_type=big"], "cluster.instance_type", "family.size"),
])
def test_aws_formats_are_checked_before_terraform(overrides, path, fragment):
    problems = problems_of(overrides, job=BIG)
    assert fragment in problems[path]


@pytest.mark.parametrize("field,old,new", [
    ("name", "name: local-tiny", 'name: "local-tiny\\n"'),
    ("promote.alias", "  auto: true", '  auto: true\n  alias: "staging\\n"'),
])
def test_a_trailing_newline_is_not_part_of_a_valid_name(tmp_path, field, old, new):
    job = job_dir(tmp_path, TINY.read_text().replace(old, new))
    problems = problems_of([], job)
    assert "control character" in problems[field], problems


def test_the_rules_match_whole_strings():
    from platform.config.rules import JOB_NAME, name_problem, uri_problem

    assert name_problem("local-tiny\n", JOB_NAME) and name_problem("web\n")
    assert name_problem("local-tiny", JOB_NAME) is None
    assert uri_problem("s3://bucket\n/x", ("s3",)) is not None
    assert uri_problem("s3://dbrx-checkpoints/runs", ("s3",)) is None


# ----------------------------------------------------------------------------- planning bounds


def test_a_billion_nodes_fails_in_seconds_in_bounded_memory():
    code, out, err, seconds = submit(str(TINY), "cluster.max_nodes=1000000000", "--dry-run",
                                     memory_cap=MEMORY_CAP, timeout=60)
    assert code == 2, err
    assert "cluster.max_nodes: must be at most 512" in err and "Traceback" not in err
    assert seconds < 20


def test_layouts_are_found_without_walking_every_node_count():
    """Even past validation, the plan's work follows the allowed sizes, not max_nodes."""
    script = (
        "import dataclasses, sys\n"
        "from platform.config import load_job\n"
        "from platform.plan import make_plan\n"
        f"cfg = load_job({str(TINY)!r})\n"
        "cfg = dataclasses.replace(cfg, cluster=dataclasses.replace(cfg.cluster, max_nodes=10**9))\n"
        "plan = make_plan(cfg)\n"
        "print([l.layout.world_size for l in plan.layouts], plan.skipped.count)\n")
    limit = lambda: resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))  # noqa: E731
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, preexec_fn=limit, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["[1,", "2,", "4]", str(10 ** 9 - 3)]
    assert time.monotonic() - start < 20


# ----------------------------------------------------------------------------- configs that cannot run


def test_132b_on_local_nodes_exits_2_with_one_message():
    code, out, err, _ = submit(str(BIG), "cluster=local", "--dry-run")
    assert code == 2 and "Traceback" not in err
    assert err.count("\n  - ") == 1, err


def test_a_model_far_larger_than_a_local_node_is_refused():
    code, out, err, _ = submit(str(BIG), "cluster=local", "train.precision=fp32", "--dry-run")
    assert code == 2, err
    assert "cluster.node_memory_mb: the job needs" in err and "GB per worker" in err
    assert "DOES NOT FIT" in out


def test_a_gpu_plan_that_does_not_fit_exits_2():
    code, out, err, _ = submit(str(BIG), "model.activation_checkpointing=false", "--dry-run",
                               "--json")
    assert code == 2, err
    assert "cluster.gpu_memory_gb: the job needs" in err


def test_local_tiny_fits_its_nodes():
    from platform.plan import fit_problem, make_plan

    plan = make_plan(load_job(TINY))
    assert plan.memory_limit_gb == 4.0 and fit_problem(plan) is None


# ----------------------------------------------------------------------------- YAML files

YAML_MISTAKES = [
    ("tab", b"\tfoo: 1\n", "line 1, column 1: a tab character", "replace the tab with spaces"),
    ("duplicate", b"train:\n  lr: 0.1\n  lr: 0.2\n", "line 3", "appears twice in one mapping"),
    ("latin-1", b"train:\n  lr: 0.1 # caf\xe9\n", "line 2: byte 0xe9 is not UTF-8", "save the file as UTF-8"),
    ("syntax", b"train: [1, 2\n", "line 2", "YAML syntax error"),
    ("scalar", b"42\n", "holds a single int", "key: value"),
]


@pytest.mark.parametrize("kind,text,where,fix", YAML_MISTAKES, ids=[m[0] for m in YAML_MISTAKES])
def test_yaml_mistake_in_the_job_file(tmp_path, kind, text, where, fix):
    job = job_dir(tmp_path, text)
    message = str(pytest.raises(ConfigError, load_job, job).value)
    assert f"{job}, {where}" in message or f"{job}: {where}" in message, message
    assert fix in message


@pytest.mark.parametrize("kind,text,where,fix", YAML_MISTAKES, ids=[m[0] for m in YAML_MISTAKES])
def test_yaml_mistake_in_a_group_file_exits_2_naming_it(tmp_path, kind, text, where, fix):
    job = job_dir(tmp_path, TINY.read_text())
    (tmp_path / "train").unlink()
    (tmp_path / "train").mkdir()
    group_file = tmp_path / "train" / "tiny.yaml"
    group_file.write_bytes(text)
    code, out, err, _ = submit(str(job), "--dry-run")
    assert code == 2 and "Traceback" not in err, err
    assert str(group_file) in err and fix in err, err


# ----------------------------------------------------------------------------- what messages show


@pytest.mark.parametrize("override", [f"serve.api_key={SECRET}", f"serve.api_key=[{SECRET}",
                                      f"+serve.api_key={SECRET}"])
def test_errors_never_echo_a_secret(override):
    code, out, err, _ = submit(str(TINY), override, "--dry-run")
    assert code == 2 and "serve.api_key" in err
    assert SECRET not in err + out


def test_a_secret_in_a_job_file_is_not_echoed(tmp_path):
    job = job_dir(tmp_path, TINY.read_text() + f"serve:\n  api_key: {SECRET}\n")
    message = str(pytest.raises(ConfigError, load_job, job).value)
    assert "serve.api_key: must be a string" in message and SECRET not in message


def test_huge_inputs_are_cut_in_messages():
    huge = "y" * 100_000   # under Linux's 128 KiB per argument
    code, out, err, _ = submit(str(TINY), f"+train.{huge}=1", f"tracking.experiment={huge}",
                               "--dry-run")
    assert code == 2 and "Traceback" not in err
    assert len(err) < 3000, len(err)


def test_a_huge_job_file_is_refused_before_it_is_parsed(tmp_path):
    job = job_dir(tmp_path, TINY.read_text() + "#" * (2 << 20) + "\n")
    message = str(pytest.raises(ConfigError, load_job, job).value)
    assert "a job file holds at most" in message
