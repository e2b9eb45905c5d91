# Nodes live in a private subnet: either the one given (subnet_id, its VPC
# looked up) or a new VPC with a private node subnet, a public subnet holding
# a NAT gateway (pip installs), and an S3 gateway endpoint so checkpoint
# traffic stays on the AWS network and skips NAT charges.

data "aws_subnet" "given" {
  count = var.subnet_id != "" ? 1 : 0
  id    = var.subnet_id
}

locals {
  create_network = var.subnet_id == ""
  vpc_id         = local.create_network ? aws_vpc.this[0].id : (var.vpc_id != "" ? var.vpc_id : data.aws_subnet.given[0].vpc_id)
  subnet_id      = local.create_network ? aws_subnet.nodes[0].id : var.subnet_id
}

resource "aws_vpc" "this" {
  count                = local.create_network ? 1 : 0
  cidr_block           = var.vpc_cidr
  enable_dns_support   = true
  enable_dns_hostnames = true
  tags                 = { Name = "${var.job_name}-vpc" }
}

resource "aws_subnet" "nodes" {
  count             = local.create_network ? 1 : 0
  vpc_id            = aws_vpc.this[0].id
  availability_zone = local.availability_zone
  # The first /20 of the VPC: 4091 addresses, room for 32 EFA IPs per node.
  cidr_block = cidrsubnet(var.vpc_cidr, 20 - tonumber(split("/", var.vpc_cidr)[1]), 0)
  tags       = { Name = "${var.job_name}-nodes" }
}

resource "aws_subnet" "public" {
  count                   = local.create_network ? 1 : 0
  vpc_id                  = aws_vpc.this[0].id
  availability_zone       = local.availability_zone
  cidr_block              = cidrsubnet(var.vpc_cidr, 24 - tonumber(split("/", var.vpc_cidr)[1]), pow(2, 24 - tonumber(split("/", var.vpc_cidr)[1])) - 1)
  map_public_ip_on_launch = false
  tags                    = { Name = "${var.job_name}-public" }
}

resource "aws_internet_gateway" "this" {
  count  = local.create_network ? 1 : 0
  vpc_id = aws_vpc.this[0].id
  tags   = { Name = "${var.job_name}-igw" }
}

resource "aws_eip" "nat" {
  count  = local.create_network ? 1 : 0
  domain = "vpc"
  tags   = { Name = "${var.job_name}-nat" }
}

resource "aws_nat_gateway" "this" {
  count         = local.create_network ? 1 : 0
  subnet_id     = aws_subnet.public[0].id
  allocation_id = aws_eip.nat[0].id
  tags          = { Name = "${var.job_name}-nat" }
  depends_on    = [aws_internet_gateway.this]
}

resource "aws_route_table" "public" {
  count  = local.create_network ? 1 : 0
  vpc_id = aws_vpc.this[0].id

  route {
    cidr_block = "0.0.0.0/0"
    gateway_id = aws_internet_gateway.this[0].id
  }

  tags = { Name = "${var.job_name}-public" }
}

resource "aws_route_table_association" "public" {
  count          = local.create_network ? 1 : 0
  subnet_id      = aws_subnet.public[0].id
  route_table_id = aws_route_table.public[0].id
}

resource "aws_route_table" "nodes" {
  count  = local.create_network ? 1 : 0
  vpc_id = aws_vpc.this[0].id

  route {
    cidr_block     = "0.0.0.0/0"
    nat_gateway_id = aws_nat_gateway.this[0].id
  }

  tags = { Name = "${var.job_name}-nodes" }
}

resource "aws_route_table_association" "nodes" {
  count          = local.create_network ? 1 : 0
  subnet_id      = aws_subnet.nodes[0].id
  route_table_id = aws_route_table.nodes[0].id
}

resource "aws_vpc_endpoint" "s3" {
  count             = local.create_network ? 1 : 0
  vpc_id            = aws_vpc.this[0].id
  service_name      = "com.amazonaws.${var.region}.s3"
  vpc_endpoint_type = "Gateway"
  route_table_ids   = [aws_route_table.nodes[0].id]
  tags              = { Name = "${var.job_name}-s3" }
}
