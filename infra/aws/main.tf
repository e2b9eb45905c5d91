# H100 training nodes for one job: p5.48xlarge instances with EFA in a
# cluster placement group, joining an existing Ray head.
#
# Files: network.tf (VPC or the given subnet), security.tf (node security
# group), iam.tf (instance profile scoped to the checkpoint bucket),
# storage.tf (the bucket), compute.tf (launch template and instances),
# templates/user_data.sh.tftpl (install, Ray join, spot watcher).
#
# Spot-notice contract (the same on infra/local, implemented in
# platform/provision/preemption.py):
#   * every Ray process on a node has DBRX_NODE_DIR (here /run/dbrx-platform);
#   * a training worker registers by creating $DBRX_NODE_DIR/workers/<pid>
#     holding its process start time (field 22 of /proc/<pid>/stat);
#   * on a spot interruption notice (IMDSv2 spot/instance-action) the watcher
#     writes $DBRX_NODE_DIR/preemption.json atomically, then sends SIGUSR1 to
#     every registered worker that is still alive with that start time;
#   * the worker checkpoints at its next step boundary (the notice comes two
#     minutes before the instance stops) and keeps its files as they are.

data "aws_partition" "current" {}

data "aws_availability_zones" "available" {
  state = "available"
}

locals {
  node_names = length(var.node_names) > 0 ? toset(var.node_names) : toset([
    for i in range(var.node_count) : format("%s-node-%d", var.job_name, i)
  ])

  tags = merge(var.tags, {
    "dbrx-platform/job" = var.job_name
    "managed-by"        = "dbrx-platform"
  })

  node_dir              = "/run/dbrx-platform"
  ray_token_parameter   = var.ray_auth_token_parameter != "" ? var.ray_auth_token_parameter : "/dbrx-platform/${var.job_name}/ray-auth-token"
  bucket_arn            = "arn:${data.aws_partition.current.partition}:s3:::${var.bucket}"
  availability_zone     = var.availability_zone != "" ? var.availability_zone : data.aws_availability_zones.available.names[0]
  deep_learning_ami_ssm = "/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id"
}
