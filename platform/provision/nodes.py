"""The node inventory of one job: Terraform's nodes, matched to Ray's.

Identity. A node has a *name* (`<job>-node-<i>`), stable for the node's slot:
it keys the Terraform resource (`terraform_data.node["<name>"]` /
`aws_instance.node["<name>"]`), and the Ray node carries it as its node name,
the label `dbrx-platform/node` and the resource `node_<name>` (to pin work to
it). Each incarnation has an *instance id* (the EC2 instance id, or the
terraform_data id locally) that changes on replace; Ray carries it as the
label `dbrx-platform/instance`. A provisioned node is live when an alive Ray
node has both its name and its current instance id, so a dead predecessor of
the same name never counts. Every worker node offers `node_slot: 1`: training
asks for one slot per worker, which places one worker per node.

The Provisioner owns the names: `scale_to` adds the lowest free indexes and
removes lost or highest-index nodes first; it passes the exact name list to
Terraform (`node_names`), so adding or removing one node never touches the
others, and `replace` recreates one node in place with `-replace`.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from platform.provision.errors import NodesNotReady, ProvisionError
from platform.provision.terraform import Terraform

log = logging.getLogger(__name__)

NODE_LABEL = "dbrx-platform/node"
INSTANCE_LABEL = "dbrx-platform/instance"
SLOT_RESOURCE = "node_slot"
# The Terraform resource that is one node, per provider module.
NODE_RESOURCE = {"local": "terraform_data.node", "aws": "aws_instance.node"}
# Variables and outputs every provider module shares (tests/test_infra_aws.py checks them).
SHARED_VARIABLES = ("job_name", "node_count", "node_names", "head_address", "tags")
SHARED_OUTPUTS = ("node_names", "instance_ids", "private_ips", "node_dirs")


def node_resource(name: str) -> str:
    """The Ray custom resource that exists only on node `name` (pin tasks with it)."""
    return f"node_{name}"


def terraform_job_name(job: str) -> str:
    """`job` as the modules accept it: lowercase letters, digits, '-', max 40 chars."""
    name = re.sub(r"[^a-z0-9-]+", "-", job.lower()).strip("-")
    if not name or not name[0].isalpha():
        name = f"job-{name}".rstrip("-")
    return name[:40].rstrip("-")


@dataclasses.dataclass(frozen=True)
class Node:
    """A provisioned node as Terraform knows it."""

    name: str
    instance_id: str
    private_ip: str
    node_dir: str                   # DBRX_NODE_DIR on that node (spot-notice contract)
    pid: int | None = None          # local nodes: the `ray start` session leader (its session id)


@dataclasses.dataclass(frozen=True)
class RayNode:
    """A Ray node that belongs to a provisioned node."""

    name: str
    instance_id: str
    node_id: str                    # Ray's node id
    alive: bool
    address: str
    resources: Mapping[str, float]


def fetch_ray_nodes(address: str) -> list[dict[str, Any]]:
    """Ray's node table as [{node_id, name, alive, address, labels, resources}], via the
    state API of the cluster at `address` (works whatever this process is connected to)."""
    from ray.util.state import list_nodes

    from platform.provision.head import enable_token_auth_in_process

    enable_token_auth_in_process()
    rows = list_nodes(address=address, detail=True, limit=10_000, raise_on_missing_output=False,
                      timeout=30)
    return [{"node_id": n.node_id, "name": n.node_name, "alive": n.state == "ALIVE",
             "address": n.node_ip, "labels": dict(n.labels or {}),
             "resources": dict(n.resources_total or {})} for n in rows]


class Provisioner:
    """Creates, replaces and removes one job's worker nodes through Terraform.

    The controller calls: up(n) once, then live_ray_nodes() / lost_nodes()
    in its loop, replace(name) for a lost node, scale_to(n) to resize,
    down() at the end (destroy() also removes the job's shared resources,
    such as the checkpoint bucket on AWS, and fails if it is not empty).
    """

    def __init__(self, job_name: str, provider: str, head_address: str, *,
                 variables: Mapping[str, Any] | None = None, terraform: Terraform | None = None,
                 ray_nodes: Callable[[str], list[dict[str, Any]]] = fetch_ray_nodes,
                 join_timeout_s: float = 180.0) -> None:
        if provider not in NODE_RESOURCE:
            raise ProvisionError(f"unknown provider {provider!r}; expected one of {sorted(NODE_RESOURCE)}")
        self.job_name = terraform_job_name(job_name)
        self.provider = provider
        self.head_address = head_address
        self.variables = dict(variables or {})
        self.terraform = terraform or Terraform.for_job(self.job_name, provider, env=_ray_env())
        self._ray_nodes = ray_nodes
        self.join_timeout_s = join_timeout_s

    @classmethod
    def for_job(cls, job: Any, head_address: str, **kwargs: Any) -> "Provisioner":
        """From a JobConfig: provider and module variables come from `job.cluster`."""
        return cls(job.name, job.cluster.provider, head_address,
                   variables=module_variables(job), join_timeout_s=job.cluster.node_join_timeout_s,
                   **kwargs)

    # -- Terraform side --------------------------------------------------

    def nodes(self) -> list[Node]:
        """The provisioned nodes, by name."""
        out = self.terraform.output()
        ids = out.get("instance_ids") or {}
        ips = out.get("private_ips") or {}
        dirs = out.get("node_dirs") or {}
        return [Node(name, str(ids.get(name, "")), str(ips.get(name, "")), str(dirs.get(name, "")),
                     self._local_pid(str(dirs.get(name, ""))))
                for name in sorted(out.get("node_names") or [], key=_index)]

    def _local_pid(self, node_dir: str) -> int | None:
        """A local node's `ray start` pid, from <node_dir>/ray.pid (None elsewhere)."""
        if self.provider != "local" or not node_dir:
            return None
        try:
            return int(Path(node_dir, "ray.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def up(self, n: int) -> list[Node]:
        """Provision `n` nodes (init included); existing nodes are kept."""
        return self.scale_to(n)

    def scale_to(self, n: int, prefer_remove: Iterable[str] = ()) -> list[Node]:
        """Grow or shrink to `n` nodes. Growing takes the lowest free indexes;
        shrinking removes `prefer_remove` first, then the highest indexes."""
        if n < 0:
            raise ValueError(f"node count must be >= 0, got {n}")
        current = [node.name for node in self.nodes()]
        names = list(current)
        if n < len(names):
            doomed = [x for x in prefer_remove if x in names]
            doomed += sorted((x for x in names if x not in doomed), key=_index, reverse=True)
            names = [x for x in names if x not in set(doomed[:len(names) - n])]
        taken = {_index(x) for x in names}
        i = 0
        while len(names) < n:
            if i not in taken:
                names.append(f"{self.job_name}-node-{i}")
            i += 1
        return self._apply(sorted(names, key=_index))

    def replace(self, *names: str) -> list[Node]:
        """Recreate the named nodes in place (same names, new incarnations)."""
        current = {node.name for node in self.nodes()}
        unknown = [x for x in names if x not in current]
        if unknown:
            raise ProvisionError(f"cannot replace {', '.join(unknown)}: not provisioned for job "
                                 f"{self.job_name} (nodes: {', '.join(sorted(current)) or 'none'})")
        resource = NODE_RESOURCE[self.provider]
        return self._apply(sorted(current, key=_index),
                           replace=[f'{resource}["{x}"]' for x in names])

    def remove(self, *names: str) -> list[Node]:
        """Remove exactly these nodes; the others keep running."""
        current = [node.name for node in self.nodes()]
        return self._apply([x for x in current if x not in names])

    def down(self) -> None:
        """Remove every node; shared resources (network, bucket) and the state stay."""
        self._apply([])

    def destroy(self) -> None:
        """`terraform destroy`: the nodes and every other resource of the job."""
        self.terraform.destroy(self._variables([]))

    def plan_summary(self, n: int) -> str:
        """What `up(n)` would do, for `submit --dry-run` (raises ProvisionError when Terraform rejects the module; a module whose providers cannot be fetched is reported, not raised)."""
        names = [f"{self.job_name}-node-{i}" for i in range(n)]
        return self.terraform.plan_summary(self._variables(names), timeout_s=60.0)

    def _apply(self, names: Sequence[str], replace: Sequence[str] = ()) -> list[Node]:
        log.info("provisioning %d node(s) for %s: %s%s", len(names), self.job_name,
                 ", ".join(names) or "none", f" (replacing {', '.join(replace)})" if replace else "")
        self.terraform.apply(self._variables(names), replace=replace)
        return self.nodes()

    def _variables(self, names: Sequence[str]) -> dict[str, Any]:
        variables = dict(self.variables)
        if self.provider == "local":   # this host's ray CLI; node run files beside the state
            from platform.provision.head import ray_bin

            variables.setdefault("ray_bin", ray_bin())
            variables.setdefault("state_dir", str(self.terraform.workdir / "run"))
        return {**variables, "job_name": self.job_name, "head_address": self.head_address,
                "node_count": len(names), "node_names": list(names)}

    # -- Ray side --------------------------------------------------------

    def live_ray_nodes(self) -> dict[str, RayNode]:
        """Provisioned node name -> its alive Ray node (current incarnation only)."""
        wanted = {node.name: node.instance_id for node in self.nodes()}
        live: dict[str, RayNode] = {}
        for row in self._ray_nodes(self.head_address):
            labels = row.get("labels") or {}
            name, instance = labels.get(NODE_LABEL), labels.get(INSTANCE_LABEL)
            if row.get("alive") and name in wanted and instance == wanted[name]:
                live[name] = RayNode(name, instance, row["node_id"], True, row.get("address", ""),
                                     row.get("resources") or {})
        return live

    def lost_nodes(self) -> list[str]:
        """Provisioned nodes with no alive Ray node: dead, or not joined yet."""
        live = self.live_ray_nodes()
        return [node.name for node in self.nodes() if node.name not in live]

    def wait_for_nodes(self, n: int | None = None, timeout_s: float | None = None,
                       poll_s: float = 1.0) -> dict[str, RayNode]:
        """Wait until `n` (default: all) provisioned nodes are alive in Ray."""
        timeout_s = self.join_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        while True:
            provisioned = [node.name for node in self.nodes()]
            want = len(provisioned) if n is None else n
            if want > len(provisioned):
                raise NodesNotReady(f"waiting for {want} nodes but only {len(provisioned)} are "
                                    f"provisioned for job {self.job_name}; call scale_to({want}) first")
            live = self.live_ray_nodes()
            if len(live) >= want:
                return live
            if time.monotonic() >= deadline:
                missing = [x for x in provisioned if x not in live]
                raise NodesNotReady(
                    f"only {len(live)} of {want} nodes joined the Ray cluster at {self.head_address} "
                    f"within {timeout_s:.0f}s; not joined: {', '.join(missing)}. Check the node "
                    f"logs ({self._log_hint()}) and that the nodes can reach the head.")
            time.sleep(poll_s)

    def _log_hint(self) -> str:
        if self.provider == "local":
            return f"{self.terraform.workdir}/run/<node>/ray.log"
        return "/var/log/dbrx-node-setup.log and `journalctl -u dbrx-ray-node` on the node"


def _index(name: str) -> int:
    match = re.search(r"-node-(\d+)$", name)
    return int(match.group(1)) if match else 1 << 30


def _ray_env() -> dict[str, str]:
    from platform.provision.head import ray_auth_env

    return ray_auth_env()


def module_variables(job: Any) -> dict[str, Any]:
    """Module variables from a JobConfig, beyond the shared node contract."""
    c = job.cluster
    tags = {str(k): str(v) for k, v in dict(c.tags).items()}
    if c.provider == "local":
        return {"tags": tags, "node_cpus": c.cpus_per_worker, "node_memory_mb": c.node_memory_mb,
                "object_store_mb": c.node_object_store_mb, **c.terraform_vars}
    variables: dict[str, Any] = {
        "tags": tags, "region": c.region, "instance_type": c.instance_type, "ami": c.ami,
        "spot": c.spot, "subnet_id": c.subnet_id,
        "package_ref": c.package_ref or _default_package_ref(),
    }
    uri = job.checkpoint.uri
    if uri.startswith("s3://"):
        bucket, _, prefix = uri[5:].partition("/")
        variables["bucket"] = bucket
        if prefix.strip("/"):
            variables["bucket_prefix"] = prefix.strip("/") + "/"
    variables.update(c.terraform_vars)
    return variables


def _default_package_ref() -> str:
    import platform as package

    return f"dbrx-platform=={package.__version__}"
