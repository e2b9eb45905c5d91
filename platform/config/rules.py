"""The rules for names and URIs, and how a rejected value is shown: one place each.

Names become file names, MLflow names and Terraform keys, so a rule must match
the whole string: `re.fullmatch`, never `match` with `$`, which also accepts a
trailing newline. URIs are checked for what the code that opens them needs
(an S3 URI names a bucket), so a typo fails the dry-run instead of the job.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from platform.config.limits import MAX_TEXT


@dataclass(frozen=True)
class NameRule:
    """A name pattern, matched whole, and how messages describe it."""

    pattern: re.Pattern
    what: str

    def problem(self, value: str) -> str | None:
        """Why `value` breaks the rule (or holds '..', a path step), or None."""
        if self.pattern.fullmatch(value) and ".." not in value:
            return None
        return f"{describe(value)} must be {self.what}, starting with a letter or digit, without '..'"


# Job names: the job's checkpoints, MLflow run and Terraform state are keyed by them.
JOB_NAME = NameRule(re.compile(r"[a-z0-9][a-z0-9._-]{0,62}"),
                    "1-63 lowercase letters, digits, '.', '_' or '-'")
# Other identifiers (data sources, model names and aliases, Ray job ids): case allowed.
LABEL = NameRule(re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"),
                 "1-128 letters, digits, '.', '_' or '-'")
# An S3 bucket name (AWS's rules for new buckets).
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SHOWN = 60   # characters of a rejected value that a message repeats


def describe(value: object) -> str:
    """`value` as a message shows it: repr without URL passwords, cut to a readable length.

    Never call it on a secret (schema.SECRET_KEYS): say what is wrong without the value."""
    text = repr(value)
    if "@" in text and "://" in text:
        from platform.tracking.store import strip_credentials

        text = strip_credentials(text)
    return text if len(text) <= _SHOWN else text[:_SHOWN - 3] + "..."


def text_problem(value: str) -> str | None:
    """Why a config string cannot be used at all (too long, control characters), or None.
    The message does not repeat the value: it may be a secret."""
    if len(value) > MAX_TEXT:
        return f"is {len(value)} characters long; the limit is {MAX_TEXT}"
    if _CONTROL.search(value):
        return "contains a control character (a newline, tab, ...): remove it"
    return None


def name_problem(value: str, rule: NameRule = LABEL) -> str | None:
    """Why `value` is not a name under `rule`, or None."""
    return rule.problem(value)


def uri_problem(value: str, schemes: tuple[str, ...] | None) -> str | None:
    """Why `value`, a local path or a `scheme://...` URI, is not usable, or None.

    `schemes` lists the URI schemes the consumer opens (None: any, (): none);
    s3://, http(s):// and file:// URIs are checked for what they must name
    whatever the list. A value without '://' is a local path, not checked here.
    """
    if "://" not in value:
        return None
    scheme = value.split("://", 1)[0].lower()
    if schemes is not None and scheme not in schemes:
        allowed = f"one of {', '.join(schemes)}" if schemes else "a local path"
        return f"{describe(value)}: the scheme {describe(scheme)} is not supported here; use {allowed}"
    if scheme == "s3":
        return _s3_problem(value)
    if scheme in ("http", "https"):
        return _http_problem(value)
    if scheme == "file" and urlsplit(value).netloc not in ("", "localhost"):
        return f"{describe(value)} names a host: file URIs name a local path (file:///abs/path)"
    return None


def _s3_problem(value: str) -> str | None:
    bucket, _, key = value[len("s3://"):].partition("/")
    if not bucket:
        return f"{describe(value)} names no bucket: write s3://bucket/prefix"
    if not _BUCKET.fullmatch(bucket) or ".." in bucket:
        return (f"{describe(value)}: {describe(bucket)} is not an S3 bucket name (3-63 lowercase "
                "letters, digits, '.' and '-', starting and ending with a letter or digit)")
    if "//" in key or any(part in (".", "..") for part in key.split("/")):
        return f"{describe(value)}: the prefix must be a plain a/b/c path"
    return None


def _http_problem(value: str) -> str | None:
    try:
        parts = urlsplit(value)
        parts.port   # raises on a port that is not a number or out of range
    except ValueError as exc:
        return f"{describe(value)} is not a valid URL: {exc}"
    if not parts.hostname:
        return f"{describe(value)} names no host: write {parts.scheme}://host[:port]"
    return None
