# One launch template for the shape of a node; one aws_instance per node name
# (for_each), so replacing or removing one node leaves the others untouched.

data "aws_ssm_parameter" "deep_learning_ami" {
  count = var.ami == "" ? 1 : 0
  name  = local.deep_learning_ami_ssm
}

# Cluster placement: all nodes on one low-latency network spine, which EFA
# collectives (NCCL all-to-all for expert parallelism) need at full speed.
resource "aws_placement_group" "nodes" {
  name     = "${var.job_name}-nodes"
  strategy = "cluster"
}

resource "aws_launch_template" "node" {
  name_prefix   = "${var.job_name}-node-"
  image_id      = var.ami != "" ? var.ami : nonsensitive(data.aws_ssm_parameter.deep_learning_ami[0].value)
  instance_type = var.instance_type
  ebs_optimized = true

  iam_instance_profile {
    arn = aws_iam_instance_profile.node.arn
  }

  placement {
    group_name = aws_placement_group.nodes.name
  }

  # IMDSv2 only: the spot watcher and user data fetch a session token first.
  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
    instance_metadata_tags      = "enabled"
  }

  block_device_mappings {
    device_name = "/dev/sda1"
    ebs {
      volume_size           = var.root_volume_gb
      volume_type           = "gp3"
      throughput            = 1000
      iops                  = 16000
      encrypted             = true
      delete_on_termination = true
    }
  }

  dynamic "instance_market_options" {
    for_each = var.spot ? [1] : []
    content {
      market_type = "spot"
      spot_options {
        spot_instance_type             = "one-time"
        instance_interruption_behavior = "terminate"
        max_price                      = var.spot_max_price != "" ? var.spot_max_price : null
      }
    }
  }

  dynamic "capacity_reservation_specification" {
    for_each = var.capacity_reservation_id != "" ? [1] : []
    content {
      capacity_reservation_target {
        capacity_reservation_id = var.capacity_reservation_id
      }
    }
  }

  # EFA: p5.48xlarge has 32 network cards and supports one EFA interface on
  # each. Card 0 carries the primary interface (device index 0), itself an
  # EFA interface so NCCL can use it too; cards 1..N-1 attach at device index
  # 1. All interfaces sit in the node subnet and security group, because EFA
  # traffic must stay inside that group. A node with several interfaces
  # cannot get a public IP: the subnet reaches the internet through NAT.
  dynamic "network_interfaces" {
    for_each = range(var.efa_interface_count)
    content {
      network_card_index    = network_interfaces.value
      device_index          = network_interfaces.value == 0 ? 0 : 1
      interface_type        = network_interfaces.value == 0 ? "efa" : var.secondary_efa_interface_type
      subnet_id             = local.subnet_id
      security_groups       = [aws_security_group.nodes.id]
      delete_on_termination = true
    }
  }

  tag_specifications {
    resource_type = "volume"
    tags          = local.tags
  }
}

resource "aws_instance" "node" {
  for_each = local.node_names

  launch_template {
    id      = aws_launch_template.node.id
    version = aws_launch_template.node.latest_version
  }

  user_data_base64 = base64gzip(templatefile("${path.module}/templates/user_data.sh.tftpl", {
    node_name            = each.key
    job_name             = var.job_name
    head_address         = var.head_address
    package_ref          = var.package_ref
    region               = var.region
    ray_token_parameter  = local.ray_token_parameter
    node_dir             = local.node_dir
    spot                 = var.spot
    spot_poll_interval_s = var.spot_poll_interval_s
  }))

  tags = {
    Name                 = each.key
    "dbrx-platform/node" = each.key
  }

  depends_on = [aws_iam_role_policy.node]
}
