# The shared contract (same names and meaning as infra/aws): node_count,
# node_names, job_name, head_address, tags. The rest is local-only.

variable "job_name" {
  description = "Job the nodes belong to; prefixes generated node names."
  type        = string

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{0,39}$", var.job_name))
    error_message = "job_name must be 1-40 characters: lowercase letters, digits and '-', starting with a letter."
  }
}

variable "node_count" {
  description = "Number of Ray worker nodes. Names are <job_name>-node-<i> unless node_names is set."
  type        = number

  validation {
    condition     = var.node_count >= 0 && var.node_count <= 64 && floor(var.node_count) == var.node_count
    error_message = "node_count must be a whole number from 0 to 64 on one host."
  }
}

variable "node_names" {
  description = "Exact node names to run (the controller's inventory). Empty: generated from node_count. Removing one name and adding another replaces just that node."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for n in var.node_names : can(regex("^[a-z][a-z0-9-]{0,62}$", n))]) && length(distinct(var.node_names)) == length(var.node_names)
    error_message = "node_names must be unique, lowercase letters, digits and '-', starting with a letter, at most 63 characters."
  }

  validation {
    condition     = length(var.node_names) == 0 || length(var.node_names) == var.node_count
    error_message = "When node_names is set, node_count must equal its length."
  }
}

variable "head_address" {
  description = "Ray head GCS address the nodes join, as host:port."
  type        = string

  validation {
    condition     = can(regex("^[A-Za-z0-9.-]+:[0-9]{1,5}$", var.head_address))
    error_message = "head_address must be host:port, e.g. 127.0.0.1:6379."
  }
}

variable "tags" {
  description = "Labels recorded in each node's node.json (the local stand-in for instance tags)."
  type        = map(string)
  default     = {}

  validation {
    condition     = length(var.tags) <= 50
    error_message = "At most 50 tags, as on EC2 instances."
  }
}

variable "node_cpus" {
  description = "CPUs each node advertises to Ray (one training worker per node)."
  type        = number
  default     = 1

  validation {
    condition     = var.node_cpus >= 1 && var.node_cpus <= 1024 && floor(var.node_cpus) == var.node_cpus
    error_message = "node_cpus must be a whole number from 1 to 1024."
  }
}

variable "node_memory_mb" {
  description = "Memory each node advertises to Ray for task scheduling, in MiB."
  type        = number
  default     = 3072

  validation {
    condition     = var.node_memory_mb >= 256 && var.node_memory_mb <= 16777216
    error_message = "node_memory_mb must be from 256 to 16777216 (16 TiB)."
  }
}

variable "object_store_mb" {
  description = "Object store size per node, in MiB (Ray's default takes 30% of RAM per node)."
  type        = number
  default     = 300

  validation {
    condition     = var.object_store_mb >= 80 && var.object_store_mb <= 16777216
    error_message = "object_store_mb must be from 80 (Ray's minimum is 75 MiB) to 16777216 (16 TiB)."
  }
}

variable "ray_bin" {
  description = "Absolute path of the `ray` CLI that starts each node (the driver's own environment)."
  type        = string

  validation {
    condition     = startswith(var.ray_bin, "/")
    error_message = "ray_bin must be an absolute path."
  }
}

variable "state_dir" {
  description = "Directory for per-node run files (pid, log, spot-notice directory). Empty: <module dir>/run."
  type        = string
  default     = ""

  validation {
    condition     = var.state_dir == "" || startswith(var.state_dir, "/")
    error_message = "state_dir must be empty or an absolute path."
  }
}

variable "start_timeout_s" {
  description = "Seconds a node may take to join the head before its creation fails."
  type        = number
  default     = 120

  validation {
    condition     = var.start_timeout_s >= 10 && var.start_timeout_s <= 86400
    error_message = "start_timeout_s must be at least 10 and at most 86400 (a day)."
  }
}

variable "stop_timeout_s" {
  description = "Seconds a node gets to exit on SIGTERM before it is killed."
  type        = number
  default     = 15

  validation {
    condition     = var.stop_timeout_s >= 1 && var.stop_timeout_s <= 3600
    error_message = "stop_timeout_s must be from 1 to 3600."
  }
}

variable "fail_apply" {
  description = "Testing only: every node creation fails as an EC2 capacity shortage would (InsufficientInstanceCapacity)."
  type        = bool
  default     = false
}

variable "capacity_exhausted_file" {
  description = "Testing only: while this file exists, node creation fails as an EC2 capacity shortage would; lets a test take capacity away in the middle of a run."
  type        = string
  default     = ""
}

variable "boot_hold_file" {
  description = "Testing only: while this file exists, a new node holds its boot before joining (at most start_timeout_s), as a cloud instance takes time to boot; lets a test decide when a replacement arrives."
  type        = string
  default     = ""
}
