"""Bearer API keys: `Authorization: Bearer <serve.api_key>`, checked in constant time.

The key never reaches a replica: the driver hands replicas its SHA-256
digest, and a request's key is hashed and compared with `hmac.compare_digest`.
Deployment arguments end up in Serve's controller state and can surface in
its logs or dashboard; a digest there reveals nothing, and comparing
fixed-length digests leaks neither the key's content nor its length.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Optional

from platform.serving.errors import unauthorized

# Where conf/serve/default.yaml reads serve.api_key from; launch keeps it out of Ray's processes.
API_KEY_ENV = "DBRX_SERVE_API_KEY"


def key_digest(api_key: Optional[str]) -> Optional[str]:
    """What replicas are given: the key's SHA-256 hex digest (None: no key required)."""
    return hashlib.sha256(api_key.encode()).hexdigest() if api_key else None


class ApiKeyCheck:
    """Checks the Authorization header of a request against one key digest."""

    def __init__(self, digest: Optional[str]):
        self._digest = bytes.fromhex(digest) if digest else None

    @property
    def required(self) -> bool:
        return self._digest is not None

    def __repr__(self) -> str:
        return f"ApiKeyCheck(required={self.required})"

    def check(self, authorization: Optional[str]) -> None:
        """Raise a 401 APIError unless `authorization` carries the key (no key configured: pass)."""
        if self._digest is None:
            return
        scheme, _, presented = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            raise unauthorized("You didn't provide an API key. You need to provide your API key in an "
                               "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).")
        candidate = hashlib.sha256(presented.strip().encode()).digest()
        if not hmac.compare_digest(candidate, self._digest):
            raise unauthorized("Incorrect API key provided.")
