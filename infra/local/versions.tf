# Built-in features only (terraform_data, local-exec): this module inits and
# applies with no provider download, so it works offline and in CI.
terraform {
  required_version = ">= 1.9" # cross-variable validation
}
