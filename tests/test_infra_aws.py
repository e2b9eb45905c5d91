"""infra/aws checked without AWS: formatting, the parsed HCL, and the rendered user data.

hashicorp/aws cannot be downloaded here, so `terraform init/validate/plan`
are impossible; python-hcl2 parses the module instead (8.x keeps the quotes
of block labels and string literals: `_clean` strips them), and
`terraform console` renders the user-data template (a built-in function,
no provider needed).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import hcl2
import pytest

from platform.provision.nodes import SHARED_OUTPUTS, SHARED_VARIABLES

ROOT = Path(__file__).resolve().parents[1]
AWS = ROOT / "infra" / "aws"
LOCAL = ROOT / "infra" / "local"
TF = shutil.which("terraform")
needs_terraform = pytest.mark.skipif(TF is None, reason="terraform is not on the PATH")
TF_ENV = {**os.environ, "TF_CLI_CONFIG_FILE": os.devnull, "CHECKPOINT_DISABLE": "1"}


def _clean(value):
    """hcl2 8.x output without its quoting: '"x"' -> 'x', and no __is_block__ markers."""
    if isinstance(value, dict):
        return {_clean(k): _clean(v) for k, v in value.items() if k != "__is_block__"}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value


def _load(module: Path) -> dict[str, list]:
    """All top-level blocks of a module's .tf files, merged by block type."""
    merged: dict[str, list] = {}
    for path in sorted(module.glob("*.tf")):
        with open(path, encoding="utf-8") as f:
            for kind, blocks in _clean(hcl2.load(f)).items():
                merged.setdefault(kind, []).extend(blocks)
    return merged


def _named(blocks: list[dict]) -> dict[str, dict]:
    """[{name: body}] -> {name: body} (variables, outputs)."""
    return {name: body for block in blocks for name, body in block.items()}


def _resources(module: dict, rtype: str) -> dict[str, dict]:
    return {name: body for block in module.get("resource", []) for t, named in block.items()
            if t == rtype for name, body in named.items()}


def _dynamic(body: dict, name: str) -> dict:
    for block in body.get("dynamic", []):
        if name in block:
            return block[name]
    raise AssertionError(f"no dynamic {name!r} block")


@pytest.fixture(scope="module")
def aws() -> dict:
    return _load(AWS)


@pytest.fixture(scope="module")
def local() -> dict:
    return _load(LOCAL)


@needs_terraform
def test_terraform_fmt_is_clean():
    result = subprocess.run([TF, "fmt", "-check", "-recursive", "-diff", str(ROOT / "infra")],
                            capture_output=True, text=True, env=TF_ENV, timeout=60)
    assert result.returncode == 0, f"terraform fmt would change:\n{result.stdout}{result.stderr}"


def test_both_providers_share_the_driver_contract(aws, local):
    aws_vars, local_vars = _named(aws["variable"]), _named(local["variable"])
    for name in SHARED_VARIABLES:
        assert name in aws_vars and name in local_vars, f"variable {name} missing from a module"
        assert aws_vars[name].get("type") == local_vars[name].get("type"), name
    aws_out, local_out = _named(aws["output"]), _named(local["output"])
    for name in SHARED_OUTPUTS:
        assert name in aws_out and name in local_out, f"output {name} missing from a module"
    for module in (aws_vars, local_vars, aws_out, local_out):
        undocumented = [n for n, body in module.items() if not body.get("description")]
        assert not undocumented, f"no description: {undocumented}"
    # Both key their nodes by name (for_each), so one node is replaced alone.
    assert _resources(aws, "aws_instance")["node"]["for_each"] == "${local.node_names}"
    assert _resources(local, "terraform_data")["node"]["for_each"] == "${local.node_names}"


@needs_terraform
@pytest.mark.parametrize("module", [AWS, LOCAL], ids=["aws", "local"])
def test_terraform_parses_the_module(tmp_path, module):
    """Terraform's own parser (no provider needed) accepts every file."""
    work = tmp_path / module.name
    shutil.copytree(module, work, ignore=shutil.ignore_patterns(".terraform*", "*.tfstate*", "run"))
    result = subprocess.run([TF, "providers", "-no-color"], cwd=work, capture_output=True, text=True,
                            env=TF_ENV, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("module", [AWS, LOCAL], ids=["aws", "local"])
def test_every_reference_is_declared(module):
    """What `terraform validate` would catch first, without the provider it needs:
    each var./local./data./resource reference names something the module declares."""
    parsed = _load(module)
    variables = set(_named(parsed.get("variable", [])))
    locals_ = {k for block in parsed.get("locals", []) for k in block}
    data = {f"{t}.{n}" for block in parsed.get("data", []) for t, named in block.items() for n in named}
    resources = {f"{t}.{n}" for block in parsed.get("resource", []) for t, named in block.items()
                 for n in named}
    code = "\n".join(re.sub(r"(?m)^\s*#.*$", "", p.read_text()) for p in module.glob("*.tf"))
    assert set(re.findall(r"\bvar\.(\w+)", code)) <= variables
    assert set(re.findall(r"\blocal\.(\w+)", code)) <= locals_
    assert set(re.findall(r"\bdata\.(\w+\.\w+)", code)) <= data
    refs = set(re.findall(r"\b((?:aws|terraform)_\w+\.\w+)\b", code))
    assert refs <= resources | {r.replace("data.", "") for r in data}, refs - resources
    unused = variables - set(re.findall(r"\bvar\.(\w+)", code))
    assert not unused, f"variables declared but never used: {unused}"


def test_key_variables_are_validated(aws, local):
    aws_vars, local_vars = _named(aws["variable"]), _named(local["variable"])
    for name in ("job_name", "node_count", "node_names", "head_address", "region", "instance_type",
                 "ami", "subnet_id", "vpc_id", "bucket", "package_ref", "efa_interface_count",
                 "ray_auth_token_parameter", "spot_max_price"):
        assert aws_vars[name].get("validation"), f"infra/aws variable {name} has no validation"
    for name in ("job_name", "node_count", "node_names", "head_address", "ray_bin", "state_dir"):
        assert local_vars[name].get("validation"), f"infra/local variable {name} has no validation"


def test_nodes_are_p5_with_efa_in_a_cluster_placement_group(aws):
    variables = _named(aws["variable"])
    assert variables["instance_type"]["default"] == "p5.48xlarge"
    assert variables["efa_interface_count"]["default"] == 32   # p5.48xlarge: 32 network cards
    assert _resources(aws, "aws_placement_group")["nodes"]["strategy"] == "cluster"

    template = _resources(aws, "aws_launch_template")["node"]
    assert template["placement"][0]["group_name"] == "${aws_placement_group.nodes.name}"
    efa = _dynamic(template, "network_interfaces")
    assert efa["for_each"] == "${range(var.efa_interface_count)}"
    nic = efa["content"][0]
    assert nic["network_card_index"] == "${network_interfaces.value}"
    # The primary interface (card 0, device 0) is EFA; the others EFA or EFA-only.
    assert nic["interface_type"].startswith('${network_interfaces.value == 0 ? "efa" :')
    assert nic["device_index"] == "${network_interfaces.value == 0 ? 0 : 1}"
    secondary = variables["secondary_efa_interface_type"]
    assert secondary["default"] in ("efa", "efa-only")
    assert 'contains(["efa", "efa-only"]' in secondary["validation"][0]["condition"]
    assert nic["security_groups"] == ["${aws_security_group.nodes.id}"]
    assert template["metadata_options"][0]["http_tokens"] == "required"   # IMDSv2 only

    instance = _resources(aws, "aws_instance")["node"]
    assert instance["launch_template"][0]["id"] == "${aws_launch_template.node.id}"


def test_spot_market_is_wired_to_the_spot_variable(aws):
    template = _resources(aws, "aws_launch_template")["node"]
    market = _dynamic(template, "instance_market_options")
    assert market["for_each"] == "${var.spot ? [1] : []}"
    content = market["content"][0]
    assert content["market_type"] == "spot"
    assert content["spot_options"][0]["instance_interruption_behavior"] == "terminate"
    assert _named(aws["variable"])["spot"]["type"] == "bool"


def test_checkpoint_bucket_is_private_versioned_and_encrypted(aws):
    block = _resources(aws, "aws_s3_bucket_public_access_block")["checkpoints"]
    for flag in ("block_public_acls", "block_public_policy", "ignore_public_acls",
                 "restrict_public_buckets"):
        assert block[flag] is True, flag
    assert block["bucket"] == "${aws_s3_bucket.checkpoints[0].id}"
    versioning = _resources(aws, "aws_s3_bucket_versioning")["checkpoints"]
    assert versioning["versioning_configuration"][0]["status"] == "Enabled"
    sse = _resources(aws, "aws_s3_bucket_server_side_encryption_configuration")["checkpoints"]
    algorithm = sse["rule"][0]["apply_server_side_encryption_by_default"][0]["sse_algorithm"]
    assert "aws:kms" in algorithm and "AES256" in algorithm
    assert _resources(aws, "aws_s3_bucket")["checkpoints"]["force_destroy"] is False


def test_security_group_opens_traffic_only_inside_the_cluster(aws):
    group = _resources(aws, "aws_security_group")["nodes"]
    assert "ingress" not in group and "egress" not in group   # rules are separate resources
    ingress = _resources(aws, "aws_vpc_security_group_ingress_rule")
    assert ingress, "no ingress rules"
    for name, rule in ingress.items():
        assert "cidr_ipv4" not in rule and "cidr_ipv6" not in rule, f"{name} opens an address range"
        assert rule.get("referenced_security_group_id"), f"{name} does not reference a group"
    self_rule = ingress["nodes_from_nodes"]
    assert self_rule["security_group_id"] == self_rule["referenced_security_group_id"] \
        == "${aws_security_group.nodes.id}"
    assert self_rule["ip_protocol"] == "-1"   # EFA needs all traffic within the group
    egress = _resources(aws, "aws_vpc_security_group_egress_rule")["nodes_to_nodes"]
    assert egress["referenced_security_group_id"] == "${aws_security_group.nodes.id}"


def test_instance_role_reaches_only_the_checkpoint_bucket(aws):
    documents = {name: body for block in aws["data"] for t, named in block.items()
                 if t == "aws_iam_policy_document" for name, body in named.items()}
    statements = documents["node"]["statement"]
    s3 = [s for s in statements if any(a.startswith("s3:") for a in s["actions"])]
    assert s3, "no S3 statement"
    for statement in s3:
        for resource in statement["resources"]:
            assert resource.startswith("${local.bucket_arn}"), resource
    actions = {a for s in statements for a in s["actions"]}
    assert "s3:*" not in actions and "*" not in actions
    profile = _resources(aws, "aws_iam_instance_profile")["node"]
    assert profile["role"] == "${aws_iam_role.node.name}"


def _render_user_data(tmp_path: Path, spot: bool) -> str:
    expr = (f'templatefile("{AWS}/templates/user_data.sh.tftpl", {{node_name = "job-a-node-3", '
            'job_name = "job-a", head_address = "10.0.0.5:6379", '
            'package_ref = "git+https://example.com/dbrx-platform@0123abc", region = "us-east-1", '
            'ray_token_parameter = "/dbrx-platform/job-a/ray-auth-token", '
            f'node_dir = "/run/dbrx-platform", spot = {str(spot).lower()}, '
            'spot_poll_interval_s = 5})')
    result = subprocess.run([TF, "console"], input=expr, capture_output=True, text=True,
                            cwd=tmp_path, env=TF_ENV, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0] == "<<EOT" and lines[-1] == "EOT", result.stdout[:200]
    return "\n".join(lines[1:-1]) + "\n"


@needs_terraform
@pytest.mark.parametrize("spot", [True, False])
def test_user_data_installs_the_package_and_joins_the_head(tmp_path, spot):
    script = _render_user_data(tmp_path, spot)
    syntax = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr
    assert "pip\" install --quiet 'git+https://example.com/dbrx-platform@0123abc'" in script
    assert "--address=10.0.0.5:6379" in script
    assert """--resources='{"node_slot": 1, "node_job-a-node-3": 1}'""" in script
    assert "--labels=dbrx-platform/node=job-a-node-3,dbrx-platform/instance=$INSTANCE_ID" in script
    assert "DBRX_NODE_DIR=/run/dbrx-platform" in script
    assert "RAY_AUTH_MODE=token" in script and 'Name="/dbrx-platform/job-a/ray-auth-token"' in script
    assert re.search(r"X-aws-ec2-metadata-token-ttl-seconds", script)   # IMDSv2
    watcher = "python -m platform.provision.preemption watch --node-dir /run/dbrx-platform"
    assert (watcher in script) is spot
    assert ("systemctl enable --now dbrx-spot-watcher.service" in script) is spot


@needs_terraform
def test_local_module_validates_offline(tmp_path):
    work = tmp_path / "local"
    shutil.copytree(LOCAL, work, ignore=shutil.ignore_patterns(".terraform*", "*.tfstate*", "run"))
    for args in (["init", "-input=false", "-no-color"], ["validate", "-no-color"]):
        result = subprocess.run([TF, *args], cwd=work, capture_output=True, text=True,
                                env=TF_ENV, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
