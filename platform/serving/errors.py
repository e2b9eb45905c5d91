"""OpenAI-style API errors: `{"error": {"message", "type", "param", "code"}}` with a 4xx/5xx.

Clients written against the OpenAI API (the official SDKs, LangChain, ...)
parse this shape to raise their own typed errors, so every failure the
server returns, including ones FastAPI or Starlette would answer themselves
(unknown route, wrong method), goes through `APIError`.
"""

from __future__ import annotations

from typing import Any, Optional

from pydantic import ValidationError

INVALID_REQUEST = "invalid_request_error"
AUTHENTICATION = "authentication_error"
NOT_FOUND = "not_found_error"
SERVER_ERROR = "server_error"


class APIError(Exception):
    """An error response; raise it anywhere in a request handler."""

    def __init__(self, status: int, message: str, *, type: str = INVALID_REQUEST,
                 param: Optional[str] = None, code: Optional[str] = None,
                 headers: Optional[dict[str, str]] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(message: str, param: Optional[str] = None, code: Optional[str] = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def unauthorized(message: str) -> APIError:
    return APIError(401, message, type=INVALID_REQUEST, code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"})


def model_not_found(model: str, available: str) -> APIError:
    return APIError(404, f"The model `{model}` does not exist; this server serves `{available}`.",
                    param="model", code="model_not_found")


def too_many_requests(slots: int) -> APIError:
    """The replica's sequence slots are all taken: OpenAI's rate-limit shape, which clients retry."""
    return APIError(429, f"The server is at capacity ({slots} sequences decoding); retry shortly.",
                     type="requests", code="rate_limit_exceeded", headers={"Retry-After": "1"})


# What each field accepts, for type errors on fields that take several shapes.
_SHAPES = {
    "prompt": "a string, an array of strings, an array of token ids or an array of arrays of token ids",
    "stop": "a string or an array of up to 4 strings",
    "content": "a string or an array of text parts",
}


def _param(loc: tuple) -> str:
    """OpenAI's spelling of a parameter path: messages[0].content."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("str", "int", "float", "bool") or "[" in part:
            break   # pydantic's tag for a member of a union (str, list[int], ...), not a field
        else:
            out += f".{part}" if out else part
    return out


def from_validation(exc: ValidationError) -> APIError:
    """The first problem of a pydantic validation error, as OpenAI would word it."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    kind = first["type"]
    if kind == "json_invalid":
        return invalid("We could not parse the JSON body of your request. (HINT: This likely means you "
                       "aren't using your HTTP library correctly. The OpenAI API expects a JSON payload.)")
    if kind == "model_type" and not first["loc"]:
        return invalid("The request body must be a JSON object.")
    param = _param(tuple(first["loc"]))
    leaf = param.rsplit(".", 1)[-1].split("[")[0]
    if kind == "missing":
        return invalid(f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")
    if leaf in _SHAPES and len(errors) > 1 and all(_param(tuple(e["loc"])).startswith(param) for e in errors):
        return invalid(f"Invalid type for '{param}': expected {_SHAPES[leaf]}.", param=param,
                       code="invalid_type")
    message = first["msg"]
    if kind.endswith("_type") or kind in ("literal_error", "enum"):
        return invalid(f"Invalid value for '{param}': {message}.", param=param, code="invalid_type")
    return invalid(f"Invalid value for '{param}': {message}.", param=param, code="invalid_value")
