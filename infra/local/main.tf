# Ray worker nodes as processes on this host: the offline twin of infra/aws.
#
# Each node is a terraform_data resource whose create provisioner starts
# `ray start --block` in its own session (scripts/node.sh) and whose destroy
# provisioner stops that session. Nodes are keyed by name, so
# `-replace='terraform_data.node["<name>"]'` or swapping one name in
# node_names touches that node only. A destroy provisioner may reference only
# `self`, so everything the stop needs lives in `input`.
#
# A node's pid (its session id) is in <node_dirs[name]>/ray.pid, not an
# output: outputs that read files are evaluated at plan time, before the
# process exists, and would report stale pids.

locals {
  node_names = length(var.node_names) > 0 ? toset(var.node_names) : toset([
    for i in range(var.node_count) : format("%s-node-%d", var.job_name, i)
  ])
  run_dir = var.state_dir != "" ? var.state_dir : "${abspath(path.module)}/run"
  script  = "${abspath(path.module)}/scripts/node.sh"
}

resource "terraform_data" "node" {
  for_each = local.node_names

  # Changing any of these replaces the node (a new process with new settings).
  input = {
    name            = each.key
    node_dir        = "${local.run_dir}/${each.key}"
    pid_file        = "${local.run_dir}/${each.key}/ray.pid"
    script          = local.script
    head_address    = var.head_address
    ray_bin         = var.ray_bin
    node_cpus       = var.node_cpus
    node_memory_mb  = var.node_memory_mb
    object_store_mb = var.object_store_mb
    stop_timeout_s  = var.stop_timeout_s
  }

  provisioner "local-exec" {
    command = "${self.input.script} start"
    environment = {
      NODE_NAME       = self.input.name
      NODE_ID         = self.id
      NODE_DIR        = self.input.node_dir
      PID_FILE        = self.input.pid_file
      HEAD_ADDRESS    = self.input.head_address
      RAY_BIN         = self.input.ray_bin
      NODE_CPUS       = self.input.node_cpus
      NODE_MEMORY_MB  = self.input.node_memory_mb
      OBJECT_STORE_MB = self.input.object_store_mb
      NODE_TAGS       = jsonencode(merge(var.tags, { job = var.job_name }))
      START_TIMEOUT_S = var.start_timeout_s
      FAIL_APPLY      = var.fail_apply ? "1" : "0"
      CAPACITY_FILE   = var.capacity_exhausted_file
      BOOT_HOLD_FILE  = var.boot_hold_file
    }
  }

  provisioner "local-exec" {
    when    = destroy
    command = "${self.input.script} stop"
    environment = {
      PID_FILE       = self.input.pid_file
      STOP_TIMEOUT_S = self.input.stop_timeout_s
    }
  }
}
