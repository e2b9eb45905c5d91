# The shared contract (same names and meaning as infra/local): node_count,
# node_names, job_name, head_address, tags. The rest is AWS-only.

variable "job_name" {
  description = "Job the nodes belong to; prefixes node names and every resource name."
  type        = string

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{0,39}$", var.job_name))
    error_message = "job_name must be 1-40 characters: lowercase letters, digits and '-', starting with a letter."
  }
}

variable "node_count" {
  description = "Number of training nodes. Names are <job_name>-node-<i> unless node_names is set."
  type        = number

  validation {
    condition     = var.node_count >= 0 && var.node_count <= 512 && floor(var.node_count) == var.node_count
    error_message = "node_count must be a whole number from 0 to 512."
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
  description = "Ray head GCS address the nodes join, as host:port (a private IP in the VPC, port 6379 by default)."
  type        = string

  validation {
    condition     = can(regex("^[A-Za-z0-9.-]+:[0-9]{1,5}$", var.head_address))
    error_message = "head_address must be host:port, e.g. 10.0.0.10:6379."
  }
}

variable "tags" {
  description = "Tags on every resource (merged with job and managed-by tags)."
  type        = map(string)
  default     = {}

  validation {
    condition     = alltrue([for k in keys(var.tags) : !startswith(lower(k), "aws:")])
    error_message = "Tag keys may not start with 'aws:' (reserved by AWS)."
  }
}

variable "region" {
  description = "AWS region, e.g. us-east-1."
  type        = string

  validation {
    condition     = can(regex("^[a-z]{2}(-gov|-iso[a-z]*)?-[a-z]+-[0-9]$", var.region))
    error_message = "region must be an AWS region name such as us-east-1."
  }
}

variable "availability_zone" {
  description = "Zone for a new subnet (p5 capacity is per zone). Empty: the region's first zone. Ignored when subnet_id is set."
  type        = string
  default     = ""
}

variable "instance_type" {
  description = "EC2 instance type of a training node. p5.48xlarge: 8 x H100 80GB, 32 EFA network cards."
  type        = string
  default     = "p5.48xlarge"

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]*\\.[a-z0-9]+$", var.instance_type))
    error_message = "instance_type must look like family.size, e.g. p5.48xlarge."
  }
}

variable "efa_interface_count" {
  description = "EFA network interfaces per node, one per network card (p5.48xlarge: 32, p5en.48xlarge: 16, p4d.24xlarge: 4)."
  type        = number
  default     = 32

  validation {
    condition     = var.efa_interface_count >= 1 && var.efa_interface_count <= 32 && floor(var.efa_interface_count) == var.efa_interface_count
    error_message = "efa_interface_count must be a whole number from 1 to 32."
  }
}

variable "secondary_efa_interface_type" {
  description = "Interface type on network cards 1..N: 'efa' (EFA + IP) or 'efa-only' (EFA without an IP address, saves subnet addresses)."
  type        = string
  default     = "efa"

  validation {
    condition     = contains(["efa", "efa-only"], var.secondary_efa_interface_type)
    error_message = "secondary_efa_interface_type must be 'efa' or 'efa-only'."
  }
}

variable "ami" {
  description = "AMI id for the nodes. Empty: the latest AWS Deep Learning Base OSS Nvidia Driver AMI (Ubuntu 22.04), with EFA and NCCL installed."
  type        = string
  default     = ""

  validation {
    condition     = var.ami == "" || can(regex("^ami-[0-9a-f]{8}([0-9a-f]{9})?$", var.ami))
    error_message = "ami must be empty or an AMI id like ami-0123456789abcdef0."
  }
}

variable "root_volume_gb" {
  description = "Size of each node's gp3 root volume in GiB (container images, pip cache, local checkpoint staging)."
  type        = number
  default     = 500

  validation {
    condition     = var.root_volume_gb >= 100 && var.root_volume_gb <= 16384
    error_message = "root_volume_gb must be between 100 and 16384."
  }
}

variable "spot" {
  description = "Run nodes as spot instances (interruptible; the spot watcher asks training to checkpoint on notice)."
  type        = bool
  default     = false
}

variable "spot_max_price" {
  description = "Highest spot price in USD per hour as a decimal string. Empty: the on-demand price caps it."
  type        = string
  default     = ""

  validation {
    condition     = var.spot_max_price == "" || can(regex("^[0-9]+(\\.[0-9]+)?$", var.spot_max_price))
    error_message = "spot_max_price must be empty or a decimal number such as 40.00."
  }
}

variable "capacity_reservation_id" {
  description = "On-demand capacity reservation to launch into (e.g. a reserved p5 block). Empty: none."
  type        = string
  default     = ""

  validation {
    condition     = var.capacity_reservation_id == "" || can(regex("^cr-[0-9a-f]{17}$", var.capacity_reservation_id))
    error_message = "capacity_reservation_id must be empty or like cr-0123456789abcdef0."
  }

  validation {
    condition     = !(var.spot && var.capacity_reservation_id != "")
    error_message = "Spot instances cannot launch into a capacity reservation: unset spot or capacity_reservation_id."
  }
}

variable "vpc_id" {
  description = "Existing VPC of subnet_id. Empty: taken from the subnet, or a new VPC when subnet_id is empty too."
  type        = string
  default     = ""

  validation {
    condition     = var.vpc_id == "" || can(regex("^vpc-[0-9a-f]{8}([0-9a-f]{9})?$", var.vpc_id))
    error_message = "vpc_id must be empty or like vpc-0123456789abcdef0."
  }
}

variable "subnet_id" {
  description = "Existing private subnet for the nodes (must reach S3 and the package index, e.g. via NAT). Empty: create a VPC with a private subnet, a NAT gateway and an S3 endpoint."
  type        = string
  default     = ""

  validation {
    condition     = var.subnet_id == "" || can(regex("^subnet-[0-9a-f]{8}([0-9a-f]{9})?$", var.subnet_id))
    error_message = "subnet_id must be empty or like subnet-0123456789abcdef0."
  }

  validation {
    condition     = var.subnet_id != "" || var.vpc_id == ""
    error_message = "vpc_id needs subnet_id: give the subnet to use in that VPC, or leave both empty for a new VPC."
  }
}

variable "vpc_cidr" {
  description = "Address range of a new VPC (used only when subnet_id is empty)."
  type        = string
  default     = "10.42.0.0/16"

  validation {
    condition     = can(cidrhost(var.vpc_cidr, 0)) && try(tonumber(split("/", var.vpc_cidr)[1]) <= 19, false)
    error_message = "vpc_cidr must be an IPv4 CIDR block of /19 or larger (a /20 for nodes plus a /24 for the NAT gateway)."
  }
}

variable "head_security_group_id" {
  description = "Security group of the Ray head. Set it to open head <-> node traffic both ways; empty: the head must already be in a group that allows it."
  type        = string
  default     = ""

  validation {
    condition     = var.head_security_group_id == "" || can(regex("^sg-[0-9a-f]{8}([0-9a-f]{9})?$", var.head_security_group_id))
    error_message = "head_security_group_id must be empty or like sg-0123456789abcdef0."
  }
}

variable "bucket" {
  description = "S3 bucket for checkpoints; the nodes' IAM role can reach only this bucket (under bucket_prefix)."
  type        = string

  validation {
    condition     = can(regex("^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$", var.bucket)) && !can(regex("\\.\\.|^xn--|-s3alias$|^\\d+\\.\\d+\\.\\d+\\.\\d+$", var.bucket))
    error_message = "bucket must be a valid S3 bucket name: 3-63 lowercase letters, digits, '.' and '-'."
  }
}

variable "create_bucket" {
  description = "Create the bucket (versioned, encrypted, private). False: use an existing bucket that outlives this job."
  type        = bool
  default     = true
}

variable "bucket_prefix" {
  description = "Key prefix the nodes may use inside the bucket, e.g. 'checkpoints/job-a/'. Empty: the whole bucket."
  type        = string
  default     = ""

  validation {
    condition     = var.bucket_prefix == "" || (endswith(var.bucket_prefix, "/") && !startswith(var.bucket_prefix, "/"))
    error_message = "bucket_prefix must be empty or a relative prefix ending in '/', e.g. checkpoints/."
  }
}

variable "kms_key_arn" {
  description = "KMS key for bucket encryption (SSE-KMS). Empty: SSE-S3 (AES256)."
  type        = string
  default     = ""

  validation {
    condition     = var.kms_key_arn == "" || can(regex("^arn:aws[a-z-]*:kms:", var.kms_key_arn))
    error_message = "kms_key_arn must be empty or a KMS key ARN."
  }
}

variable "noncurrent_version_days" {
  description = "Days a replaced or deleted checkpoint object version is kept before it expires."
  type        = number
  default     = 30

  validation {
    condition     = var.noncurrent_version_days >= 1
    error_message = "noncurrent_version_days must be at least 1."
  }
}

variable "package_ref" {
  description = "pip requirement that installs this platform at the submitted version: a wheel URL, 'git+https://...@<sha>', or 'dbrx-platform==X.Y.Z'."
  type        = string

  validation {
    condition     = length(var.package_ref) > 0 && can(regex("^[A-Za-z0-9_.+:/@=<>~!%#&?-]+$", var.package_ref))
    error_message = "package_ref must be one pip requirement or URL without spaces or quotes."
  }
}

variable "ray_auth_token_parameter" {
  description = "SSM parameter (SecureString) holding the Ray cluster's auth token. Empty: /dbrx-platform/<job_name>/ray-auth-token. The token never passes through user data or Terraform state."
  type        = string
  default     = ""

  validation {
    condition     = var.ray_auth_token_parameter == "" || can(regex("^/[A-Za-z0-9_./-]+$", var.ray_auth_token_parameter))
    error_message = "ray_auth_token_parameter must be empty or an absolute SSM parameter name such as /dbrx-platform/job/ray-auth-token."
  }
}

variable "spot_poll_interval_s" {
  description = "Seconds between the spot watcher's polls of the instance metadata (AWS gives a two-minute notice)."
  type        = number
  default     = 5

  validation {
    condition     = var.spot_poll_interval_s >= 1 && var.spot_poll_interval_s <= 30
    error_message = "spot_poll_interval_s must be between 1 and 30 so a two-minute notice leaves time to checkpoint."
  }
}
