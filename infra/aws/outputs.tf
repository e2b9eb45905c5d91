# Maps are keyed by node name: the identity shared with Terraform addresses
# (aws_instance.node["<name>"]) and with Ray (node name, label
# dbrx-platform/node=<name>, label dbrx-platform/instance=<instance id>,
# resource node_<name>).

output "node_names" {
  description = "Names of the provisioned nodes, sorted."
  value       = sort(keys(aws_instance.node))
}

output "instance_ids" {
  description = "Node name -> EC2 instance id (changes on replace; Ray label dbrx-platform/instance)."
  value       = { for name, node in aws_instance.node : name => node.id }
}

output "private_ips" {
  description = "Node name -> private IPv4 address of the primary (EFA) interface."
  value       = { for name, node in aws_instance.node : name => node.private_ip }
}

output "node_dirs" {
  description = "Node name -> DBRX_NODE_DIR on that node (spot-notice contract)."
  value       = { for name in keys(aws_instance.node) : name => local.node_dir }
}

output "bucket" {
  description = "Checkpoint bucket name."
  value       = var.bucket
}

output "security_group_id" {
  description = "Security group of the nodes; a head outside head_security_group_id needs an ingress rule from it."
  value       = aws_security_group.nodes.id
}

output "placement_group" {
  description = "Cluster placement group of the nodes."
  value       = aws_placement_group.nodes.name
}

output "subnet_id" {
  description = "Subnet the nodes run in."
  value       = local.subnet_id
}
