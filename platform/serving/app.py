"""The Ray Serve application: OpenAI's HTTP API over a DBRX model, with continuous batching.

Routes (FastAPI ingress):
    GET  /health                 liveness + the version being served (no key needed)
    GET  /v1/models              the served model
    GET  /v1/models/{id}
    POST /v1/completions         prompt(s) -> text; `stream: true` for SSE
    POST /v1/chat/completions    messages (ChatML, platform.serving.chat) -> reply; SSE too
    OPTIONS (each of these)      CORS preflight, for the origins in serve.allowed_origins

Every request passes `_guard` first: its Host and Origin (platform.serving.origin:
what a web page may do), the API key, and a JSON content type on POST.

Every response from the model carries `x-model-version` (the registry version,
or step-<N> for a checkpoint path) and `system_fingerprint` says the same.
Requests are validated completely before they are queued, so one bad request
can only ever fail itself: a batch holds valid requests only.

Batching: each replica runs a `Scheduler` (platform.serving.engine) in a
thread of its own, and requests join and leave its running batch at every
decoding step (iteration-level scheduling): a request starts decoding at the
next step after it arrives and frees its slot as soon as it finishes, stops on
a stop sequence, or its client goes away. Each request's stream receives its
tokens as they are produced. A replica holds at most
serve.max_concurrent_sequences sequences (fewer if serve.max_kv_cache_mb says
so); a request that finds no free slot gets 429 at once, in OpenAI's shape.
"""

# No `from __future__ import annotations` here: Serve's class-based ingress rewrites the route
# methods' signatures, and FastAPI must see real classes (Request) in them, not strings.
import asyncio
import logging
import time
import uuid
from typing import AsyncIterator, Awaitable, Callable, Optional, Sequence

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from platform.serving import chat
from platform.serving.auth import ApiKeyCheck
from platform.serving.engine import GenerationRequest, SamplingParams, Scheduler, TokenEvent, engine_slots
from platform.serving.errors import (
    SERVER_ERROR, APIError, from_validation, invalid, model_not_found, too_many_requests,
)
from platform.serving.loader import AliasWatcher, LoadedModel, ModelLoader, ServerSettings
from platform.serving.openai_schema import (
    AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest,
    ChatDelta, Completion, CompletionChoice, CompletionRequest, ModelCard, ModelList, Usage,
)
from platform.serving.origin import require_json
from platform.serving.streaming import DONE, EventStream, merge, sse
from platform.serving.text import TextStream

log = logging.getLogger("platform.serving")

VERSION_HEADER = "x-model-version"
MAX_BODY_BYTES = 4 * 1024 * 1024

api = FastAPI(title="dbrx-platform OpenAI-compatible API", docs_url=None, redoc_url=None, openapi_url=None)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Unknown routes and wrong methods answer in OpenAI's error shape too."""
    if exc.status_code == 404:
        error = APIError(404, f"Unknown request URL: {request.method} {request.url.path}.",
                         code="unknown_url")
    elif exc.status_code == 405:
        error = APIError(405, f"Method {request.method} is not allowed for {request.url.path}.",
                         code="method_not_allowed")
    else:
        error = APIError(exc.status_code, str(exc.detail))
    return JSONResponse(error.body(), status_code=error.status, headers=getattr(exc, "headers", None))


def _json(payload: BaseModel, loaded: LoadedModel) -> Response:
    return Response(payload.model_dump_json(), media_type="application/json",
                    headers={VERSION_HEADER: loaded.version})


async def _read_body(request: Request) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise APIError(413, f"Request body is larger than {MAX_BODY_BYTES} bytes.", code="request_too_large")
    body = await request.body()
    if len(body) > MAX_BODY_BYTES:
        raise APIError(413, f"Request body is larger than {MAX_BODY_BYTES} bytes.", code="request_too_large")
    return body


def _parse(schema: type[BaseModel], body: bytes):
    try:
        return schema.model_validate_json(body)
    except ValidationError as exc:
        raise from_validation(exc) from None


def _fingerprint(loaded: LoadedModel) -> str:
    return f"{loaded.model_id}-v{loaded.version}"


def _usage(gens: Sequence[GenerationRequest], results: Sequence[tuple[str, int, str]]) -> Usage:
    prompt = sum(len(g.prompt_ids) for g in gens)
    completion = sum(n for _, n, _ in results)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


# Serve serializes the decorated class when it is defined: everything its methods use from this
# module must be defined above this point.
@serve.deployment(name="OpenAIServer")
@serve.ingress(api)
class OpenAIServer:
    def __init__(self, settings: ServerSettings):
        self.settings = settings
        self.auth = ApiKeyCheck(settings.api_key_digest)
        self._watcher: Optional[AliasWatcher] = None
        self.scheduler: Optional[Scheduler] = None
        self.shards = None          # platform.serving.shards.ShardGroup: ranks 1.. of a multi-device replica
        try:
            self.loader = ModelLoader(settings)
            make_engine = None
            if settings.devices_per_replica > 1:
                from platform.serving.shards import ShardGroup, ShardedLoader

                self.shards = ShardGroup.start(settings)
                self.loader = ShardedLoader(settings, self.shards)
                make_engine = self.shards.engine
            self._model: LoadedModel = self.loader.load()
            slots = engine_slots(self._model.model, self._context(self._model), settings.max_concurrent_sequences,
                                 settings.max_kv_cache_mb * 2**20 if settings.max_kv_cache_mb else None)
            self.scheduler = Scheduler(slots, self._context, make_engine).start(self._model)
            if settings.source.follows_alias:
                self._watcher = AliasWatcher(self.loader, lambda: self._model, self._install,
                                             settings.alias_poll_s).start()
        except BaseException:
            self.shutdown()
            raise
        log.info("serving %s version %s (%s)", self._model.model_id, self._model.version,
                 settings.source.describe())

    def _install(self, loaded: LoadedModel) -> None:
        self._model = loaded   # one reference swap: requests keep the model that admitted them
        self.scheduler.set_current(loaded)

    def _context(self, loaded: LoadedModel) -> int:
        """Positions a request may use (prompt + completion): the model's, or serve.max_context_tokens."""
        cap = self.settings.max_context_tokens
        return min(loaded.max_seq_len, cap) if cap else loaded.max_seq_len

    def shutdown(self) -> None:
        """Stop the threads, then the shard processes of a multi-device replica (idempotent)."""
        if getattr(self, "_watcher", None) is not None:
            self._watcher.stop()
        if getattr(self, "scheduler", None) is not None:
            self.scheduler.stop(timeout=30 if getattr(self, "shards", None) is not None else None)
        if getattr(self, "shards", None) is not None:
            self.shards.shutdown()

    def __del__(self) -> None:
        self.shutdown()

    def check_health(self) -> None:
        """Serve's replica health check: a replica whose alias watcher or scheduler stopped, or
        whose shards fell out of lock step, is replaced."""
        if self._watcher is not None and not self._watcher.alive:
            raise RuntimeError("the alias watcher thread stopped")
        if not self.scheduler.alive:
            raise RuntimeError("the scheduler thread stopped")
        if self.shards is not None and not self.shards.alive:
            raise RuntimeError(f"a shard of this replica failed: {self.shards.failed}")

    # ------------------------------------------------------------------ routes

    @api.get("/health")
    async def health(self, request: Request) -> Response:
        async def ok(_: Request) -> Response:
            loaded = self._model
            return JSONResponse({"status": "ok", "model": loaded.model_id, "version": loaded.version},
                                headers={VERSION_HEADER: loaded.version})
        return await self._guard(request, ok, authenticate=False)

    @api.get("/v1/models")
    async def list_models(self, request: Request) -> Response:
        return await self._guard(request, self._list_models)

    @api.get("/v1/models/{model_id:path}")
    async def get_model(self, request: Request, model_id: str) -> Response:
        async def one(_: Request) -> Response:
            loaded = self._model
            self._check_model(model_id, loaded)
            return _json(ModelCard(id=loaded.model_id, created=loaded.created), loaded)
        return await self._guard(request, one)

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._guard(request, self._completions)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._guard(request, self._chat_completions)

    @api.options("/health")
    @api.options("/v1/models")
    @api.options("/v1/models/{model_id:path}")
    @api.options("/v1/completions")
    @api.options("/v1/chat/completions")
    async def preflight(self, request: Request) -> Response:
        """CORS preflight: a page of an allowed origin asks before it sends JSON or a key."""
        async def answer(_: Request) -> Response:
            origin = request.headers.get("origin")
            if origin is None or "access-control-request-method" not in request.headers:
                raise APIError(405, f"Method OPTIONS is not allowed for {request.url.path} outside a CORS "
                                    "preflight.", code="method_not_allowed")
            return Response(status_code=204, headers=self.settings.origins.preflight_headers(
                request.headers.get("access-control-request-headers")))
        return await self._guard(request, answer, authenticate=False)

    async def _guard(self, request: Request, handler: Callable[[Request], Awaitable[Response]], *,
                     authenticate: bool = True) -> Response:
        """Check the Host, the Origin, the key and a POST's content type, then run `handler`. Every
        failure becomes an OpenAI-style error; a page of an allowed origin may read every answer."""
        origins, origin = self.settings.origins, request.headers.get("origin")
        cors: dict[str, str] = {}
        try:
            origins.check_host(request.headers.get("host"))
            origins.check_origin(origin)
            cors = origins.cors_headers(origin)
            if authenticate:
                self.auth.check(request.headers.get("authorization"))
            if request.method == "POST":
                require_json(request.headers.get("content-type"))
            response = await handler(request)
        except APIError as exc:
            response = JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)
        except Exception:
            log.exception("request %s %s failed", request.method, request.url.path)
            error = APIError(500, "The server had an error while processing your request.", type=SERVER_ERROR)
            response = JSONResponse(error.body(), status_code=500)
        response.headers.update(cors)
        return response

    # ------------------------------------------------------------------ handlers

    async def _list_models(self, request: Request) -> Response:
        loaded = self._model
        return _json(ModelList(data=[ModelCard(id=loaded.model_id, created=loaded.created)]), loaded)

    async def _completions(self, request: Request) -> Response:
        req: CompletionRequest = _parse(CompletionRequest, await _read_body(request))
        req.unsupported()
        loaded = self._model
        self._check_model(req.model, loaded)
        prompts = self._completion_prompts(req.prompt, loaded)
        explicit = "max_tokens" in req.model_fields_set
        stops = req.stop_sequences()
        gens = [GenerationRequest(p, self._sampling(req, len(p), loaded, req.max_tokens, "max_tokens", "prompt",
                                                    clamp=not explicit,
                                                    stop_ids=frozenset({loaded.tokenizer.eos_id})), loaded)
                for p in prompts]
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        queues = self._submit(gens)
        if req.stream:
            usage = req.stream_options is not None and req.stream_options.include_usage
            return self._stream(self._completion_events(gens, queues, stops, rid, created, usage), loaded)
        results = await self._collect_all(gens, queues, stops)
        choices = [CompletionChoice(index=i, text=text, finish_reason=reason)
                   for i, (text, _, reason) in enumerate(results)]
        return _json(Completion(id=rid, created=created, model=loaded.model_id, choices=choices,
                                usage=_usage(gens, results), system_fingerprint=_fingerprint(loaded)), loaded)

    async def _chat_completions(self, request: Request) -> Response:
        req: ChatCompletionRequest = _parse(ChatCompletionRequest, await _read_body(request))
        req.unsupported()
        loaded = self._model
        self._check_model(req.model, loaded)
        prompt = chat.render_ids(req.messages, loaded.tokenizer)
        requested, param = req.requested_max_tokens()
        gen = GenerationRequest(prompt, self._sampling(req, len(prompt), loaded, requested, param, "messages",
                                                       clamp=requested is None,
                                                       stop_ids=chat.stop_token_ids(loaded.tokenizer)), loaded)
        stops = req.stop_sequences()
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        [queue] = self._submit([gen])
        if req.stream:
            usage = req.stream_options is not None and req.stream_options.include_usage
            return self._stream(self._chat_events(gen, queue, stops, rid, created, usage), loaded)
        results = await self._collect_all([gen], [queue], stops)
        text, _, reason = results[0]
        return _json(ChatCompletion(
            id=rid, created=created, model=loaded.model_id,
            choices=[ChatChoice(index=0, message=AssistantMessage(content=text), finish_reason=reason)],
            usage=_usage([gen], results), system_fingerprint=_fingerprint(loaded)), loaded)

    # ------------------------------------------------------------------ validation

    def _check_model(self, name: str, loaded: LoadedModel) -> None:
        if name != loaded.model_id:
            raise model_not_found(name, loaded.model_id)

    def _completion_prompts(self, prompt, loaded: LoadedModel) -> list[list[int]]:
        tok = loaded.tokenizer
        if isinstance(prompt, str):
            prompts = [prompt]
        elif not prompt:
            raise invalid("Invalid value for 'prompt': the prompt must not be empty.", param="prompt",
                          code="invalid_value")
        elif isinstance(prompt[0], int):
            prompts = [prompt]
        else:
            prompts = list(prompt)
        if len(prompts) > self.settings.max_concurrent_sequences:
            raise invalid(f"Invalid value for 'prompt': at most {self.settings.max_concurrent_sequences} prompts per "
                          f"request, got {len(prompts)}.", param="prompt", code="invalid_value")
        out = []
        for p in prompts:
            if isinstance(p, str):
                # An empty prompt starts from <|endoftext|>, the document separator the model trained on.
                out.append(tok.encode(p) or [tok.eos_id])
                continue
            if not p:
                raise invalid("Invalid value for 'prompt': token arrays must not be empty.", param="prompt",
                              code="invalid_value")
            bad = next((t for t in p if not 0 <= t < tok.vocab_size), None)
            if bad is not None:
                raise invalid(f"Invalid value for 'prompt': token id {bad} is outside the vocabulary "
                              f"[0, {tok.vocab_size}).", param="prompt", code="invalid_value")
            out.append(list(p))
        return out

    def _sampling(self, req, prompt_len: int, loaded: LoadedModel, requested: Optional[int], param: str,
                  prompt_param: str, *, clamp: bool, stop_ids: frozenset[int]) -> SamplingParams:
        """Sampling parameters, after checking max_tokens against the limit and the context."""
        limit, context = self.settings.max_tokens_limit, self._context(loaded)
        room = context - prompt_len
        if room < 1:
            raise invalid(f"This model's maximum context length is {context} tokens. However, your "
                          f"{prompt_param} has {prompt_len} tokens. Please shorten it.", param=prompt_param,
                          code="context_length_exceeded")
        if requested is None or clamp:
            max_tokens = min(limit, room, requested if requested is not None else limit)
        elif not 1 <= requested <= limit:
            raise invalid(f"Invalid value for '{param}': must be between 1 and {limit}, got {requested}.",
                          param=param, code="invalid_value")
        elif prompt_len + requested > context:
            raise invalid(f"This model's maximum context length is {context} tokens. However, you requested "
                          f"{prompt_len + requested} tokens ({prompt_len} in the {prompt_param}, {requested} "
                          f"for the completion). Please reduce the {prompt_param} or {param}.",
                          param=param, code="context_length_exceeded")
        else:
            max_tokens = requested
        if max_tokens < 1:
            raise invalid(f"Invalid value for '{param}': must be at least 1.", param=param, code="invalid_value")
        return SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                              seed=req.seed, stop_token_ids=stop_ids)

    # ------------------------------------------------------------------ generation

    def _submit(self, gens: list[GenerationRequest]) -> list[asyncio.Queue]:
        """Hand `gens` to the scheduler, all or none: 429 when the replica has no slot for them.

        Each returned queue receives its request's TokenEvents (or the exception that failed it).
        Submitting here, before any response starts, keeps the count exact: a request holds its
        slot until it finishes or its consumer (`_tokens`) lets go of it.
        """
        if len(gens) > self.scheduler.slots:
            raise invalid(f"Invalid value for 'prompt': this server decodes at most {self.scheduler.slots} "
                          f"sequences at once, got {len(gens)} prompts.", param="prompt", code="invalid_value")
        if not self.scheduler.reserve(len(gens)):
            raise too_many_requests(self.scheduler.slots)
        loop = asyncio.get_running_loop()
        queues: list[asyncio.Queue] = []
        for gen in gens:
            queue: asyncio.Queue = asyncio.Queue()
            self.scheduler.submit(gen, lambda event, q=queue: loop.call_soon_threadsafe(q.put_nowait, event))
            queues.append(queue)
        return queues

    async def _tokens(self, gen: GenerationRequest, queue: asyncio.Queue,
                      stops: Sequence[str]) -> AsyncIterator[tuple[str, int, Optional[str]]]:
        """(text delta, tokens so far, finish reason or None) for one request, ending with its finish.

        Leaving early (a stop sequence matched, the client went away) cancels the
        request: the scheduler frees its slot at its next step.
        """
        text = TextStream(gen.model.tokenizer, stops)
        produced, reason = 0, "length"
        try:
            while True:
                event = await queue.get()
                if isinstance(event, BaseException):
                    raise event
                assert isinstance(event, TokenEvent)
                if event.token is not None:
                    produced += 1
                    delta = text.push(event.token)
                    if text.stopped:
                        gen.cancel()
                        reason = "stop"
                        yield delta, produced, None
                        break
                    if delta:
                        yield delta, produced, None
                if event.finish_reason is not None:
                    reason = event.finish_reason
                    break
            yield text.finish(), produced, reason
        finally:
            gen.cancel()

    async def _collect_all(self, gens: list[GenerationRequest], queues: list[asyncio.Queue],
                           stops: Sequence[str]) -> list[tuple[str, int, str]]:
        async def collect(gen: GenerationRequest, queue: asyncio.Queue) -> tuple[str, int, str]:
            parts, produced, reason = [], 0, "length"
            async for delta, produced, finish in self._tokens(gen, queue, stops):
                parts.append(delta)
                reason = finish or reason
            return "".join(parts), produced, reason

        try:
            return await asyncio.gather(*(collect(g, q) for g, q in zip(gens, queues)))
        finally:
            for g in gens:
                g.cancel()

    # ------------------------------------------------------------------ streaming

    def _stream(self, events: AsyncIterator[str], loaded: LoadedModel) -> EventStream:
        async def body() -> AsyncIterator[str]:
            try:
                async for event in events:
                    yield event
            except Exception:
                log.exception("streamed generation failed")
                yield sse(APIError(500, "The server had an error while generating.", type=SERVER_ERROR).body())
                return
            yield DONE

        return EventStream(body(), headers={VERSION_HEADER: loaded.version, "Cache-Control": "no-cache"})

    async def _completion_events(self, gens: list[GenerationRequest], queues: list[asyncio.Queue],
                                 stops: Sequence[str], rid: str, created: int,
                                 include_usage: bool) -> AsyncIterator[str]:
        loaded = gens[0].model
        produced = [0] * len(gens)
        try:
            async for i, (delta, n, reason) in merge([self._tokens(g, q, stops) for g, q in zip(gens, queues)]):
                produced[i] = n
                if delta or reason:
                    yield sse(Completion(id=rid, created=created, model=loaded.model_id,
                                         system_fingerprint=_fingerprint(loaded),
                                         choices=[CompletionChoice(index=i, text=delta, finish_reason=reason)]))
            if include_usage:
                yield sse(Completion(id=rid, created=created, model=loaded.model_id, choices=[],
                                     usage=_usage(gens, [("", n, "") for n in produced]),
                                     system_fingerprint=_fingerprint(loaded)))
        finally:
            for g in gens:
                g.cancel()

    async def _chat_events(self, gen: GenerationRequest, queue: asyncio.Queue, stops: Sequence[str], rid: str,
                           created: int, include_usage: bool) -> AsyncIterator[str]:
        loaded = gen.model

        def chunk(delta: ChatDelta, reason: Optional[str] = None) -> str:
            return sse(ChatCompletionChunk(id=rid, created=created, model=loaded.model_id,
                                           system_fingerprint=_fingerprint(loaded),
                                           choices=[ChatChunkChoice(index=0, delta=delta, finish_reason=reason)]))

        produced = 0
        try:
            yield chunk(ChatDelta(role="assistant", content=""))
            async for delta, produced, reason in self._tokens(gen, queue, stops):
                if delta:
                    yield chunk(ChatDelta(content=delta))
                if reason:
                    yield chunk(ChatDelta(), reason)
            if include_usage:
                yield sse(ChatCompletionChunk(id=rid, created=created, model=loaded.model_id, choices=[],
                                              usage=_usage([gen], [("", produced, "")]),
                                              system_fingerprint=_fingerprint(loaded)))
        finally:
            gen.cancel()
