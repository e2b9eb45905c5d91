# The checkpoint bucket: versioned (an overwritten or deleted checkpoint can
# be recovered), encrypted at rest, TLS only, and closed to the public.
# create_bucket = false uses an existing bucket (one that outlives the job).

resource "aws_s3_bucket" "checkpoints" {
  count         = var.create_bucket ? 1 : 0
  bucket        = var.bucket
  force_destroy = false # a destroy must never delete checkpoints
}

resource "aws_s3_bucket_public_access_block" "checkpoints" {
  count                   = var.create_bucket ? 1 : 0
  bucket                  = aws_s3_bucket.checkpoints[0].id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_ownership_controls" "checkpoints" {
  count  = var.create_bucket ? 1 : 0
  bucket = aws_s3_bucket.checkpoints[0].id

  rule {
    object_ownership = "BucketOwnerEnforced"
  }
}

resource "aws_s3_bucket_versioning" "checkpoints" {
  count  = var.create_bucket ? 1 : 0
  bucket = aws_s3_bucket.checkpoints[0].id

  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "checkpoints" {
  count  = var.create_bucket ? 1 : 0
  bucket = aws_s3_bucket.checkpoints[0].id

  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm     = var.kms_key_arn != "" ? "aws:kms" : "AES256"
      kms_master_key_id = var.kms_key_arn != "" ? var.kms_key_arn : null
    }
    bucket_key_enabled = var.kms_key_arn != ""
  }
}

resource "aws_s3_bucket_lifecycle_configuration" "checkpoints" {
  count  = var.create_bucket ? 1 : 0
  bucket = aws_s3_bucket.checkpoints[0].id

  rule {
    id     = "expire-old-versions-and-stale-uploads"
    status = "Enabled"
    filter {}

    noncurrent_version_expiration {
      noncurrent_days = var.noncurrent_version_days
    }

    abort_incomplete_multipart_upload {
      days_after_initiation = 7
    }
  }

  depends_on = [aws_s3_bucket_versioning.checkpoints]
}

data "aws_iam_policy_document" "bucket" {
  statement {
    sid       = "DenyInsecureTransport"
    effect    = "Deny"
    actions   = ["s3:*"]
    resources = [local.bucket_arn, "${local.bucket_arn}/*"]

    principals {
      type        = "*"
      identifiers = ["*"]
    }

    condition {
      test     = "Bool"
      variable = "aws:SecureTransport"
      values   = ["false"]
    }
  }
}

resource "aws_s3_bucket_policy" "checkpoints" {
  count      = var.create_bucket ? 1 : 0
  bucket     = aws_s3_bucket.checkpoints[0].id
  policy     = data.aws_iam_policy_document.bucket.json
  depends_on = [aws_s3_bucket_public_access_block.checkpoints]
}
