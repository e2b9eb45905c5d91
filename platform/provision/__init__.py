"""Provisioning: Terraform-driven worker nodes, the embedded Ray head, spot notices.

The controller's entry points:

    head = LocalHead(port=6379).start()            # embedded default (no cluster.ray_address)
    prov = Provisioner.for_job(job, head.address)   # job: platform.config.JobConfig
    prov.up(job.cluster.max_nodes)
    prov.wait_for_nodes(timeout_s=job.cluster.node_join_timeout_s)
    ...   # loop: prov.lost_nodes() -> prov.replace(name) / prov.scale_to(n)
    prov.down(); head.stop()

See nodes.py for how Terraform nodes map to Ray nodes, and preemption.py for
the spot-notice contract the training workers follow.
"""

from platform.provision.errors import (
    CapacityError, LockError, NodesNotReady, ProvisionError, classify,
)
from platform.provision.head import (
    LocalHead, enable_token_auth_in_process, ensure_auth_token, ray_auth_env, ray_bin,
)
from platform.provision.nodes import (
    INSTANCE_LABEL, NODE_LABEL, SLOT_RESOURCE, Node, Provisioner, RayNode, module_variables,
    node_resource, terraform_job_name,
)
from platform.provision.terraform import PlanSummary, RetryPolicy, Terraform, module_dir

__all__ = [
    "CapacityError", "INSTANCE_LABEL", "LocalHead", "LockError", "NODE_LABEL", "Node",
    "NodesNotReady", "PlanSummary", "ProvisionError", "Provisioner", "RayNode", "RetryPolicy",
    "SLOT_RESOURCE", "Terraform", "classify", "enable_token_auth_in_process", "ensure_auth_token",
    "module_dir", "module_variables", "node_resource", "ray_auth_env", "ray_bin",
    "terraform_job_name",
]
