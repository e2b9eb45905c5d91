"""Keep secrets out of everything written to MLflow.

`platform.config.to_dict` already masks the schema's secret fields. MLflow
data is shared and permanent, so anything bound for it is also scrubbed of
the secret *values* wherever they appear (a key pasted into a URL, a tag, an
event detail) and of passwords in `scheme://user:password@host` URLs.
"""

from __future__ import annotations

from typing import Any, Iterable

from platform.config import JobConfig, to_dict
from platform.config.schema import SECRET_KEYS
from platform.tracking.store import strip_credentials

MASK = "***"
# Shorter values would mask innocent substrings ("1", "on") all over the config.
_MIN_SECRET_LEN = 4


def secret_values(cfg: JobConfig) -> frozenset[str]:
    """The configured values of the schema's secret fields."""
    tree = to_dict(cfg, redact=False)
    values = set()
    for key in SECRET_KEYS:
        node: Any = tree
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, str) and len(node) >= _MIN_SECRET_LEN:
            values.add(node)
    return frozenset(values)


class Redactor:
    """Scrubs known secret values and URL passwords from strings and nested data."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        # Longest first, so a secret containing another is masked whole.
        self._secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    @classmethod
    def for_job(cls, cfg: JobConfig) -> "Redactor":
        return cls(secret_values(cfg))

    def text(self, value: str) -> str:
        for secret in self._secrets:
            if secret in value:
                value = value.replace(secret, MASK)
        return strip_credentials(value)

    def data(self, value: Any) -> Any:
        """A copy of `value` (dicts, lists, scalars) with every string scrubbed."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {self.text(str(k)): self.data(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.data(v) for v in value]
        return value
