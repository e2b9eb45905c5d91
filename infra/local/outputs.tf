# Maps are keyed by node name: the identity shared with Terraform addresses
# (terraform_data.node["<name>"]) and with Ray (node name, label
# dbrx-platform/node=<name>, resource node_<name>).

output "node_names" {
  description = "Names of the provisioned nodes, sorted."
  value       = sort(keys(terraform_data.node))
}

output "instance_ids" {
  description = "Node name -> id of this incarnation (changes on replace; Ray label dbrx-platform/instance)."
  value       = { for name, node in terraform_data.node : name => node.id }
}

output "private_ips" {
  description = "Node name -> address the node is reached at (all on this host)."
  value       = { for name in keys(terraform_data.node) : name => "127.0.0.1" }
}

output "node_dirs" {
  description = "Node name -> the node's run directory (DBRX_NODE_DIR: spot-notice contract, logs)."
  value       = { for name, node in terraform_data.node : name => node.input.node_dir }
}
