# Ray (GCS, raylets, object managers, worker ports) and EFA traffic flow only
# between members of this group: EFA requires all traffic to and from the
# group itself, so the rules reference the group, never an address range.
# Nothing is reachable from outside; egress is open for pip, S3 and the head.

resource "aws_security_group" "nodes" {
  name        = "${var.job_name}-nodes"
  description = "dbrx-platform ${var.job_name}: Ray and EFA traffic between cluster members only"
  vpc_id      = local.vpc_id
  tags        = { Name = "${var.job_name}-nodes" }
}

resource "aws_vpc_security_group_ingress_rule" "nodes_from_nodes" {
  security_group_id            = aws_security_group.nodes.id
  referenced_security_group_id = aws_security_group.nodes.id
  ip_protocol                  = "-1"
  description                  = "All traffic between nodes (Ray ports, EFA)"
}

resource "aws_vpc_security_group_egress_rule" "nodes_to_nodes" {
  security_group_id            = aws_security_group.nodes.id
  referenced_security_group_id = aws_security_group.nodes.id
  ip_protocol                  = "-1"
  description                  = "All traffic between nodes (EFA needs the self-referencing egress rule)"
}

resource "aws_vpc_security_group_egress_rule" "nodes_out" {
  security_group_id = aws_security_group.nodes.id
  cidr_ipv4         = "0.0.0.0/0"
  ip_protocol       = "-1"
  description       = "Outbound: package index, S3, SSM, the Ray head"
}

# The head runs outside this module (it provisions the nodes). When its group
# is given, open Ray's traffic between head and nodes in both directions.
resource "aws_vpc_security_group_ingress_rule" "nodes_from_head" {
  count                        = var.head_security_group_id != "" ? 1 : 0
  security_group_id            = aws_security_group.nodes.id
  referenced_security_group_id = var.head_security_group_id
  ip_protocol                  = "-1"
  description                  = "Ray head -> nodes (raylet, object manager, worker ports)"
}

resource "aws_vpc_security_group_ingress_rule" "head_from_nodes" {
  count                        = var.head_security_group_id != "" ? 1 : 0
  security_group_id            = var.head_security_group_id
  referenced_security_group_id = aws_security_group.nodes.id
  ip_protocol                  = "-1"
  description                  = "dbrx-platform ${var.job_name} nodes -> Ray head (GCS, object manager)"
}
