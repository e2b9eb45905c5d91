# hashicorp/aws cannot be downloaded offline: this module is checked
# statically here (terraform fmt, an HCL parser) and applied where the
# registry or a provider mirror is reachable.
terraform {
  required_version = ">= 1.9" # cross-variable validation

  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = ">= 5.80, < 7.0" # 5.80: interface_type "efa-only" in launch templates
    }
  }
}

provider "aws" {
  region = var.region

  default_tags {
    tags = local.tags
  }
}
