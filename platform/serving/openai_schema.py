"""The OpenAI HTTP API's request and response bodies (the subset this server speaks).

Requests are parsed with pydantic in strict mode from the raw JSON: a string
where a number belongs, a float where an integer belongs, NaN, or a value out
of range is a 400, as it is at OpenAI; unknown fields are ignored, as
clients send newer fields freely. `null` for an optional parameter means its
documented default, as at OpenAI, whose SDKs send null for unset parameters
(`"max_tokens": null` is 16 tokens for a completion, not the server's limit).
Parameters this server cannot honour (n > 1, logprobs, penalties, tools, ...)
are refused by `unsupported()` with a message naming them, rather than
silently ignored.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator

from platform.serving.errors import APIError, invalid

MAX_STOP_SEQUENCES = 4
# torch.Generator.manual_seed accepts this range.
SEED_MIN, SEED_MAX = -(2 ** 63), 2 ** 64 - 1


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        """Drop `null` optional parameters, so each takes its default (and counts as not sent);
        a required one stays null and is refused."""
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        return {k: v for k, v in data.items() if v is not None or (k in fields and fields[k].is_required())}


class StreamOptions(_Strict):
    include_usage: bool = False


class _Generation(_Strict):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str = Field(min_length=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, ge=0.0, le=1.0)
    n: int = 1
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = Field(None, ge=SEED_MIN, le=SEED_MAX)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: Optional[dict[str, float]] = None
    user: Optional[str] = None

    def stop_sequences(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise invalid(f"Invalid value for 'stop': at most {MAX_STOP_SEQUENCES} sequences, got {len(stops)}.",
                          param="stop", code="invalid_value")
        if any(s == "" for s in stops):
            raise invalid("Invalid value for 'stop': stop sequences must not be empty.", param="stop",
                          code="invalid_value")
        return stops

    def unsupported(self) -> None:
        """Refuse parameters this server does not implement (400 naming the parameter)."""
        if self.n != 1:
            raise _unsupported("n", "only n=1 is supported; send separate requests")
        if self.presence_penalty or self.frequency_penalty:
            raise _unsupported("presence_penalty" if self.presence_penalty else "frequency_penalty",
                               "penalties are not supported; omit them or send 0")
        if self.logit_bias:
            raise _unsupported("logit_bias", "logit_bias is not supported")
        if self.stream_options is not None and not self.stream:
            raise invalid("The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                          param="stream_options", code="invalid_value")


def _unsupported(param: str, why: str) -> APIError:
    return invalid(f"Unsupported value for '{param}': {why}.", param=param, code="unsupported_value")


PromptType = Union[str, list[str], list[int], list[list[int]]]


class CompletionRequest(_Generation):
    prompt: PromptType
    max_tokens: int = 16
    echo: bool = False
    logprobs: Optional[int] = None
    best_of: Optional[int] = None
    suffix: Optional[str] = None

    def unsupported(self) -> None:
        super().unsupported()
        if self.echo:
            raise _unsupported("echo", "echo is not supported")
        if self.logprobs is not None:
            raise _unsupported("logprobs", "logprobs are not supported")
        if self.best_of not in (None, 1):
            raise _unsupported("best_of", "only best_of=1 is supported")
        if self.suffix:
            raise _unsupported("suffix", "suffix (insertion) is not supported")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart]]
    name: Optional[str] = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[int] = None
    max_completion_tokens: Optional[int] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None
    tools: Optional[list[Any]] = None
    tool_choice: Optional[Any] = None
    response_format: Optional[dict[str, Any]] = None

    def requested_max_tokens(self) -> tuple[Optional[int], str]:
        """(value, parameter name): max_completion_tokens wins over the older max_tokens."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"

    def unsupported(self) -> None:
        super().unsupported()
        if self.logprobs or self.top_logprobs:
            raise _unsupported("logprobs", "logprobs are not supported")
        if self.tools:
            raise _unsupported("tools", "tool calling is not supported")
        if self.tool_choice not in (None, "none"):
            raise _unsupported("tool_choice", "tool calling is not supported")
        if self.response_format not in (None, {"type": "text"}):
            raise _unsupported("response_format", "only {\"type\": \"text\"} is supported")


# ----------------------------------------------------------------------------- responses


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Optional[Literal["stop", "length"]]
    logprobs: None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Optional[Usage] = None
    system_fingerprint: Optional[str] = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: Optional[str] = None


class ChatDelta(BaseModel):
    """Only the fields a chunk carries are sent (the first has the role, the last is empty)."""

    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None

    @model_serializer(mode="wrap")
    def _present_fields_only(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    finish_reason: Optional[Literal["stop", "length"]] = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Optional[Usage] = None
    system_fingerprint: Optional[str] = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "dbrx-platform"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
