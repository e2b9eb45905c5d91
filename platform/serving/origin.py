"""Requests from web browsers: the `Host` and `Origin` checks, CORS, and the JSON content type.

A server on loopback without a key still answers every web page its user has
open. A page may POST JSON labelled `text/plain` without asking first (a CORS
"simple" request), and DNS rebinding (the page's own host name re-pointed at
127.0.0.1) makes the browser treat the server as the page's origin, so the
page reads the answers as well. Three checks close both:

- `Host` must name this server: loopback names on the bound port, the bound
  address (any IP address on the bound port for a 0.0.0.0/:: bind), plus
  `serve.allowed_hosts`. A rebound name is none of these.
- A request carrying `Origin` (browsers send it on every cross-origin request)
  is refused unless the origin is in `serve.allowed_origins`; those get CORS
  headers, and their preflight `OPTIONS` is answered.
- A POST body must be `application/json`: a page cannot send that cross-origin
  without a preflight, which only allowed origins pass.

SDKs, curl and load balancers send no `Origin`, name the host they connect to
and send JSON, so none of this changes anything for them.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Iterable, Optional
from urllib.parse import urlsplit

from platform.serving.errors import APIError

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
WILDCARD_BINDS = ("0.0.0.0", "::", "")
ANY = "*"
HTTP_PORT = 80
PREFLIGHT_MAX_AGE_S = 600
ALLOWED_METHODS = "GET, POST, OPTIONS"
EXPOSED_HEADERS = "x-model-version"

_NAME = re.compile(r"[a-z0-9_]([a-z0-9_.-]*[a-z0-9_])?")
_SHOWN = 100   # characters of a refused header value repeated in the error


@dataclass(frozen=True)
class OriginPolicy:
    """Which `Host` and `Origin` values the server answers; built on the driver, checked in replicas."""

    hosts: frozenset[tuple[str, Optional[int]]]   # (name, port); port None: any port
    ip_port: Optional[int] = None                 # IP-address hosts allowed on this port (wildcard bind)
    any_host: bool = False
    origins: frozenset[str] = frozenset()
    any_origin: bool = False

    @classmethod
    def build(cls, bind_host: str, port: int, allowed_hosts: Iterable[str] = (),
              allowed_origins: Iterable[str] = ()) -> "OriginPolicy":
        """The policy for a server bound to `bind_host:port`; ValueError names each malformed entry."""
        hosts = {(name, port) for name in LOOPBACK_NAMES}
        wildcard = bind_host in WILDCARD_BINDS
        if not wildcard:
            hosts.add((bind_host.lower(), port))
        problems, origins = [], set()
        allowed_hosts, allowed_origins = list(allowed_hosts), list(allowed_origins)
        for entry in allowed_hosts:
            if entry != ANY:
                try:
                    hosts.add(split_host(entry))
                except ValueError:
                    problems.append(f"serve.allowed_hosts entry {entry[:_SHOWN]!r} is not a host name or "
                                    "address with an optional :port (or '*')")
        for entry in allowed_origins:
            if entry != ANY:
                try:
                    origins.add(normalize_origin(entry))
                except ValueError:
                    problems.append(f"serve.allowed_origins entry {entry[:_SHOWN]!r} is not an origin "
                                    "like https://app.example.com or http://localhost:3000 (or '*')")
        if problems:
            raise ValueError("; ".join(problems))
        return cls(frozenset(hosts), ip_port=port if wildcard else None, any_host=ANY in allowed_hosts,
                   origins=frozenset(origins), any_origin=ANY in allowed_origins)

    # ------------------------------------------------------------------ Host

    def allows_host(self, host: Optional[str]) -> bool:
        if self.any_host:
            return True
        try:
            name, port = split_host(host or "")
        except ValueError:
            return False
        port = HTTP_PORT if port is None else port
        if (name, port) in self.hosts or (name, None) in self.hosts:
            return True
        return port == self.ip_port and _is_ip(name)

    def check_host(self, host: Optional[str]) -> None:
        if not self.allows_host(host):
            raise APIError(403, f"Host {_shown(host)} is not allowed: this server answers its own address and "
                                "loopback names on its port; add other names to serve.allowed_hosts.",
                           code="host_not_allowed")

    # ------------------------------------------------------------------ Origin and CORS

    def allows_origin(self, origin: str) -> bool:
        if self.any_origin:
            return True
        try:
            return normalize_origin(origin) in self.origins
        except ValueError:
            return False

    def check_origin(self, origin: Optional[str]) -> None:
        """No Origin (not a browser, or a same-origin GET) passes; a browser's origin must be allowed."""
        if origin is not None and not self.allows_origin(origin):
            raise APIError(403, f"Cross-origin requests from {_shown(origin)} are not allowed; add the origin "
                                "to serve.allowed_origins to let its pages call this server.",
                           code="origin_not_allowed")

    def cors_headers(self, origin: Optional[str]) -> dict[str, str]:
        """Headers that let an allowed origin's page read a response (none without Origin)."""
        if origin is None or not self.allows_origin(origin):
            return {}
        return {"Access-Control-Allow-Origin": origin, "Access-Control-Expose-Headers": EXPOSED_HEADERS,
                "Vary": "Origin"}

    @staticmethod
    def preflight_headers(requested_headers: Optional[str]) -> dict[str, str]:
        """What an allowed origin's preflight gets besides `cors_headers`: the methods, the headers
        it asked for (its SDK's own among them), and how long the browser may cache the answer."""
        headers = {"Access-Control-Allow-Methods": ALLOWED_METHODS,
                   "Access-Control-Max-Age": str(PREFLIGHT_MAX_AGE_S)}
        if requested_headers:
            headers["Access-Control-Allow-Headers"] = requested_headers
        return headers


def require_json(content_type: Optional[str]) -> None:
    """POST bodies must be application/json (parameters such as charset allowed): 415 otherwise."""
    media_type = (content_type or "").split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        got = f"got {_shown(content_type)}" if content_type else "none was given"
        raise APIError(415, f"The request body must be sent with 'Content-Type: application/json'; {got}.",
                       code="unsupported_media_type")


def split_host(value: str) -> tuple[str, Optional[int]]:
    """`name`, `name:port`, `[v6]:port` or an address -> (lowercase name, port or None); ValueError otherwise."""
    value = value.strip().lower()
    if _is_ip(value):
        return value, None
    if value.startswith("["):
        name, bracket, rest = value[1:].partition("]")
        if not bracket or not _is_ip(name) or (rest and not rest.startswith(":")):
            raise ValueError(value)
        port = rest[1:] if rest else None
    else:
        name, colon, port = value.partition(":")
        if not colon:
            port = None
        if not _NAME.fullmatch(name):
            raise ValueError(value)
    if port is None:
        return name, None
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(value)
    return name, int(port)


def normalize_origin(value: str) -> str:
    """An origin as browsers send it: lowercase `scheme://host[:port]`, without the scheme's default port."""
    parts = urlsplit(value.strip())
    if parts.scheme.lower() not in ("http", "https") or parts.path or parts.query or parts.fragment \
            or parts.username or parts.password or not parts.hostname:
        raise ValueError(value)
    port = parts.port   # ValueError when it is not a port number
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    scheme = parts.scheme.lower()
    default = {"http": 80, "https": 443}[scheme]
    return f"{scheme}://{host}" + (f":{port}" if port not in (None, default) else "")


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def _shown(value: Optional[str]) -> str:
    if value is None:
        return "(none)"
    return repr(value if len(value) <= _SHOWN else value[:_SHOWN] + "...")
